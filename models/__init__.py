"""dfpipe.models"""
