"""A shard task killed at every write step of every path converges, and no command calls a torn shard done.

Every write a shard task makes visible goes through ``modalmill.pipeline.shard._step`` (the task's fence and, in
the test suite only, a crash hook that reads ``$MODALMILL_TEST_CRASH_DIR/crash.json``). For each path a shard task
takes -- a first run, ``--only`` adding a modality, ``--force``, ``--only`` whose new modality fails on a sample
(realignment) and ``--force`` that drops an earlier modality no longer aligned -- the uninterrupted run logs its
write steps (checked against the list below, and the list against every ``_step`` call in shard.py). Then, for
each step, the shard task runs in a Ray worker that dies there (SIGKILL of the worker process, or an exception),
locally and on the loopback S3 server (SIGKILL there at one step of each kind: see its test). After each crash:

- ``status`` counts the shard done, planning skips it and ``load_dataset`` reads it only if ``check`` finds the
  output clean (the marker describes the tars) -- a torn shard is never reported done; a pending marker is
  reported as torn by ``status``;
- the same command run again converges: tars byte-identical to the uninterrupted run's, ``check`` clean.
"""

from __future__ import annotations

import ast
import os
import shutil

import pytest

import tests.labelers_for_tests  # noqa: F401  (registers test_caption_or_fail)
from modalmill.dataset import load_dataset
from modalmill.io import manifest, storage
from modalmill.jobs.check import check_output
from modalmill.jobs.democorpus import build_corpus
from modalmill.jobs.runner import JobError, plan_job
from modalmill.jobs.spec import job_from_dict
from modalmill.jobs.status import output_status
from modalmill.pipeline import shard as shard_mod
from modalmill.pipeline.shard import CRASH_DIR_ENV, process_shard

SHARD = "shard-00000"
BASE = ["rgb", "crop_settings", "canny_edge"]
FAIL_KEY = 1  # index (in the shard's key order) of the sample the failing caption labeler drops

# path -> (start from, modalities, caption fails on a sample, --only, --force, its write steps in order)
PATHS = {
    "first": (None, BASE, False, None, False,
              ["tar:rgb", "tar:crop_settings", "tar:canny_edge", "manifest", "marker", "clear-failure"]),
    "only": ("base", BASE + ["caption"], False, ["caption"], False,
             ["pending", "tar:caption", "manifest", "marker", "clear-failure"]),
    "force": ("base", BASE, False, None, True,
              ["pending", "tar:rgb", "tar:crop_settings", "tar:canny_edge", "manifest", "marker", "clear-failure"]),
    "realign": ("base", BASE + ["caption"], True, ["caption"], False,
                ["pending", "tar:caption", "realign:canny_edge", "realign:crop_settings", "realign:rgb", "manifest",
                 "marker", "clear-failure"]),
    "force-drop": ("base_cap", ["rgb", "crop_settings", "caption"], True, None, True,
                   ["pending", "tar:rgb", "tar:crop_settings", "tar:caption", "remove:canny_edge", "manifest",
                    "marker", "clear-failure"]),
}
N_POINTS = sum(len(p[-1]) for p in PATHS.values())


def step_kinds_in_source() -> set[str]:
    """The kinds of write step that pipeline/shard.py names in its ``_step(task, "kind", ...)`` calls."""
    tree = ast.parse(open(shard_mod.__file__).read())
    return {n.args[1].value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "_step"
            and len(n.args) > 1 and isinstance(n.args[1], ast.Constant)}


def test_the_crash_points_cover_every_write_step_of_shard_py():
    kinds = {s.split(":")[0] for p in PATHS.values() for s in p[-1]}
    assert kinds == step_kinds_in_source(), "a write step of pipeline/shard.py is not in any path's crash points"
    assert N_POINTS == 34


# ---------------------------------------------------------------------- the world: local or S3 outputs


