"""Readers: webdataset tar shards (local or s3://), image folders and parquet files, streamed sample by sample.

The shard is the unit of work: :func:`plan_sources` turns an input spec into an ordered list of
:class:`ShardSource` (input shard i becomes output shard i), and :func:`iter_samples` streams one
source as :class:`RawSample` records, never holding more than one sample's bytes in memory. Problems
with a single sample (unsafe or duplicate key, truncated member) come back as a sample whose ``error`` is
set; a tar that is cut short yields the samples before the cut and then a :class:`ShardTruncated` marker.

Every kind of input gives a sample the same members, so everything downstream is the same: the image under
its extension, the text under the job's text member (``txt``), the source metadata as ``json``.

- **tar**: the members of the sample (webdataset / img2dataset layout: ``KEY.jpg``, ``KEY.txt``, ``KEY.json``).
- **folder**: each image file, plus the files next to it with the same stem and the text member's extension
  or ``.json`` (img2dataset's folder layout: ``00000/000000001.jpg``, ``000000001.txt``, ``000000001.json``).
- **parquet** (a pattern whose files end in ``.parquet``): one sample per row. The image column holds the bytes
  (binary) or Hugging Face's ``{"bytes": ..., "path": ...}`` struct; the optional text column (string or binary)
  becomes the text member; every other column that is not binary becomes a field of the ``json`` member. Keys
  come from the optional id column (dots become ``_``, as 4M cuts keys at the first dot), else
  ``<file stem>_<row in file, 9 digits>``. Files are read with pyarrow one row group at a time (never a whole
  file); only the footer is read when planning.

Shard boundaries of parquet input (so a rerun maps the same rows to the same output shard): the pattern's files
in sorted order, each cut into consecutive chunks of ``shard_size`` rows (row ``r`` of a file is in its chunk
``r // shard_size``; the last chunk of a file may be shorter; a shard never spans two files). Output shard
numbers count these chunks in that order, and a shard's source is ``FILE#rows=START-END`` (END inclusive),
recorded in its marker: a rerun with another ``shard_size`` or other files is refused instead of mixing rows.
"""

from __future__ import annotations

