"""Corpus statistics of an output root: what is in it, and whether the labels look sane.

``corpus_stats(root)`` reads every completed shard (the shards with a completion marker; for an output
without markers, every shard of its folder layout) and reports:

- samples read / written / failed and the failure reasons, from the parquet manifests' counts in the shard
  index (``io.index``: listings plus a snapshot the runs keep; no manifest row is held in memory)
  (``stage: reason``, the reason up to its first colon, as ``modalmill status`` groups them);
- per modality: samples and shards;
- ``tok_*``: the token histogram over the vocabulary, codebook usage (the fraction of the codes of the
  tokenizer that wrote the tokens that occur; of the modality's vocabulary when that tokenizer is not known),
  perplexity ``exp(H)`` of the empirical id distribution (natural log; equals the vocabulary size when
  every id is equally frequent), and the ten most frequent ids. The tokenizer is the checkpoint that the run
  records name for the tok labeler, if its hash is the one every marker records;
- pixel labels, feature maps and global embeddings: min / max / mean over all values;
- ``rgb``: width and height ranges; ``metadata``: min / max / mean of every numeric field;
- the quality scores (``aesthetic_score``, ``watermark_score``, in ``metadata`` and as scalar modalities; the scalar
  modalities ``nsfw_score`` and ``clip_score``):
  histograms over their ranges (:data:`SCORE_BINS`);
  ``det``/``sam_mask``: instances per sample; ``human_poses``/``pose_keypoints``: people per sample;
  ``caption``: entries per sample (one per crop row), distinct texts among them and characters per text;
  ``crop_settings``: crops per sample.

Members that do not decode are counted under ``undecodable`` (``modalmill check`` says why).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..io import index, manifest, storage
from ..io.tars import decode_member, iter_tar_groups, scan_layout, spec_for_folder
from ..schemas.modalities import FEATURE_MAP, GLOBAL, IMAGE, PIXEL, TOKENS, ModalitySpec


@dataclass
class _Range:
    """min / max / mean of a stream of numbers or arrays (merged in a fixed order: deterministic)."""

    lo: float = math.inf
    hi: float = -math.inf
    total: float = 0.0
    n: int = 0

    def add(self, values: Any) -> None:
        a = np.asarray(values, dtype=np.float64)
        if a.size == 0:
            return
        self.lo = min(self.lo, float(a.min()))
        self.hi = max(self.hi, float(a.max()))
        self.total += float(a.sum())
        self.n += int(a.size)

    def merge(self, other: _Range) -> None:
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)
        self.total += other.total
        self.n += other.n

    def to_dict(self) -> dict | None:
        if not self.n:
            return None
        return {"min": self.lo, "max": self.hi, "mean": self.total / self.n, "count": self.n}


# quality scores drawn as histograms by `stats` (metadata fields and scalar modalities): (low, high, bins)
SCORE_BINS = {"aesthetic_score": (0.0, 10.0, 20), "watermark_score": (0.0, 1.0, 20), "nsfw_score": (0.0, 1.0, 20),
              "clip_score": (-1.0, 1.0, 20)}


@dataclass
class _Acc:
    """What one (modality, shard) tar contributes."""

    samples: int = 0
    undecodable: int = 0
    values: _Range = field(default_factory=_Range)
    ranges: dict[str, _Range] = field(default_factory=dict)  # named ranges (metadata fields, width, ...)
    hist: np.ndarray | None = None  # token histogram
    classes: Counter = field(default_factory=Counter)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # quality-score histograms (SCORE_BINS)

    def rng(self, name: str) -> _Range:
        return self.ranges.setdefault(name, _Range())

    def merge(self, other: _Acc) -> None:
        self.samples += other.samples
        self.undecodable += other.undecodable
        self.values.merge(other.values)
        for k, r in other.ranges.items():
            self.rng(k).merge(r)
        if other.hist is not None:
            self.hist = other.hist.copy() if self.hist is None else self.hist + other.hist
        self.classes.update(other.classes)
        for k, h in other.scores.items():
            self.scores[k] = self.scores[k] + h if k in self.scores else h.copy()

    def score(self, name: str, value: float) -> None:
        lo, hi, bins = SCORE_BINS[name]
        i = min(bins - 1, max(0, int((float(value) - lo) / (hi - lo) * bins)))
        self.scores.setdefault(name, np.zeros(bins, np.int64))[i] += 1


def _scan(spec: ModalitySpec | None, url: str) -> _Acc:
    acc = _Acc()
    if spec is not None and spec.kind == TOKENS and spec.vocab_size:
        acc.hist = np.zeros(spec.vocab_size, np.int64)
    for _key, members in iter_tar_groups(url):
        acc.samples += 1
        if spec is None:
            continue
        ext = spec.ext if spec.ext in members else next(iter(members))
        try:
            value = decode_member(spec, ext, members[ext])
        except Exception:  # noqa: BLE001 - counted; `modalmill check` explains
            acc.undecodable += 1
            continue
        _add(spec, value, acc)
    return acc


def _add(spec: ModalitySpec, value: Any, acc: _Acc) -> None:
    if spec.kind == TOKENS:
        ids = np.asarray(value, np.int64).ravel()
        inside = ids[(ids >= 0) & (ids < len(acc.hist))]
        acc.hist += np.bincount(inside, minlength=len(acc.hist))
        acc.rng("out_of_vocab").add(float(len(ids) - len(inside)))
    elif spec.kind == IMAGE:
        acc.rng("height").add(value.shape[0])
        acc.rng("width").add(value.shape[1])
    elif spec.kind in (PIXEL, FEATURE_MAP, GLOBAL):
        acc.values.add(value)
    elif spec.name == "metadata" and isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                acc.rng(k).add(v)
                if k in SCORE_BINS:
                    acc.score(k, v)
    elif spec.name in SCORE_BINS:
        v = float(np.asarray(value, np.float64).reshape(-1)[0])
        acc.rng("score").add(v)
        acc.score(spec.name, v)
    elif spec.name == "det" and isinstance(value, dict):
        inst = value.get("instances", [])
        acc.rng("instances").add(len(inst))
        acc.classes.update(d.get("class_name", "?") for d in inst)
    elif spec.name == "caption":
        items = value if isinstance(value, list) else [value]
        texts = list(dict.fromkeys(c.get("caption", "") if isinstance(c, dict) else str(c) for c in items))
        acc.rng("entries").add(len(items))  # one entry per crop row (4M-21's aligned captions)
        acc.rng("distinct").add(len(texts))  # distinct texts among them (one caption per image is repeated)
        for text in texts:
            acc.rng("chars").add(len(text))
    elif spec.name == "crop_settings":
        acc.rng("n_crops").add(len(value))
    elif spec.name == "human_poses":
        n = len(value.get("bbox_xyxy") or []) if isinstance(value, dict) else len(value or [])
        acc.rng("people").add(n)
    elif spec.name == "pose_keypoints" and isinstance(value, dict):
        acc.rng("people").add(len(value.get("people", [])))
    elif spec.name == "sam_mask" and isinstance(value, dict):
        acc.rng("instances").add(len(value.get("instances", [])))


def _token_summary(hist: np.ndarray, tokenizer: dict | None = None) -> dict:
    """``usage``: the fraction of the tokenizer's codes used (``codebook_size`` of ``tokenizer``), else of the
    vocabulary; ``used`` counts the distinct ids that occur."""
    total = int(hist.sum())
    used = int((hist > 0).sum())
    p = hist[hist > 0] / total if total else np.zeros(0)
    entropy = float(-(p * np.log(p)).sum()) if total else 0.0
    top = np.argsort(-hist, kind="stable")[:10]
    codes = int(tokenizer["codebook_size"]) if tokenizer else len(hist)
    out = {"vocab_size": len(hist), "codebook_size": codes, "tokens": total, "used": used,
           "usage": used / codes if codes else 0.0, "perplexity": math.exp(entropy) if total else 0.0,
           "entropy_nats": entropy, "top": [[int(i), int(hist[i])] for i in top if hist[i] > 0],
           "histogram": hist.tolist()}
    if tokenizer:
        out["tokenizer"] = tokenizer
    return out


def _tokenizer_codes(root: str, markers: dict, modalities: list[str]) -> dict[str, dict]:
    """{token modality: {"checkpoint": location, "codebook_size": n}} for the token modalities whose shards were
    all written by one tokenizer checkpoint that a run record of ``root`` still locates (same content hash)."""
    from ..tokenize.checkpoint import checkpoint_hash, tokenizer_info

    runs = None
    out: dict[str, dict] = {}
    for m in modalities:
        producers = {(p.get("labeler"), p.get("checkpoint")) for mk in markers.values()
                     for k, p in (mk.get("modalities") or {}).items() if k == m}
        if len(producers) != 1:
            continue
        labeler, digest = producers.pop()
        if not labeler or not digest:
            continue
        if runs is None:
            runs = sorted(manifest.list_runs(root), key=lambda r: r.get("run_id", ""), reverse=True)
        locations = dict.fromkeys(
            ((r.get("spec") or {}).get("labelers") or {}).get(labeler, {}).get("config", {}).get("checkpoint")
            for r in runs)
        for loc in (x for x in locations if isinstance(x, str) and x):
            try:
                if checkpoint_hash(loc) != digest:
                    continue
                out[m] = {"checkpoint": loc, "codebook_size": tokenizer_info(loc)["codebook_size"]}
            except Exception:  # noqa: BLE001 - moved or unreadable: usage falls back to the vocabulary
                continue
            break
    return out


def corpus_stats(root: str, modalities: list[str] | None = None, workers: int | None = None) -> dict:
    """Statistics of the output ``root`` (see the module docstring). ``modalities`` restricts what is read."""
    scanned = index.scan(root, with_manifests=True, write=False)  # listings + the shard index, no row is held
    markers = {name: {"modalities": mk.modalities} for name, mk in scanned.markers.items()}
    source, tasks = _tar_tasks(root, markers, modalities)
    if workers is None:
        workers = storage.io_workers(True) if storage.is_s3(root) else 4
    accs, shards = _scan_all(tasks, workers)
    codes = _tokenizer_codes(root, markers, [m for m in accs if accs[m].hist is not None])
    per_modality = {m: _modality_summary(m, accs[m], len(shards[m]), codes.get(m)) for m in sorted(accs)}
    return {"output": root, "shards_from": source, "shards": len({s for _, s, _ in tasks}),
            **_manifest_counts(list(scanned.manifests.values())), "modalities": per_modality}


def _tar_tasks(root: str, markers: dict, modalities: list[str] | None) -> tuple[str, list[tuple[str, str, str]]]:
    """(where the shard list came from: "markers" or "layout", [(modality, shard, tar url)]) of ``root``, only
    of ``modalities`` when given."""
    layout = scan_layout(root)
    tasks: list[tuple[str, str, str]] = []  # (modality, shard, url)
    if markers:
        source = "markers"
        for shard, mk in sorted(markers.items()):
            for m in sorted(mk.get("modalities", {})):
                url = layout.folders.get(m, {}).get(f"{shard}.tar")
                if url is not None:
                    tasks.append((m, shard, url))
    else:
        source = "layout"
        for m, files in layout.folders.items():
            for name, url in sorted(files.items()):
                if name.endswith(".tar"):
                    tasks.append((m, name[: -len(".tar")], url))
    if not tasks and not markers and not layout.folders:
        raise FileNotFoundError(f"{root}: no modality folders with .tar shards")
    if modalities:
        unknown = sorted(set(modalities) - {m for m, _, _ in tasks})
        if unknown:
            raise ValueError(f"{root}: no shards of {', '.join(unknown)}")
        tasks = [t for t in tasks if t[0] in modalities]
    return source, tasks


def _scan_all(tasks: list[tuple[str, str, str]], workers: int) -> tuple[dict[str, _Acc], dict[str, set]]:
    """Every tar of ``tasks`` scanned on ``workers`` threads: ({modality: its accumulated sums}, {modality: its
    shards})."""
    accs: dict[str, _Acc] = {}
    shards: dict[str, set] = {}
    # a bounded window of tars in flight, merged in task order as they finish (the sums are deterministic and
    # only the window's partial results are held, whatever the number of shards)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        window: deque = deque()

        def merge_oldest() -> None:
            (m, shard, _), fut = window.popleft()
            accs.setdefault(m, _Acc()).merge(fut.result())
            shards.setdefault(m, set()).add(shard)

        for t in tasks:
            if len(window) >= 2 * max(1, workers):
                merge_oldest()
            window.append((t, pool.submit(_scan, spec_for_folder(t[0]), t[2])))
        while window:
            merge_oldest()
    return accs, shards


def _modality_summary(m: str, acc: _Acc, n_shards: int, tokenizer: dict | None) -> dict[str, Any]:
    """One modality's entry of the statistics: counts, token usage, value ranges, classes, score histograms."""
    spec = spec_for_folder(m)
    d: dict[str, Any] = {"samples": acc.samples, "shards": n_shards}
    if acc.undecodable:
        d["undecodable"] = acc.undecodable
    if acc.hist is not None:
        d.update(_token_summary(acc.hist, tokenizer))
        d["out_of_vocab"] = int(acc.ranges["out_of_vocab"].total) if "out_of_vocab" in acc.ranges else 0
    if spec is not None and spec.kind in (PIXEL, FEATURE_MAP, GLOBAL):
        d["values"] = acc.values.to_dict()
    named = {k: r.to_dict() for k, r in sorted(acc.ranges.items()) if k != "out_of_vocab"}
    if named:
        d["fields" if m == "metadata" else "ranges"] = named
    if acc.classes:
        d["classes"] = dict(sorted(acc.classes.items(), key=lambda kv: (-kv[1], kv[0])))
    if acc.scores:
        d["histograms"] = {k: {"low": SCORE_BINS[k][0], "high": SCORE_BINS[k][1], "counts": h.tolist()}
                           for k, h in sorted(acc.scores.items())}
    return d


