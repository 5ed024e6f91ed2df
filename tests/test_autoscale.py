"""The pool-sizing rule (modalmill.pipeline.autoscale) on scripted measurements: no Ray, no timing."""

import time

import pytest

from modalmill.pipeline.autoscale import Autoscaler, DeviceClock, PoolShape, Window, allocate, device_seconds

# a 4M-21-like mix on 4 devices: device time per batch of 16 of 20, 80, 320 and 1,280 ms
MIX_MS = {"clip": 20, "dino": 80, "depth": 320, "sam": 1280}
COSTS = {n: ms / 1000 / 16 for n, ms in MIX_MS.items()}  # device-seconds per sample
IDEAL = 4 / sum(COSTS.values())  # devices / summed device time per sample


def quarter_pools():
    return [PoolShape(n, {"CPU": 0, "dev": 0.25}) for n in MIX_MS]


def test_greedy_allocation_reaches_the_ideal_on_a_4m21_like_mix():
    a = allocate(quarter_pools(), COSTS, {"dev": 4})
    assert a.actors == {"clip": 1, "dino": 1, "depth": 3, "sam": 11}
    assert sum(a.actors.values()) * 0.25 == 4  # every device share is used
    assert a.bottleneck == "sam"
    assert a.throughput == pytest.approx(11 * 0.25 / COSTS["sam"])
    assert a.throughput >= 0.9 * IDEAL


def test_an_equal_split_of_whole_devices_is_a_third_of_the_ideal():
    whole = [PoolShape(n, {"dev": 1}) for n in MIX_MS]
    a = allocate(whole, COSTS, {"dev": 4})
    assert a.actors == {n: 1 for n in MIX_MS}
    assert a.throughput == pytest.approx(1 / COSTS["sam"])
    assert a.throughput < IDEAL / 3 + 1e-9


def test_fixed_pools_and_bounds_are_kept():
    pools = [PoolShape("clip", {"dev": 0.25}, fixed=2), PoolShape("dino", {"dev": 0.25}),
             PoolShape("depth", {"dev": 0.25}), PoolShape("sam", {"dev": 0.25}, max=6)]
    a = allocate(pools, COSTS, {"dev": 4})
    assert a.actors["clip"] == 2 and a.actors["sam"] == 6
    assert a.bottleneck == "sam"  # at its max: the others do not grow past it
    assert sum(a.actors.values()) < 16


def test_minimums_that_do_not_fit_name_the_pool():
    with pytest.raises(ValueError, match="pool sam: 5 actor"):
        allocate([PoolShape("sam", {"GPU": 1}, min=5)], {"sam": 1.0}, {"GPU": 4})


def test_cpu_pools_share_the_cpus_left_after_shard_tasks():
    pools = [PoolShape("a", {"CPU": 1}), PoolShape("b", {"CPU": 1})]
    a = allocate(pools, {"a": 0.01, "b": 0.03}, {"CPU": 8})
    assert a.actors == {"a": 2, "b": 6}


def scripted(scaler, rounds, current):
    """Feed windows in which each pool's actors are busy the whole window at its scripted cost."""
    log = []
    for costs in rounds:
        for p in scaler.pools:
            n = current[p.name]
            # n actors busy 10 s each; sharing a device, each gets its share of it
            samples = int(n * 10 * p.share / costs[p.name])
            scaler.observe(p.name, Window(samples=samples, busy_s=n * 10.0))
        for d in scaler.decide(current):
            current[d.pool] = d.after
            log.append(d)
    return log