import json
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
class ParquetColumns:
    """Which columns of a parquet corpus hold what (the job's ``parquet:`` section)."""

    image_column: str = "image"
    text_column: str | None = None
    id_column: str | None = None

    def __post_init__(self):
        for name in ("image_column", "text_column", "id_column"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{name} must be a column name, got {v!r}")
        if self.image_column in (self.text_column, self.id_column):
            raise ValueError(f"image_column {self.image_column!r} is also the text or id column")


@dataclass(frozen=True)
class ShardSource:
    index: int  # output shard number
    url: str  # the input tar, or a description of a folder chunk / parquet row range
    kind: str  # "tar", "folder" or "parquet"
    files: tuple[str, ...] = ()  # folder chunks: the image files, in order; parquet: the one file
    root: str = ""  # folder chunks: the folder the keys are relative to
    rows: tuple[int, int] = (0, 0)  # parquet: rows [start, stop) of the file
    columns: ParquetColumns = ParquetColumns()  # parquet: which column is what
    text_member: str = "txt"  # folder sidecars and parquet text: the member name text goes under

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


def plan_sources(inputs: str | list[str], shard_size: int = 1000, parquet: ParquetColumns = ParquetColumns(),
                 text_member: str = "txt", check: bool = False) -> list[ShardSource]:
    """Expand the input spec(s) into ordered shard sources.

    Each input is a tar shard pattern (``shard-{00000..00009}.tar``, globs, ``s3://...``), a parquet pattern
    (its files end in ``.parquet``) or a local image folder. Folders are split into chunks of ``shard_size``
    images in sorted path order; parquet files into chunks of ``shard_size`` rows (see the module docstring).
    ``check``: every file a pattern names must exist (FileNotFoundError naming the missing ones; one listing per
    folder or S3 prefix, see :func:`modalmill.io.storage.expand`), so a wrong input fails before anything starts.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    out: list[dict] = []
    for spec in inputs:
        if not storage.is_s3(spec) and os.path.isdir(spec):
            files = _list_images(spec)
            if not files:
                raise FileNotFoundError(f"{spec}: no image files ({', '.join(IMAGE_EXTS)}) in this folder")
            for start in range(0, len(files), shard_size):
                chunk = tuple(files[start:start + shard_size])
                out.append(dict(url=f"{spec}#{start}-{start + len(chunk) - 1}", kind="folder", files=chunk,
                                root=spec))
        else:
            expanded = storage.expand(spec, check=check)
            if not expanded:
                raise FileNotFoundError(f"{spec}: no input shards match")
            if all(u.lower().endswith(".parquet") for u in expanded):
                for u in expanded:
                    n = _parquet_rows(u, parquet)
                    for start in range(0, n, shard_size):
                        stop = min(n, start + shard_size)
                        out.append(dict(url=f"{u}#rows={start}-{stop - 1}", kind="parquet", files=(u,),
                                        rows=(start, stop), columns=parquet))
            elif any(u.lower().endswith(".parquet") for u in expanded):
                raise ValueError(f"{spec}: matches both parquet files and other files; give one kind per pattern")
            else:
                out.extend(dict(url=u, kind="tar") for u in expanded)
    return [ShardSource(index=i, text_member=text_member, **d) for i, d in enumerate(out)]


def _parquet_rows(url: str, columns: ParquetColumns) -> int:
    """The row count of a parquet file (its footer only); checks that the named columns exist."""
    import pyarrow.parquet as pq

    try:
        with storage.open_read(url) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            n = pf.metadata.num_rows
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a file that is not parquet
        raise ValueError(f"{url}: not a readable parquet file ({type(e).__name__}: {e})") from None
    for what, col in (("image", columns.image_column), ("text", columns.text_column), ("id", columns.id_column)):
        if col is not None and col not in names:
            raise ValueError(f"{url}: no {what} column {col!r} (its columns: {', '.join(names)})")
    return n


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
    elif source.kind == "parquet":
        yield from _iter_parquet(source)
    else:
        yield from iter_tar(source.url)


def _iter_folder(source: ShardSource) -> Iterator[RawSample]:
    for pos, path in enumerate(source.files):
        key = folder_key(source.root, path)
        ext = path.rsplit(".", 1)[-1].lower()
        sample = RawSample(key=key, position=pos)
        stem = path.rsplit(".", 1)[0]
        try:
            with open(path, "rb") as f:
                sample.members[ext] = f.read()
            for side in (source.text_member, "json"):  # img2dataset's folder layout: KEY.txt, KEY.json beside it
                if os.path.isfile(f"{stem}.{side}"):
                    with open(f"{stem}.{side}", "rb") as f:
                        sample.members[side] = f.read()
        except OSError as e:
            sample.error = f"cannot read {path}: {e.strerror or e}"
        yield sample


PARQUET_BATCH_ROWS = 64  # rows per record batch read from a row group


def _iter_parquet(source: ShardSource) -> Iterator[RawSample]:
    """Rows ``source.rows`` of one parquet file as samples, reading only the row groups that hold them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    url, (start, stop), cols = source.files[0], source.rows, source.columns
    stem = posixpath.basename(url).rsplit(".", 1)[0].replace(".", "_")
    seen: set[str] = set()
    with storage.open_read(url) as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        skip = {cols.image_column, cols.text_column, cols.id_column}
        meta_cols = [fld.name for fld in schema
                     if fld.name not in skip and not (pa.types.is_binary(fld.type) or pa.types.is_large_binary(fld.type)
                                                       or pa.types.is_fixed_size_binary(fld.type))]
        meta_cols += [c for c in (cols.text_column, cols.id_column) if c is not None and c not in meta_cols
                      and not pa.types.is_binary(schema.field(c).type)]
        read_cols = list(dict.fromkeys([cols.image_column] + [c for c in (cols.text_column, cols.id_column) if c]
                                       + meta_cols))
        first = 0  # first row of the current row group
        for rg in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if first + n <= start:
                first += n
                continue
            if first >= stop:
                break
            row = first
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[rg], columns=read_cols,
                                         use_threads=False):
                data = batch.to_pydict()
                for i in range(batch.num_rows):
                    r = row + i
                    if r < start or r >= stop:
                        continue
                    yield _parquet_sample(data, i, r, r - start, stem, cols, meta_cols, source.text_member, seen)
                row += batch.num_rows
            first += n


def _parquet_sample(data: dict, i: int, row: int, pos: int, stem: str, cols: ParquetColumns, meta_cols: list[str],
                    text_member: str, seen: set[str]) -> RawSample:
    where = f"parquet row {row}"
    if cols.id_column is not None:
        ident = data[cols.id_column][i]
        key = "" if ident is None else str(ident).replace(".", "_")
    else:
        key = f"{stem}_{row:09d}"
    sample = RawSample(key=key, position=pos)
    if cols.id_column is not None and data[cols.id_column][i] is None:
        sample.error = f"{where}: id column {cols.id_column!r} is null"
    image = data[cols.image_column][i]
    ext = ""
    if isinstance(image, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
        path = image.get("path") or ""
        tail = path.rsplit(".", 1)[-1].lower() if "." in path else ""
        ext = tail if tail in IMAGE_EXTS else ""
        image = image.get("bytes")
    if isinstance(image, (bytes, bytearray)) and image:
        sample.members[ext] = bytes(image)
    elif sample.error is None:
        sample.error = (f"{where}: image column {cols.image_column!r} holds no image bytes "
                        f"({'null' if image is None else type(image).__name__})")
    if cols.text_column is not None:
        text = data[cols.text_column][i]
        if isinstance(text, str):
            sample.members[text_member] = text.encode("utf-8")
        elif isinstance(text, (bytes, bytearray)):
            sample.members[text_member] = bytes(text)  # decoded strictly later: bad bytes are that sample's error
    meta = {c: data[c][i] for c in meta_cols}
    if meta:
        sample.members["json"] = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                            default=str).encode("utf-8")
    if sample.error is None:
        problem = key_problem(key)
        if problem:
            sample.error = f"{where}: unusable key {key!r}: {problem}"
        elif key in seen:
            sample.error = f"{where}: duplicate key {key!r} in this shard (an earlier row has the same id)"
    seen.add(key)
    return sample


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
