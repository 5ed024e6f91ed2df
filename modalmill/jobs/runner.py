"""Plan and run a job: which shards need which work, then execute on Ray and record the run.

Resume rules (per output shard, decided from its completion marker):
- no marker (or only a failure record): the shard is made from its input (``full``);
- a torn marker (pending, or its tars are not what it records: ``io.commit``): made again from its input (``full``);
- a marker with every requested modality made by the same labeler config: skipped;
- a marker lacking some requested modalities: only those are added (``update``), the others untouched;
- a requested modality made with a different config, or a shard made from a different input: an error
  that lists them, unless ``--force`` (recompute) is given.
``--only M,...`` adds or recomputes just those modalities on existing output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .. import __version__
from ..labelers.base import LABELERS, get_labeler, labeler_for, load_entry_points
from ..io import index, manifest
from ..labelers.pins import mirror_location
from ..io.readers import ShardSource, plan_sources
from ..io.captions import INPUT
from ..pipeline.shard import (CORE, FULL, UPDATE, LabelerRun, ShardTask, core_producers, labeler_producers,
                              with_caption_source)
from .spec import JobSpec, JobSpecError
from .weights import downloadable

# exit codes (docs/cli.md): 1 (usage, config, weights or I/O error) and 2 (click's usage errors) come from the CLI
EXIT_OK, EXIT_ERROR, EXIT_SAMPLES_FAILED, EXIT_SHARDS_FAILED, EXIT_LEASE = 0, 1, 3, 4, 5


class JobError(RuntimeError):
    pass


@dataclass
class Plan:
    spec: JobSpec
    sources: list[ShardSource]
    runs: list[LabelerRun]
    tasks: list[ShardTask] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def resolve_labelers(spec: JobSpec, modalities: list[str], available: set[str] = frozenset()) -> list[LabelerRun]:
    """The labeler runs that produce ``modalities``, in dependency order."""
    load_entry_points()
    chosen: dict[str, list[str]] = {}
    for m in modalities:
        if m in CORE or (m == "caption" and spec.text.caption_source == INPUT):
            continue  # made by the shard task itself (captions: read from the input samples)
        cls = next((LABELERS[n] for n in spec.labelers if m in LABELERS[n].outputs), None)
        try:
            cls = cls or labeler_for(m)
        except KeyError:
            raise JobSpecError(f"no labeler produces modality {m!r}; see `modalmill labelers`") from None
        chosen.setdefault(cls.name, []).append(m)
    runs: dict[str, LabelerRun] = {}
    mirror = spec.weights_from or os.environ.get("MODALMILL_WEIGHTS_FROM") or None
    for name, outs in chosen.items():
        cls = get_labeler(name)
        s = spec.labelers.get(name)
        config = dict(s.config) if s else {}
        if mirror and not config.get("weights") and downloadable(cls) \
                and "weights" in {f.name for f in dataclasses.fields(cls.Config)}:
            config["weights"] = mirror_location(mirror, name)  # weights staged by `modalmill weights fetch`
        runs[name] = LabelerRun(labeler=name, config=config, outputs=tuple(outs),
                                batch_size=(s.batch_size if s and s.batch_size else cls.default_batch_size),
                                stateful=cls.stateful, cls=cls)
    # order so that a labeler runs after the labelers of the modalities it requires
    ordered: list[LabelerRun] = []
    made = set(CORE) | set(available)
    pending = list(runs.values())
    while pending:
        done = made | {m for o in ordered for m in o.outputs}

        def waits(r: LabelerRun) -> bool:  # a requirement that another pending run still has to (re)make
            later = {m for o in pending if o is not r for m in o.outputs}
            return bool(set(r.labeler_class().requires) & later)

        ready = [r for r in pending if set(r.labeler_class().requires) <= done and not waits(r)]
        if not ready:
            missing = {r.labeler: sorted(set(r.labeler_class().requires) - made) for r in pending}
            raise JobSpecError(f"labelers need modalities that are neither requested nor in the output: {missing}")
        for r in ready:
            ordered.append(r)
            pending.remove(r)
    return ordered


def expected_checkpoints(runs: list[LabelerRun], cluster: bool = False) -> dict[str, str]:
    """``{labeler: checkpoint id}`` of the weights each run would load now, found on the driver before any actor
    starts (:meth:`Labeler.preflight`): missing or wrong weights fail here, as one ``WeightsError`` line. An
    ``s3://`` checkpoint is fetched only when its ETag/size/LastModified changed, and a checkpoint is hashed only
    when a file's size, inode, mtime or ctime changed, so an unchanged big checkpoint costs a HEAD and some stats.

    ``cluster``: the job runs on a Ray cluster, whose nodes may hold weights at local paths this machine lacks
    (node-local paths): those are left to the workers (their set-up error comes back as one line), with a note,
    and their id is '' (resume then compares that labeler's settings only)."""
    out: dict[str, str] = {}
    for run in runs:
        inst = run.instance()
        if cluster:
            values = dataclasses.asdict(inst.config).values() if dataclasses.is_dataclass(inst.config) else ()
            elsewhere = [v for v in values if isinstance(v, str) and v.startswith(("/", "~", "file://"))
                         and not os.path.exists(os.path.expanduser(v[7:] if v.startswith("file://") else v))]
            if elsewhere:
                print(f"modalmill: labeler {run.labeler}: {elsewhere[0]} is not on this machine; the cluster's workers "
                      "will load it (resume compares this labeler's settings, not its weights)", file=sys.stderr)
                out[run.labeler] = ""
                continue
        out[run.labeler] = inst.preflight() or ""
    return out


def made_otherwise(marker: dict | None, modalities: list[str], producers: dict[str, dict],
                     checkpoints: dict[str, str]) -> dict[str, str]:
    """Which of ``modalities`` the shard ``marker`` records as made differently from how this job would make them
    now, each with why: ``"settings"`` (the producer's config hash differs) or ``"weights"`` (same settings, but
    the labeler's checkpoint content hash differs from ``checkpoints[labeler]``, e.g. a checkpoint replaced in
    place at the same path or ``s3://`` URL). ``producers``: modality -> what would produce it
    (``labeler``, ``config_hash``). A modality refined in place (``human_poses`` + ``pose_tokenized``) also counts
    as made by the producer it refines. Markers without a recorded checkpoint (model-free labelers) compare
    settings only."""
    have = (marker or {}).get("modalities", {})
    out: dict[str, str] = {}
    for m in modalities:
        if m not in have or m not in producers:
            continue
        want = producers[m]
        made = [have[m]] + ([have[m]["refines"]] if isinstance(have[m].get("refines"), dict) else [])
        same = [p for p in made if p.get("config_hash") == want["config_hash"]]
        if not same:
            out[m] = "settings"
            continue
        now = checkpoints.get(want.get("labeler", ""), "")
        if now and not any(p.get("checkpoint") in ("", None, now) for p in same):
            out[m] = "weights"
    return out


def describe_stale(stale: dict[str, str]) -> str:
    """``{"depth": "weights", "canny_edge": "settings"}`` -> "['depth'] were made with other weights, ['canny_edge']
    with other settings"."""
    parts = []
    for why in ("settings", "weights"):
        mods = sorted(m for m, w in stale.items() if w == why)
        if mods:
            parts.append(f"{mods} {'were made ' if not parts else ''}with other {why}")
    return ", ".join(parts)


@dataclass
class JobPlan:
    """What every shard of a job is decided against: the requested modalities and who must have made them."""

    spec: JobSpec
    only: list[str] | None
    force: bool
    sources: list[ShardSource]
    selected: list[ShardSource]
    requested: list[str]
    requested_only: list[str]
    all_runs: list[LabelerRun]
    expected: dict[str, dict]  # modality -> the producer this job would record (labeler, version, config_hash)
    base: dict
    checkpoints: dict[str, str] = field(default_factory=dict)  # labeler -> the weights' content hash it would load

    def runs_for(self, mods: list[str], have: set[str]) -> tuple[LabelerRun, ...]:
        return tuple(resolve_labelers(self.spec, mods, available=have))


def prepare_job(spec: JobSpec, only: list[str] | None = None, force: bool = False, cluster: bool = False,
                check_inputs: bool = False) -> JobPlan:
    """Everything planning needs besides the markers: the input shards (one listing per pattern, or none for a
    brace pattern unless ``check_inputs``: then one listing per folder or S3 prefix proves every input file
    exists), the selection, the labelers, the producers they record and the checkpoints they would load
    (:func:`expected_checkpoints`: missing or wrong weights fail here, before anything starts)."""
    sources = plan_sources(spec.input, spec.shard_size, parquet=spec.parquet, text_member=spec.text.member,
                           check=check_inputs)
    if not sources:
        raise JobError(f"no input shards in {spec.input!r}")
    selected = [sources[i] for i in spec.selected_shards(len(sources))]
    requested = list(dict.fromkeys(list(CORE) + list(spec.modalities)))
    requested_only: list[str] = []
    if only:
        unknown = [m for m in only if m not in spec.modalities and m not in CORE]
        for m in only:
            from ..schemas.modalities import get_modality

            try:
                get_modality(m)
            except KeyError as e:
                raise JobSpecError(str(e.args[0])) from None
        requested_only = list(dict.fromkeys(only))
        if unknown:
            requested = list(dict.fromkeys(requested + unknown))
    all_runs = resolve_labelers(spec, requested, available=set(requested))
    expected = with_caption_source({**core_producers(spec.decode, spec.crops, spec.seed),
                                    **labeler_producers(tuple(all_runs))}, spec.text, requested)
    base = dict(output=spec.output, decode=spec.decode, crops=spec.crops, seed=spec.seed, batch_size=spec.batch_size,
                text=spec.text)
    checked = set(requested_only if only else requested)
    checkpoints = expected_checkpoints([r for r in all_runs if checked & set(r.outputs)], cluster=cluster)
    return JobPlan(spec, only, force, sources, selected, requested, requested_only, all_runs, expected, base,
                   checkpoints)


def stale_modalities(job: JobPlan, marker: dict, mods: list[str]) -> dict[str, str]:
    """The modalities of ``mods`` that ``marker`` records as made otherwise than this job would make them, each
    with why (``"settings"`` or ``"weights"``): the one "is this shard's output still what the job asks for" check
    of planning (see :func:`made_otherwise`)."""
    return made_otherwise(marker, mods, job.expected, job.checkpoints)


SKIP = "skip"


def decide_shard(job: JobPlan, src: ShardSource, marker: dict | None, torn: bool = False) -> ShardTask | str:
    """What shard ``src`` needs, from its marker (None: no marker; a marker without its key list is enough):
    a ShardTask, ``SKIP``, or a problem (any other str) that stops the job until the user decides. ``torn``: the
    shard has a marker that is pending or does not describe its tars (``io.index``): it is made again from its
    input, with every modality the job names (``--only`` too: what the shard held is not known to be there)."""
    only, force = job.only, job.force
    if torn:
        return ShardTask(source=src, mode=FULL, write=tuple(job.requested), labelers=tuple(job.all_runs),
                         **job.base)
    if marker and marker.get("source") != src.url:
        return (f"{src.name} was made from {marker.get('source')!r} but the input now maps "
                f"{src.url!r} to it")
    have = marker.get("modalities", {}) if marker else {}
    stale = stale_modalities(job, marker, job.requested_only if only else job.requested) if marker else {}
    if only:
        if not marker:
            return f"{src.name} has no output yet: run the job without --only first"
        if any(m in CORE for m in job.requested_only):
            return (f"--only cannot recompute {sorted(set(job.requested_only) & set(CORE))}: "
                    "they define the shard; rerun the job with --force instead")
        todo = [m for m in job.requested_only if force or m not in have or m in stale]
        if stale and not force:
            return f"{src.name}: {describe_stale(stale)}; add --force to recompute"
        if todo:
            return ShardTask(source=src, mode=UPDATE, write=tuple(todo),
                             labelers=job.runs_for(todo, set(have) | set(todo)), **job.base)
        return SKIP
    if force or not marker:
        return ShardTask(source=src, mode=FULL, write=tuple(job.requested), labelers=tuple(job.all_runs),
                         **job.base)
    if stale:
        return (f"{src.name}: {describe_stale(stale)}; add --force to recompute "
                f"(or --only {','.join(stale)} --force for just those)")
    missing = [m for m in job.requested if m not in have]
    if missing:
        return ShardTask(source=src, mode=UPDATE, write=tuple(missing),
                         labelers=job.runs_for(missing, set(have) | set(missing)), **job.base)
    return SKIP


@dataclass
class PlanPage:
    """The decisions for the selected shards one marker-listing page covers (in listing order)."""

    tasks: list[ShardTask] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    markers_read: int = 0


def plan_pages(job: JobPlan, snap: index.Snapshot | None = None) -> Iterator[PlanPage]:
    """Decide every selected shard, streaming: one page per page of the marker listing (1,000 markers), so the
    first shard tasks can start while the rest is planned. Markers come from the output's shard index where the
    listing shows them unchanged, else are read with bounded parallel requests (only the selected shards')."""
    snap = snap if snap is not None else index.load_snapshot(job.spec.output, with_manifests=False)
    todo = sorted(job.selected, key=lambda s: s.name + ".json")  # listing order
    wanted = {s.name for s in todo}
    pos = 0

    def decide(upto: str | None, markers: dict, torn: dict) -> PlanPage:
        nonlocal pos
        page = PlanPage()
        while pos < len(todo) and (upto is None or todo[pos].name + ".json" <= upto):
            src = todo[pos]
            pos += 1
            info = markers.get(src.name)
            got = decide_shard(job, src, info.as_marker() if info is not None else None, torn=src.name in torn)
            if isinstance(got, ShardTask):
                page.tasks.append(got)
            elif got == SKIP:
                page.skipped.append(src.name)
            else:
                page.problems.append(got)
        return page

    for mp in index.marker_pages(job.spec.output, snap, want=wanted.__contains__):
        page = decide(mp.last, mp.markers, mp.torn)
        page.markers_read = mp.read
        yield page
    yield decide(None, {}, {})


def plan_job(spec: JobSpec, only: list[str] | None = None, force: bool = False, cluster: bool = False) -> Plan:
    """The whole plan at once (every page of :func:`plan_pages`); raises JobError listing the problems."""
    job = prepare_job(spec, only, force, cluster=cluster)
    plan = Plan(spec=spec, sources=job.sources, runs=[])
    problems: list[str] = []
    for page in plan_pages(job):
        plan.tasks += page.tasks
        plan.skipped += page.skipped
        problems += page.problems
    if problems:
        raise JobError(_problem_message(problems))
    plan.tasks.sort(key=lambda t: t.source.index)
    plan.runs = _runs_of(plan.tasks)
    return plan


def _problem_message(problems: list[str], done_before: int = 0) -> str:
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    head = "cannot run this job on the existing output:\n  "
    tail = (f"\n  ({done_before} shard task(s) planned before the first problem was found ran and are recorded)"
            if done_before else "")
    return head + "\n  ".join(problems[:10]) + more + tail


def _runs_of(tasks: list[ShardTask]) -> list[LabelerRun]:
    seen: dict[str, LabelerRun] = {}
    for t in tasks:
        for r in t.labelers:
            seen.setdefault(r.labeler, r)
    return list(seen.values())


def run_job(spec: JobSpec, only: list[str] | None = None, force: bool = False, address: str | None = None,
            show_progress: bool = True, on_submit: Callable[[ShardTask], None] | None = None,
            wait: bool = False) -> dict:
    """Take the output's lease (:mod:`modalmill.io.lease`; ``wait``: wait for another driver to finish instead of
    refusing), then plan, execute and record one run; returns the run summary (also written under
    _modalmill/runs/); see :func:`_run_job`. A driver that loses the lease while it runs stops at once and
    returns with ``exit_code`` 5 and ``lease_lost`` naming the new holder."""
    from ..io import lease

    t0 = time.time()
    # every check (inputs, modalities, labelers, weights) before the lease: a job that cannot run writes nothing.
    # An --only run reads no input (it updates existing shards), so its inputs need not exist any more.
    job = prepare_job(spec, only=only, force=force, check_inputs=not only,
                      cluster=bool(address or spec.ray.address or os.environ.get("RAY_ADDRESS")))
    with lease.hold(spec.output, wait=wait) as held:
        summary = _run_job(job, address, show_progress, on_submit, t0, held)
        if held.lost and "lease_lost" not in summary:  # taken over after the last check: results may be overwritten
            summary["lease_lost"] = held.lost
            summary["exit_code"] = EXIT_LEASE
    return summary


class _Planning:
    """The streaming plan of one run (:func:`plan_pages`): the pages still to plan and what the planned ones
    found. The first page with work (or a problem) is planned by :meth:`first_tasks`, the rest by :meth:`rest`
    while the first tasks run."""

    def __init__(self, job: JobPlan, snap: index.Snapshot):
        self.pages = plan_pages(job, snap)
        self.problems: list[str] = []
        self.skipped: list[str] = []
        self.deferred: list[ShardTask] = []
        self.tasks = 0
        self.markers_read = 0

    def absorb(self, page: PlanPage) -> list[ShardTask]:
        self.skipped.extend(page.skipped)
        self.problems.extend(page.problems)
        self.markers_read += page.markers_read
        self.tasks += len(page.tasks)
        return page.tasks

    def first_tasks(self) -> list[ShardTask]:
        """The tasks of the first page that has any; a problem found there stops the job before anything runs,
        listing every problem of the whole output (JobError)."""
        first: list[ShardTask] = []
        for page in self.pages:
            first += self.absorb(page)
            if first or self.problems:
                break
        if self.problems:
            for page in self.pages:
                self.absorb(page)
            raise JobError(_problem_message(self.problems))
        return first

    def rest(self, first: list[ShardTask]) -> Iterator[ShardTask]:
        """``first``, then the tasks of the later pages; once a problem is found, no more (planning goes on to
        report every problem). Tasks needing a labeler whose actors this execution did not start are deferred."""
        pooled = {r.labeler for r in _runs_of(first) if r.stateful}
        yield from first
        for page in self.pages:
            tasks = self.absorb(page)
            if self.problems:
                continue
            for t in tasks:
                if {r.labeler for r in t.labelers if r.stateful} <= pooled:
                    yield t
                else:
                    self.deferred.append(t)


def _execute_planned(spec: JobSpec, address: str | None, planning: _Planning, first: list[ShardTask],
                     opts: dict) -> list[dict]:
    """Run the planned tasks on Ray (the stream, then the deferred ones); returns their results by shard."""
    from ..io.cluster import init_ray
    from ..pipeline.execute import execute

    if not first:
        return []
    started = init_ray(address or spec.ray.address, spec.ray.num_cpus)
    try:
        results = execute(index.prefetch(planning.rest(first), depth=4096), _runs_of(first), spec.labelers, **opts)
        stop = opts.get("stop")
        if planning.deferred and not (stop and stop()):
            results += execute(planning.deferred, _runs_of(planning.deferred), spec.labelers, **opts)
    finally:
        if started:
            import ray

            ray.shutdown()
    return sorted(results, key=lambda r: r.get("index", 0))


def _update_index(spec: JobSpec, snap: index.Snapshot, wrote: bool, held) -> None:
    """Bring the shard index up to date with what this run wrote (and what planning had to read); fenced by the
    lease, whose generation it records. The index is a cache: a failure other than a lost lease is a warning."""
    from ..io.lease import LeaseLost

    try:
        if wrote or snap.changed:  # a no-op rerun that found the index up to date touches nothing
            index.scan(spec.output, snap=snap, with_markers=wrote, write=True,
                       fence=held.fence() if held is not None else None)
    except LeaseLost:
        raise
    except Exception as e:  # noqa: BLE001 - the next reader re-reads what the index lacks
        print(f"modalmill: warning: could not update the shard index: {type(e).__name__}: {e}", file=sys.stderr)


def _summarize(spec: JobSpec, job: JobPlan, planning: _Planning, results: list[dict], timing: dict) -> dict:
    """The run summary (the run record's body) from the shard tasks' results."""
    done = [r for r in results if r.get("status") == "done"]
    failed = [r for r in results if r.get("status") != "done"]
    errors: dict[str, int] = {}
    for r in done:
        for k, v in r.get("errors_by_reason", {}).items():
            errors[k] = errors.get(k, 0) + v
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    summary = {
        "run_id": run_id, "job": spec.name, "output": spec.output, "modalmill_version": __version__,
        "only": job.only, "force": job.force, "modalities": list(spec.modalities),
        "shards_total": len(job.sources), "shards_selected": planning.tasks + len(planning.skipped),
        "shards_processed": len(done), "shards_skipped": len(planning.skipped), "shards_failed": len(failed),
        "samples_read": sum(r.get("n_read", 0) for r in done),
        "samples_written": sum(r.get("n_ok", 0) for r in done),
        "samples_failed": sum(r.get("n_failed", 0) for r in done),
        "samples_dropped": sum(r.get("n_dropped", 0) for r in done),
        "errors_by_reason": errors,
        "failed_shards": [{k: r.get(k) for k in ("shard", "source", "error")} for r in failed],
        "shards": [{k: r.get(k) for k in ("shard", "mode", "n_read", "n_ok", "n_failed", "seconds", "finished_at",
                                        "first_batch", "held_bytes", "draft_decoded", "timeline")}
                   for r in done],
        "seconds": round(time.time() - timing["t0"], 3),
        "planning": {"markers_read": planning.markers_read, "deferred": len(planning.deferred),
                     "seconds_to_first_task": round(timing["first_submit"][0], 3) if timing["first_submit"] else None,
                     "seconds_planning_first_page": round(timing["planning_first"], 3),
                     "seconds_planning": (round(timing["planning"], 3) if timing["planning"] is not None
                                          else None)},
        "spec": json.loads(json.dumps(dataclasses.asdict(spec), default=str)),
    }
    summary["exit_code"] = (EXIT_SHARDS_FAILED if failed else
                            EXIT_SAMPLES_FAILED if summary["samples_failed"] or summary["samples_dropped"] else EXIT_OK)
    return summary


def _record_run(spec: JobSpec, summary: dict, held) -> None:
    """Write the run record under _modalmill/runs/, only while the lease is held (it names its generation). The
    caller skips it for a run with nothing to do (no shard done or failed, no problem): the output stays as it was."""
    if held is not None:
        held.check()  # raises LeaseLost: nothing more is committed
        summary["lease"] = {"generation": held.generation, "holder": held.token}
    try:
        manifest.write_run(spec.output, summary["run_id"], summary)
    except OSError as e:  # e.g. the disk filled up: the shards' own results are already recorded (or failed)
        summary["run_record_error"] = f"could not write the run record: {type(e).__name__}: {e}"
        print(f"modalmill: warning: {summary['run_record_error']}", file=sys.stderr)


def _run_job(job: JobPlan, address: str | None, show_progress: bool, on_submit: Callable[[ShardTask], None] | None,
             t0: float, held=None) -> dict:
    """Plan, execute and record one run.

    Planning streams (:func:`plan_pages`): the shard tasks of the first marker-listing page that has any start
    while later pages are still being planned. A problem (a modality made with other settings, ...) found on
    that first page stops the job before anything runs, listing every problem of the whole output, as before;
    one found later stops new submissions, lets the running shard tasks commit, records the run and then raises
    the same error. ``on_submit(task)`` is called as each shard task is handed to Ray (benchmarks).

    ``held``: the output's lease (None: unfenced). Every shard task carries its fence; submissions stop as soon as
    the lease is lost (checked before each, at most every ``min(2, ttl/8)`` s, and by the heartbeat), and then
    neither the index nor the run record is written: the summary says who took over, with exit code 5."""
    from ..io.lease import LeaseLost

    spec = job.spec
    timing: dict = {"t0": t0, "first_submit": []}
    if held is not None:
        job.base["fence"] = held.fence()
    snap = index.load_snapshot(spec.output, with_manifests=False)  # the manifest part is loaded at the end if needed
    planning = _Planning(job, snap)
    first = planning.first_tasks()
    timing["planning_first"] = time.time() - timing["t0"]

    def submitted(task: ShardTask) -> None:
        if not timing["first_submit"]:
            timing["first_submit"].append(time.time() - timing["t0"])
        if on_submit is not None:
            on_submit(task)

    stop = (lambda: held.lost_now(min(2.0, held.ttl_s / 8))) if held is not None else None
    report: dict = {}  # the executor's autoscale record, when auto pools were resized while the job ran
    results = _execute_planned(spec, address, planning, first, dict(
        shard_cpus=spec.ray.shard_cpus, max_retries=spec.ray.max_retries, batches_in_flight=spec.ray.batches_in_flight,
        bytes_in_flight=spec.ray.bytes_in_flight,
        show_progress=show_progress, on_submit=submitted, stop=stop, report=report))
    timing["planning"] = time.time() - timing["t0"] if not first else None  # without tasks: the whole run
    summary = _summarize(spec, job, planning, results, timing)
    summary.update(report)
    try:
        if held is not None:
            held.check()
        _update_index(spec, snap, bool(first), held)
        if results or planning.problems:  # a run with nothing to do leaves the output as it was: no record
            _record_run(spec, summary, held)
    except LeaseLost as e:  # another driver owns the output now: commit nothing more
        summary["lease_lost"] = str(e)
        summary["exit_code"] = EXIT_LEASE
        return summary
    if planning.problems:
        summary["problems"] = planning.problems
        raise JobError(_problem_message(planning.problems, done_before=len(results)))
    return summary
