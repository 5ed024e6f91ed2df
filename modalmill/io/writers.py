"""Writers: deterministic tar shards written atomically, one per modality per shard.

Every member gets fixed metadata (mtime 0, uid/gid 0, mode 0644, no user names), so the same members in
the same order give a byte-identical tar. :class:`ShardWriterSet` writes all modality tars of one shard
from one key list: a sample is written to every tar or to none, which keeps 4M's key-order contract.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
from typing import Callable, Iterable, Iterator

from . import localfs, storage
from .readers import ShardTruncated, iter_tar


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _HashingWriter(io.RawIOBase):
    """Pass-through writer that counts and hashes what goes into the file."""

    def __init__(self, f):
        self.f, self.sha, self.md5, self.nbytes = f, hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0

    def writable(self):
        return True

    def write(self, b):
        self.sha.update(b)
        self.md5.update(b)
        self.nbytes += len(b)
        return self.f.write(b)


class TarShardWriter:
    """One tar, written to a temporary name and made visible only by :meth:`commit`."""

    def __init__(self, url: str):
        self.url = url
        self._stack = contextlib.ExitStack()
        raw = self._stack.enter_context(storage.atomic_write(url))
        self._hw = _HashingWriter(raw)
        self._tar = tarfile.open(fileobj=self._hw, mode="w|", format=tarfile.PAX_FORMAT)
        self.keys: list[str] = []
        self._closed = False

    def write(self, key: str, ext: str, data: bytes) -> None:
        self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        if not self.keys or self.keys[-1] != key:
            self.keys.append(key)

    def commit(self) -> dict:
        """Make the tar visible; returns its record for the shard's marker (see :mod:`modalmill.io.commit`):
        ``sha256``, ``md5`` and ``bytes`` of what was written, ``n`` samples, and locally the file's ``mtime_ns``."""
        self._tar.close()
        self._closed = True
        self._stack.close()  # rename / upload happens here
        record = {"sha256": self._hw.sha.hexdigest(), "md5": self._hw.md5.hexdigest(), "bytes": self._hw.nbytes,
                  "n": len(self.keys)}
        if not storage.is_s3(self.url):
            record["mtime_ns"] = os.stat(localfs.local_path(self.url)).st_mtime_ns
        return record

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._tar.close()
        except Exception:
            pass
        # leaving the atomic_write context through an exception discards the temporary file
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


class ShardWriterSet:
    """The tars of every modality being written for one shard."""

    def __init__(self, root: str, shard: str, modalities: dict[str, str]):
        """``modalities`` maps modality name to member extension."""
        self.exts = dict(modalities)
        self.writers: dict[str, TarShardWriter] = {}
        try:
            for m in self.exts:
                self.writers[m] = TarShardWriter(storage.join(root, m, f"{shard}.tar"))
        except BaseException:
            self.abort()
            raise

    def write_sample(self, key: str, payloads: dict[str, bytes]) -> None:
        missing = set(self.exts) - set(payloads)
        if missing:
            raise ValueError(f"sample {key!r} lacks {sorted(missing)}: every modality or none")
        for m, w in self.writers.items():
            w.write(key, self.exts[m], payloads[m])

    def commit(self, before: Callable[[str], None] | None = None) -> dict[str, dict]:
        """Make every tar visible, one after the other; ``before(modality)`` is called before each (a fence, which
        may raise: the tars not yet made visible are then discarded by :meth:`abort`)."""
        out = {}
        for m, w in self.writers.items():
            if before is not None:
                before(m)
            out[m] = w.commit()
        return out

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def iter_tar_members(url: str) -> Iterator[tuple[str, str, bytes]]:
    """(key, ext, bytes) of every member of one of our own tars, in order."""
    for sample in iter_tar(url):
        if isinstance(sample, ShardTruncated):
            raise OSError(f"{url}: {sample.reason}")
        if sample.error:
            raise OSError(f"{url}: sample {sample.key!r}: {sample.error}")
        for ext, data in sample.members.items():
            yield sample.key, ext, data


def filter_tar(url: str, keep: Iterable[str], before: Callable[[], None] | None = None) -> dict:
    """Rewrite one of our tars keeping only ``keep`` (in the tar's own order). Streams; atomic; ``before()`` is
    called just before the new tar replaces the old one."""
    keep = set(keep)
    w = TarShardWriter(url)
    try:
        for key, ext, data in iter_tar_members(url):
            if key in keep:
                w.write(key, ext, data)
        if before is not None:
            before()
        return w.commit()
    except BaseException:
        w.abort()
        raise


def tar_keys(url: str) -> list[str]:
    keys: list[str] = []
    for sample in iter_tar(url):
        if isinstance(sample, ShardTruncated):
            raise OSError(f"{url}: {sample.reason}")
        keys.append(sample.key)
    return keys
