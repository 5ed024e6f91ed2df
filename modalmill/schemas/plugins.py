"""Import the plugins of the ``modalmill.labelers`` entry-point group, once per process.

Importing a plugin registers its modalities, labelers and token modalities, so every lookup that misses
(:func:`modalmill.schemas.modalities.get_modality`, the labeler registry, the tokenizer registry, a class a Ray
worker unpickles by name) calls :func:`load_plugins` and looks again: a plugin installed with pip is known in every
process modalmill starts (the CLI, the Python API, shard tasks, labeler actors, Ray Train workers) without any
set-up by the user. This module only imports the entry points; :func:`modalmill.labelers.load_entry_points` also
registers the Labeler classes they name.
"""

from __future__ import annotations

import threading
from typing import Any

GROUP = "modalmill.labelers"

_LOADED: list[Any] = []  # what each entry point gave, in entry-point order
_STATE = {"done": False, "complete": False}
_LOCK = threading.RLock()


def load_plugins() -> list[Any]:
    """Import every entry point of the group (once; later calls return the same objects). A plugin whose import
    fails raises here, naming the entry point."""
    if _STATE["done"]:
        return _LOADED
    with _LOCK:
        if _STATE["done"]:
            return _LOADED
        _STATE["done"] = True  # set first: a lookup made while a plugin imports must not recurse
        from importlib.metadata import entry_points

        for ep in entry_points(group=GROUP):
            try:
                _LOADED.append(ep.load())
            except Exception as e:  # noqa: BLE001 - one line naming the plugin, not a traceback deep inside it
                raise ImportError(f"modalmill plugin {ep.name!r} ({ep.value}, entry point group {GROUP!r}) "
                                  f"failed to import: {type(e).__name__}: {e}") from e
        _STATE["complete"] = True
    return _LOADED


def plugins_loaded() -> bool:
    """Whether :func:`load_plugins` has started in this process (it may still be importing one)."""
    return _STATE["done"]


def plugins_complete() -> bool:
    """Whether every entry point has been imported."""
    return _STATE["complete"]
