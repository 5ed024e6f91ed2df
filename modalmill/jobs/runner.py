"""Plan and run a job: which shards need which work, then execute on Ray and record the run.

Resume rules (per output shard, decided from its completion marker):
- no marker (or only a failure record): the shard is made from its input (``full``);
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
from dataclasses import dataclass, field

from .. import __version__
from ..labelers.base import LABELERS, get_labeler, labeler_for, load_entry_points
from ..io import manifest
from ..io.readers import ShardSource, plan_sources
from ..pipeline.shard import CORE, FULL, UPDATE, LabelerRun, ShardTask, core_producers, labeler_producers
from .spec import JobSpec, JobSpecError

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
        if m in CORE:
            continue
        cls = next((LABELERS[n] for n in spec.labelers if m in LABELERS[n].outputs), None)
        try:
            cls = cls or labeler_for(m)
        except KeyError:
            raise JobSpecError(f"no labeler produces modality {m!r}; see `modalmill labelers`") from None
        chosen.setdefault(cls.name, []).append(m)
    runs: dict[str, LabelerRun] = {}
    for name, outs in chosen.items():
        cls = get_labeler(name)
        s = spec.labelers.get(name)
        runs[name] = LabelerRun(labeler=name, config=dict(s.config) if s else {}, outputs=tuple(outs),
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


def plan_job(spec: JobSpec, only: list[str] | None = None, force: bool = False, cluster: bool = False) -> Plan:
    sources = plan_sources(spec.input, spec.shard_size)
    if not sources:
        raise JobError(f"no input shards in {spec.input!r}")
    selected = [sources[i] for i in spec.selected_shards(len(sources))]
    requested = list(dict.fromkeys(list(CORE) + list(spec.modalities)))
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
    expected = {**core_producers(spec.decode, spec.crops, spec.seed), **labeler_producers(tuple(all_runs))}
    checked = set(requested_only if only else requested)
    checkpoints = expected_checkpoints([r for r in all_runs if checked & set(r.outputs)], cluster=cluster)
    plan = Plan(spec=spec, sources=sources, runs=[])
    problems: list[str] = []
    base = dict(output=spec.output, decode=spec.decode, crops=spec.crops, seed=spec.seed, batch_size=spec.batch_size)

    def runs_for(mods: list[str], have: set[str]) -> tuple[LabelerRun, ...]:
        return tuple(resolve_labelers(spec, mods, available=have))

    for src in selected:
        marker = manifest.read_marker(spec.output, src.name)
        if marker and marker.get("source") != src.url:
            problems.append(f"{src.name} was made from {marker.get('source')!r} but the input now maps "
                            f"{src.url!r} to it")
            continue
        have = marker.get("modalities", {}) if marker else {}
        stale = made_otherwise(marker, requested_only if only else requested, expected, checkpoints)
        if only:
            if not marker:
                problems.append(f"{src.name} has no output yet: run the job without --only first")
                continue
            if any(m in CORE for m in requested_only):
                problems.append(f"--only cannot recompute {sorted(set(requested_only) & set(CORE))}: "
                                "they define the shard; rerun the job with --force instead")
                continue
            todo = [m for m in requested_only if force or m not in have or m in stale]
            if stale and not force:
                problems.append(f"{src.name}: {describe_stale(stale)}; add --force to recompute")
                continue
            if todo:
                plan.tasks.append(ShardTask(source=src, mode=UPDATE, write=tuple(todo),
                                            labelers=runs_for(todo, set(have) | set(todo)), **base))
            else:
                plan.skipped.append(src.name)
            continue
        if force or not marker:
            plan.tasks.append(ShardTask(source=src, mode=FULL, write=tuple(requested),
                                        labelers=tuple(all_runs), **base))
            continue
        if stale:
            problems.append(f"{src.name}: {describe_stale(stale)}; add --force to recompute "
                            f"(or --only {','.join(stale)} --force for just those)")
            continue
        missing = [m for m in requested if m not in have]
        if missing:
            plan.tasks.append(ShardTask(source=src, mode=UPDATE, write=tuple(missing),
                                        labelers=runs_for(missing, set(have) | set(missing)), **base))
        else:
            plan.skipped.append(src.name)
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise JobError("cannot run this job on the existing output:\n  " + "\n  ".join(problems[:10]) + more)
    seen: dict[str, LabelerRun] = {}
    for t in plan.tasks:
        for r in t.labelers:
            seen.setdefault(r.labeler, r)
    plan.runs = list(seen.values())
    return plan


def run_job(spec: JobSpec, only: list[str] | None = None, force: bool = False, address: str | None = None,
            show_progress: bool = True, wait: bool = False) -> dict:
    """Take the output's lease (:mod:`modalmill.io.lease`; ``wait``: wait for another driver to finish instead of
    refusing), then plan, execute and record one run; returns the run summary (also written under
    _modalmill/runs/)."""
    from ..io import lease

    with lease.hold(spec.output, wait=wait) as held:
        summary = _run_job(spec, only, force, address, show_progress)
        if held.lost:  # another driver took over while this one ran: its results may be overwritten
            summary["lease_lost"] = held.lost
            summary["exit_code"] = EXIT_LEASE
    return summary


def _run_job(spec: JobSpec, only: list[str] | None, force: bool, address: str | None, show_progress: bool) -> dict:
    from ..io.cluster import init_ray
    from ..pipeline.execute import execute

    t0 = time.time()
    plan = plan_job(spec, only=only, force=force,
                    cluster=bool(address or spec.ray.address or os.environ.get("RAY_ADDRESS")))
    started = False
    results: list[dict] = []
    if plan.tasks:
        started = init_ray(address or spec.ray.address, spec.ray.num_cpus)
        try:
            results = execute(plan.tasks, plan.runs, spec.labelers, shard_cpus=spec.ray.shard_cpus,
                              max_retries=spec.ray.max_retries, show_progress=show_progress)
        finally:
            if started:
                import ray

                ray.shutdown()
    done = [r for r in results if r.get("status") == "done"]
    failed = [r for r in results if r.get("status") != "done"]
    errors: dict[str, int] = {}
    for r in done:
        for k, v in r.get("errors_by_reason", {}).items():
            errors[k] = errors.get(k, 0) + v
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    summary = {
        "run_id": run_id, "job": spec.name, "output": spec.output, "modalmill_version": __version__,
        "only": only, "force": force, "modalities": list(spec.modalities),
        "shards_total": len(plan.sources), "shards_selected": len(plan.tasks) + len(plan.skipped),
        "shards_processed": len(done), "shards_skipped": len(plan.skipped), "shards_failed": len(failed),
        "samples_read": sum(r.get("n_read", 0) for r in done),
        "samples_written": sum(r.get("n_ok", 0) for r in done),
        "samples_failed": sum(r.get("n_failed", 0) for r in done),
        "samples_dropped": sum(r.get("n_dropped", 0) for r in done),
        "errors_by_reason": errors,
        "failed_shards": [{k: r.get(k) for k in ("shard", "source", "error")} for r in failed],
        "shards": [{k: r.get(k) for k in ("shard", "mode", "n_read", "n_ok", "n_failed", "seconds")} for r in done],
        "seconds": round(time.time() - t0, 3),
        "spec": json.loads(json.dumps(dataclasses.asdict(spec), default=str)),
    }
    summary["exit_code"] = (EXIT_SHARDS_FAILED if failed else
                            EXIT_SAMPLES_FAILED if summary["samples_failed"] or summary["samples_dropped"] else EXIT_OK)
    try:
        manifest.write_run(spec.output, run_id, summary)
    except OSError as e:  # e.g. the disk filled up: the shards' own results are already recorded (or failed)
        summary["run_record_error"] = f"could not write the run record: {type(e).__name__}: {e}"
        print(f"modalmill: warning: {summary['run_record_error']}", file=sys.stderr)
    return summary
