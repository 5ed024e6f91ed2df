"""A labeler's default weights: what is known of them (:class:`Pin`, checked by :func:`modalmill.io.fetch.resolve`
when they are fetched) and where ``modalmill weights fetch --to PREFIX`` stages them for offline workers."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..io import storage

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Pin:
    """What is known of a labeler's default weights, checked when they are fetched.

    ``sha256`` is of the file the location names (an https:// file, the tarball of a ``#member`` location) or, for
    a hub id, of ``file`` in the snapshot; None when no published hash could be found (``note`` says so: the file is
    then used as downloaded and its sha256 recorded in the cache). ``size`` in bytes when known; ``source`` says
    where the hash comes from.
    """

    sha256: str | None = None
    size: int | None = None
    file: str | None = None  # hub ids: the snapshot file whose sha256 is pinned (e.g. model.safetensors)
    source: str = ""  # where the hash was taken from
    note: str = ""  # e.g. why there is no hash

    def __post_init__(self):
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise ValueError(f"a pinned sha256 is 64 lowercase hex digits, got {self.sha256!r}")


def mirror_location(prefix: str, labeler: str) -> str:
    """Where ``modalmill weights fetch --to PREFIX`` stages a labeler's default weights: ``PREFIX/<labeler>``."""
    return storage.join(prefix, labeler) if storage.is_s3(prefix) else os.path.join(os.path.expanduser(prefix),
                                                                                     labeler)
