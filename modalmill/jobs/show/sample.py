"""Find a sample in an output root (through the completion markers, or by scanning the tars of an output without
markers), read and decode its member of every modality, and write its grid as a PNG."""

from __future__ import annotations

import os
import re
from typing import Any

import pyarrow.compute as pc

from ...io import manifest
from ...io.readers import shard_name
from ...io.tars import decode_member, iter_tar_groups, scan_layout, spec_for_folder
from .canvas import Context
from .grid import ShowResult, render_values
from .tokens import load_tokenizers


def find_sample(root: str, key: str, shard: str | None = None) -> tuple[str, dict[str, str]]:
    """(shard name, {modality folder: tar url}) of the shard holding ``key``."""
    markers = manifest.list_markers(root)
    layout = scan_layout(root)
    if shard is None and markers:
        shard = next((name for name, mk in sorted(markers.items()) if key in mk.get("keys", ())), None)
    if shard is None:
        # no markers (or a key not in them): scan the tars of one modality folder, the rgb if there is one
        folders = sorted(layout.folders, key=lambda f: (f != "rgb", f))
        if folders:
            for name in sorted(layout.folders[folders[0]]):
                url = layout.folders[folders[0]][name]
                if name.endswith(".tar") and any(k == key for k, _ in iter_tar_groups(url)):
                    shard = name[: -len(".tar")]
                    break
    if shard is None:
        raise ValueError(why_absent(root, key))
    urls = {f: files[f"{shard}.tar"] for f, files in layout.folders.items() if f"{shard}.tar" in files}
    if shard in markers:
        urls = {f: u for f, u in urls.items() if f in markers[shard].get("modalities", {})}
    if not urls:
        raise ValueError(f"{root}: shard {shard!r} has no modality tars")
    return shard, urls


def why_absent(root: str, key: str) -> str:
    """The message for a key that no tar holds: where and why it failed when the manifest records it failing
    (shard, source, stage, error), else that no sample has the key (naming shards that failed as a whole, whose
    samples are unknown)."""
    columns = ["shard", "source", "position", "key", "status", "stage", "error"]
    for table in manifest.iter_manifest(root, columns=columns):
        hits = [r for r in table.filter(pc.equal(table["key"], key)).to_pylist() if r["status"] != "ok"]
        if hits:
            r = hits[-1]
            return (f"{root}: sample {key!r} failed ({r['stage']}: {r['error']}); it is in no tar of "
                    f"{shard_name(r['shard'])} (input {r['source']}, position {r['position']}); see `modalmill stats`")
    failed = sorted(manifest.list_failures(root))
    note = (f" ({len(failed)} shard(s) failed as a whole, their samples unknown: {', '.join(failed[:3])}"
            f"{' ...' if len(failed) > 3 else ''}; see `modalmill status`)") if failed else ""
    return f"{root}: no sample with key {key!r}{note}"


def read_sample(root: str, key: str, shard: str | None = None,
                modalities: list[str] | None = None) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(shard, {modality: decoded value}, {modality: error}) of the sample ``key``."""
    shard, urls = find_sample(root, key, shard)
    if modalities:
        unknown = [m for m in modalities if m not in urls]
        if unknown:
            raise ValueError(f"{root}: {shard} has no {', '.join(unknown)} (it has {', '.join(sorted(urls))})")
        urls = {m: urls[m] for m in modalities}
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for m, url in urls.items():
        spec = spec_for_folder(m)
        try:
            members = next((mem for k, mem in iter_tar_groups(url) if k == key), None)
            if members is None:
                errors[m] = f"key {key!r} is not in {m}/{shard}.tar"
                continue
            if spec is None:
                errors[m] = f"{m!r} is not a registered modality"
                continue
            ext = next((e for e in members if e == spec.ext), next(iter(members)))
            values[m] = decode_member(spec, ext, members[ext])
        except Exception as e:  # noqa: BLE001 - show what is readable, say what is not
            errors[m] = f"{type(e).__name__}: {e}"
    return shard, values, errors


def _original_size(root: str, shard: str, key: str, values: dict[str, Any]) -> tuple[int, int] | None:
    meta = values.get("metadata")
    if isinstance(meta, dict) and "original_width" in meta and "original_height" in meta:
        return int(meta["original_width"]), int(meta["original_height"])
    for row in manifest.read_rows(root, shard):
        if row.key == key and row.original_width and row.original_height:
            return int(row.original_width), int(row.original_height)
    return None


def default_path(root: str, key: str) -> str:
    """``<output folder name>_<key>.png`` in the current directory."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.rstrip("/").rsplit("/", 1)[-1] or "output")
    return f"{base}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}.png"


def show_sample(root: str, key: str, out: str | None = None, shard: str | None = None,
                modalities: list[str] | None = None, tokenizers: dict[str, str] | None = None) -> ShowResult:
    """Render sample ``key`` of the output ``root`` and write it as a PNG (``out``, default
    :func:`default_path`). Returns the image, the panel layout and the path."""
    loaded = load_tokenizers(tokenizers or {})
    shard, values, errors = read_sample(root, key, shard, modalities)
    ctx = Context(tokenizers=loaded, original_size=_original_size(root, shard, key, values))
    result = render_values(values, key=key, header=f"{root}   key {key}   ({shard})", ctx=ctx, errors=errors)
    result.shard = shard
    result.path = out or default_path(root, key)
    directory = os.path.dirname(os.path.abspath(result.path))
    os.makedirs(directory, exist_ok=True)
    result.image.save(result.path, format="PNG", optimize=True)
    return result
