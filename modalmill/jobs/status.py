"""What an output root holds: shards done, failed and pending; samples written and failed, by reason."""

from __future__ import annotations

from collections import Counter

from ..io import manifest, storage


def output_status(root: str) -> dict:
    if not storage.exists(manifest.meta_url(root, "shards")) and not storage.list_files(manifest.meta_url(root)):
        raise FileNotFoundError(f"{root}: not a modalmill output (no {manifest.META_DIR}/ folder)")
    markers = manifest.list_markers(root)
    failures = {k: v for k, v in manifest.list_failures(root).items() if k not in markers}
    runs = sorted(manifest.list_runs(root), key=lambda r: r.get("run_id", ""))
    total = runs[-1]["shards_total"] if runs else None
    table = manifest.read_manifest(root)
    status = table.column("status").to_pylist() if table.num_rows else []
    failed_rows = [r for r in table.to_pylist() if r["status"] == "failed"] if table.num_rows else []
    reasons = Counter(f"{r['stage']}: {(r['error'] or '').split(':')[0].strip()}" for r in failed_rows)
    mods = Counter(m for mk in markers.values() for m in mk.get("modalities", {}))
    return {
        "output": root,
        "shards_total": total,
        "shards_done": len(markers),
        "shards_failed": len(failures),
        "shards_pending": None if total is None else max(0, total - len(markers) - len(failures)),
        "samples_read": len(status),
        "samples_ok": sum(s == "ok" for s in status),
        "samples_failed": sum(s == "failed" for s in status),
        "errors_by_reason": dict(reasons),
        "modalities": dict(mods),
        "failures": {k: v.get("error", "") for k, v in failures.items()},
        "runs": len(runs),
    }
