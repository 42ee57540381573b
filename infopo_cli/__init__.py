"""infopo: align a language model with preference data (InfoPO and relatives) on one GPU."""

__version__ = "0.1.0"