def test_autoscaler_moves_shares_to_the_bottleneck_and_logs_each_move():
    s = Autoscaler(quarter_pools(), {"dev": 4}, min_samples=8)
    current = {"clip": 4, "dino": 4, "depth": 4, "sam": 4}  # the equal split a user would guess
    log = scripted(s, [COSTS] * 3, current)
    assert current == {"clip": 1, "dino": 1, "depth": 3, "sam": 11}
    assert {d.pool for d in log} == set(MIX_MS)
    grow = [d for d in log if d.after > d.before]
    assert [d.pool for d in grow] == ["sam"] and "bottleneck" in grow[0].why
    assert all("idles" in d.why for d in log if d.after < d.before)
    assert log.index(grow[0]) == len(log) - 1  # shrinks come first: their shares are what sam grows into
    assert "autoscale: pool sam 4 -> 11 actors" in grow[0].line()


def test_autoscaler_waits_for_enough_samples_and_has_hysteresis():
    s = Autoscaler(quarter_pools(), {"dev": 4}, min_samples=10_000)
    current = {"clip": 1, "dino": 1, "depth": 3, "sam": 11}
    assert scripted(s, [COSTS], dict(current)) == []  # not enough samples yet
    s = Autoscaler(quarter_pools(), {"dev": 4}, min_samples=8)
    noisy = dict(COSTS, depth=COSTS["depth"] * 1.05)  # 5% noise on one pool: nothing to gain worth a move
    assert scripted(s, [COSTS, noisy, COSTS], dict(current)) == []


def test_autoscaler_decides_only_after_enough_windows():
    s = Autoscaler(quarter_pools(), {"dev": 4}, min_samples=8, min_windows=3)
    current = {"clip": 4, "dino": 4, "depth": 4, "sam": 4}
    assert scripted(s, [COSTS] * 2, current) == [] and not s.ready()
    assert scripted(s, [COSTS], current) and current["sam"] == 11
    s.forget()
    assert not s.ready() and s.costs == {}


def test_autoscaler_follows_a_change_in_costs():
    s = Autoscaler(quarter_pools(), {"dev": 4}, min_samples=8, decay=0.0)
    current = {"clip": 1, "dino": 1, "depth": 3, "sam": 11}
    # the corpus turns into crowded scenes: depth becomes as costly as sam
    changed = dict(COSTS, depth=COSTS["sam"])
    scripted(s, [COSTS, changed], current)
    assert current["depth"] > 3 and current["sam"] < 11
    assert sum(current.values()) <= 16


def test_costs_on_shared_devices_count_how_many_kernels_really_shared_them():
    """One quarter-share actor per pool, each alone on a device and busy the whole window: its busy time is its
    device time (nothing shared the device), not a quarter of it; with 16 actors all busy, a quarter (4 at once)."""
    w = 10.0
    alone = Autoscaler(quarter_pools(), {"dev": 4}, min_samples=1)
    alone.observe_all({n: Window(samples=int(w / COSTS[n]), busy_s=w) for n in MIX_MS}, w)
    assert alone.costs == pytest.approx(COSTS, rel=0.01)
    full = Autoscaler(quarter_pools(), {"dev": 4}, min_samples=1)
    full.observe_all({n: Window(samples=int(4 * w * 0.25 / COSTS[n]), busy_s=4 * w) for n in MIX_MS}, w)
    assert full.costs == pytest.approx(COSTS, rel=0.01)
    # the projection from such costs never rises above what the devices can do
    assert allocate(quarter_pools(), alone.costs, {"dev": 4}).throughput <= IDEAL * 1.01


