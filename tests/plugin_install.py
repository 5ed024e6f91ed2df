"""pip-install the example plugin (examples/third_party_labeler) into a folder, the real way, for tests that run
modalmill with it installed (that folder put on PYTHONPATH)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "third_party_labeler")


def install_example_plugin(d) -> tuple[dict, dict]:
    """(environment with the plugin installed, the same environment without it); both import this checkout's
    modalmill and have no RAY_ADDRESS."""
    src = os.path.join(d, "src")
    # built from a copy, so that the build leaves nothing in the repository's example folder
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = os.path.join(d, "site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--quiet", "--target", site, src], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base = {**env, "PYTHONPATH": os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])}
    return {**base, "PYTHONPATH": os.pathsep.join([site, base["PYTHONPATH"]])}, base
