"""The trainer-side reader: a modalmill (or any 4M-layout) output as a PyTorch ``IterableDataset``."""

from .loader import AlignmentError, ModalDataset, load_dataset, to_torch
from .transforms import FourMCrops, collate

__all__ = ["AlignmentError", "FourMCrops", "ModalDataset", "collate", "load_dataset", "to_torch"]
