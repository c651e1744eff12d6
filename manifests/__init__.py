"""dfpipe.manifests"""
