"""Connecting to Ray: an embedded Ray or a cluster, and the S3 settings this process hands to Ray workers that run
on this machine."""

from __future__ import annotations

import os
from typing import Any

import ray

from . import storage


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet_embedded: bool = False) -> bool:
    """Connect to ``address`` (or ``RAY_ADDRESS``) or start an embedded Ray. Returns True if we started it.
    ``quiet_embedded``: an embedded Ray does not print its workers' logs here (for commands that draw their own
    progress and report errors themselves); a cluster's logs are always shown."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": always a fresh embedded Ray, never silently attach to a `ray start` cluster on this machine
        kwargs["log_to_driver"] = not quiet_embedded
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return True


def local_s3_env(*locations: str) -> dict[str, str]:
    """The S3 settings Ray workers get from this process when some of ``locations`` are on S3 and Ray runs only on
    this machine: workers inherit the environment Ray was started with, so a Ray started before the S3 settings
    were made (a notebook, a test session) would otherwise not reach the bucket. Workers on other machines use
    their own S3 configuration: credentials never leave this machine."""
    if not any(storage.is_s3(loc) for loc in locations if loc):
        return {}
    here = ray.util.get_node_ip_address()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not nodes or any(n.get("NodeManagerAddress") != here for n in nodes):
        return {}
    return storage.s3_env_vars()
