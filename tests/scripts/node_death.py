"""Run a job on a 3-node Ray cluster on this machine (ray.cluster_utils.Cluster) and remove a worker node
mid-job. Prints the run summary as JSON on its last line. Used by tests/test_node_death.py."""

import faulthandler
import json
import os
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

import tests.labelers_for_tests  # noqa: F401
from modalmill.jobs.runner import run_job
from modalmill.jobs.spec import job_from_dict

inp, out = sys.argv[1], sys.argv[2]
# The GCS declares a node dead after `health_check_failure_threshold` missed health checks, one every
# `health_check_period_ms` (Ray's defaults, 5 x 3 s, are sized for real networks and left this test waiting ~17 s
# for the death it causes). 3 misses of checks 1 s apart, each given 2 s, still tolerate a busy 2-core machine.
HEALTH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 2000, "health_check_failure_threshold": 3}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                        "_system_config": HEALTH})
keep = cluster.add_node(num_cpus=2)  # room for the restarted labeler actor beside a shard task
doomed = cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
cluster.wait_for_nodes()
removed = {}


def kill_a_node_mid_job():
    markers = os.path.join(out, "_modalmill", "shards")
    while not (os.path.isdir(markers) and os.listdir(markers)):
        time.sleep(0.05)
    removed["after_markers"] = len(os.listdir(markers))
    cluster.remove_node(doomed, allow_graceful=False)
    removed["at"] = time.time()


threading.Thread(target=kill_a_node_mid_job, daemon=True).start()
# a stall shows where the driver waits (every thread's stack on stderr) before the test's 420 s timeout kills it
faulthandler.dump_traceback_later(360, exit=True)
spec = job_from_dict({"input": inp, "output": out, "modalities": ["rgb", "canny_edge", "caption"], "batch_size": 2,
                      "labelers": {"test_crash_actor": {"config": {"sleep": 0.4}, "workers": 1}},
                      "ray": {"max_retries": 5}})
summary = run_job(spec, show_progress=False)
summary["removed_node"] = removed
ray.shutdown()
cluster.shutdown()
print(json.dumps(summary, default=str))
