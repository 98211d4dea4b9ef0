"""sg-train: train and fine-tune landmark image-retrieval models (SuperGlobal + CFCD)."""

__version__ = "0.1.0"
