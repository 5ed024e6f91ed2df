"""``modalmill plan``: labelers measured on a sample of the input on a real Ray with a declared device, and the
allocation, bottleneck and projected throughput that follow from the measured costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
import ray
from tests import labelers_costed  # noqa: F401 - registers the costed labelers
from modalmill.jobs.plan import plan, render
from modalmill.jobs.spec import job_from_dict

ray.init(address="local", num_cpus=2, resources={"dev": 2}, include_dashboard=False, log_to_driver=False)
spec = job_from_dict({"input": sys.argv[1], "output": sys.argv[2], "batch_size": 4,
                      "modalities": ["rgb", "crop_settings", "test_costed_fast", "test_costed_slow"],
                      "decode": {"max_size": 128},
                      "labelers": {"test_costed_fast": {"config": {"ms_per_image": 2}},
                                   "test_costed_slow": {"config": {"ms_per_image": 16}}}})
p = plan(spec, sample=12, devices=2)
print(render(p), file=sys.stderr)
print(json.dumps(p))
"""


def test_plan_measures_each_pool_and_projects_the_job(demo_corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", SCRIPT, os.path.join(demo_corpus, "shard-{00000..00001}.tar"),
                        str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    p = json.loads(r.stdout.strip().splitlines()[-1])
    cost = {c["name"]: c["seconds_per_image"] for c in p["costs"]}
    # time.sleep bounds each cost from below; 3x above leaves room for a loaded 2-core machine
    assert 0.002 <= cost["test_costed_fast"] < 0.006 and 0.016 <= cost["test_costed_slow"] < 0.048
    held = {c["name"]: c["per_actor"] for c in p["costs"]}
    assert held["test_costed_slow"].get("dev") == 0.5
    # 2 devices = 4 half shares: the slow pool takes 3 of them, the fast one the last
    assert p["budget"]["dev"] == 2
    assert p["actors"]["test_costed_slow"] == 3 and p["actors"]["test_costed_fast"] == 1
    assert p["bottleneck"] == "test_costed_slow"
    assert abs(p["images_per_s"] - 3 * 0.5 / cost["test_costed_slow"]) < 1e-6
    assert p["devices_used"] == 2 and p["device_kind"] == ["dev"]
    assert abs(p["device_hours_per_million"] - 2 * 1e6 / p["images_per_s"] / 3600) < 1e-6
    assert not os.path.exists(tmp_path / "out")  # planning writes nothing
    assert "bottleneck: test_costed_slow" in r.stderr


def test_plan_devices_needs_a_measured_accelerator():
    import pytest

    from modalmill.jobs.plan import Cost, budget_of

    cpu_only = [Cost("shard tasks", 0.01, {"CPU": 1}), Cost("m", 0.1, {"CPU": 1})]
    with pytest.raises(ValueError, match="ran on CPUs here"):
        budget_of({"CPU": 4}, cpu_only, devices=8)
    gpu = [Cost("shard tasks", 0.01, {"CPU": 1}), Cost("m", 0.1, {"CPU": 1, "GPU": 0.5})]
    assert budget_of({"CPU": 4, "GPU": 1, "memory": 1e9}, gpu, devices=8) == {"CPU": 4, "GPU": 8}


def test_job_files_take_workers_auto_with_bounds_or_a_fixed_number(tmp_path):
    import pytest

    from modalmill.jobs.spec import JobSpecError, job_from_dict

    base = {"input": str(tmp_path / "in.tar"), "output": str(tmp_path / "out"),
            "modalities": ["rgb", "crop_settings", "dinov2"]}
    auto = job_from_dict({**base, "labelers": {"dinov2": {"min_workers": 2, "max_workers": 6}}}).labelers["dinov2"]
    assert auto.workers == "auto" and auto.actors() == 2 and auto.bounds() == {"min": 2, "max": 6}
    fixed = job_from_dict({**base, "labelers": {"dinov2": {"workers": 3}}}).labelers["dinov2"]
    assert fixed.actors() == 3 and fixed.bounds() == {"fixed": 3}
    for bad in ({"workers": 0}, {"workers": "many"}, {"min_workers": 3, "max_workers": 2}, {"min_workers": 0}):
        with pytest.raises(JobSpecError, match="workers"):
            job_from_dict({**base, "labelers": {"dinov2": bad}})