def test_a_batch_at_an_actor_a_shrink_removed_is_sent_again(ray_local):
    """A shard task's batch that was at an actor when a shrink killed it (the task had not yet seen the new pool)
    is sent again to an actor that remains; an actor that dies while still in its pool is an error (WorkerDied)."""
    import threading

    import ray

    from modalmill.pipeline.execute import LabelerActor, WorkerDied, _call_pool, _Members
    from modalmill.pipeline.dispatch import PoolRegistry
    from modalmill.pipeline.shard import LabelerRun
    from tests.labelers_costed import CostedSlow

    run = LabelerRun("test_costed_slow", {"ms_per_image": 1000}, ("test_costed_slow",), 4, True, cls=CostedSlow)
    a, b = (LabelerActor.options(num_cpus=0).remote(run) for _ in range(2))
    assert ray.get([a.ready.remote(), b.ready.remote()]) == ["", ""]
    registry = PoolRegistry.remote({"p": [a, b]})
    assert ray.get(registry.since.remote(-1))[0] == 0  # the registry is up
    members = _Members({"p": [a, b]}, registry, start=0)  # the first batch goes to a
    got = {}
    worker = threading.Thread(target=lambda: got.update(out=_call_pool(members, "p", [0, 1])))
    worker.start()
    time.sleep(0.5)  # a holds the batch (2 s of work)
    ray.get(registry.publish.remote({"p": [b]}))
    ray.kill(a)
    worker.join(30)
    assert len(got["out"]) == 2 and all("test_costed_slow" in r for r in got["out"])
    assert ray.get(b.load.remote())["samples"] == 2  # b served it
    ray.kill(b)  # still in the pool: a real failure, not a shrink
    with pytest.raises(WorkerDied):
        _call_pool(members, "p", [0])
    ray.kill(registry)


def test_the_dispatch_spreads_every_tasks_batches_over_actors_and_devices():
    """Batches of several shard tasks go to the actor with the fewest in flight from any task (a task alone sent
    its batch to the actor with the fewest of its own: two tasks doubled up on the same actors); ties go to the
    least crowded device, then in turn; a task's batches are given back one by one or forgotten with its task."""
    from modalmill.pipeline.dispatch import Dispatcher

    d = Dispatcher({"p": ["a1", "a2", "a3", "a4"], "q": ["b1", "b2"]})
    got = [d.take("p", "shard-1"), d.take("p", "shard-1"), d.take("p", "shard-2"), d.take("p", "shard-2")]
    assert sorted(k for k, _ in got) == ["a1", "a2", "a3", "a4"]  # one each, whichever task sent them
    assert d.take("p", "shard-2")[0] == "a1" and d.take("p", "shard-1")[0] == "a2"  # then a second each, in turn
    d.give_back("a3", "shard-2", 1.0)
    assert d.take("p", "shard-3")[0] == "a3"  # the least loaded again
    d.forget("shard-1")  # its task ended (or its worker died holding batches): its batches no longer count
    assert (d.at["a1"], d.at["a2"], d.at["a4"]) == (1, 0, 1) and d.work["a2"] == 0 and "shard-1" not in d.held
    d.give_back("a2", "shard-1", 1.0)  # a late give-back of a forgotten task changes nothing
    assert d.at["a2"] == 0
    # devices: the one holding the least work wins, whichever pool's batches it holds
    d2 = Dispatcher({"p": ["a1", "a2"], "q": ["b1"]})
    d2.where({"a1": "gpu0", "a2": "gpu1", "b1": "gpu0"})
    assert d2.take("q", "s") == ("b1", 1.0)
    assert d2.take("p", "s")[0] == "a2"  # gpu0 already runs b1's batch
    # with costs (device-s per sample), work is what counts: one costly batch outweighs several cheap ones
    d2.costs({"p": 0.08})  # not every pool's cost: still one per batch
    assert d2.take("p", "s") == ("a1", 1.0)
    d3 = Dispatcher({"cheap": ["c1"], "costly": ["x1", "x2"]})
    d3.where({"c1": "gpu0", "x1": "gpu0", "x2": "gpu1"})
    d3.costs({"cheap": 0.001, "costly": 0.08})
    for _ in range(3):
        assert d3.take("cheap", "s", 16)[0] == "c1"
    assert d3.take("costly", "s", 16) == ("x2", pytest.approx(1.28))  # gpu0 holds 0.048 s of work, gpu1 none
    assert d3.take("costly", "s", 16)[0] == "x1"  # gpu0 0.048 against gpu1 1.28
    assert d3.take("costly", "s", 16)[0] == "x2"  # gpu0 1.328 against 1.28
    d2.members({"p": ["a1"], "q": ["b1"]})  # a shrink: a retired actor gets nothing more
    assert d2.take("p", "s")[0] == "a1" and d2.take("p", "s")[0] == "a1"
    assert Dispatcher({"p": []}).take("p", "s") is None


