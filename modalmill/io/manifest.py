"""Manifests, completion markers and run records under ``OUT/_modalmill/``.

- ``shards/shard-NNNNN.json``: the completion marker and stats of a shard; written last and atomically, it
  is the commit point. It lists the shard's key order and, per modality, what produced the tar and the tar's
  size and digests; while a rewrite is under way it is a pending marker (the protocol: ``io.commit``).
- ``shards/shard-NNNNN.failed.json``: why the last attempt at a shard failed (removed once it is done).
- ``manifest/shard-NNNNN.parquet``: one row per sample read (see ``schemas.manifest_schema``).
- ``runs/<time>-<id>.json``: one summary per run of a job (its per-shard list in ``<time>-<id>.shards.parquet``
  when the run processed more than 1,000 shards).
- ``index/shards.parquet``: the shard index, a cache of what the markers and manifests say (see ``io.index``).
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow.parquet as pq

from ..schemas.manifest_schema import SampleRow, rows_to_table, table_to_rows
from . import storage

META_DIR = "_modalmill"


def meta_url(root: str, *parts: str) -> str:
    return storage.join(root, META_DIR, *parts)


def marker_url(root: str, shard: str) -> str:
    return meta_url(root, "shards", f"{shard}.json")


def failed_url(root: str, shard: str) -> str:
    return meta_url(root, "shards", f"{shard}.failed.json")


def manifest_url(root: str, shard: str) -> str:
    return meta_url(root, "manifest", f"{shard}.parquet")


def _read_json(url: str) -> Any | None:
    try:
        return json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        return None


def _write_json(url: str, obj: Any) -> None:
    storage.write_bytes(url, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_marker(root: str, shard: str) -> dict | None:
    return _read_json(marker_url(root, shard))


def write_marker(root: str, shard: str, marker: dict) -> None:
    _write_json(marker_url(root, shard), marker)


def write_failure(root: str, shard: str, failure: dict) -> None:
    _write_json(failed_url(root, shard), failure)


def clear_failure(root: str, shard: str) -> None:
    storage.remove(failed_url(root, shard), missing_ok=True)


# pyarrow's multi-threaded readers can abort the interpreter at exit on these machines ("terminate called
# without an active exception", seen with pyarrow 23-26); manifests are small, so read them on one thread.


def read_rows(root: str, shard: str) -> list[SampleRow]:
    try:
        data = storage.read_bytes(manifest_url(root, shard))
    except FileNotFoundError:
        return []
    return table_to_rows(pq.read_table(io.BytesIO(data), use_threads=False))


def write_rows(root: str, shard: str, rows: list[SampleRow]) -> None:
    buf = io.BytesIO()
    pq.write_table(rows_to_table(rows), buf, compression="zstd")
    storage.write_bytes(manifest_url(root, shard), buf.getvalue())


def read_manifest(root: str):
    """All shards' manifest rows as one pyarrow Table (in memory: for small outputs and tests; at corpus scale
    use :func:`iter_manifest`, :func:`manifest_dataset` or :func:`export_manifest`)."""
    import pyarrow as pa

    from ..schemas.manifest_schema import MANIFEST_SCHEMA

    tables = list(iter_manifest(root))
    # manifests written before a column was added lack it: promote (missing columns read as null)
    return pa.concat_tables(tables, promote_options="default") if tables else MANIFEST_SCHEMA.empty_table()


def iter_manifest(root: str, columns: list[str] | None = None, workers: int | None = None):
    """Each shard's manifest as a pyarrow Table (``columns`` only), in shard order, read with bounded parallel
    requests: the whole corpus's manifest streamed, one shard's rows in memory at a time (plus the read window)."""
    urls = [u for page in storage.list_pages(meta_url(root, "manifest"), suffix=".parquet") for u, _ in page]
    for _url, data in storage.read_many(urls, workers):
        if data is not None:
            yield pq.read_table(io.BytesIO(data), columns=columns, use_threads=False)


def export_manifest(root: str, dest: str, columns: list[str] | None = None) -> int:
    """Compact the whole manifest of ``root`` into one parquet file ``dest`` (local or ``s3://``), streaming
    shard by shard (row groups of about 64k rows); returns the rows written. Read it back with
    ``pyarrow.parquet.read_table(dest, filters=..., columns=...)``, ``pyarrow.dataset.dataset(dest)``, DuckDB or
    polars."""
    import pyarrow as pa

    from ..schemas.manifest_schema import MANIFEST_SCHEMA

    schema = MANIFEST_SCHEMA if columns is None else pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
    n = 0
    with storage.atomic_write(dest) as f, pq.ParquetWriter(f, schema, compression="zstd") as writer:
        pending: list = []
        rows = 0
        for t in iter_manifest(root, columns):
            pending.append(t.cast(schema))
            rows += t.num_rows
            if rows >= 65536:
                writer.write_table(pa.concat_tables(pending))
                n, pending, rows = n + rows, [], 0
        if pending:
            writer.write_table(pa.concat_tables(pending))
            n += rows
    return n


def manifest_dataset(root: str):
    """The whole manifest of ``root`` as one ``pyarrow.dataset.Dataset`` over its per-shard parquet files
    (nothing is read until it is scanned): ``manifest_dataset(out).to_table(columns=["key", "status"],
    filter=pyarrow.compute.field("status") == "failed")``, or ``duckdb.sql("select ... from ds")``. On
    ``s3://`` it uses pyarrow's own S3 client, configured from the same settings as modalmill's
    (:func:`storage.arrow_filesystem`)."""
    import pyarrow.dataset as pds

    from ..schemas.manifest_schema import MANIFEST_SCHEMA

    urls = [u for page in storage.list_pages(meta_url(root, "manifest"), suffix=".parquet") for u, _ in page]
    fs, paths = storage.arrow_filesystem(urls) if urls else (None, [])
    return pds.dataset(paths, schema=MANIFEST_SCHEMA, format="parquet", filesystem=fs)


def list_markers(root: str, with_pending: bool = False) -> dict[str, dict]:
    """Every shard's full done marker (key lists included), read with bounded parallel requests; pending markers
    (a rewrite under way or interrupted, see ``io.commit``) only with ``with_pending``. For what a marker says
    besides its keys, at corpus scale, and whether its tars are still what it records, use the shard index
    (``io.index.scan``)."""
    urls = [u for u in storage.list_files(meta_url(root, "shards"), suffix=".json")
            if not u.endswith(".failed.json")]
    out = {url.rsplit("/", 1)[-1][: -len(".json")]: json.loads(data)
           for url, data in storage.read_many(urls) if data is not None}
    return out if with_pending else {k: v for k, v in out.items() if v.get("state") != "pending"}


def list_failures(root: str) -> dict[str, dict]:
    urls = storage.list_files(meta_url(root, "shards"), suffix=".failed.json")
    return {url.rsplit("/", 1)[-1][: -len(".failed.json")]: json.loads(data)
            for url, data in storage.read_many(urls) if data is not None}


#: A run record lists at most this many shards inline; a longer list goes to ``runs/<id>.shards.parquet``, so
#: the record that ``status`` reads stays small whatever the number of shards a run processed.
RUN_SHARDS_INLINE = 1000


def write_run(root: str, run_id: str, summary: dict) -> str:
    url = meta_url(root, "runs", f"{run_id}.json")
    shards = summary.get("shards") or []
    if len(shards) > RUN_SHARDS_INLINE:
        import pyarrow as pa

        table = pa.table({"shard": [s.get("shard") for s in shards], "mode": [s.get("mode") for s in shards],
                          "n_read": [s.get("n_read") for s in shards], "n_ok": [s.get("n_ok") for s in shards],
                          "n_failed": [s.get("n_failed") for s in shards],
                          "seconds": [json.dumps(s.get("seconds"), sort_keys=True) for s in shards]})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        name = f"{run_id}.shards.parquet"
        storage.write_bytes(meta_url(root, "runs", name), buf.getvalue())
        summary = {**summary, "shards": shards[:RUN_SHARDS_INLINE], "shards_file": name}
    _write_json(url, summary)
    return url


def list_runs(root: str) -> list[dict]:
    return [json.loads(storage.read_bytes(u)) for u in storage.list_files(meta_url(root, "runs"), suffix=".json")]