class World:
    """Where outputs live (a local folder or an S3 bucket), and how to copy and read them."""

    def __init__(self, root: str, corpus: str, client=None, bucket: str | None = None):
        self.root, self.corpus, self.client, self.bucket = root, corpus, client, bucket
        self.n = 0

    def new(self, name: str) -> str:
        self.n += 1
        return storage.join(self.root, f"{name}-{self.n}")

    def copy(self, src: str, name: str) -> str:
        dst = self.new(name)
        if self.client is None:
            shutil.copytree(src, dst)  # keeps mtimes, as `cp -a` does
            return dst
        head = f"s3://{self.bucket}/"
        for url in storage.list_files(src):
            self.client.copy_object(Bucket=self.bucket, Key=dst[len(head):] + url[len(src):],
                                    CopySource={"Bucket": self.bucket, "Key": url[len(head):]})
        return dst

    def tars(self, out: str) -> dict[str, bytes]:
        """Every tar of the output: "modality/shard.tar" -> bytes."""
        urls = [u for u in storage.list_files(out, suffix=".tar") if "/_modalmill/" not in u]
        return {u[len(out) + 1:]: storage.read_bytes(u) for u in urls}

    def spec(self, out: str, path: str, keys: list[str] | None = None):
        _, mods, fails, _, _, _ = PATHS[path]
        labelers = {}
        if "caption" in mods:
            labelers = {"test_caption_or_fail": {"config": {"fail_keys": [keys[FAIL_KEY]] if fails else []}}}
        return job_from_dict({"input": self.corpus, "output": out, "modalities": mods, "batch_size": 4,
                              "crops": {"n_crops": 1}, "labelers": labelers})


def run_command(world: World, out: str, path: str, keys) -> None:
    """The path's command, uninterrupted: plan as `modalmill run` does, run each shard task here."""
    _, _, _, only, force, _ = PATHS[path]
    for task in plan_job(world.spec(out, path, keys), only=only, force=force).tasks:
        process_shard(task)


def crash_spec(out: str, step: str | None, how: str = "raise") -> None:
    import json

    with open(os.path.join(os.environ[CRASH_DIR_ENV], "crash.json"), "w") as f:
        json.dump({"output": out, "shard": SHARD, "step": step, "how": how}, f)


def clear_crash() -> None:
    for name in ("crash.json", "steps.log"):
        try:
            os.remove(os.path.join(os.environ[CRASH_DIR_ENV], name))
        except FileNotFoundError:
            pass


def logged_steps() -> list[str]:
    with open(os.path.join(os.environ[CRASH_DIR_ENV], "steps.log")) as f:
        return [line.split()[2] for line in f if line.split()[0] == SHARD]


# ---------------------------------------------------------------------- the checks


def assert_nothing_reports_torn_as_done(world: World, out: str, path: str, keys, step: str) -> None:
    """After a crash: whatever status, planning and the loader call done must be what check finds clean."""
    marker = manifest.read_marker(out, SHARD)
    pending = marker is not None and marker.get("state") == "pending"
    st = output_status(out) if marker is not None or storage.list_files(manifest.meta_url(out)) else None
    said_done = bool(st and st["shards_done"])
    if pending:
        assert not said_done and SHARD in st.get("torn", {}), (step, st)
    _, _, _, only, _, _ = PATHS[path]
    try:
        plan = plan_job(world.spec(out, path, keys), only=only)
        skipped = SHARD in plan.skipped
    except JobError:  # a refusal (made with other settings: --force needed) calls nothing done
        skipped = False
    try:
        ds = load_dataset(out, ["rgb", "crop_settings"], shuffle_shards=False, decode=False)
        loaded = [s["__key__"] for s in ds]  # no AlignmentError mid-epoch
    except FileNotFoundError:
        loaded = None
    if said_done or skipped or loaded:
        report = check_output(out)
        assert report.ok, (step, "reported done but torn", [v.line() for v in report.violations])
        assert loaded == manifest.read_marker(out, SHARD)["keys"], step
    assert said_done == (loaded is not None), (step, st, loaded)


def assert_converged(world: World, out: str, reference: dict[str, bytes], step: str) -> None:
    got = world.tars(out)
    assert sorted(got) == sorted(reference), step
    for name, data in reference.items():
        assert got[name] == data, (step, name)
    report = check_output(out)
    assert report.ok, (step, [v.line() for v in report.violations])
    st = output_status(out)
    assert st["shards_done"] == 1 and "torn" not in st, (step, st)


