"""apple/ml-4m's own code, for the checks that run it (outside CI unless set up): ``MODALMILL_ML4M`` names a folder
holding ml-4m's source tree in ``src/`` and its own environment in ``venv/`` (machine notes: ``fetch`` +
``git archive``, then the venv of ml-4m's pinned packages). Unset, those checks skip: CI never depends on a
checkout left on a machine by hand."""

import os

import pytest

ML4M = os.environ.get("MODALMILL_ML4M", "")
PYTHON = os.path.join(ML4M, "venv", "bin", "python")
SRC = os.path.join(ML4M, "src")

needs_ml4m = pytest.mark.skipif(not (ML4M and os.path.exists(PYTHON) and os.path.isdir(os.path.join(SRC, "fourm"))),
                                reason="MODALMILL_ML4M is not set to an ml-4m checkout (src/) with its venv (venv/)")


def check_captions(output) -> dict:
    """Run scripts/check_captions_with_ml4m.py (ml-4m's own loader and caption transforms) on ``output`` in ml-4m's
    environment; returns its JSON report (it must exit 0)."""
    import json
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "check_captions_with_ml4m.py")
    r = subprocess.run([PYTHON, script, str(output), "--ml4m", SRC], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])