def test_two_shard_tasks_share_the_registrys_choice(ray_local):
    """Across the boundary the tasks cross: two tasks' views (_Members) with one registry actor never double up
    while an actor is free, and the registry's membership changes reach them with its answers."""
    import ray

    from modalmill.pipeline.dispatch import PoolRegistry, actor_key
    from modalmill.pipeline.execute import LabelerActor, _Members
    from modalmill.pipeline.shard import LabelerRun
    from tests.labelers_costed import CostedSlow

    run = LabelerRun("test_costed_slow", {"ms_per_image": 1}, ("test_costed_slow",), 4, True, cls=CostedSlow)
    actors = [LabelerActor.options(num_cpus=0).remote(run) for _ in range(4)]
    registry = PoolRegistry.remote({"p": actors})
    one, two = (_Members({"p": actors}, registry, start=0, shard=s) for s in ("shard-1", "shard-2"))
    taken = [one.take("p", 4), two.take("p", 4), one.take("p", 4), two.take("p", 4)]
    assert len({actor_key(h) for h, _ in taken}) == 4 and all(w == 1.0 for _, w in taken)
    for m, (h, w) in zip((one, two, one, two), taken):
        m.give_back(h, w)
    ray.get(registry.publish.remote({"p": actors[2:]}))
    assert actor_key(one.take("p")[0]) in {actor_key(h) for h in actors[2:]} and one.version == 1
    alone = _Members({"p": actors}, None, start=0)  # no registry: this task's own least loaded
    assert [actor_key(alone.take("p")[0]) for _ in range(2)] == [actor_key(h) for h in actors[:2]]
    for h in actors:
        ray.kill(h)
    ray.kill(registry)


def test_a_hung_actor_no_longer_holds_back_its_devices_costs(ray_local, monkeypatch):
    """A batch is costed only once every serving actor on its device has answered after it ended; an actor whose
    process hangs (stopped with SIGSTOP here) would hold that back for the rest of the job. After SILENT_S without
    an answer the resizer says so (naming the process) and the clock stops waiting for it; when the actor answers
    again it counts again."""
    import os
    import signal

    import ray

    from modalmill.pipeline import resize
    from modalmill.pipeline.autoscale import PoolShape
    from modalmill.pipeline.dispatch import PoolRegistry, actor_key
    from modalmill.pipeline.execute import LabelerActor
    from modalmill.pipeline.shard import LabelerRun
    from tests.labelers_costed import CostedSlow

    name = "test_costed_slow"
    run = LabelerRun(name, {"ms_per_image": 5, "device": "dev0"}, (name,), 4, True, cls=CostedSlow)
    a, b = (LabelerActor.options(num_cpus=0).remote(run) for _ in range(2))
    assert ray.get([a.ready.remote(), b.ready.remote()]) == ["", ""]
    first = ray.get(b.load.remote())
    device, pid = first["device"], first["pid"]
    registry = PoolRegistry.remote({name: [a, b]})
    monkeypatch.setattr(resize, "SILENT_S", 1.5)
    said: list[str] = []
    r = resize.Resizer([PoolShape(name, {"dev": 0.5}, fixed=2)], {"dev": 1.0}, {name: [a, b]}, registry,
                       start_actor=lambda _: None, interval=0.2, echo=said.append)
    t0 = time.monotonic()
    while actor_key(b) not in r.clock.devices and time.monotonic() - t0 < 10:  # both answered once
        r.tick()
        time.sleep(0.05)
    ray.get([a.process_batch.remote([0, 1]), b.process_batch.remote([0, 1])])
    mine = lambda: [x for x in r.clock.pending.get(device, []) if x.actor == actor_key(a)]  # noqa: E731
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        while not mine() and time.monotonic() - t0 < 10:  # a answered; b, stopped, cannot
            r.tick()
            time.sleep(0.05)
        assert mine() and actor_key(b) not in r.silent  # a's batch waits for b (the horizon)
        while actor_key(b) not in r.silent and time.monotonic() - t0 < 15:
            r.tick()
            time.sleep(0.05)
        assert actor_key(b) in r.silent and not mine()  # given up on b: a's batch is costed
        assert any("has not answered" in line and f"pid {pid}" in line for line in said), said
    finally:
        os.kill(pid, signal.SIGCONT)
    t0 = time.monotonic()
    while actor_key(b) in r.silent and time.monotonic() - t0 < 15:
        r.tick()
        time.sleep(0.05)
    assert actor_key(b) not in r.silent and r.clock.devices.get(actor_key(b)) == device  # it counts again
    for h in (a, b, registry):
        ray.kill(h)


