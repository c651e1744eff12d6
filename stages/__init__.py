"""dfpipe.stages"""
