"""What an output root holds: shards done, failed and pending; samples written and failed, by reason.

Answered from listings and the shard index (``io.index``): one LIST per 1,000 markers / manifests / run records,
plus reads of only the markers and manifests the index does not know at their listed version (bounded parallel),
the failure records of failed shards and the newest run record; the modality folders are listed to compare each
marker with its tars (a *torn* shard, whose marker is pending or does not describe its tars, is not done: it is
named in ``torn`` with why). Nothing is written.
"""

from __future__ import annotations

import json
from collections import Counter

from ..io import index, manifest, storage


def output_status(root: str) -> dict:
    if not storage.exists(manifest.meta_url(root, "shards")) and not storage.list_files(manifest.meta_url(root)):
        raise FileNotFoundError(f"{root}: not a modalmill output (no {manifest.META_DIR}/ folder)")
    scanned = index.scan(root, with_manifests=True, write=False)
    markers = scanned.markers
    failed_names = [s for s in scanned.failures if s not in markers]  # a torn shard may also have failed
    failures = {}
    urls = [manifest.failed_url(root, s) for s in failed_names]
    for (_url, data), name in zip(storage.read_many(urls), failed_names):
        if data is not None:
            failures[name] = json.loads(data)
    run_urls = [u for page in storage.list_pages(manifest.meta_url(root, "runs"), suffix=".json") for u, _ in page]
    last_run = None
    for url in sorted(run_urls, key=lambda u: u.rsplit("/", 1)[-1], reverse=True)[:1]:
        last_run = json.loads(storage.read_bytes(url))
    total = last_run["shards_total"] if last_run else None
    reasons: Counter = Counter()
    for mf in scanned.manifests.values():
        for reason, n in mf.reasons:
            reasons[reason] += n
    mods = Counter(m for mk in markers.values() for m in mk.modalities)
    out = {
        "output": root,
        "shards_total": total,
        "shards_done": len(markers),
        "shards_failed": len(failures),
        "shards_pending": None if total is None else max(0, total - len(markers) - len(failures)),
        "samples_read": sum(m.n_read for m in scanned.manifests.values()),
        "samples_ok": sum(m.n_ok for m in scanned.manifests.values()),
        "samples_failed": sum(m.n_failed for m in scanned.manifests.values()),
        "errors_by_reason": dict(reasons),
        "modalities": dict(mods),
        "failures": {k: v.get("error", "") for k, v in failures.items()},
        "runs": len(run_urls),
    }
    if scanned.torn:  # not done (counted as pending or failed): the next run redoes them
        out["shards_torn"] = len(scanned.torn)
        out["torn"] = dict(scanned.torn)
    return out