# ---------------------------------------------------------------------- the test


def crash_all_points(ray, world: World, how: str, at: set[tuple[str, str]] | None = None) -> int:
    """Crash at every write step of every path (or at the ``(path, step)`` pairs of ``at``); the number of crash
    points that converged. The uninterrupted runs log every path's steps either way."""
    @ray.remote(max_retries=0)
    def shard_task(task):
        return process_shard(task)

    if world.client is not None:  # the workers reach the loopback S3 server as the driver does
        shard_task = shard_task.options(runtime_env={"env_vars": storage.s3_env_vars()})

    starts = {"base": world.new("base")}
    run_command(world, starts["base"], "first", None)
    keys = manifest.read_marker(starts["base"], SHARD)["keys"]
    starts["base_cap"] = world.copy(starts["base"], "base_cap")
    run_command(world, starts["base_cap"], "only", keys)
    points = 0
    try:
        for path, (start, _, _, only, force, expected) in PATHS.items():
            reference = world.new(f"ref-{path}") if start is None else world.copy(starts[start], f"ref-{path}")
            clear_crash()
            crash_spec(reference, None)  # log the steps, crash nowhere
            run_command(world, reference, path, keys)
            assert logged_steps() == expected, path
            ref_tars = world.tars(reference)
            for step in expected:
                if at is not None and (path, step) not in at:
                    continue
                out = world.new(path) if start is None else world.copy(starts[start], path)
                (task,) = plan_job(world.spec(out, path, keys), only=only, force=force).tasks
                crash_spec(out, step, how)
                with pytest.raises(Exception) as died:
                    ray.get(shard_task.remote(task))
                clear_crash()
                assert ("injected crash" in str(died.value)) if how == "raise" else (
                    isinstance(died.value, ray.exceptions.WorkerCrashedError)), (path, step, died.value)
                assert_nothing_reports_torn_as_done(world, out, path, keys, f"{path} {step}")
                run_command(world, out, path, keys)  # the same command again
                assert_converged(world, out, ref_tars, f"{path} {step}")
                points += 1
    finally:
        clear_crash()
    print(f"{how}: {points} crash points converged")
    return points


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash-corpus")
    build_corpus(str(d), n_shards=1, per_shard=3, size_range=(64, 96))
    return str(d / "shard-00000.tar")


@pytest.mark.parametrize("how", ["raise", pytest.param("kill", marks=pytest.mark.slow)])  # kill: a new worker each
def test_34_crash_points_local_converge_and_are_never_reported_done(ray_local, tiny_corpus, tmp_path, how):
    assert crash_all_points(ray_local, World(str(tmp_path), tiny_corpus), how) == N_POINTS


# One crash point of every kind of write step (the S3 SIGKILL test's subset).
ONE_OF_EACH_KIND = {("first", "tar:rgb"), ("only", "pending"), ("realign", "realign:crop_settings"),
                    ("force-drop", "remove:canny_edge"), ("force-drop", "manifest"), ("first", "marker"),
                    ("force-drop", "clear-failure")}


def test_one_of_each_kind_is_a_crash_point_of_every_kind():
    assert all(step in PATHS[path][-1] for path, step in ONE_OF_EACH_KIND)
    assert {step.split(":")[0] for _, step in ONE_OF_EACH_KIND} == step_kinds_in_source()


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_34_crash_points_s3_converge_and_are_never_reported_done(ray_local, s3_env, tiny_corpus, how):
    """On S3 an exception is injected at all 34 write steps; SIGKILL at one step of every kind (7). A write step's
    crash hook runs before its write, and on S3 a write is one PUT of a file spooled under $TMPDIR, outside the
    bucket: neither an exception (``writers.abort`` discards the local spool, uploads nothing) nor a SIGKILL
    leaves anything in the bucket, so the bucket a killed task leaves is the one the exception leaves at the same
    step, which the ``raise`` variant checks at every step. What SIGKILL adds -- a dead Ray worker, no exception
    handler run, temporary files left behind -- is checked at all 34 steps locally (where the temporary files are
    in the output's folders). Each kill costs a fresh Ray worker with the S3 runtime env (~3 s on 2 cores), so the
    S3 SIGKILL variant checks one step of each kind: the uninterrupted runs still log every path's steps."""
    server, bucket = s3_env
    world = World(f"s3://{bucket}/crash", tiny_corpus, client=server.client(), bucket=bucket)
    at = ONE_OF_EACH_KIND if how == "kill" else None
    assert crash_all_points(ray_local, world, how, at) == (len(at) if at else N_POINTS)


