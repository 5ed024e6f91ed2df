"""Readers: webdataset tar shards (local or s3://) and plain image folders, streamed sample by sample.

The shard is the unit of work: :func:`plan_sources` turns an input spec into an ordered list of
:class:`ShardSource` (input shard i becomes output shard i), and :func:`iter_samples` streams one
source as :class:`RawSample` records, never holding more than one sample's bytes in memory. Problems
with a single sample (unsafe or duplicate key, truncated member) come back as a sample whose ``error`` is
set; a tar that is cut short yields the samples before the cut and then a :class:`ShardTruncated` marker.
"""

from __future__ import annotations

import os
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from . import storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "jpe", "ppm", "pgm")
_KEY_OK = re.compile(r"^[^\x00-\x1f\\]+$")


@dataclass(frozen=True)
class ShardSource:
    index: int  # output shard number
    url: str  # the input tar, or a description of a folder chunk
    kind: str  # "tar" or "folder"
    files: tuple[str, ...] = ()  # folder chunks: the image files, in order
    root: str = ""  # folder chunks: the folder the keys are relative to

    @property
    def name(self) -> str:
        return shard_name(self.index)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    position: int = 0  # position of the sample in its source
    error: str | None = None  # a read problem that makes this sample fail


@dataclass
class ShardTruncated:
    """The source ended early; samples before the cut have been yielded."""

    reason: str


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the base name."""
    dirname, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(dirname, stem) if dirname else stem), ext.lower()


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a sample key of the output, or None when it can."""
    if not key:
        return "empty key"
    if not _KEY_OK.match(key):
        return "key contains control characters or backslashes"
    if key.startswith("/") or re.match(r"^[A-Za-z]:", key):
        return "absolute path in member name"
    if ".." in key.split("/") or "." in key.split("/"):
        return "'..' or '.' path component in member name"
    if len(key.encode()) > 200:
        return "key longer than 200 bytes"
    return None


# ---------------------------------------------------------------------- planning


def plan_sources(inputs: str | list[str], shard_size: int = 1000) -> list[ShardSource]:
    """Expand the input spec(s) into ordered shard sources.

    Each input is a tar shard pattern (``shard-{00000..00009}.tar``, globs, ``s3://...``) or a local image
    folder. Folders are split into chunks of ``shard_size`` images in sorted path order.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    urls: list[tuple[str, str, tuple[str, ...], str]] = []
    for spec in inputs:
        if not storage.is_s3(spec) and os.path.isdir(spec):
            files = _list_images(spec)
            if not files:
                raise FileNotFoundError(f"{spec}: no image files ({', '.join(IMAGE_EXTS)}) in this folder")
            for start in range(0, len(files), shard_size):
                chunk = tuple(files[start:start + shard_size])
                urls.append((f"{spec}#{start}-{start + len(chunk) - 1}", "folder", chunk, spec))
        else:
            expanded = storage.expand(spec)
            if not expanded:
                raise FileNotFoundError(f"{spec}: no input shards match")
            urls.extend((u, "tar", (), "") for u in expanded)
    return [ShardSource(index=i, url=u, kind=k, files=f, root=r) for i, (u, k, f, r) in enumerate(urls)]


def _list_images(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith("."):
                continue
            if fn.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in fn:
                out.append(os.path.join(dirpath, fn))
    return sorted(out)


def folder_key(root: str, path: str) -> str:
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    stem = rel.rsplit(".", 1)[0]
    return stem.replace(".", "_")


# ---------------------------------------------------------------------- streaming


def iter_samples(source: ShardSource) -> Iterator[RawSample | ShardTruncated]:
    if source.kind == "folder":
        yield from _iter_folder(source)
    else:
        yield from iter_tar(source.url)


def _iter_folder(source: ShardSource) -> Iterator[RawSample]:
    for pos, path in enumerate(source.files):
        key = folder_key(source.root, path)
        ext = path.rsplit(".", 1)[-1].lower()
        sample = RawSample(key=key, position=pos)
        try:
            with open(path, "rb") as f:
                sample.members[ext] = f.read()
        except OSError as e:
            sample.error = f"cannot read {path}: {e.strerror or e}"
        yield sample


def iter_tar(url: str) -> Iterator[RawSample | ShardTruncated]:
    """Stream a tar shard, grouping consecutive members by key (webdataset's layout)."""
    seen: set[str] = set()
    current: RawSample | None = None
    pos = 0

    def finish(sample: RawSample) -> RawSample:
        if sample.error is None:
            problem = key_problem(sample.key)
            if problem:
                sample.error = f"unsafe key: {problem}"
            elif sample.key in seen:
                sample.error = "duplicate key in shard (an earlier sample has the same key)"
        seen.add(sample.key)
        return sample

    try:
        with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                key, ext = split_member_name(info.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield finish(current)
                    current = RawSample(key=key, position=pos)
                    pos += 1
                if not info.isfile():
                    if not info.isdir():
                        current.error = current.error or f"member {info.name!r} is not a regular file"
                    continue
                if ext in current.members:
                    current.error = current.error or f"member {info.name!r} appears twice"
                    continue
                fobj = tar.extractfile(info)
                current.members[ext] = fobj.read() if fobj is not None else b""
    except (tarfile.TarError, EOFError) as e:
        # the tar itself is cut short or corrupt: keep what came before. Storage errors (OSError: connection
        # lost for good, permission, missing object) are not caught: they fail the shard, and a rerun retries it.
        if current is not None:
            current.error = current.error or f"truncated shard: member data cut off ({e})"
            yield finish(current)
            current = None
        yield ShardTruncated(f"truncated or corrupt tar after {pos} sample(s): {e}")
        return
    if current is not None:
        yield finish(current)


def pick_image_member(members: dict[str, bytes]) -> tuple[str, bytes] | None:
    """The sample's image member: the first known image extension, else a lone extension-less member."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return ext, members[ext]
    if "" in members:
        return "", members[""]
    return None


def zip_output(out: str, shard: str, modalities: list[str]):
    """Iterate several of a shard's output tars in lockstep: yields (key, {modality: bytes})."""
    iters = {m: iter_tar(storage.join(out, m, f"{shard}.tar")) for m in modalities}
    while True:
        batch = {m: next(it, None) for m, it in iters.items()}
        present = {m: s for m, s in batch.items() if s is not None}
        if not present:
            return
        if len(present) != len(batch):
            raise RuntimeError(f"{shard}: modalities {sorted(set(batch) - set(present))} end early; "
                               f"run `modalmill check {out}`")
        for m, s in present.items():
            if isinstance(s, ShardTruncated) or s.error:
                raise RuntimeError(f"{shard}/{m}: {getattr(s, 'reason', None) or s.error}")
        ks = {s.key for s in present.values()}
        if len(ks) != 1:
            raise RuntimeError(f"{shard}: keys diverge across modalities ({sorted(ks)}); run `modalmill check {out}`")
        key = ks.pop()
        yield key, {m: next(iter(s.members.values())) for m, s in present.items()}
