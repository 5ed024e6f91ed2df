"""The picture ``show`` writes: one titled panel per modality in a grid, each drawn by its registered renderer;
a label that cannot be drawn becomes a red panel saying why, without hiding the others."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ...io.tars import spec_for_folder
from ...schemas.modalities import MODALITIES
from .canvas import BG, COLUMNS, HEADER_H, INK, PAD, PANEL, TITLE_H, Context, _draw_text, _fit, _font, _text
from .registry import renderer_for


@dataclass
class Panel:
    modality: str
    title: str
    subtitle: str
    box: tuple[int, int, int, int]  # the picture area on the canvas: (x0, y0, x1, y1)
    ok: bool = True


@dataclass
class ShowResult:
    image: Image.Image
    panels: list[Panel]
    key: str
    shard: str | None = None
    path: str | None = None


def _order(names: list[str]) -> list[str]:
    known = list(MODALITIES)
    return sorted(names, key=lambda m: (known.index(m) if m in known else len(known), m))


def render_values(values: dict[str, Any], key: str = "", header: str = "", ctx: Context | None = None,
                  errors: dict[str, str] | None = None) -> ShowResult:
    """Draw decoded ``values`` ({modality: value}) as a titled grid. ``errors`` ({modality: message}) become
    red panels. Returns the image and where each panel is."""
    ctx = ctx or Context()
    if ctx.rgb is None and isinstance(values.get("rgb"), np.ndarray):
        ctx.rgb = values["rgb"]
    if ctx.crops is None and isinstance(values.get("crop_settings"), np.ndarray):
        ctx.crops = values["crop_settings"]
    errors = dict(errors or {})
    names = _order(list(dict.fromkeys([*values, *errors])))
    cols = max(1, min(COLUMNS, len(names)))
    rows = -(-len(names) // cols)
    cell_w, cell_h = PANEL + 2 * PAD, PANEL + TITLE_H + 2 * PAD
    canvas = Image.new("RGB", (cols * cell_w + PAD, HEADER_H + rows * cell_h + PAD), BG)
    draw = ImageDraw.Draw(canvas)
    _draw_text(draw, (PAD + 4, 7), header or f"key {key}", INK, _font(15))
    title_font, sub_font = _font(14), _font(11)
    panels = []
    for i, m in enumerate(names):
        r, c = divmod(i, cols)
        x0, y0 = PAD + c * cell_w, HEADER_H + r * cell_h
        ok = m not in errors
        if ok:
            spec = spec_for_folder(m)
            try:
                if spec is None:
                    raise KeyError(f"{m!r} is not a registered modality")
                pic, subtitle = renderer_for(spec)(spec, values[m], ctx)
            except Exception as e:  # noqa: BLE001 - one bad label must not hide the others
                ok, errors[m] = False, f"{type(e).__name__}: {e}"
        if not ok:
            pic, subtitle = _text(["could not render:", errors[m]]), "error"
        pic = _fit(pic.convert("RGB"), nearest=pic.width * 4 <= PANEL)
        px, py = x0 + PAD + (PANEL - pic.width) // 2, y0 + TITLE_H + PAD + (PANEL - pic.height) // 2
        draw.rectangle((x0 + PAD - 1, y0 + TITLE_H + PAD - 1, x0 + PAD + PANEL, y0 + TITLE_H + PAD + PANEL),
                       fill=(255, 255, 255), outline=(200, 200, 200))
        canvas.paste(pic, (px, py))
        _draw_text(draw, (x0 + PAD, y0 + PAD), m, INK if ok else (190, 0, 0), title_font)
        _draw_text(draw, (x0 + PAD, y0 + PAD + 19), _clip(subtitle, 58), (90, 90, 90), sub_font)
        panels.append(Panel(m, m, subtitle, (px, py, px + pic.width, py + pic.height), ok))
    return ShowResult(image=canvas, panels=panels, key=key)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
