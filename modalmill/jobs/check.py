"""Verify the 4M on-disk contract on any output root (local or ``s3://``), written by modalmill or not.

What :func:`check_output` verifies (``docs/format.md``):

- **layout**: every modality folder holds ``shard-NNNNN.tar`` files, zero-padded to one width, numbered
  contiguously from 0, and every folder has the same shard numbers;
- **alignment**: shard N of every modality holds the same keys in the same order (the key list shared by most
  modalities of the shard is the reference; each deviation is reported on the modality that deviates), keys
  contain no dots (4M takes the key up to the first dot), no key appears twice, one member per key;
- **members**: every member decodes with its modality's codec and matches its spec: dtype and shape, pixel
  labels at the geometry of the sample's stored ``rgb``, ``crop_settings`` inside the rgb image (crop 0 an
  unflipped square of the shorter side), token ids inside the vocabulary, and one row per ``crop_settings``
  row for every per-crop modality (``tok_*`` token rows, ``sam_instance`` entries, the teacher features
  ``clip``/``dinov2``/``imagebind`` and their ``*_global`` vectors), and ``caption`` lists / ``t5_caption``
  sequences that 4M's aligned-caption transforms can index by every crop row;
- **markers** (when ``_modalmill/shards/*.json`` exist): every shard has one, its key list equals the tars'
  and its per-modality sha256 equals the tar's bytes.

Folders the registry does not know are checked for layout and alignment only (a note says so). The readers it
shares with the loader, ``show`` and ``stats`` are in :mod:`modalmill.io.tars`.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..schemas.modalities import IMAGE, TEXT, TOKENS, ModalitySpec, RecordError
from ..io import manifest, storage

from ..io.tars import (SHARD_RE, Layout, _HashingReader, accepted_exts, decode_member, iter_tar_groups,  # noqa: F401
                       scan_layout, spec_for_folder, split_member)


# ============================================================================ the report


@dataclass(frozen=True)
class Violation:
    modality: str  # folder name, or "*" for the whole shard, or "_marker"
    shard: str  # shard file stem ("shard-00003"), or "-" for the whole folder
    key: str  # sample key, or "-"
    what: str
    position: int = -1

    def line(self) -> str:
        return f"{self.modality} {self.shard} {self.key}: {self.what}"


@dataclass
class CheckReport:
    root: str
    violations: list[Violation]
    notes: list[str]
    shards: int
    modalities: list[str]
    samples: int
    markers: int

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return {"output": self.root, "ok": self.ok, "shards": self.shards, "modalities": self.modalities,
                "samples": self.samples, "markers": self.markers, "notes": self.notes,
                "violations": [{k: v for k, v in asdict(x).items() if k != "position"} for x in self.violations]}


# ============================================================================ member validation


def _record_what(e: RecordError) -> str:
    msg = str(e).split(f"field {e.field!r}: ", 1)[-1]
    return f"{e.field}: {msg}"


def validate_value(spec: ModalitySpec, value: Any, key: str, image_hw: tuple[int, int] | None) -> None:
    """Raise RecordError/ValueError when a decoded ``value`` does not match ``spec``."""
    if spec.ext == "npz":
        if not isinstance(value, dict) or set(value) != {"emb", "mask_valid"}:
            raise spec._err(key, "type", f"expected arrays 'emb' and 'mask_valid', got {sorted(value)}")
        emb, mask = value["emb"], value["mask_valid"]
        width = spec.shape[2]  # an int, or a symbolic "C" (any width)
        if emb.ndim != 3 or (isinstance(width, int) and emb.shape[2] != width):
            raise spec._err(key, "shape", f"emb must be [N, L, {spec.shape[2]}], got {emb.shape}")
        if mask.shape != emb.shape[:2]:
            raise spec._err(key, "shape", f"mask_valid must be {emb.shape[:2]}, got {mask.shape}")
        return
    if isinstance(value, np.ndarray):
        spec.check_array(value, key, image_hw if spec.is_pixel_aligned and spec.kind != IMAGE else None)
        return
    if spec.ext == "json" or spec.kind == TEXT:
        spec.encode(value, key)  # runs the registry's JSON validators and checks it serialises
        return
    raise spec._err(key, "type", f"unexpected decoded value {type(value).__name__}")


def _check_crops(crops: np.ndarray, hw: tuple[int, int]) -> str | None:
    h, w = hw
    top, left, ch, cw, flip = (crops[:, i] for i in range(5))
    bad = (top < 0) | (left < 0) | (ch <= 0) | (cw <= 0) | (top + ch > h) | (left + cw > w)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        return f"crop {i} {crops[i].tolist()} lies outside the {h}x{w} rgb image"
    if not np.isin(flip, (0, 1)).all():
        return f"hflip must be 0 or 1, got {sorted(set(flip.tolist()))}"
    if len(crops) and (crops[0, 2] != crops[0, 3] or crops[0, 2] != min(h, w) or crops[0, 4] != 0):
        return f"crop 0 must be the unflipped centre square of side {min(h, w)}, got {crops[0].tolist()}"
    return None


PER_CROP_LISTS = ("caption", "t5_caption")


def per_crop_problem(modality: str, value: Any, n_crops: int | None) -> str | None:
    """Why 4M's trainer cannot index ``value`` by every crop row, or None.

    ``caption``: ``CaptionTransform(aligned_captions=True)`` takes ``val[rand_aug_idx]`` of a list, so a list needs
    an entry for every ``crop_settings`` row (a plain string works with any row). ``t5_caption``:
    ``CaptionEmbTransform`` indexes ``emb`` by the row only when it holds more than one sequence, so N is 1 or at
    least the number of rows."""
    if modality == "caption":
        if isinstance(value, list):
            if not value:
                return "empty caption list (4M's CaptionTransform has no entry to pick)"
            if n_crops is not None and len(value) < n_crops:
                return (f"{len(value)} caption entries but crop_settings has {n_crops} crops: 4M's aligned captions "
                        f"read entry i for crop i (IndexError for crops {len(value)}..{n_crops - 1})")
        return None
    if modality == "t5_caption" and n_crops is not None:
        n = int(value["emb"].shape[0])
        if n == 0:
            return "t5_caption holds no sequence"
        if 1 < n < n_crops:
            return (f"{n} T5 sequences but crop_settings has {n_crops} crops: 4M reads sequence i for crop i when "
                    "there is more than one (IndexError)")
    return None


# ============================================================================ one tar


@dataclass
class _ShardContext:
    name: str
    image_hw: dict[str, tuple[int, int]] = field(default_factory=dict)
    n_crops: dict[str, int] = field(default_factory=dict)


@dataclass
class _TarResult:
    keys: list[str]
    sha256: str | None
    violations: list[Violation]


def _scan_tar(url: str, folder: str, spec: ModalitySpec | None, ctx: _ShardContext, parse: bool) -> _TarResult:
    scan = _TarScan(folder, spec, ctx, parse)
    sha = scan.read(url)
    return _TarResult(keys=scan.keys, sha256=sha, violations=scan.out)


class _TarScan:
    """One streamed pass over one modality tar: its keys in order, its sha256 and every violation found (member
    names, duplicate keys and, with ``parse``, each sample decoded and checked against the shard's other tars)."""

    def __init__(self, folder: str, spec: ModalitySpec | None, ctx: _ShardContext, parse: bool):
        self.folder, self.spec, self.ctx, self.parse = folder, spec, ctx, parse
        self.out: list[Violation] = []
        self.keys: list[str] = []
        self.seen: dict[str, int] = {}
        self.accepted = accepted_exts(spec) if spec else ()

    def v(self, key, what, pos=-1):
        self.out.append(Violation(self.folder, self.ctx.name, key, what, pos))

    def read(self, url: str) -> str | None:
        """Stream the tar, grouping members by key; the tar's sha256, or None when it could not be read whole."""
        spec, accepted, v = self.spec, self.accepted, self.v
        current: tuple[str, dict[str, bytes]] | None = None
        pos = 0
        try:
            with storage.open_read(url) as raw:
                hr = _HashingReader(raw)
                with tarfile.open(fileobj=hr, mode="r|*") as tar:
                    for info in tar:
                        if not info.isfile():
                            if not info.isdir():
                                v("-", f"member {info.name!r} is not a regular file")
                            continue
                        key, ext = split_member(info.name)
                        if spec is not None and ext not in accepted:
                            self.bad_extension(info.name, key, ext, pos)
                        if current is None or current[0] != key:
                            if current is not None:
                                self.finish(current[0], current[1], pos)
                                pos += 1
                            current = (key, {})
                        fobj = tar.extractfile(info)
                        data = fobj.read() if fobj is not None else b""
                        if ext in current[1]:
                            v(key, f"member {info.name!r} appears twice in a row", pos)
                        current[1][ext] = data
                    if current is not None:
                        self.finish(current[0], current[1], pos)
                        current = None
                hr.drain()
                return hr.sha.hexdigest()
        except (FileNotFoundError, PermissionError) as e:
            v("-", f"cannot read the tar: {e}")
        except (tarfile.TarError, EOFError, OSError) as e:
            where = f" after {len(self.keys)} sample(s)" if self.keys else ""
            v(current[0] if current else "-", f"corrupt or truncated tar{where}: {e}", pos)
        return None

    def bad_extension(self, name: str, key: str, ext: str, pos: int) -> None:
        tail = ext.rsplit(".", 1)[-1]
        if "." in ext and tail in self.accepted:
            self.v(key, f"key contains a dot: member {name!r} is read as key {key!r} with extension {ext!r}", pos)
        else:
            self.v(key, f"member {name!r}: extension .{ext} is not one of .{', .'.join(self.accepted)}", pos)

    def finish(self, key: str, members: dict[str, bytes], pos: int) -> None:
        """One sample's members, all read: its key noted, and, with ``parse``, its value decoded and checked."""
        if key in self.seen:
            self.v(key, f"duplicate key: also at position {self.seen[key]}", pos)
        self.seen.setdefault(key, pos)
        self.keys.append(key)
        if self.spec is None or not self.parse:
            return
        usable = [e for e in members if e in self.accepted]
        if len(members) > 1:
            self.v(key, f"{len(members)} members for one key (.{', .'.join(members)}): expected one "
                        f".{self.spec.ext}", pos)
        if usable:  # else the extension problem was reported per member
            self.check_value(key, usable[0], members[usable[0]], pos)

    def check_value(self, key: str, ext: str, data: bytes, pos: int) -> None:
        """Decode one member with its modality's codec, validate it against the spec, and check it against what
        the shard's other tars said of the sample (image size, number of crops)."""
        spec, ctx, v = self.spec, self.ctx, self.v
        try:
            value = decode_member(spec, ext, data)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt member
            v(key, f"cannot decode {key}.{ext} with the {spec.name} codec: {type(e).__name__}: {e}", pos)
            return
        hw = ctx.image_hw.get(key)
        try:
            validate_value(spec, value, key, hw)
        except RecordError as e:
            v(key, _record_what(e), pos)
            return
        except ValueError as e:
            v(key, str(e), pos)
            return
        if spec.kind == IMAGE:
            ctx.image_hw[key] = tuple(value.shape[:2])
        elif spec.name == "crop_settings":
            ctx.n_crops[key] = int(value.shape[0])
            if hw is not None:
                problem = _check_crops(value, hw)
                if problem:
                    v(key, problem, pos)
        elif spec.shape[:1] == ("n_crops",) and key in ctx.n_crops and len(value) != ctx.n_crops[key]:
            # one token row / sam_instance entry / teacher feature row per crop_settings row
            what = "token rows" if spec.kind == TOKENS else f"{spec.name} entries" if spec.dtype == "object" \
                else f"{spec.name} rows"
            v(key, f"{len(value)} {what} but crop_settings has {ctx.n_crops[key]} crops "
                   f"({'entry' if spec.dtype == 'object' else 'row'} i = crop i)", pos)
        elif spec.name in PER_CROP_LISTS:
            problem = per_crop_problem(spec.name, value, ctx.n_crops.get(key))
            if problem:
                v(key, problem, pos)


# ============================================================================ one shard


def _describe(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _compare_keys(folder: str, shard: str, keys: list[str], ref: list[str], ref_name: str) -> list[Violation]:
    out = []
    if keys == ref:
        return out
    ref_set, key_set = set(ref), set(keys)
    for i, k in enumerate(ref):
        if k not in key_set:
            out.append(Violation(folder, shard, k, f"key missing (position {i} in {ref_name})", i))
    for i, k in enumerate(keys):
        if k not in ref_set:
            out.append(Violation(folder, shard, k, f"key at position {i} is not in {ref_name}", i))
    common_here = [k for k in keys if k in ref_set]
    common_ref = [k for k in ref if k in key_set]
    if common_here != common_ref:
        i = next(i for i, (a, b) in enumerate(zip(common_here, common_ref)) if a != b)
        out.append(Violation(folder, shard, common_here[i],
                             f"keys in a different order than {ref_name}: {common_here[i]!r} where "
                             f"{ref_name} has {common_ref[i]!r}", keys.index(common_here[i])))
    return out


def _folder_order(folders: list[str]) -> list[str]:
    """The rgb image first (pixel labels are checked at its geometry), then crop_settings, then the rest."""
    def rank(f):
        spec = spec_for_folder(f)
        return (0 if spec and spec.kind == IMAGE else 1 if spec and spec.name == "crop_settings" else 2, f)
    return sorted(folders, key=rank)


def _check_shard(shard: str, urls: dict[str, str], marker: dict | None, parse: bool) -> tuple[list[Violation], int]:
    ctx = _ShardContext(shard)
    violations: list[Violation] = []
    if marker is not None and marker.get("state") == "pending":
        violations.append(Violation("_marker", shard, "-", "an interrupted rewrite (pending marker, rewriting "
                                    f"{', '.join(marker.get('rewrites') or [])}): the next run redoes the shard"))
        marker = None
    results: dict[str, _TarResult] = {}
    for folder in _folder_order(list(urls)):
        res = _scan_tar(urls[folder], folder, spec_for_folder(folder), ctx, parse)
        results[folder] = res
        violations.extend(res.violations)
    # the reference key list: the one most modalities share (the marker's list counts as a vote)
    votes = Counter(tuple(r.keys) for r in results.values())
    if marker is not None:
        votes[tuple(marker.get("keys", []))] += 1
    ref = list(max(votes.items(), key=lambda kv: kv[1])[0]) if votes else []
    holders = [f for f, r in results.items() if r.keys == ref]
    ref_name = "the other modalities" if holders else "the marker"
    if holders:
        ref_name = f"the other modalities ({_describe(holders)})"
    for folder, res in results.items():
        violations.extend(_compare_keys(folder, shard, res.keys, ref, ref_name))
    if marker is not None:
        mkeys = list(marker.get("keys", []))
        if mkeys != ref:
            diff = _compare_keys("_marker", shard, mkeys, ref, ref_name)
            violations.extend(Violation("_marker", shard, d.key, f"marker key list: {d.what}", d.position)
                              for d in diff)
        for m, info in sorted(marker.get("modalities", {}).items()):
            if m not in results:
                violations.append(Violation(m, shard, "-", "listed in the shard's marker but the tar is missing"))
                continue
            want, got = info.get("sha256"), results[m].sha256
            if want and got and want != got:  # the digest of the bytes: what a listing cannot see
                violations.append(Violation(m, shard, "-", f"sha256 of the tar ({got[:12]}…) differs from the "
                                                           f"marker's ({want[:12]}…)"))
        for m in sorted(set(results) - set(marker.get("modalities", {}))):
            violations.append(Violation(m, shard, "-", "tar not recorded in the shard's marker (stale or foreign)"))
    return violations, len(ref)


# ============================================================================ the whole output


def check_output(root: str, parse: bool = True, workers: int = 4) -> CheckReport:
    """Check ``root`` against the 4M contract. ``parse=False`` checks layout, keys and markers only."""
    layout = scan_layout(root)
    markers = manifest.list_markers(root, with_pending=True)
    if not layout.folders and not markers:
        raise FileNotFoundError(f"{root}: no modality folders with .tar shards (and no {manifest.META_DIR}/ markers)")
    violations: list[Violation] = []
    notes: list[str] = []
    if layout.stray:
        notes.append(f"files outside modality folders, ignored: {_describe(layout.stray)}")

    numbers: dict[str, dict[int, str]] = {}
    names: dict[int, str] = {}  # shard number -> displayed name
    for folder, files in layout.folders.items():
        spec = spec_for_folder(folder)
        if spec is None:
            notes.append(f"{folder}: not a registered modality; layout and alignment checked, members not parsed")
        widths: dict[int, list[str]] = {}
        for name in sorted(files):
            m = SHARD_RE.match(name)
            if not m:
                violations.append(Violation(folder, name, "-", "not a shard tar: names must be shard-NNNNN.tar"))
                continue
            widths.setdefault(len(m.group(1)), []).append(name)
            numbers.setdefault(folder, {})[int(m.group(1))] = name[: -len(".tar")]
        if len(widths) > 1:
            main_width = max(widths, key=lambda w: (len(widths[w]), w))
            for w, shard_files in sorted(widths.items()):
                if w != main_width:
                    for name in shard_files:
                        violations.append(Violation(folder, name[: -len(".tar")], "-",
                                                    f"shard number not zero-padded to {main_width} digits like "
                                                    "the others (brace patterns would miss it)"))
        for n, name in numbers.get(folder, {}).items():
            names.setdefault(n, name)

    all_numbers = sorted(set().union(*[set(d) for d in numbers.values()])) if numbers else []
    width = max((len(SHARD_RE.match(n + ".tar").group(1)) for n in names.values()), default=5)
    for n in range(all_numbers[-1] + 1 if all_numbers else 0):
        if n not in names:
            violations.append(Violation("*", f"shard-{n:0{width}d}", "-",
                                        "gap in the shard numbers: no modality has this shard (numbers must be "
                                        "contiguous from 0)"))
            continue
        have = [f for f in numbers if n in numbers[f]]
        for folder, have_numbers in numbers.items():
            if n not in have_numbers:
                violations.append(Violation(folder, names[n], "-",
                                            f"shard missing in this modality (present in {_describe(have)})"))

    # markers: by shard name
    by_name = {names[n]: n for n in all_numbers}
    for shard in sorted(set(markers) - set(by_name)):
        violations.append(Violation("_marker", shard, "-", "completion marker without any shard tars"))
    if markers:
        for shard in sorted(set(by_name) - set(markers)):
            violations.append(Violation("_marker", shard, "-", "no completion marker: the shard is unfinished "
                                                               "(modalmill's loader skips it)"))

    def run(n: int):
        shard = names[n]
        urls = {f: layout.folders[f][numbers[f][n] + ".tar"] for f in numbers if n in numbers[f]}
        return _check_shard(shard, urls, markers.get(shard), parse)

    samples = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for shard_violations, n_keys in pool.map(run, all_numbers):
            violations.extend(shard_violations)
            samples += n_keys
    violations.sort(key=lambda x: (x.shard, x.modality, x.position, x.key, x.what))
    return CheckReport(root=root, violations=violations, notes=notes, shards=len(all_numbers),
                       modalities=list(layout.folders), samples=samples, markers=len(markers))
