"""The manifest schema: one parquet row per sample read, saying what happened to it and what made it."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import pyarrow as pa

PRODUCER = pa.struct([
    ("modality", pa.string()),
    ("labeler", pa.string()),
    ("version", pa.string()),
    ("config_hash", pa.string()),
    ("checkpoint", pa.string()),
])

MANIFEST_SCHEMA = pa.schema([
    ("shard", pa.int32()),
    ("source", pa.string()),
    ("position", pa.int32()),  # position of the sample in its source shard
    ("key", pa.string()),
    ("status", pa.string()),  # "ok" or "failed"
    ("stage", pa.string()),  # where it failed: read, decode, label:<labeler>, validate:<modality>
    ("error", pa.string()),
    ("modalities", pa.list_(pa.string())),  # modalities written for this sample
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("width", pa.int32()),  # the stored rgb image
    ("height", pa.int32()),
    ("producers", pa.list_(PRODUCER)),
    ("caption_source", pa.string()),  # where this sample's caption came from: "input", "model", or null (none)
    ("source_url", pa.string()),  # the "url" field of the sample's source json (img2dataset), if any
    ("source_json", pa.string()),  # the sample's source json (canonical: sorted keys), if any
    ("source_json_error", pa.string()),  # why the sample's json member could not be read (the sample still goes on)
    ("score_sources", pa.string()),  # JSON {metadata field: "input:<column>"} of the scores taken from the input
])

OK, FAILED = "ok", "failed"


@dataclass
class SampleRow:
    shard: int
    source: str
    position: int
    key: str
    status: str = OK
    stage: str | None = None
    error: str | None = None
    modalities: list[str] = field(default_factory=list)
    original_width: int | None = None
    original_height: int | None = None
    width: int | None = None
    height: int | None = None
    producers: list[dict] = field(default_factory=list)
    caption_source: str | None = None
    source_url: str | None = None
    source_json: str | None = None
    source_json_error: str | None = None
    score_sources: str | None = None

    def fail(self, stage: str, error: str) -> "SampleRow":
        self.status, self.stage, self.error = FAILED, stage, error
        self.modalities = []
        self.caption_source = None
        return self

    @property
    def reason_class(self) -> str:
        """The error grouped for stats: the stage and the reason up to its first colon."""
        return f"{self.stage}: {(self.error or '').split(':')[0].strip()}"


def rows_to_table(rows: list[SampleRow]) -> pa.Table:
    """The rows as a table of :data:`MANIFEST_SCHEMA`, parsed from JSON lines by Arrow's own reader: converting
    Python lists (``pa.table``, ``pa.array``) makes pyarrow import pandas on first use, ~1 s of CPU (4 s on a
    loaded 2-core machine) that every fresh Ray worker paid in its first shard task's commit, while the task holds
    its CPU and the model actors wait for the next shard's batches (benchmark 6). Keys a producer dict has beyond
    :data:`PRODUCER`'s fields (an import's ``provenance`` and ``source_digest``) are dropped, as ``pa.table``
    dropped them."""
    import pyarrow.json as pj

    if not rows:
        return MANIFEST_SCHEMA.empty_table()
    data = "\n".join(json.dumps({n: getattr(r, n) for n in MANIFEST_SCHEMA.names}) for r in rows).encode()
    table = pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(use_threads=False, block_size=len(data) + 1),
                         parse_options=pj.ParseOptions(explicit_schema=MANIFEST_SCHEMA,
                                                       unexpected_field_behavior="ignore"))
    return table.select(MANIFEST_SCHEMA.names)


def table_to_rows(table: pa.Table) -> list[SampleRow]:
    return [SampleRow(**{k: d.get(k) for k in MANIFEST_SCHEMA.names}) for d in table.to_pylist()]
