"""modalmill: raw image corpora in, aligned 4M-style multimodal token datasets out."""

__version__ = "0.1.0"

# Imported on first use (torch, webdataset), so that `import modalmill` stays light.
_LAZY = {"load_dataset": "modalmill.dataset", "ModalDataset": "modalmill.dataset", "FourMCrops": "modalmill.dataset",
         "collate": "modalmill.dataset"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'modalmill' has no attribute {name!r}")
