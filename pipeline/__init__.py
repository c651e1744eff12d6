"""dfpipe: deepfake-video detection pipeline (extract, align, train, score-video)."""

__version__ = "0.1.0"
