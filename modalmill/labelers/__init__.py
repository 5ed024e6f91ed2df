"""Labelers: one module per model family, all registered by name in :data:`LABELERS`."""

from .base import (LABELERS, LabelFailure, LabelInput, Labeler, Resources, get_labeler, labeler_for,
                   load_entry_points, register_labeler)
from . import modelfree  # noqa: F401  (registers the model-free labelers)

__all__ = ["LABELERS", "LabelFailure", "LabelInput", "Labeler", "Resources", "get_labeler", "labeler_for",
           "load_entry_points", "register_labeler"]
