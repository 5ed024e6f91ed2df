"""Schemas: the modality registry, record validation and the manifest schema."""

from .modalities import (MODALITIES, METADATA_RANGES, TOKEN_MODALITIES, ModalitySpec, RecordError, find_modality,
                         get_modality, register_modality, token_dtype)

__all__ = ["MODALITIES", "METADATA_RANGES", "TOKEN_MODALITIES", "ModalitySpec", "RecordError", "find_modality",
           "get_modality", "register_modality", "token_dtype"]