# ---------------------------------------------------------------------- tars changed behind a done marker


def _tamper(out: str) -> None:
    """Replace the done shard's canny_edge tar by one of the same size and other content (another writer)."""
    url = storage.join(out, "canny_edge", f"{SHARD}.tar")
    data = bytearray(storage.read_bytes(url))
    data[-1] ^= 0xFF  # the zero padding at the end of the tar: same size, other bytes
    storage.write_bytes(url, bytes(data))


def assert_torn_everywhere(world: World, out: str, keys, why: str, loader_skips: bool = True) -> None:
    from click.testing import CliRunner

    from modalmill.cli import main

    st = output_status(out)
    assert st["shards_done"] == 0 and why in st["torn"][SHARD], st
    r = CliRunner().invoke(main, ["status", out])
    assert r.exit_code == 0 and f"torn shard {SHARD}: " in r.output and "0 done" in r.output, r.output
    (task,) = plan_job(world.spec(out, "only", keys), only=["caption"]).tasks  # --only too: made again in full
    assert task.mode == "full" and "canny_edge" in task.write and "caption" in task.write
    if loader_skips:
        with pytest.raises(FileNotFoundError):  # its only shard is left out (with a warning naming it)
            load_dataset(out, ["rgb"], decode=False)
    else:  # same size, other ETag / mtime: read, every key checked against the marker's as it goes
        assert [s["__key__"] for s in load_dataset(out, ["rgb", "canny_edge"], decode=False,
                                                   shuffle_shards=False)] == keys
    process_shard(task)
    assert check_output(out).ok and output_status(out)["shards_done"] == 1


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_tar_changed_behind_a_done_marker_is_torn_everywhere(request, tiny_corpus, tmp_path, where):
    if where == "s3":
        server, bucket = request.getfixturevalue("s3_env")
        world = World(f"s3://{bucket}/torn", tiny_corpus, client=server.client(), bucket=bucket)
    else:
        world = World(str(tmp_path), tiny_corpus)
    out = world.new("out")
    run_command(world, out, "first", None)
    keys = manifest.read_marker(out, SHARD)["keys"]
    _tamper(out)
    assert not check_output(out).ok  # check compares the sha256 of the bytes
    # same size: the listing shows another version (S3: the ETag is not the recorded MD5; local: the mtime)
    assert_torn_everywhere(world, out, keys, "canny_edge: the tar" if where == "local" else "ETag", loader_skips=False)
    # a tar of another size, and a missing tar
    storage.write_bytes(storage.join(out, "rgb", f"{SHARD}.tar"), b"\0" * 10240)
    assert_torn_everywhere(world, out, keys, "rgb: the tar has 10240 bytes")
    storage.remove(storage.join(out, "crop_settings", f"{SHARD}.tar"))
    assert_torn_everywhere(world, out, keys, "not there")


def test_legacy_markers_without_sizes_are_done_while_their_tars_are_listed(tiny_corpus, tmp_path):
    world = World(str(tmp_path), tiny_corpus)
    out = world.new("out")
    run_command(world, out, "first", None)
    marker = manifest.read_marker(out, SHARD)
    keys = marker["keys"]
    del marker["state"]
    for info in marker["modalities"].values():
        for k in ("bytes", "md5", "mtime_ns"):
            del info[k]
    manifest.write_marker(out, SHARD, marker)
    assert output_status(out)["shards_done"] == 1
    assert SHARD in plan_job(world.spec(out, "first", keys)).skipped
    storage.remove(storage.join(out, "canny_edge", f"{SHARD}.tar"))
    assert_torn_everywhere(world, out, keys, "not there")


