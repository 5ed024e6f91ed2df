"""Run a job on a 2-node Ray cluster on this machine (ray.cluster_utils.Cluster) whose head has one CPU, held by
the job's model actor; remove the other node mid-job, so the retried shard tasks cannot be placed anywhere. Record
when the driver says so (its stderr, with times), then add a node back and let the job finish. Prints a JSON
summary on its last line. Used by tests/test_node_death.py."""

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
# the GCS declares a node dead after 3 missed health checks, one a second (see tests/scripts/node_death.py)
HEALTH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 2000, "health_check_failure_threshold": 3}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head_slot": 1},
                                                        "include_dashboard": False, "_system_config": HEALTH})
doomed = cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
cluster.wait_for_nodes()


class Tee:
    """stderr, with each write's time kept."""

    def __init__(self, stream):
        self.stream, self.lines = stream, []

    def write(self, text):
        self.lines.append((time.time(), text))
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


tee = sys.stderr = Tee(sys.stderr)
events = {}


def said(what: str):
    return next(((t, text) for t, text in list(tee.lines) if what in text), None)


def run():
    events["summary"] = run_job(spec, show_progress=False)


def lose_a_node_then_add_one():  # in the main thread: Ray's add_node sets signal handlers
    markers = os.path.join(out, "_modalmill", "shards")
    while not (os.path.isdir(markers) and os.listdir(markers)):
        time.sleep(0.05)
    events["after_markers"] = len(os.listdir(markers))
    cluster.remove_node(doomed, allow_graceful=False)
    events["removed_at"] = time.time()
    deadline = time.time() + 90
    while time.time() < deadline and not said("modalmill: waiting"):
        time.sleep(0.1)
    if said("modalmill: waiting"):
        events["reported_at"], events["report"] = said("modalmill: waiting")
    events["adding_at"] = time.time()
    cluster.add_node(num_cpus=1)  # a node joins: the job goes on


# the model actor must sit on the head (head_slot) and takes its only CPU; shard tasks run on the other node
spec = job_from_dict({"input": inp, "output": out, "modalities": ["rgb", "canny_edge", "caption"], "batch_size": 2,
                      "labelers": {"test_crash_actor": {"config": {"sleep": 0.4}, "workers": 1,
                                                        "resources": {"num_cpus": 1, "custom": {"head_slot": 1}}}},
                      "ray": {"max_retries": 5}})
job = threading.Thread(target=run, daemon=True)
job.start()
lose_a_node_then_add_one()
job.join(timeout=300)
summary = events.pop("summary")
again = said("placed the waiting shard tasks")
summary["events"] = {**events, "going_on_at": again[0] if again else None}
sys.stderr = tee.stream
ray.shutdown()
cluster.shutdown()
print(json.dumps(summary, default=str))
