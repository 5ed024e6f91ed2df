"""``modalmill filter OUT NEW``: a new output holding the samples of OUT that pass the filters.

Rules, applied to every sample of OUT's completed shards (in shard order, then tar order):

- ``where:<expression>``: the sample fails the ``--where`` expression (:mod:`modalmill.io.where`) on its
  ``metadata`` fields and scalar modalities;
- ``dedup:<name>``: a ``modalmill dedup --name NAME`` result puts the sample in a duplicate group and does not
  keep it.

Every rule that drops a sample is recorded (``; ``-joined). The kept samples are written in the same order,
resharded into shards of ``shard_size``: one Ray task per new shard copies each modality's members byte for
byte from OUT's tars (nothing is decoded or re-encoded), writes one tar per modality from one key list, then
the shard's manifest and, last, its marker (the commit point, as in a labelling run). Keys stay as they were;
a key that two source shards share and that would meet in one new shard becomes ``<source shard>-<key>``.

What NEW says about where things came from (``_modalmill/filter/``):

- ``kept.parquet``: per kept sample its new shard, position and key, and its source (OUT, shard, position,
  key) plus the input source and position OUT's manifest gave it;
- ``dropped.parquet``: per dropped sample its source shard, position and key and the rule(s) that dropped it;
- ``filter.json``: the settings, the counts by rule and the keep rule of each dedup result used.

One writer: the filter holds NEW's lease (:mod:`modalmill.io.lease`) from before it checks that NEW is empty to
after its last record; shard tasks check the lease's fence before each commit, the driver before each marker.

NEW's per-shard manifests carry the kept samples' rows from OUT's manifest with ``shard``, ``key`` and
``source`` (``OUT#shard-NNNNN``) and ``position`` (in that shard) rewritten, so ``check``, ``status``,
``stats`` and 4M's loader read NEW as any output.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from .. import __version__
from ..io import manifest, storage
from ..io.lease import LEASE_DIR, hold
from ..io.tars import decode_member, iter_tar_groups, scan_layout, spec_for_folder
from ..io.where import Where, compile_where, needed_modalities, record_of
from ..io.writers import TarShardWriter
from ..schemas.manifest_schema import OK, SampleRow
from .dedup import read_dedup

__all__ = ["FilterConfig", "plan_filter", "run_filter"]


@dataclass(frozen=True)
class FilterConfig:
    where: str | None = None
    drop_duplicates: tuple[str, ...] = ()
    shard_size: int = 1000
    modalities: tuple[str, ...] = ()  # () = every modality of the source

    def __post_init__(self):
        if int(self.shard_size) < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.where is not None:
            compile_where(self.where)


def _shard_fields(urls: dict[str, str], where: Where) -> dict[str, dict]:
    """key -> the where record of one source shard (reads only the modalities the expression needs)."""
    values: dict[str, dict] = {}
    for m, url in urls.items():
        spec = spec_for_folder(m)
        for key, members in iter_tar_groups(url):
            ext, data = next(iter(members.items()))
            values.setdefault(key, {})[m] = decode_member(spec, ext, data)
    return {k: record_of(k, v) for k, v in values.items()}


def _dedup_drops(root: str, names: tuple[str, ...]) -> tuple[dict[tuple[str, str], list[str]], dict]:
    drops: dict[tuple[str, str], list[str]] = {}
    rules = {}
    for name in names:
        table, meta = read_dedup(root, name)
        rules[name] = {"method": meta.get("method"), "keep_rule": meta.get("keep_rule"),
                       "settings": meta.get("settings")}
        for row in table.select(["shard", "key", "keep"]).to_pylist():
            if not row["keep"]:
                drops.setdefault((row["shard"], row["key"]), []).append(f"dedup:{name}")
    return drops, rules


def plan_filter(root: str, cfg: FilterConfig, markers: dict, layout) -> tuple[list[dict], list[dict], dict]:
    """(kept samples in order, dropped samples with their rules, the dedup results' rules)."""
    where = compile_where(cfg.where) if cfg.where else None
    need = needed_modalities(where, set(layout.folders)) if where else []
    drops, dedup_rules = _dedup_drops(root, cfg.drop_duplicates)
    kept, dropped = [], []
    for shard in sorted(markers):
        keys = list(markers[shard]["keys"])
        fields = {}
        if where is not None:
            fields = _shard_fields({m: layout.folders[m][f"{shard}.tar"] for m in need}, where)
        for pos, key in enumerate(keys):
            rules = list(drops.get((shard, key), []))
            if where is not None and not where(fields.get(key, {"key": key})):
                rules.insert(0, f"where:{where.text}")
            row = {"source_shard": shard, "source_position": pos, "source_key": key}
            if rules:
                dropped.append({**row, "rule": "; ".join(rules)})
            else:
                kept.append(row)
    return kept, dropped, dedup_rules


def _assign_shards(kept: list[dict], shard_size: int) -> list[list[dict]]:
    width = max(5, len(str(max(0, (len(kept) - 1) // shard_size))))
    out = []
    for i in range(0, len(kept), shard_size):
        part, seen = kept[i:i + shard_size], set()
        n = len(out)
        for pos, s in enumerate(part):
            key = s["source_key"]
            if key in seen:
                key = f"{s['source_shard']}-{key}"
            seen.add(key)
            s.update(shard=f"shard-{n:0{width}d}", position=pos, key=key)
        out.append(part)
    return out


def write_new_shard(root: str, new: str, samples: list[dict], folders: dict[str, dict[str, str]],
                    modalities: list[str], fence=None) -> dict:
    """Copy one new shard's samples from the source tars (a Ray task); returns its marker's modalities.
    ``fence`` (the lease's :class:`~modalmill.io.lease.Fence` on NEW) is checked before every tar and the manifest
    are committed: a filter that lost NEW's lease writes nothing more."""
    fence = fence or (lambda: None)
    shard = samples[0]["shard"]
    by_source: dict[str, dict[str, dict]] = {}
    for s in samples:
        by_source.setdefault(s["source_shard"], {})[s["source_key"]] = s
    info = {}
    for m in modalities:
        members: dict[str, dict[str, bytes]] = {}
        for src, wanted in by_source.items():
            for key, group in iter_tar_groups(folders[m][f"{src}.tar"]):
                if key in wanted:
                    members[wanted[key]["key"]] = group
        w = TarShardWriter(storage.join(new, m, f"{shard}.tar"))
        try:
            for s in samples:
                for ext, data in members[s["key"]].items():
                    w.write(s["key"], ext, data)
            fence()
            info[m] = {"labeler": "modalmill.filter", "source": root, **w.commit()}
        except BaseException:
            w.abort()
            raise
    rows = _manifest_rows(root, samples, by_source)
    fence()
    manifest.write_rows(new, shard, rows)
    return {"modalities": info, "lineage": [(s["input_source"], s["input_position"]) for s in samples]}


def _manifest_rows(root: str, samples: list[dict], by_source: dict) -> list[SampleRow]:
    src_rows = {src: {r.key: r for r in manifest.read_rows(root, src) if r.status == OK} for src in by_source}
    out = []
    n = int(samples[0]["shard"].split("-")[1])
    for s in samples:
        r = src_rows[s["source_shard"]].get(s["source_key"]) or SampleRow(0, "", 0, s["source_key"])
        s["input_source"], s["input_position"] = r.source, r.position
        out.append(SampleRow(**{**r.__dict__, "shard": n, "source": f"{root}#{s['source_shard']}",
                                "position": s["source_position"], "key": s["key"]}))
    return out


def _check_new(new: str) -> None:
    """NEW must hold nothing but its lease (which this filter holds)."""
    lease_dir = manifest.meta_url(new, LEASE_DIR).rstrip("/") + "/"
    if manifest.list_markers(new) or any(not n.startswith(lease_dir) for n in _listing(new)):
        raise FileExistsError(f"{new}: already holds files; filter writes a new output (remove it first)")


def _listing(root: str) -> list[str]:
    try:
        return storage.list_files(root)
    except FileNotFoundError:
        return []


def _modalities(cfg: FilterConfig, markers: dict, layout) -> list[str]:
    sets = {frozenset(mk.get("modalities", {})) for mk in markers.values()}
    common = sorted(frozenset.intersection(*sets)) if sets else []
    if cfg.modalities:
        missing = [m for m in cfg.modalities if m not in common]
        if missing:
            raise ValueError(f"--modalities: {', '.join(missing)} not in every completed shard of the source")
        return list(dict.fromkeys(cfg.modalities))
    return [m for m in common if m in layout.folders]


def _write_records(new: str, root: str, cfg: FilterConfig, kept: list[dict], dropped: list[dict], summary: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = ["shard", "position", "key", "source_shard", "source_position", "source_key", "input_source",
            "input_position"]
    kept_table = pa.table({c: [s.get(c) for s in kept] for c in cols}).append_column(
        "source_output", pa.array([root] * len(kept), pa.string()))
    dropped_table = pa.table({c: [d[c] for d in dropped] for c in ("source_shard", "source_position",
                                                                    "source_key", "rule")},
                             schema=pa.schema([("source_shard", pa.string()), ("source_position", pa.int64()),
                                               ("source_key", pa.string()), ("rule", pa.string())]))
    for name, table in (("kept", kept_table), ("dropped", dropped_table)):
        with storage.atomic_write(manifest.meta_url(new, "filter", f"{name}.parquet")) as f:
            pq.write_table(table, f)
    storage.write_bytes(manifest.meta_url(new, "filter", "filter.json"),
                        json.dumps(summary, indent=1, sort_keys=True).encode())


def _write_shards(root: str, new: str, shards: list[list[dict]], folders: dict, modalities: list[str], held,
                  progress: bool) -> None:
    """One Ray task per new shard (fenced by NEW's lease); the driver writes each marker (the commit point) after
    checking that it still holds the lease."""
    import ray
    from tqdm import tqdm

    from ..io.cluster import local_s3_env

    env = local_s3_env(root, new)
    task = ray.remote(num_cpus=1, max_retries=2)(write_new_shard).options(
        **({"runtime_env": {"env_vars": env}} if env else {}))
    folders_ref, fence = ray.put(folders), held.fence()
    refs = [task.remote(root, new, part, folders_ref, modalities, fence) for part in shards]
    with tqdm(total=len(refs), desc="filter: shards", unit="shard", disable=not progress) as bar:
        for i, (part, ref) in enumerate(zip(shards, refs)):
            res = ray.get(ref)
            for s, (src, pos) in zip(part, res["lineage"]):
                s["input_source"], s["input_position"] = src, pos
            marker = {"shard": part[0]["shard"], "index": i, "source": f"filter of {root}",
                      "keys": [s["key"] for s in part], "n_samples": len(part), "modalities": res["modalities"],
                      "stats": {"n_read": len(part), "n_ok": len(part), "n_failed": 0, "errors_by_reason": {}},
                      "lease": {"generation": held.generation, "holder": held.token},
                      "modalmill_version": __version__,
                      "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            held.check()  # raises LeaseLost: another filter owns NEW now, commit nothing more
            manifest.write_marker(new, part[0]["shard"], marker)
            bar.update(1)


def run_filter(root: str, new: str, cfg: FilterConfig, progress: bool = True, address: str | None = None,
               wait: bool = False) -> dict:
    """Write ``new`` from ``root`` under ``cfg``; returns the summary (also in ``_modalmill/filter/filter.json``).

    Holds NEW's lease (:mod:`modalmill.io.lease`) from before it checks that NEW is empty to after the last
    record: a second filter into the same place is refused (:class:`~modalmill.io.lease.LeaseHeld`, exit 5) or,
    with ``wait``, waits and then finds NEW written and refuses; shard tasks and commits are fenced."""
    from ..io.cluster import init_ray

    started = time.time()
    markers = manifest.list_markers(root)
    if not markers:
        raise FileNotFoundError(f"{root}: no completed shards to filter")
    with hold(new, wait=wait, command=f"modalmill filter {root} {new}") as held:
        _check_new(new)
        layout = scan_layout(root)
        modalities = _modalities(cfg, markers, layout)
        kept, dropped, dedup_rules = plan_filter(root, cfg, markers, layout)
        shards = _assign_shards(kept, cfg.shard_size)
        init_ray(address, quiet_embedded=True)
        _write_shards(root, new, shards, {m: layout.folders[m] for m in modalities}, modalities, held, progress)
        by_rule: dict[str, int] = {}
        for d in dropped:
            by_rule[d["rule"]] = by_rule.get(d["rule"], 0) + 1
        summary = {"source": root, "output": new, "where": cfg.where, "drop_duplicates": list(cfg.drop_duplicates),
                   "dedup_rules": dedup_rules, "shard_size": cfg.shard_size, "modalities": modalities,
                   "n_samples": len(kept) + len(dropped), "n_kept": len(kept), "n_dropped": len(dropped),
                   "dropped_by_rule": by_rule, "n_shards": len(shards), "seconds": round(time.time() - started, 3),
                   "lease": {"generation": held.generation, "holder": held.token},
                   "modalmill_version": __version__}
        held.check()
        _write_records(new, root, cfg, kept, dropped, summary)
    return summary
