"""A shard task's main thread waits for its labelling threads' actor calls inside Ray, where Ray lends the task's
CPUs, and keeps waiting there through what a node death does to a batch: the call answered with an error, a pause
between pings, the ping, the call sent again, the batch split into calls of its own. Leaving early left it in
``future.result()`` holding its CPUs, where a restarting actor needed them (the stall tests/test_node_death.py
runs on a cluster)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from modalmill.pipeline.execute import _AtActors


@ray.remote(num_cpus=0)
class _Slow:
    def call(self, seconds: float, fail: bool = False):
        time.sleep(seconds)
        if fail:
            raise RuntimeError("lost")
        return "ok"


@ray.remote(num_cpus=1)
class _NeedsACpu:
    def call(self):
        return "placed"


def _wait_on(at: _AtActors, labelling) -> tuple[object, list[str]]:
    """Run ``labelling(log)`` in a labelling thread (each batch's call begun and answered, as the shard task's
    ``call`` does) while the main thread waits on it; returns what it returned and the log."""
    log: list[str] = []
    ident: dict[str, int] = {}
    started = threading.Event()

    def thread():
        ident["t"] = threading.get_ident()
        started.set()
        return labelling(log)

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(thread)
        started.wait()
        at.wait(future, ident["t"])
        log.append("main thread left" + (" (batch done)" if future.done() else ""))
        return future.result(), log


@pytest.mark.parametrize("pause_s", [0.0, 1.5])
def test_the_main_thread_waits_through_an_error_a_pause_and_a_call_sent_again(ray_local, pause_s):
    actor = _Slow.remote()
    ray.get(actor.call.remote(0))
    at = _AtActors()

    def labelling(log):
        at.begin()
        try:
            ray.get(at.sent(actor.call.remote(0.3, fail=True)))
        except ray.exceptions.RayTaskError:
            log.append("error")
        time.sleep(0.05 + pause_s)  # handling the error, then a pause between pings (the failed call still registered)
        ray.get(at.sent(actor.call.remote(0.3)))
        at.answered()
        log.append("sent again and answered")

    t0 = time.time()
    _, log = _wait_on(at, labelling)
    assert log == ["error", "sent again and answered", "main thread left (batch done)"], log
    assert time.time() - t0 >= 0.6 + pause_s - 0.05


@ray.remote(num_cpus=2)
def _task_holding_every_cpu() -> str:
    """A shard task on a 2-CPU Ray whose batch, split after a failure, goes on to an actor that needs a CPU: it is
    placed only if the task's main thread lends the CPUs it holds while that call waits."""
    at = _AtActors()
    slow = _Slow.remote()

    def labelling(log):
        at.begin()
        ray.get(at.sent(slow.call.remote(0.2)))
        at.answered()  # the first half's call is over; the thread goes on with the second half
        time.sleep(0.3)
        at.begin()
        needs = _NeedsACpu.remote()
        try:
            return ray.get(at.sent(needs.call.remote()), timeout=30)
        except ray.exceptions.GetTimeoutError:
            return "never placed: the task held its CPUs"
        finally:
            at.answered()

    return _wait_on(at, labelling)[0]


def test_a_task_lends_its_cpus_to_an_actor_its_split_batch_needs(ray_local):
    assert ray.get(_task_holding_every_cpu.remote(), timeout=120) == "placed"
