"""``modalmill show OUT --dedup NAME --group G``: one duplicate group of a ``modalmill dedup`` result as one PNG.

Every member's stored rgb, side by side in the result's order, titled with its key, shard, image size and distance
to the kept sample (Hamming bits, 1 - cosine, or 0 for exact); the kept sample framed green, the others red.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw

from ...io import storage
from ...io.tars import decode_member, iter_tar_groups, scan_layout
from ...schemas.modalities import get_modality
from ..dedup import read_dedup
from .canvas import BG, INK, PANEL, _draw_text, _fit, _font

KEEP, DROP = (40, 160, 60), (200, 40, 40)


def _images(root: str, members: list[dict]) -> dict[str, np.ndarray]:
    layout = scan_layout(root)
    spec = get_modality("rgb")
    out: dict[str, np.ndarray] = {}
    for shard in sorted({m["shard"] for m in members}):
        want = {m["key"] for m in members if m["shard"] == shard}
        for key, group in iter_tar_groups(layout.folders["rgb"][f"{shard}.tar"]):
            if key in want:
                ext, data = next(iter(group.items()))
                out[(shard, key)] = decode_member(spec, ext, data)
    return out


def show_group(root: str, name: str, group: int | None = None, out: str | None = None) -> str:
    """Write the PNG of duplicate group ``group`` (default: the largest group) and return its path."""
    table, meta = read_dedup(root, name)
    rows = table.to_pylist()
    if not rows:
        raise ValueError(f"{root}: dedup result {name!r} has no duplicate groups")
    if group is None:
        sizes: dict[int, int] = {}
        for r in rows:
            sizes[r["group"]] = sizes.get(r["group"], 0) + 1
        group = min(sizes, key=lambda g: (-sizes[g], g))
    members = [r for r in rows if r["group"] == group]
    if not members:
        last = max(r["group"] for r in rows)
        raise ValueError(f"{root}: dedup result {name!r} has no group {group} (groups 0..{last})")
    images = _images(root, members)
    title_h, label_h, pad = 34, 40, 8
    width = pad + len(members) * (PANEL + pad)
    canvas = Image.new("RGB", (width, title_h + PANEL + label_h + pad), BG)
    draw = ImageDraw.Draw(canvas)
    _draw_text(draw, (pad, 8), f"{name} ({meta.get('method')}): group {group}, {len(members)} samples; keep rule: "
                               f"{meta.get('keep_rule', '')}"[:160], INK, _font(13))
    for i, m in enumerate(members):
        x = pad + i * (PANEL + pad)
        tile = _fit(Image.fromarray(images[(m["shard"], m["key"])]))
        canvas.paste(tile, (x + (PANEL - tile.width) // 2, title_h + (PANEL - tile.height) // 2))
        colour = KEEP if m["keep"] else DROP
        draw.rectangle([x - 2, title_h - 2, x + PANEL + 1, title_h + PANEL + 1], outline=colour, width=3)
        h, w = images[(m["shard"], m["key"])].shape[:2]
        _draw_text(draw, (x, title_h + PANEL + 4), f"{'KEEP' if m['keep'] else 'drop'} {m['key']} ({m['shard']})",
                   colour, _font(12))
        _draw_text(draw, (x, title_h + PANEL + 20), f"{w}x{h}  distance {m['distance']:.4g}", INK, _font(12))
    path = out or f"{os.path.basename(os.path.normpath(root)) or 'output'}_{name}_group{group}.png"
    buf = io.BytesIO()
    canvas.save(buf, "PNG")
    storage.write_bytes(path, buf.getvalue()) if storage.is_s3(path) else open(path, "wb").write(buf.getvalue())
    return path
