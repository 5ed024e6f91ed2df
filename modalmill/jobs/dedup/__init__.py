"""``modalmill dedup``: exact, perceptual and semantic duplicates of an output's samples (see :mod:`.run`)."""

from .run import METHODS, DedupConfig, dedup_url, read_dedup, run_dedup

__all__ = ["METHODS", "DedupConfig", "dedup_url", "read_dedup", "run_dedup"]
