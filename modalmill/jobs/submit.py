"""Submitting a job to a running Ray cluster through the Ray Jobs API.

The job file is resolved (relative paths made absolute), written into a fresh working directory and
shipped with the modalmill package itself (``py_modules``), so the cluster needs modalmill's dependencies
but not modalmill. The entrypoint is ``python -m modalmill run job.yaml`` on the head node.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import tempfile
import time

import yaml

from .spec import load_job

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _spec_to_yaml(spec) -> str:
    data = dataclasses.asdict(spec)
    data["modalities"] = list(spec.modalities)
    data["decode"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data["decode"].items()}
    data["crops"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data["crops"].items()}
    data["ray"] = {**data["ray"], "address": None}  # on the cluster, the job connects to its own Ray
    return yaml.safe_dump(data, sort_keys=False)


def submit_job(job_file: str, address: str, only: list[str] | None = None, force: bool = False, wait: bool = True,
               pip: list[str] | None = None, timeout_s: float = 24 * 3600,
               agent_wait_s: float = 180.0) -> tuple[str, str, str]:
    """Returns (final or current status, job id, logs when waited)."""
    from ray.job_submission import JobSubmissionClient

    import modalmill

    spec = load_job(job_file)
    workdir = tempfile.mkdtemp(prefix="modalmill-submit-")
    with open(os.path.join(workdir, "job.yaml"), "w") as f:
        f.write(_spec_to_yaml(spec))
    cmd = ["python", "-m", "modalmill", "run", "job.yaml", "--no-progress"]
    if only:
        cmd += ["--only", ",".join(only)]
    if force:
        cmd.append("--force")
    runtime_env = {
        "working_dir": workdir,
        "py_modules": [os.path.dirname(modalmill.__file__)],
        "env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "RAY_USAGE_STATS_ENABLED") if k in os.environ},
    }
    if pip:
        runtime_env["pip"] = list(pip)
    client = JobSubmissionClient(address)
    agent_deadline = time.time() + agent_wait_s
    while True:
        try:
            job_id = client.submit_job(entrypoint=shlex.join(cmd), runtime_env=runtime_env,
                                       metadata={"modalmill_job": spec.name})
            break
        except RuntimeError as e:
            # a freshly started head accepts jobs only once its job agent has registered
            if "No available agent" not in str(e) or time.time() > agent_deadline:
                raise
            time.sleep(2.0)
    if not wait:
        return str(client.get_job_status(job_id)), job_id, ""
    deadline = time.time() + timeout_s
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL and time.time() < deadline:
        time.sleep(1.0)
        status = str(client.get_job_status(job_id))
    return status.split(".")[-1], job_id, client.get_job_logs(job_id)
