"""``modalmill import``: add ground-truth annotations to an existing output as a modality, aligned.

Steps: read the source (:mod:`modalmill.io.annotations`), match its entries to sample keys (``key``: the entry's
name without extension; ``filename``: its file name against the last part of the key; ``source_url``: against the
manifest's ``source_url`` of each sample, whole or by file name), map classes (detection: by name, with a report
of names that are not COCO classes; semseg: by id through a class map, every id checked against 4M's semseg classes
before anything is written; COCO panoptic: by category name), write the resolved index under
``OUT/_modalmill/imports/`` and run the pipeline's ``--only`` update with the ``import_<modality>`` labeler
(:mod:`modalmill.labelers.imported`), which writes the modality's tars from each shard's key list.

Samples without an annotation: ``missing="fail"`` (the default) refuses before anything is written and names
them; ``missing="drop"`` drops them from every modality of their shard (manifest reason ``no_annotation``), so
every shard keeps one key list, as 4M's loader requires.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections import Counter
from typing import Any
from urllib.parse import urlparse

import numpy as np
from tqdm import tqdm

from .spec import job_from_dict
from ..io import manifest, storage
from ..io.annotations import AnnotationError, AnnotationSet, read_annotations
from ..labelers.imported import DEPTH_UNITS, read_array
from ..labelers.semseg import COCO_PANOPTIC_CLASSES, COCO_THING_CLASSES
from ..schemas.manifest_schema import OK

IMPORTABLE = ("det", "semseg_coco", "depth", "normal", "caption")
MATCHES = ("key", "filename", "source_url")
SEMSEG_VALID = set(range(len(COCO_PANOPTIC_CLASSES))) | {255}


class ImportError_(ValueError):
    """A problem with what is being imported (named precisely); nothing was written."""


def _stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in base else name


def _samples(out: str, need_urls: bool) -> list[tuple[str, str | None]]:
    """(key, source_url) of every committed sample, shard by shard in key order."""
    markers = manifest.list_markers(out)
    if not markers:
        raise ImportError_(f"{out}: no completed shards (label the images first, then import)")
    res = []
    for shard, mk in sorted(markers.items()):
        urls = {}
        if need_urls:
            urls = {r.key: r.source_url for r in manifest.read_rows(out, shard) if r.status == OK}
        res += [(k, urls.get(k)) for k in mk["keys"]]
    return res


def match_entries(names: list[str], samples: list[tuple[str, str | None]], how: str) -> tuple[dict, list[str]]:
    """``{key: entry name}`` and the entry names that match no sample."""
    if how == "key":
        index = {k: k for k, _ in samples}
        want = {n: index.get(n) or index.get(_stem(n).replace(".", "_")) for n in names}
    else:
        by: dict[str, list[str]] = {}
        for k, url in samples:
            if how == "filename":
                by.setdefault(k.rsplit("/", 1)[-1], []).append(k)
            elif url:
                by.setdefault(url, []).append(k)
                by.setdefault(_stem(posixpath.basename(urlparse(url).path)), []).append(k)
        want = {}
        for n in names:
            hits = by.get(n) or by.get(_stem(n.rsplit("/", 1)[-1])) or []
            if len(set(hits)) > 1:
                raise ImportError_(f"annotation {n!r} matches {len(set(hits))} samples by {how} "
                                   f"({', '.join(sorted(set(hits))[:3])}); match by key instead")
            want[n] = hits[0] if hits else None
    keyed: dict[str, str] = {}
    for n, k in want.items():
        if k is None:
            continue
        if k in keyed:
            raise ImportError_(f"annotations {keyed[k]!r} and {n!r} both match sample {k!r} (--match {how})")
        keyed[k] = n
    return keyed, sorted(n for n, k in want.items() if k is None)


def _load_map(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        data = json.loads(storage.read_bytes(path if "://" in path else os.path.abspath(path)))
    except (OSError, ValueError) as e:
        raise ImportError_(f"--class-map {path}: {e}") from None
    if not isinstance(data, dict):
        raise ImportError_(f"--class-map {path}: expected a JSON object (source class -> 4M class)")
    return data


def det_records(ann: AnnotationSet, keyed: dict[str, str], class_map: dict | None) -> tuple[dict, Counter]:
    """key -> {"det": 4M's det JSON, "size": [w, h] of the annotated image or None}; and the instances per class
    name that is not one of 4M's 80 COCO classes (kept, reported: 4M tokenises them as plain words)."""
    names = dict(class_map or {})
    unmapped: Counter = Counter()
    out = {}
    for key, name in keyed.items():
        item = ann.items[name]
        insts = []
        for inst in item["instances"]:
            if "box_xyxy" in inst:
                w, h = item["width"], item["height"]
                box = [inst["box_xyxy"][0] / w, inst["box_xyxy"][1] / h, inst["box_xyxy"][2] / w,
                       inst["box_xyxy"][3] / h]
            else:
                box = list(inst["box_norm"])
            cls = str(names.get(inst["class_name"], inst["class_name"]))
            if cls not in COCO_THING_CLASSES:
                unmapped[cls] += 1
            insts.append({"boxes": [min(1.0, max(0.0, float(v))) for v in box], "class_name": cls, "score": 1.0})
        size = [item["width"], item["height"]] if "width" in item else None
        out[key] = {"det": {"instances": insts}, "size": size}
    return out, unmapped


def semseg_class_map(class_map: dict | None) -> dict[int, int] | None:
    """``{source id: 4M id}``; a value may be a COCO-panoptic class name."""
    if class_map is None:
        return None
    out = {}
    for k, v in class_map.items():
        if isinstance(v, str):
            if v not in COCO_PANOPTIC_CLASSES:
                raise ImportError_(f"--class-map: {v!r} is not a COCO-panoptic class name")
            v = COCO_PANOPTIC_CLASSES.index(v)
        if not (isinstance(v, int) and v in SEMSEG_VALID) or not str(k).isdigit():
            raise ImportError_(f"--class-map: {k!r} -> {v!r}: expected source id -> 0..132 or 255")
        out[int(k)] = int(v)
    return out


def panoptic_records(ann: AnnotationSet, keyed: dict[str, str], class_map: dict | None, source: str) -> dict:
    """key -> {"png", "segments": {segment id: 4M class id}}: COCO panoptic category names (through ``class_map``,
    name -> COCO-panoptic name) to 4M's ids; a name that is not a COCO-panoptic class is an error."""
    names = dict(class_map or {})
    out = {}
    for key, name in keyed.items():
        item = ann.items[name]
        segs = {}
        for sid, cat in item["segments"].items():
            cls = names.get(cat, cat)
            if cls not in COCO_PANOPTIC_CLASSES:
                raise ImportError_(f"{source}: category {cat!r} (image {name}) is not a COCO-panoptic class; map it "
                                   f"with --class-map")
            segs[sid] = COCO_PANOPTIC_CLASSES.index(cls)
        out[key] = {"png": item["png"], "segments": segs}
    return out


def check_semseg(urls: list[str], cmap: dict[int, int] | None, show_progress: bool) -> None:
    """Every id of every mask, after the class map, must be one of 4M's semseg classes: else name the file."""
    for url in tqdm(urls, desc="check semseg ids", unit="mask", disable=not show_progress):
        arr = read_array(url)
        if arr.ndim == 3:
            if not (arr[..., :1] == arr[..., :3]).all():
                raise ImportError_(f"{url}: a colour PNG; semseg masks are 1-channel class-index PNGs")
            arr = arr[..., 0]
        ids = set(int(i) for i in np.unique(arr))
        bad = sorted(ids - set(cmap)) if cmap is not None else sorted(ids - SEMSEG_VALID)
        if bad:
            what = "not in --class-map" if cmap is not None else "outside 4M's semseg classes (0..132, 255)"
            raise ImportError_(f"{url}: class id(s) {bad[:10]} {what}")


def _spec(out: str, modality: str, labeler: str, config: dict) -> Any:
    runs = [r for r in manifest.list_runs(out) if isinstance(r.get("spec"), dict)]
    last = sorted(runs, key=lambda r: r.get("run_id", ""))[-1]["spec"] if runs else {}
    markers = manifest.list_markers(out)
    done = ",".join(str(i) for i in sorted(int(m["index"]) for m in markers.values()))
    if last:
        spec = {k: v for k, v in last.items() if k not in ("name", "shards", "output")}
    else:
        n = max(int(m["index"]) for m in markers.values()) + 1
        by = {int(m["index"]): m["source"] for m in markers.values()}
        spec = {"input": [by.get(i, f"(no output for shard {i})") for i in range(n)], "seed": 0}
    old = {k: v for k, v in (spec.get("labelers") or {}).items() if k != labeler}
    mods = list(dict.fromkeys(list(spec.get("modalities") or []) + [modality]))
    spec.update(name=f"{(last or {}).get('name', 'job')}-import-{modality}", output=out, shards=done,
                modalities=mods, labelers={labeler: {"config": config}, **old})
    if isinstance(spec.get("ray"), dict):
        spec["ray"] = {k: v for k, v in spec["ray"].items() if k != "address" and v is not None}
    if modality == "caption":  # captions come from the import labeler, not from the input's text
        spec["text"] = {**(spec.get("text") or {}), "caption_source": "model"}
    return job_from_dict(spec, where="modalmill import")


def prepare_import(out: str, modality: str, source: str, *, fmt: str | None = None, match: str = "key",
                   missing: str = "fail", class_map: str | None = None, classes: str | None = None,
                   units: str = "metres", png_scale: float = 1.0, panoptic_dir: str | None = None,
                   show_progress: bool = True):
    """Read, match, check and write the resolved index; returns (job spec, report). Raises ImportError_ /
    AnnotationError before anything is written to the output's tars."""
    if modality not in IMPORTABLE:
        raise ImportError_(f"--modality {modality!r}: importable modalities are {', '.join(IMPORTABLE)}")
    if match not in MATCHES or missing not in ("fail", "drop") or units not in DEPTH_UNITS:
        raise ImportError_(f"--match is one of {MATCHES}, --missing fail|drop, --units one of {DEPTH_UNITS}")
    ann = read_annotations(modality, source, fmt, column=match, classes=classes, panoptic_dir=panoptic_dir)
    samples = _samples(out, need_urls=match == "source_url")
    keyed, unmatched = match_entries(list(ann.items), samples, match)
    lacking = [k for k, _ in samples if k not in keyed]
    if not keyed:
        raise ImportError_(f"none of the {len(ann.items)} annotations in {source} matches any of the "
                           f"{len(samples)} samples by {match} (e.g. {list(ann.items)[:2]} vs "
                           f"{[k for k, _ in samples[:2]]})")
    if lacking and missing == "fail":
        raise ImportError_(f"{len(lacking)} of {len(samples)} samples have no annotation (e.g. {lacking[:5]}); "
                           f"nothing was written. --missing drop drops them from every modality (recorded in "
                           f"the manifest as no_annotation)")
    cmap = _load_map(class_map)
    report: dict[str, Any] = {"modality": modality, "format": ann.format, "source": ann.source,
                              "digest": f"sha256:{ann.digest}", "samples": len(samples), "matched": len(keyed),
                              "unannotated": len(lacking), "annotations_matching_no_sample": len(unmatched),
                              **ann.notes}
    extra: dict[str, Any] = {}
    if modality == "det":
        records, unmapped = det_records(ann, keyed, cmap)
        report["unmapped_classes"] = dict(unmapped)
    elif modality == "semseg_coco" and ann.format == "coco":
        records = panoptic_records(ann, keyed, cmap, source)
    elif modality == "semseg_coco":
        sm = semseg_class_map(cmap)
        records = {k: ann.items[n] for k, n in keyed.items()}
        check_semseg(list(records.values()), sm, show_progress)
        extra["class_map"] = {str(k): v for k, v in sm.items()} if sm is not None else None
    else:
        records = {k: ann.items[n] for k, n in keyed.items()}
    index = manifest.meta_url(out, "imports", f"{modality}-{ann.digest[:16]}.json")
    storage.write_bytes(index, json.dumps({"modality": modality, "format": ann.format, "source": ann.source,
                                           "digest": ann.digest, "match": match, **extra,
                                           "records": records}).encode())
    config = {"index": index, "digest": ann.digest}
    if modality == "depth":
        config.update(units=units, png_scale=float(png_scale))
    return _spec(out, modality, f"import_{modality}", config), report


def import_annotations(out: str, modality: str, source: str, *, force: bool = False, address: str | None = None,
                       show_progress: bool = True, wait: bool = False, **options) -> dict:
    """Import ``source`` into the output ``out`` as ``modality``; returns the run summary with ``import`` (the
    report: matched, unannotated, unmapped classes, ...). ``options``: see :func:`prepare_import`."""
    from .runner import run_job

    spec, report = prepare_import(out, modality, source, show_progress=show_progress, **options)
    summary = run_job(spec, only=[modality], force=force, address=address, show_progress=show_progress, wait=wait)
    summary["import"] = report
    return summary


__all__ = ["AnnotationError", "ImportError_", "import_annotations", "prepare_import", "match_entries"]
