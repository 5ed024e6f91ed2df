"""Labelers can ask Ray for custom resources (an accelerator a cluster declares): the job spec takes them, the
executor checks the cluster has them, and Ray's own scheduling places and packs the actors (benchmark 6's
simulated device runs through exactly this path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_job_spec_takes_custom_resources_and_rejects_bad_ones(tmp_path):
    from modalmill.jobs.spec import JobSpecError, job_from_dict

    base = {"input": str(tmp_path / "in-{0..1}.tar"), "output": str(tmp_path / "out"),
            "modalities": ["rgb", "crop_settings", "dinov2"]}
    spec = job_from_dict({**base, "labelers": {"dinov2": {"resources": {"num_gpus": 0, "custom": {"TPU": 0.5}}}}})
    assert spec.labelers["dinov2"].resources["custom"] == {"TPU": 0.5}
    with pytest.raises(JobSpecError, match="resources.custom must map Ray resource names"):
        job_from_dict({**base, "labelers": {"dinov2": {"resources": {"custom": {"TPU": "lots"}}}}})
    with pytest.raises(JobSpecError, match="unknown key 'gpus'"):
        job_from_dict({**base, "labelers": {"dinov2": {"resources": {"gpus": 1}}}})


def test_ray_options_and_a_missing_custom_resource_is_a_clear_error(ray_local):
    from modalmill.labelers.base import Resources
    from modalmill.pipeline.execute import _largest_node, fit_resources

    res = fit_resources("x", Resources(num_cpus=0.5), {"custom": {"CPU_SLOT": 0}}, _largest_node())
    assert res.ray_options()["resources"] == {"CPU_SLOT": 0.0}
    with pytest.raises(ValueError, match="asks for 1 'TPU' per worker but this Ray cluster has 0"):
        fit_resources("x", Resources(num_cpus=0.5), {"custom": {"TPU": 1}}, _largest_node())


SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {root!r})
from benchmarks import bench_device as b
from modalmill.jobs.democorpus import build_corpus
paths = build_corpus({corpus!r}, n_shards=2, per_shard=12, size_range=(200, 260))
b.WORK = {work!r}
r = b.run_once(paths, 1, {{"bench_sim_a": 0.5, "bench_sim_b": 0.5}}, batch_ms=30)
print("@@" + json.dumps(r))
"""


def test_two_labelers_share_one_simulated_device_through_fractional_custom_resources(tmp_path):
    """Two model labelers asking 0.5 of a one-unit custom resource run side by side on it: every sample reaches
    both, and all their batches hold the one device (never at the same time: the busy fraction is at most 1)."""
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "RAY_ADDRESS": "local", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(root=ROOT, corpus=str(tmp_path / "corpus"),
                                                               work=str(work))],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(lines[-1][2:])
    assert r["images"] == 2 * 24  # 24 samples, each through both labelers, all on device 0
    assert r["per_device_busy"] and len(r["per_device_busy"]) == 1
    assert 0 < r["busy_fraction"] <= 1.0 + 1e-6