def _manifest_counts(counts: list) -> dict[str, Any]:
    """Samples read, written and failed (by reason and by stage) over the shards' manifest summaries."""
    reasons: Counter = Counter()
    stages: Counter = Counter()
    for mf in counts:  # merged in shard order: ties in most_common() keep the order of first occurrence
        for k, n in mf.reasons:
            reasons[k] += n
        for k, n in mf.stages:
            stages[k] += n
    return {
        "samples_read": sum(m.n_read for m in counts),
        "samples_ok": sum(m.n_ok for m in counts),
        "samples_failed": sum(m.n_failed for m in counts),
        "failures_by_reason": dict(reasons.most_common()),
        "failures_by_stage": dict(stages.most_common()),
    }


def _fmt(r: dict | None, digits: int = 4) -> str:
    if not r:
        return "-"
    return f"{r['min']:.{digits}g}..{r['max']:.{digits}g} (mean {r['mean']:.{digits}g})"


def format_stats(st: dict) -> list[str]:
    """Human-readable lines of :func:`corpus_stats`' result."""
    head = f"{st['output']}: {st['shards']} shard(s) (from {st['shards_from']}); "
    head += (f"manifest: {st['samples_read']} sample(s) read, {st['samples_ok']} written, {st['samples_failed']} "
             "failed" if st["samples_read"] else "no manifest rows")
    lines = [head]
    for reason, n in st["failures_by_reason"].items():
        lines.append(f"  failed samples: {n:6d}  {reason}")
    width = max((len(m) for m in st["modalities"]), default=8)
    for m, d in st["modalities"].items():
        parts = []
        if "usage" in d:
            top = ", ".join(f"{i}({n})" for i, n in d["top"][:5])
            if "tokenizer" in d:
                usage = (f"codebook usage {d['used']}/{d['codebook_size']} of its tokenizer's codes ({d['usage']:.1%}; "
                         f"vocabulary {d['vocab_size']})")
            else:
                usage = (f"ids used {d['used']}/{d['vocab_size']} ({d['usage']:.1%} of the vocabulary; tokenizer "
                         "not found)")
            parts.append(f"{usage}, perplexity {d['perplexity']:.1f}, top ids {top}")
            if d.get("out_of_vocab"):
                parts.append(f"{d['out_of_vocab']} ids outside the vocabulary")
        if "values" in d:
            parts.append(f"values {_fmt(d['values'])}")
        for k, r in d.get("ranges", {}).items():
            parts.append(f"{k} {_fmt(r)}")
        if "classes" in d:
            parts.append("classes " + ", ".join(f"{c}({n})" for c, n in list(d["classes"].items())[:5]))
        if d.get("undecodable"):
            parts.append(f"{d['undecodable']} undecodable")
        lines.append(f"  {m:<{width}} {d['samples']:6d} sample(s) in {d['shards']} shard(s)"
                     + (f"; {'; '.join(parts)}" if parts else ""))
        for k, r in d.get("fields", {}).items():
            lines.append(f"  {'':<{width}}   {k}: {_fmt(r)}")
        for k, h in d.get("histograms", {}).items():
            lines.extend(f"  {'':<{width}}   {line}" for line in format_histogram(k, h))
    return lines


def format_histogram(name: str, h: dict, width: int = 40) -> list[str]:
    """A text histogram: one line per bin, ``[lo, hi)  count  ####``."""
    counts = h["counts"]
    step = (h["high"] - h["low"]) / len(counts)
    top = max(counts) or 1
    lines = [f"{name} histogram ({sum(counts)} value(s)):"]
    for i, c in enumerate(counts):
        lo = h["low"] + i * step
        lines.append(f"  [{lo:6.3g}, {lo + step:6.3g})  {c:7d}  {'#' * round(width * c / top)}")
    return lines
