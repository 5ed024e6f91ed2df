"""The README's benchmark table is the summary of the committed benchmarks/RESULTS.md, row for row (both are
written by ``make bench``; a hand edit or a partial run that updated only one of them fails here)."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| benchmark |")]


def test_readme_figures_are_the_results_summary():
    import sys

    sys.path.insert(0, ROOT)
    from benchmarks.run import README_MARKERS

    readme = open(os.path.join(ROOT, "README.md")).read()
    results = open(os.path.join(ROOT, "benchmarks", "RESULTS.md")).read()
    header = results.split("\n## ", 1)[0]
    assert "quick mode" not in header, "RESULTS.md is from a --quick run"
    assert "uncommitted changes" not in header, "RESULTS.md was written from a tree with uncommitted changes"
    block = readme.split(README_MARKERS[0], 1)[1].split(README_MARKERS[1], 1)[0]
    summary = results.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert _rows(summary), "RESULTS.md has no summary rows"
    assert _rows(block) == _rows(summary)
    date = re.search(r"on (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", results).group(1)
    assert date in block, "the README's table names another run's date"