def test_a_new_actor_that_never_answers_stops_holding_back_every_device():
    """A joined actor not yet heard from holds back the costing of every device (its own is not known); once it is
    given up on (left), the batches that waited for it are costed at once, not at the next answer."""
    from modalmill.pipeline.autoscale import DeviceClock

    clock = DeviceClock()
    clock.expect("new")
    clock.take("a", "gpu0", [(0.0, 1.0, 4)], None, at=2.0)
    assert clock.drain() == {}  # waits for "new"
    clock.leave("new")
    assert clock.drain() == {"a": (4, pytest.approx(1.0))}


def test_first_sizes_split_the_devices_and_no_resizer_where_nothing_can_move():
    from modalmill.pipeline.resize import can_move, first_sizes, pool_budget

    budget = pool_budget({"CPU": 2, "dev": 4, "memory": 1e9, "node:127.0.0.1": 1}, shard_cpus=1)
    assert budget == {"CPU": 1, "dev": 4}
    sizes = first_sizes(quarter_pools_on("dev"), budget)
    assert sizes == {n: 4 for n in MIX_MS}  # an equal split of the 16 quarter shares
    cpu = [PoolShape("m", {"CPU": 1})]  # a CPU pool at its minimum, the budget full: nothing can move
    assert first_sizes(cpu, budget) == {"m": 1} and not can_move(cpu, {"m": 1}, budget)
    assert can_move(quarter_pools_on("dev"), {"clip": 1, "dino": 1, "depth": 1, "sam": 1}, budget)
    assert can_move(quarter_pools_on("dev"), sizes, budget)  # full, but above their minimums: they can shrink
    fixed = [PoolShape(n, {"dev": 0.25}, fixed=4) for n in MIX_MS]
    assert not can_move(fixed, sizes, budget)


def quarter_pools_on(resource):
    return [PoolShape(n, {resource: 0.25}) for n in MIX_MS]


def test_a_batch_uses_its_interval_divided_by_the_batches_beside_it():
    assert device_seconds((0.0, 2.0), []) == pytest.approx(2.0)  # alone: the whole interval
    assert device_seconds((0.0, 2.0), [(0.0, 2.0)]) == pytest.approx(1.0)  # two side by side: half each
    assert device_seconds((0.0, 2.0), [(1.0, 3.0)]) == pytest.approx(1.5)  # 1 s alone, 1 s shared
    assert device_seconds((0.0, 4.0), [(1.0, 2.0), (1.5, 3.0), (5.0, 6.0)]) == pytest.approx(
        1.0 + 0.5 / 2 + 0.5 / 3 + 1.0 / 2 + 1.0)  # 0-1 alone, 1-1.5 two, 1.5-2 three, 2-3 two, 3-4 alone


