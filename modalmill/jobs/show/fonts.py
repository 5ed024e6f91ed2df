"""Fonts for ``show``: a chain of fonts tried character by character, so captions, OCR lines and class names in
any script are drawn with real glyphs instead of empty boxes.

The chain, first to last:

1. the font files in ``MODALMILL_FONTS`` (paths separated by ``os.pathsep``), if set;
2. DejaVu Sans (Latin with accents, Greek, Cyrillic, many symbols such as ☕) where an installed package or the
   system ships it: matplotlib's ``mpl-data``, OpenCV's Qt fonts, ``/usr/share/fonts`` (Debian's
   ``fonts-dejavu-core``); then other wide fonts found there (Noto Sans, Liberation Sans, FreeSans);
3. for a character none of these has, any installed font that fontconfig says covers it
   (``fc-list :charset=<hex>``): CJK, for example, needs a CJK font on the machine (``fonts-noto-cjk``,
   ``fonts-wqy-microhei``, ...);
4. Pillow's built-in font.

Whether a font has a glyph is decided by drawing: a character whose bitmap equals the font's ``.notdef`` glyph
(what it draws for a code point it lacks, usually an empty box) is missing from it. Characters no font has are
drawn with the first font (a box) and listed in :attr:`FontChain.missing`.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
from functools import lru_cache

from PIL import ImageDraw, ImageFont

NOTDEF = "\U0010fffd"  # a private-use code point no font maps: it draws the .notdef glyph
WIDE = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "LiberationSans-Regular.ttf", "FreeSans.ttf")


def _package_dir(name: str) -> str | None:
    """A package's folder without importing it (matplotlib would take seconds)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return os.path.dirname(spec.origin) if spec and spec.origin else None


@lru_cache(maxsize=1)
def font_files() -> tuple[str, ...]:
    """The font files of steps 1 and 2 of the chain, in order, that exist here."""
    found = [p for p in os.environ.get("MODALMILL_FONTS", "").split(os.pathsep) if p and os.path.isfile(p)]
    places = []
    mpl, cv = _package_dir("matplotlib"), _package_dir("cv2")
    if mpl:
        places.append(os.path.join(mpl, "mpl-data", "fonts", "ttf"))
    if cv:
        places.append(os.path.join(cv, "qt", "fonts"))
    places += ["/usr/share/fonts/truetype", "/usr/share/fonts/opentype", "/usr/share/fonts", "/usr/local/share/fonts",
               "/Library/Fonts", "/System/Library/Fonts"]
    for name in WIDE:
        for place in places:
            hits = sorted(glob.glob(os.path.join(place, "**", name), recursive=True)) if os.path.isdir(place) else []
            if hits:
                found.append(hits[0])
                break
    return tuple(dict.fromkeys(found))


@lru_cache(maxsize=4096)
def fontconfig_file(ch: str) -> str | None:
    """A font file fontconfig says covers ``ch`` (None without fontconfig or without such a font)."""
    if shutil.which("fc-list") is None:
        return None
    try:
        r = subprocess.run(["fc-list", f":charset={ord(ch):x}", "file"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    files = sorted(line.split(":")[0].strip() for line in r.stdout.splitlines() if line.strip())
    return next((f for f in files if f.lower().endswith((".ttf", ".otf", ".ttc"))), None)


@lru_cache(maxsize=64)
def _load(path: str, size: int) -> ImageFont.FreeTypeFont | None:
    try:
        return ImageFont.truetype(path, size)
    except OSError:  # e.g. a bitmap-only colour emoji font at another size
        return None


def _bitmap(font, text: str) -> tuple:
    mask = font.getmask(text)
    return mask.size, bytes(mask)


class FontChain:
    """Fonts of one size tried in order for each character (see the module docstring)."""

    def __init__(self, size: int, files: tuple[str, ...] | None = None):
        self.size = size
        self.fonts = [f for f in (_load(p, size) for p in (font_files() if files is None else files)) if f]
        self.builtin = ImageFont.load_default(size=size)
        self._notdef: dict[int, tuple] = {}
        self._choice: dict[str, ImageFont.FreeTypeFont] = {}
        self.missing: set[str] = set()

    def has(self, font, ch: str) -> bool:
        """Whether ``font`` has a glyph for ``ch`` (its bitmap is not the font's .notdef box)."""
        if id(font) not in self._notdef:
            self._notdef[id(font)] = _bitmap(font, NOTDEF)
        return _bitmap(font, ch) != self._notdef[id(font)]

    def font_for(self, ch: str):
        """The font that draws ``ch``: the first of the chain that has it (the first font when none has it)."""
        if ch not in self._choice:
            first = self.fonts[0] if self.fonts else self.builtin
            if ch.isspace() or not ch.isprintable():
                self._choice[ch] = first
            else:
                found = next((f for f in self.fonts if self.has(f, ch)), None)
                if found is None:
                    path = fontconfig_file(ch)
                    extra = _load(path, self.size) if path else None
                    if extra is not None and self.has(extra, ch):
                        self.fonts.append(extra)
                        found = extra
                if found is None and self.has(self.builtin, ch):
                    found = self.builtin
                if found is None:
                    self.missing.add(ch)
                self._choice[ch] = found or first
        return self._choice[ch]

    def runs(self, text: str) -> list[tuple[str, ImageFont.FreeTypeFont]]:
        """``text`` split into runs of characters drawn with the same font."""
        out: list[tuple[str, ImageFont.FreeTypeFont]] = []
        for ch in text:
            f = self.font_for(ch)
            if out and out[-1][1] is f:
                out[-1] = (out[-1][0] + ch, f)
            else:
                out.append((ch, f))
        return out

    def getlength(self, text: str) -> float:
        return sum(f.getlength(run) for run, f in self.runs(text))

    def text(self, draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill) -> None:
        x, y = xy
        for run, f in self.runs(text):
            draw.text((x, y), run, fill=fill, font=f)
            x += f.getlength(run)

    def textbbox(self, draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str) -> tuple[float, ...]:
        x, y = xy
        left, top, right, bottom = x, y, x, y
        for run, f in self.runs(text):
            b = draw.textbbox((x, y), run, font=f)
            left, top, right, bottom = min(left, b[0]), min(top, b[1]), max(right, b[2]), max(bottom, b[3])
            x += f.getlength(run)
        return left, top, right, bottom


@lru_cache(maxsize=16)
def font_chain(size: int) -> FontChain:
    return FontChain(size)
