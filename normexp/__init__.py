"""normexp: where and which normalization goes in a transformer."""

__version__ = "0.1.0"
