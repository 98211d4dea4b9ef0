"""sg-train: train and fine-tune landmark image-retrieval models (SuperGlobal + CFCD)."""

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    # ``sg_train.load_model`` is imported on first use (PEP 562): it pulls in torch, timm and
    # albumentations (~3 s), and every ``python -m sg_train.<tool>`` imports this package first.
    if name == "load_model":
        from sg_train.embedder import load_model

        return load_model
    raise AttributeError(f"module 'sg_train' has no attribute {name!r}")
