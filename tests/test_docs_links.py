"""Every relative link in README.md and docs/*.md resolves to a file of the repository (and its #anchor, if any,
to a heading of that file), and the README links every page under docs/.

Links are Markdown inline links and images (``[text](target)``, ``![alt](target)``), reference definitions
(``[name]: target``) and HTML ``href``/``src`` attributes, outside fenced code blocks and code spans. Absolute
URLs (``https:``, ``mailto:``, ...) are not followed. A link that leaves the repository (``../shared/x.md``) is
broken even when the file exists on this machine: a user who clones the repository does not have it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HTML = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks, with code spans blanked out."""
    fenced = False
    for no, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield no, _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every link in a Markdown text."""
    out = []
    for no, line in _prose_lines(text):
        out += [(no, m.group(1)) for m in _INLINE.finditer(line)]
        out += [(no, m.group(1)) for m in _HTML.finditer(line)]
        m = _REFERENCE.match(line)
        if m:
            out.append((no, m.group(1)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (``-`` and ``_`` kept), spaces -> ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown text's headings (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    out |= {m.group(1) for m in re.finditer(r"""<a\s+(?:name|id)\s*=\s*["']([^"']+)["']""", text)}
    return out


def broken_links(doc: Path, root: Path = ROOT) -> list[str]:
    """One line per relative link of ``doc`` that does not resolve inside ``root``."""
    text = doc.read_text(encoding="utf-8")
    bad = []
    for no, target in links(text):
        if not target or _SCHEME.match(target) or target.startswith("//"):
            continue
        path, _, anchor = target.partition("#")
        path = path.split("?", 1)[0]
        where = f"{doc.relative_to(root)}:{no}: {target}"
        dest = (doc.parent / path).resolve() if path else doc
        if path:
            if path.startswith("/"):
                bad.append(f"{where}: an absolute path; link relative to the file")
                continue
            if not dest.is_relative_to(root):
                bad.append(f"{where}: leaves the repository (a clone does not have it)")
                continue
            if not dest.exists():
                bad.append(f"{where}: no such file")
                continue
        if anchor and dest.suffix == ".md" and dest.is_file():
            if anchor.lower() not in anchors(dest.read_text(encoding="utf-8")):
                bad.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return bad


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_to_files_in_the_repository(doc):
    bad = broken_links(doc)
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_readme_links_every_page_under_docs():
    readme = ROOT / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for _, t in links(readme.read_text(encoding="utf-8"))
              if t and not _SCHEME.match(t)}
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md links no {', '.join(missing)}: add them to its Documentation table"


def test_the_checker_finds_broken_links_and_anchors(tmp_path):
    """The checker itself: each kind of broken link is reported, and what is fine is not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## What `check` verifies\n\n## Same\n\n## Same\n")
    (tmp_path / "pic.png").write_bytes(b"\x89PNG")
    (tmp_path / "README.md").write_text(
        "![picture](pic.png) [page](docs/a.md) [section](docs/a.md#what-check-verifies) [again](docs/a.md#same-1)\n"
        "[site](https://example.org/x.md) [here](#intro) <img src=\"pic.png\">\n"
        "`[not a link](nowhere.md)`\n"
        "```\n[in a code block](nowhere.md)\n```\n"
        "## Intro\n"
        "[gone](docs/missing.md) [outside](../shared/4m-format.md) [bad anchor](docs/a.md#nope)\n"
        "[ref]: docs/also-missing.md\n"
        "<a href=\"/etc/passwd\">absolute</a>\n")
    bad = broken_links(tmp_path / "README.md", root=tmp_path)
    assert [b.split(": ", 1)[1] for b in bad] == [
        "docs/missing.md: no such file",
        "../shared/4m-format.md: leaves the repository (a clone does not have it)",
        "docs/a.md#nope: no heading with anchor #nope in docs/a.md",
        "docs/also-missing.md: no such file",
        "/etc/passwd: an absolute path; link relative to the file",
    ]
    assert [b.split(":", 2)[1] for b in bad] == ["8", "8", "8", "9", "10"]
    assert slug("Resume, `--only`, `--force`") == "resume---only---force"
    assert slug("The demo's tokenizers") == "the-demos-tokenizers"
