"""The torch-free readers of an output root that ``check``, ``show``, ``stats`` and the loader share: the folder
layout (:func:`scan_layout`), a tar's members grouped by key in tar order (:func:`iter_tar_groups`) and one
member decoded with its modality's codec (:func:`decode_member`)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..schemas.modalities import IMAGE, ModalitySpec, find_modality
from . import manifest, storage

SHARD_RE = re.compile(r"^shard-(\d+)\.tar$")

# Extensions a third-party 4M output may use besides the registry's own (the contract allows them).
_ALTERNATE_EXTS = {IMAGE: ("jpg", "jpeg", "png")}
_ALTERNATE_NAME_EXTS = {"caption": ("json", "txt")}


# ============================================================================ layout


@dataclass
class Layout:
    """What an output root holds, from its folder layout alone."""

    root: str
    folders: dict[str, dict[str, str]]  # folder -> {file name: url} of the files directly in it
    stray: list[str] = field(default_factory=list)  # files outside modality folders (besides _modalmill/)

    def shard_urls(self, folder: str) -> dict[int, str]:
        """Shard number -> url of the well-named tars of ``folder``."""
        out = {}
        for name, url in self.folders.get(folder, {}).items():
            m = SHARD_RE.match(name)
            if m:
                out[int(m.group(1))] = url
        return out


def _relative(root: str, url: str) -> str:
    if storage.is_s3(root):
        return url[len(root.rstrip("/")) + 1:]
    return os.path.relpath(url, root).replace(os.sep, "/")


def scan_layout(root: str) -> Layout:
    """List ``root`` once and group its files by folder (``_modalmill/`` is left out)."""
    files = storage.list_files(root)
    folders: dict[str, dict[str, str]] = {}
    stray = []
    for url in files:
        rel = _relative(root, url)
        if rel.startswith(manifest.META_DIR + "/"):
            continue
        folder, name = posixpath.split(rel)
        if not folder:
            stray.append(rel)
            continue
        folders.setdefault(folder, {})[name] = url
    # a folder is a modality folder when it holds at least one tar
    for folder in [f for f, names in folders.items() if not any(n.endswith(".tar") for n in names)]:
        stray.extend(posixpath.join(folder, n) for n in folders.pop(folder))
    return Layout(root=root, folders=dict(sorted(folders.items())), stray=sorted(stray))


def spec_for_folder(folder: str) -> ModalitySpec | None:
    """The registry spec of a modality folder (an installed plugin's too); ``rgb@224``-style resolution aliases map
    to their base."""
    spec = find_modality(folder)
    if spec is not None:
        return spec
    base = folder.split("@", 1)[0]
    spec = find_modality(base) if base != folder else None
    return spec if spec is not None and spec.is_pixel_aligned else None


# ============================================================================ reading members


def accepted_exts(spec: ModalitySpec) -> tuple[str, ...]:
    """The member extensions a modality may use: the registry's, plus those the 4M contract also allows."""
    alts = _ALTERNATE_NAME_EXTS.get(spec.name) or _ALTERNATE_EXTS.get(spec.kind) or ()
    return tuple(dict.fromkeys((spec.ext, *alts)))


def decode_member(spec: ModalitySpec, ext: str, data: bytes) -> Any:
    """Decode one member with its modality's codec (or, for the alternatives the contract allows, PIL/UTF-8)."""
    if ext == spec.ext:
        return spec.decode(data)
    if spec.kind == IMAGE and ext in _ALTERNATE_EXTS[IMAGE]:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    if spec.name == "caption" and ext == "txt":
        return data.decode("utf-8")
    if spec.name == "caption" and ext == "json":
        return json.loads(data)
    raise ValueError(f"unexpected member extension .{ext} (expected .{spec.ext})")


def split_member(name: str) -> tuple[str, str]:
    """4M's (webdataset's) reading of a member name: the key is the path up to the first dot of the base name."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(dirname, stem) if dirname else stem), ext.lower()


class _HashingReader(io.RawIOBase):
    """Pass-through reader that hashes and counts every byte read."""

    def __init__(self, f):
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
            self.nbytes += n
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def iter_tar_groups(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of consecutive members sharing a key, in tar order (webdataset's grouping).

    Streams through :func:`storage.open_read` (local or ``s3://``); a corrupt or truncated tar raises OSError
    naming the url.
    """
    current: tuple[str, dict[str, bytes]] | None = None
    try:
        with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member(info.name)
                if current is None or current[0] != key:
                    if current is not None:
                        yield current
                    current = (key, {})
                fobj = tar.extractfile(info)
                current[1][ext] = fobj.read() if fobj is not None else b""
    except (FileNotFoundError, PermissionError):
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise OSError(f"{url}: corrupt or truncated tar: {e}") from None
    if current is not None:
        yield current
