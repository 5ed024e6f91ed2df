"""The local side of :mod:`modalmill.io.storage`: plain paths and ``file://`` URLs, atomic writes by rename,
listings that never show a write in progress.

Callers use :mod:`modalmill.io.storage`, which dispatches here for every URL that is not ``s3://``.

* **Atomic writes.** :func:`atomic_write` writes ``.<name>.tmp-<uuid>`` in the target's directory, flushes and
  fsyncs it and ``os.replace``-s it onto the final name on success; on any exception the temporary file is
  removed. A half-written file is never seen under its final name.
* **Errors name the file.** An ``OSError`` raised while writing (``ENOSPC`` from a ``write()``, for instance,
  carries no file name) names the path being written (:class:`PathNamingWriter`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

_FILE_SCHEME = "file://"

#: Buffer of the writers (local files and S3 spool files).
WRITE_BUFFER_SIZE = 1024 * 1024

#: Our own temporary files: ".<name>.tmp-<32 hex digits>"; never listed.
TMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")


def is_file_url(url: str) -> bool:
    return url[:7].lower() == _FILE_SCHEME


def local_path(url: str) -> str:
    """The filesystem path of a local URL: plain paths pass through; ``file:///a/b`` and
    ``file://localhost/a/b`` become ``/a/b``. File URLs are taken literally (no percent-decoding), so that
    :func:`modalmill.io.storage.join` on a ``file://`` root round-trips any file name."""
    if not is_file_url(url):
        return url
    rest = url[7:]
    if rest.lower().startswith("localhost/"):
        rest = rest[9:]
    if rest and not rest.startswith("/"):
        raise ValueError(f"{url}: only local file:// URLs (file:///path) are supported")
    return rest


def list_files(prefix: str, suffix: str = "") -> list[str]:
    """Files below the directory ``prefix`` (recursively) whose names end with ``suffix``, sorted, in the style
    of ``prefix`` (a ``file://`` prefix gives ``file://`` URLs); none for a missing directory."""
    root = local_path(prefix)
    scheme = prefix[:7] if is_file_url(prefix) else ""
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if name.endswith(suffix) and not TMP_NAME.match(name):
                out.append(scheme + os.path.join(dirpath, name))
    return sorted(out)


def glob_files(pattern: str) -> list[str]:
    """The files (not directories) matching the glob ``pattern`` (``**`` recurses), in the style of ``pattern``."""
    scheme = pattern[:7] if is_file_url(pattern) else ""
    return [scheme + p for p in glob.glob(local_path(pattern), recursive=True) if not os.path.isdir(p)]


# ============================================================================ writing


def with_path(exc: OSError, path: str) -> OSError:
    """``exc`` if it already names a file, else an equivalent OSError naming ``path``
    (a write() hitting ENOSPC, for instance, carries no file name)."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), path)  # OSError() picks the errno's subclass


class PathNamingWriter(io.BufferedWriter):
    """A BufferedWriter whose OSErrors name ``label`` (the final path or URL being written)."""

    def __init__(self, raw: io.RawIOBase, label: str):
        super().__init__(raw, buffer_size=WRITE_BUFFER_SIZE)
        self._label = label

    def write(self, data: Any) -> int:
        try:
            return super().write(data)
        except OSError as e:
            new = with_path(e, self._label)
            if new is e:
                raise
            raise new from e

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            new = with_path(e, self._label)
            if new is e:
                raise
            raise new from e


@contextlib.contextmanager
def atomic_write(url: str) -> Iterator[BinaryIO]:
    """Write ``.<name>.tmp-<uuid>`` next to the target (creating parent directories), then flush, fsync and
    ``os.replace``; on any exception the temporary file is removed and the exception propagates."""
    path = local_path(url)
    directory, name = os.path.split(os.path.abspath(path))
    if not name:
        raise IsADirectoryError(errno.EISDIR, "cannot write to a directory path", path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        raw = io.FileIO(tmp, "xb")  # mode 0o666 & ~umask, like open()
    except OSError as e:  # name the file the caller asked for; the temporary name is a detail
        raise OSError(e.errno, f"{e.strerror} (creating the temporary file {tmp})", path) from None
    f = PathNamingWriter(raw, path)
    try:
        yield cast(BinaryIO, f)
        f.flush()
        try:
            os.fsync(f.fileno())
        except OSError as e:
            raise with_path(e, path) from e
        f.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()  # may fail again (ENOSPC while flushing the rest): the first error is the one to see
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make a rename durable (best effort: not every filesystem supports fsync on a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(url: str, missing_ok: bool = True) -> None:
    """Delete the file at ``url``; a missing one is fine unless ``missing_ok`` is False."""
    try:
        os.remove(local_path(url))
    except FileNotFoundError:
        if not missing_ok:
            raise
