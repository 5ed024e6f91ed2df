"""Manifests, completion markers and run records under ``OUT/_modalmill/``.

- ``shards/shard-NNNNN.json``: the completion marker and stats of a shard; written last and atomically, it
  is the commit point. It lists the shard's key order and, per modality, what produced the tar.
- ``shards/shard-NNNNN.failed.json``: why the last attempt at a shard failed (removed once it is done).
- ``manifest/shard-NNNNN.parquet``: one row per sample read (see ``schemas.manifest``).
- ``runs/<time>-<id>.json``: one summary per run of a job.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow.parquet as pq

from ..schemas.manifest import SampleRow, rows_to_table, table_to_rows
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


def read_failure(root: str, shard: str) -> dict | None:
    return _read_json(failed_url(root, shard))


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
    """All shards' manifest rows as one pyarrow Table."""
    import pyarrow as pa

    from ..schemas.manifest import MANIFEST_SCHEMA

    tables = []
    for url in storage.list_files(meta_url(root, "manifest"), suffix=".parquet"):
        tables.append(pq.read_table(io.BytesIO(storage.read_bytes(url)), use_threads=False))
    # manifests written before a column was added lack it: promote (missing columns read as null)
    return pa.concat_tables(tables, promote_options="default") if tables else MANIFEST_SCHEMA.empty_table()


def list_markers(root: str) -> dict[str, dict]:
    out = {}
    for url in storage.list_files(meta_url(root, "shards"), suffix=".json"):
        name = url.rsplit("/", 1)[-1]
        if name.endswith(".failed.json"):
            continue
        out[name[: -len(".json")]] = json.loads(storage.read_bytes(url))
    return out


def list_failures(root: str) -> dict[str, dict]:
    out = {}
    for url in storage.list_files(meta_url(root, "shards"), suffix=".failed.json"):
        out[url.rsplit("/", 1)[-1][: -len(".failed.json")]] = json.loads(storage.read_bytes(url))
    return out


def write_run(root: str, run_id: str, summary: dict) -> str:
    url = meta_url(root, "runs", f"{run_id}.json")
    _write_json(url, summary)
    return url


def list_runs(root: str) -> list[dict]:
    return [json.loads(storage.read_bytes(u)) for u in storage.list_files(meta_url(root, "runs"), suffix=".json")]