# ---------------------------------------------------------------------- retries and the fence


def test_a_retried_update_goes_on_from_its_pending_marker_or_leaves_the_shard_to_a_full_rerun(ray_local, tiny_corpus,
                                                                                             tmp_path):
    from modalmill.jobs.runner import EXIT_SAMPLES_FAILED, run_job
    from modalmill.pipeline.shard import InjectedCrash, ShardAbort

    world = World(str(tmp_path), tiny_corpus)
    base = world.new("base")
    run_command(world, base, "first", None)
    keys = manifest.read_marker(base, SHARD)["keys"]
    reference = {}
    for path in ("only", "realign"):
        ref = world.copy(base, f"ref-{path}")
        run_command(world, ref, path, keys)
        reference[path] = world.tars(ref)
    try:
        # killed after its new tar: the retry (the same task, as Ray reruns it) goes on from the replaced marker
        out = world.copy(base, "only")
        (task,) = plan_job(world.spec(out, "only", keys), only=["caption"]).tasks
        crash_spec(out, "manifest")
        with pytest.raises(InjectedCrash):
            process_shard(task)
        clear_crash()
        assert manifest.read_marker(out, SHARD)["state"] == "pending"
        assert any("interrupted rewrite" in v.line() for v in check_output(out).violations)
        assert manifest.list_markers(out) == {}  # readers of full markers see no done shard
        process_shard(task)
        assert_converged(world, out, reference["only"], "retried update")
        # killed while realigning: the kept tars changed, so the retry refuses and the next run redoes it all
        out = world.copy(base, "realign")
        (task,) = plan_job(world.spec(out, "realign", keys), only=["caption"]).tasks
        crash_spec(out, "realign:crop_settings")
        with pytest.raises(InjectedCrash):
            process_shard(task)
        clear_crash()
        with pytest.raises(ShardAbort, match="interrupted rewrite"):
            process_shard(task)
        # `modalmill run JOB --only caption` again: the torn shard is planned in full and converges
        s = run_job(world.spec(out, "realign", keys), only=["caption"], show_progress=False)
        assert s["exit_code"] == EXIT_SAMPLES_FAILED and s["shards_processed"] == 1, s
        assert_converged(world, out, reference["realign"], "realign after a refused retry")
    finally:
        clear_crash()


class CountingFence:
    """A fence as the lease gives one: picklable, no arguments; raises once the lease is "lost" (after ``allow``
    calls); counts its calls in a file (it may run in a Ray worker)."""

    def __init__(self, path: str, allow: int):
        self.path, self.allow = path, allow

    def __call__(self) -> None:
        with open(self.path, "a") as f:
            f.write("x")
        if os.path.getsize(self.path) > self.allow:
            raise RuntimeError("lease lost")


def test_the_fence_is_called_before_every_write_step_and_stops_the_task(ray_local, tiny_corpus, tmp_path):
    import dataclasses

    world = World(str(tmp_path), tiny_corpus)
    base = world.new("base")
    run_command(world, base, "first", None)
    keys = manifest.read_marker(base, SHARD)["keys"]
    out = world.copy(base, "fenced")
    (task,) = plan_job(world.spec(out, "realign", keys), only=["caption"]).tasks
    calls = str(tmp_path / "calls")
    process_shard(dataclasses.replace(task, fence=CountingFence(calls, 1000)))
    assert os.path.getsize(calls) == len(PATHS["realign"][-1])  # once per write step
    # the lease is lost before the first write: in a Ray worker, the task stops and nothing changes
    out = world.copy(base, "lost")
    before = world.tars(out), manifest.read_marker(out, SHARD)
    os.remove(calls)
    fenced = ray_local.remote(max_retries=0)(process_shard)
    with pytest.raises(ray_local.exceptions.RayTaskError, match="lease lost"):
        ray_local.get(fenced.remote(dataclasses.replace(task, fence=CountingFence(calls, 0))))
    assert (world.tars(out), manifest.read_marker(out, SHARD)) == before
    assert not [f for _, _, files in os.walk(out) for f in files if ".tmp-" in f]  # temporary files discarded
