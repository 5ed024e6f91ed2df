"""modalmill: raw image corpora in, aligned 4M-style multimodal token datasets out."""

__version__ = "0.1.0"