def test_the_device_clock_costs_a_batch_once_every_actor_on_its_device_answered_after_it():
    """Two actors on one device: a serves [0, 2], b serves [1, 3]. a's batch is costed only after b has answered
    after 2 (b was serving since 1: it shared the device 1-2); the two batches use the device's 3 s between them."""
    clock = DeviceClock()
    clock.take("a", "n/dev:0", [], None, at=0.0)
    clock.take("b", "n/dev:0", [], None, at=0.0)
    clock.take("c", "n/dev:1", [], 0.5, at=0.0)  # another device: never in these batches' way
    clock.take("a", "n/dev:0", [(0.0, 2.0, 4)], None, at=2.5)
    assert clock.drain() == {}  # b last answered at 0: it may have served a batch beside a's
    clock.take("b", "n/dev:0", [], 1.0, at=2.6)
    got = clock.drain()
    assert got["a"][0] == 4 and got["a"][1] == pytest.approx(1.5)
    clock.take("b", "n/dev:0", [(1.0, 3.0, 4)], None, at=3.5)
    clock.take("a", "n/dev:0", [], None, at=3.6)
    got = clock.drain()
    assert got["b"][0] == 4 and got["b"][1] == pytest.approx(1.5)
    clock.take("a", "n/dev:0", [(4.0, 5.0, 2)], None, at=5.0)
    clock.leave("b")  # b retired: the horizon no longer waits for it
    assert clock.drain()["a"] == (2, pytest.approx(1.0))
    clock.expect("d")  # a new actor serves: which device it is on is not known until it answers
    clock.take("a", "n/dev:0", [(5.0, 7.0, 2)], None, at=7.5)
    assert clock.drain() == {}
    clock.take("d", "n/dev:0", [(6.0, 7.0, 2)], None, at=7.6)  # it was beside a's batch for 1 s
    assert clock.drain() == {"a": (2, pytest.approx(1.5)), "d": (2, pytest.approx(0.5))}


def test_measured_device_time_is_the_cost_and_a_window_with_nothing_costed_is_no_measurement():
    p = PoolShape("p", {"GPU": 0.25})
    scaler = Autoscaler([p], {"GPU": 1.0}, min_samples=1)
    scaler.observe("p", Window(samples=16, busy_s=4.0, device_s=0.0, device_samples=0))
    assert "p" not in scaler.costs  # batches served, none costed yet: not a free pool
    scaler.observe("p", Window(samples=16, busy_s=4.0, device_s=0.32, device_samples=16), sharing=1.0)
    assert scaler.costs["p"] == pytest.approx(0.02)  # 0.32 device-s / 16, whatever the busy time or sharing


def test_an_actor_tells_its_device_and_its_batches_intervals_once(ray_local):
    """What the resizer reads from a real actor: the device as node/device_key() (None when the labeler does not
    say and Ray assigned no GPU), and each batch's interval exactly once, on the node's clock."""
    import time as _time

    import ray

    from modalmill.pipeline.execute import LabelerActor
    from modalmill.pipeline.shard import LabelerRun
    from tests.labelers_costed import CostedFast

    said = LabelerRun("test_costed_fast", {"ms_per_image": 50, "device": "dev:1"}, ("test_costed_fast",), 4, True,
                      cls=CostedFast)
    silent = LabelerRun("test_costed_fast", {"ms_per_image": 50}, ("test_costed_fast",), 4, True, cls=CostedFast)
    a, b = (LabelerActor.options(num_cpus=0).remote(r) for r in (said, silent))
    assert ray.get([a.ready.remote(), b.ready.remote()]) == ["", ""]
    t0 = _time.time()
    ray.get(a.process_batch.remote([0, 1]))
    first, again = ray.get(a.load.remote()), ray.get(a.load.remote())
    assert first["device"] == f"{ray.get_runtime_context().get_node_id()}/dev:1"
    ((start, end, n),) = first["intervals"]
    assert n == 2 and t0 <= start < end <= first["at"] and end - start >= 0.1  # 2 images at 50 ms
    assert first["samples"] == 2 and first["running_since"] is None and again["intervals"] == []
    assert ray.get(b.load.remote())["device"] is None
    for h in (a, b):
        ray.kill(h)
