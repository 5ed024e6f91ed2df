"""``modalmill weights``: every labeler's default weights (source, licence, size, sha256, cached or not), and
``modalmill weights fetch`` to download them once and stage them where workers without internet read them.

Staged layout: ``PREFIX/<labeler>/<files>`` (a local folder or an ``s3://`` prefix) plus
``PREFIX/<labeler>/.modalmill-weights.json`` (source, licence, the sha256 and size of every staged file). A job
then names ``weights_from: PREFIX`` (or ``MODALMILL_WEIGHTS_FROM=PREFIX`` is set where jobs are started), and
every model labeler without a ``weights`` setting of its own reads ``PREFIX/<labeler>``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..io import storage
from ..labelers.base import LABELERS, get_labeler, load_entry_points
from ..io.fetch import WeightsError, cached, is_http, is_hub_id, resolve, split_member
from ..io.hashes import verified_sha256
from ..labelers.pins import Pin, mirror_location

MANIFEST = ".modalmill-weights.json"


@dataclass
class WeightsRow:
    labeler: str
    source: str
    licence: str
    kind: str  # https | hub | s3 | local | bundled
    sha256: str | None  # pinned sha256 (None: not pinned)
    pinned_file: str | None  # hub ids: the snapshot file the sha256 is of
    size: int | None  # bytes: pinned, else of the cached copy
    cached: str | None  # local path when cached; None when not; "bundled" for weights inside a package
    note: str = ""
    pin_source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _kind(location: str) -> str:
    base, _ = split_member(location)
    if is_http(base):
        return "https"
    if storage.is_s3(base):
        return "s3"
    if os.path.exists(os.path.expanduser(base)):
        return "local"
    if is_hub_id(base):
        return "hub"
    return "bundled"


def _size_of(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs if not f.startswith("."))


def downloadable(cls) -> bool:
    return bool(getattr(cls, "weights", None)) and _kind(cls.weights) != "bundled"


def table() -> list[WeightsRow]:
    """One row per registered labeler that has default weights (model-free labelers have none)."""
    load_entry_points()
    rows = []
    for name, cls in sorted(LABELERS.items()):
        location = getattr(cls, "weights", None)
        if not location:
            continue
        pin: Pin = getattr(cls, "weights_pin", None) or Pin()
        kind = _kind(location)
        here = "bundled" if kind == "bundled" else cached(location, pin)
        size = pin.size if pin.size is not None else (_size_of(here) if here and here != "bundled" else None)
        rows.append(WeightsRow(labeler=name, source=location, licence=cls.license, kind=kind, sha256=pin.sha256,
                               pinned_file=pin.file if kind == "hub" else None, size=size, cached=here,
                               note=pin.note, pin_source=pin.source))
    return rows


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ---------------------------------------------------------------------- fetch / stage


@dataclass
class Staged:
    labeler: str
    local: str  # the verified copy in the weights cache (or the bundled/local path)
    staged: str | None = None  # PREFIX/<labeler>, when staged
    files: list[dict] = field(default_factory=list)


def fetch(names: list[str] | None, to: str | None = None, *, echo=print) -> tuple[list[Staged], list[str]]:
    """Download (and verify) the default weights of ``names`` (default: every labeler whose default is
    downloadable) into the local weights cache; with ``to``, also copy them to ``to/<labeler>/``.
    Returns (what was done, one error line per labeler that failed); the others are done regardless."""
    load_entry_points()
    if names:
        classes = [get_labeler(n) for n in names]
        for cls in classes:
            if not downloadable(cls):
                raise WeightsError(f"labeler {cls.name!r} has no downloadable default weights "
                                   f"({cls.weights or 'model-free'})")
    else:
        classes = [c for _, c in sorted(LABELERS.items()) if downloadable(c)]
    done, errors = [], []
    for cls in classes:
        try:
            local = resolve(cls.weights, expected=f"{cls.architecture} weights for labeler {cls.name!r}",
                            how_to_get=cls.weights_help, pin=getattr(cls, "weights_pin", None))
            item = Staged(cls.name, local)
            if to:
                item.staged, item.files = _stage(cls, local, mirror_location(to, cls.name))
            echo(f"{cls.name}: {local}" + (f" -> {item.staged} ({len(item.files)} file(s), "
                                           f"{human_size(sum(f['size'] for f in item.files))})" if to else ""))
            done.append(item)
        except (WeightsError, OSError, ValueError) as e:
            errors.append(f"{cls.name}: {e}")
            echo(f"{cls.name}: FAILED: {e}")
    return done, errors


def _stage(cls, local: str, dest: str) -> tuple[str, list[dict]]:
    """Copy the file or folder ``local`` to ``dest/`` (folders: every file but hidden ones, symlinks followed), each
    file appearing whole or not at all, then the manifest with every file's sha256 and size."""
    if os.path.isfile(local):
        files = [(local, os.path.basename(local))]
    else:
        files = sorted((os.path.join(d, f), os.path.relpath(os.path.join(d, f), local))
                       for d, ds, fs in os.walk(local, followlinks=True) for f in fs
                       if not f.startswith(".") and not any(p.startswith(".") for p in
                                                            os.path.relpath(d, local).split(os.sep) if p != "."))
    if not files:
        raise WeightsError(f"{cls.name}: nothing to stage in {local}")
    listed = []
    for src, rel in files:
        target = storage.join(dest, *rel.split(os.sep))
        storage.upload_file(src, target)
        listed.append({"path": rel.replace(os.sep, "/"), "size": os.path.getsize(src),
                       "sha256": verified_sha256(src)})
    pin = getattr(cls, "weights_pin", None) or Pin()
    manifest = {"labeler": cls.name, "source": cls.weights, "licence": cls.license, "pinned_sha256": pin.sha256,
                "pinned_file": pin.file, "files": listed}
    storage.write_bytes(storage.join(dest, MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode())
    return dest, listed

