"""saectl: sparse autoencoders for language models as a content-addressed pipeline."""

__version__ = "0.1.0"
