"""Processing one shard: the unit of work.

``full`` mode reads an input shard, decodes every sample into the stored rgb image, makes its crop
settings, runs the labelers batch by batch and writes every modality's tar from one key list: a sample
that fails anywhere is written to no tar and recorded in the manifest with its stage and reason.

``update`` mode adds or recomputes modalities of an existing output shard (``--only``). It reads the
shard's own ``rgb`` and ``crop_settings`` tars (and any modality a derived labeler needs) in lockstep, so
labels are always computed from exactly what is stored. Samples that fail the new modality are dropped
from every other tar of the shard too (streamed filter, no recomputation), so the shard stays aligned.

Both are one flow: read -> prepare -> label -> write -> commit (:func:`process_shard`); they differ only in where
the samples come from, which modalities are written and which are kept. The commit follows the protocol of
:mod:`modalmill.io.commit`: when the shard already has a marker, a pending marker replaces it first; then the tars,
the realigned or removed earlier tars and the manifest; the done marker (``_modalmill/shards/shard-N.json``),
which records every tar's size and digests, comes last. Every visible write goes through :func:`_step` (the
task's fence, and the test suite's crash hook).

Memory: a task holds the samples it decoded until they are written, within ``call.bytes_in_flight`` bytes plus one
sample (:class:`_Labelling`), and when every labeler of the task reads only crops resized to a bounded side
(:func:`crop_side`) it decodes each JPEG reduced to what they need (:func:`draft_size`; docs/cluster.md).

Captions from the input (``ShardTask.text``, see :mod:`modalmill.io.captions`): with ``caption_source`` ``input`` or
``input_or_model`` the shard task reads the sample's own text and stores it as ``caption`` (one entry per crop
row) before any labeler runs; a labeler whose outputs a sample already has is not called for that sample, so
with ``input_or_model`` the captioner sees only the samples without text. The manifest row says where each
caption came from (``caption_source``) and keeps the sample's source json (``source_json``, ``source_url``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import __version__
from ..labelers.base import LabelFailure, LabelInput, get_labeler
from ..schemas.manifest_schema import FAILED, OK, SampleRow
from ..schemas.modalities import RecordError, get_modality
from ..io import commit, manifest, storage
from ..io.crops import CropConfig, make_crop_settings
from ..io.decode import DecodeConfig, DecodeError, decode_image, decode_stored_rgb
from ..io.readers import RawSample, ShardSource, ShardTruncated, iter_samples, pick_image_member, zip_output
from ..io.scores import parse_source, score_sources
from ..io.captions import INPUT, INPUT_OR_MODEL, MODEL, TextConfig, TextError, input_text, source_metadata
from ..schemas.modalities import fit_to_crops
from ..io.writers import ShardWriterSet, filter_tar

FULL, UPDATE = "full", "update"
CORE = ("rgb", "crop_settings")


@dataclass(frozen=True)
class LabelerRun:
    """One labeler as a job runs it."""

    labeler: str
    config: dict
    outputs: tuple[str, ...]  # the modalities of this labeler that the job writes
    batch_size: int
    stateful: bool
    # the class itself travels with the task, so workers need not have it registered (test or notebook labelers)
    cls: type | None = field(default=None, compare=False)

    def labeler_class(self):
        return self.cls or get_labeler(self.labeler)

    def instance(self):
        return self.labeler_class()(self.config)


@dataclass(frozen=True)
class ShardTask:
    source: ShardSource
    output: str
    mode: str
    write: tuple[str, ...]  # modalities whose tars this task writes
    labelers: tuple[LabelerRun, ...]  # in dependency order
    decode: DecodeConfig
    crops: CropConfig
    seed: int
    batch_size: int = 16
    text: TextConfig = TextConfig(caption_source=MODEL)  # where ``caption`` comes from (the job's ``text:``)
    # called (no arguments) right before every write the task makes visible (each tar, tar removal, the manifest,
    # pending and done markers, the failure record): raising stops the task before that write (a lost lease)
    fence: Callable[[], None] | None = field(default=None, compare=False)

    @property
    def shard(self) -> str:
        return self.source.name

    @property
    def gather(self) -> int:
        """How many samples the task gathers before labelling them: the job's batch size, or more when a
        labeler asks for bigger batches (each labeler is then called on chunks of its own ``batch_size``)."""
        return max([self.batch_size] + [r.batch_size for r in self.labelers])


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def core_producers(decode: DecodeConfig, crops: CropConfig, seed: int) -> dict[str, dict]:
    return {
        "rgb": {"labeler": "modalmill.decode", "version": "1", "config_hash": _hash(dataclasses.asdict(decode)),
                "checkpoint": ""},
        "crop_settings": {"labeler": "modalmill.crops", "version": "1",
                          "config_hash": _hash({**dataclasses.asdict(crops), "seed": seed}), "checkpoint": ""},
    }


def input_caption_producer(text: TextConfig) -> dict:
    """The producer of captions read from the input samples' own text."""
    return {"labeler": "modalmill.input_text", "version": "1",
            "config_hash": _hash({"member": text.member, "json_key": text.json_key}), "checkpoint": ""}


def with_caption_source(producers: dict[str, dict], text: TextConfig, modalities) -> dict[str, dict]:
    """``producers`` with the ``caption`` entry the job's caption source gives: the input's text (``input``), the
    captioning labeler (``model``), or both (``input_or_model``: one entry whose config hash covers both, so a
    changed caption source or text setting makes earlier captions stale)."""
    if "caption" not in modalities or text.caption_source == MODEL:
        return producers
    inp = input_caption_producer(text)
    out = dict(producers)
    if text.caption_source == INPUT or "caption" not in producers:
        out["caption"] = inp
    else:
        model = producers["caption"]
        out["caption"] = {**model, "labeler": f"{inp['labeler']}+{model['labeler']}",
                          "config_hash": _hash([inp["config_hash"], model["config_hash"]])}
    return out


def labeler_producers(runs: tuple[LabelerRun, ...], checkpoint_of: Callable | None = None) -> dict[str, dict]:
    """What produces each modality; ``checkpoint_of(run)`` asks the set-up labeler for its weights' hash."""
    out = {}
    for run in runs:
        inst = run.instance()
        info = {"labeler": inst.name, "version": inst.version, "config_hash": inst.config_hash(),
                "checkpoint": (checkpoint_of(run) if checkpoint_of else "") or "",
                **getattr(inst, "producer_extra", dict)()}  # provenance of imported ground truth
        for m in run.outputs:
            out[m] = info
    return out


# ---------------------------------------------------------------------- labeler calls

_LOCAL_INSTANCES: dict[tuple[str, str], Any] = {}


def local_labeler(run: LabelerRun):
    """A labeler instance set up once per worker process."""
    inst = run.instance()
    cache_key = (run.labeler, inst.config_hash())
    if cache_key not in _LOCAL_INSTANCES:
        inst.setup()
        _LOCAL_INSTANCES[cache_key] = inst
    return _LOCAL_INSTANCES[cache_key]


def call_local(run: LabelerRun, inputs: list[LabelInput]):
    return local_labeler(run).process_batch(inputs)


call_local.checkpoint = lambda run: local_labeler(run).checkpoint_id()


def fenced(task: ShardTask) -> None:
    """Check the driver's lease before a write step (raises ``LeaseLost`` when another driver took it over)."""
    if task.fence is not None:
        task.fence()


class ShardAbort(RuntimeError):
    """An error of the whole shard task, not of its samples (e.g. the labeler's actor could not set up): it fails
    the task, which is recorded as failed and run again later, instead of every sample being recorded as failed."""


def label_isolated(call: Callable[[list[LabelInput]], list], inputs: list[LabelInput]) -> list:
    """Call a labeler on a batch; when the batch raises, split it until the failing sample is isolated."""
    if not inputs:
        return []
    try:
        results = list(call(inputs))
        if len(results) != len(inputs):
            raise RuntimeError(f"labeler returned {len(results)} results for {len(inputs)} inputs")
        return results
    except ShardAbort:
        raise
    except Exception as e:  # noqa: BLE001 - a labeler's failure is data, not a crash
        if len(inputs) == 1:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            return [LabelFailure(f"{type(e).__name__}: {msg}"[:500])]
        mid = len(inputs) // 2
        return label_isolated(call, inputs[:mid]) + label_isolated(call, inputs[mid:])


# ---------------------------------------------------------------------- the shard


@dataclass
class _Item:
    row: SampleRow
    input: LabelInput
    payloads: dict[str, bytes] = field(default_factory=dict)
    provided: set[str] = field(default_factory=set)  # modalities the input itself gave (no labeler runs for them)


class _Stats:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.first_batch: list | None = None  # [epoch seconds, samples] of the first labelled batch back
        # bytes of decoded samples held between decode and write: the bound (None: none), the most held at once
        # and the largest single sample; and how many samples were decoded reduced (JPEG draft)
        self.held = {"limit": None, "peak": 0, "largest_sample": 0}
        self.draft_decoded = 0
        # epoch seconds of the task's milestones (started, first_sent, read_done, last_result, commit_start,
        # tars_committed, manifest_written, committed) and [epoch seconds, samples] of every labelled batch back:
        # where a device waits
        self.timeline: dict[str, Any] = {"started": round(time.time(), 3), "batches": []}

    def mark(self, what: str, once: bool = False) -> None:
        if not (once and what in self.timeline):
            self.timeline[what] = round(time.time(), 3)

    def timed(self, stage: str):
        stats = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                stats.seconds[stage] += time.perf_counter() - self.t

        return _T()


def held_bytes(item: _Item) -> int:
    """What a gathered sample holds in memory until it is written: its decoded image, the payloads made so far
    (the stored rgb's bytes among them) and any array labels it carries."""
    labels = sum(getattr(v, "nbytes", 0) for v in item.input.labels.values())
    return int(item.input.image.nbytes) + sum(len(p) for p in item.payloads.values()) + int(labels)


def _label_batch(task: ShardTask, items: list[_Item], call: Callable, stats: _Stats) -> list[_Item]:
    """Run every labeler over the batch; returns the items that succeeded everywhere."""
    alive = [it for it in items if it.row.status == OK]
    for run in task.labelers:
        if not alive:
            break
        # samples whose input already gave this labeler's outputs (captions from the input) skip it
        todo = [it for it in alive if not set(run.outputs) <= it.provided]
        with stats.timed(f"label:{run.labeler}"):
            results = []
            for i in range(0, len(todo), max(1, run.batch_size)):
                chunk = [it.input for it in todo[i:i + max(1, run.batch_size)]]
                results += label_isolated(lambda batch, run=run: call(run, batch), chunk)
        by_item = {id(it): res for it, res in zip(todo, results)}
        survivors = []
        for it in alive:
            if id(it) not in by_item:
                survivors.append(it)
                continue
            res = by_item[id(it)]
            if isinstance(res, LabelFailure):
                it.row.fail(f"label:{run.labeler}", res.reason)
                continue
            if not isinstance(res, dict):
                it.row.fail(f"label:{run.labeler}", f"labeler returned {type(res).__name__}, not a dict")
                continue
            try:
                with stats.timed("encode"):
                    size = it.input.stored_size  # the stored rgb's (w, h) when the image is a reduced decode
                    hw = it.input.image.shape[:2] if size is None else (size[1], size[0])
                    for m in run.outputs:
                        if m not in res:
                            raise RecordError(m, it.row.key, "output", f"labeler {run.labeler!r} returned no {m!r}")
                        value = fit_to_crops(m, res[m], len(it.input.crops), it.row.key)  # captions: one per crop
                        if m in task.write:
                            it.payloads[m] = get_modality(m).encode(value, it.row.key, hw)
                            if m == "caption":
                                it.row.caption_source = "model"
                        it.input.labels[m] = value
            except RecordError as e:
                it.row.fail(f"validate:{e.modality}", str(e))
                continue
            survivors.append(it)
        alive = survivors
    return alive


class _Labelling:
    """Labels gathered batches and hands each, with its survivors, to ``done(batch, alive)``, in batch order.

    With ``call.in_flight`` = K > 0 (some labeler runs in a model actor pool) up to K batches are labelled on
    background threads while the task reads and decodes the next ones, so the model actors always have this
    task's next batches queued instead of waiting for it between batches (at shard ends too, as long as another
    task is running). ``done`` always runs on the task's own thread, in batch order, so the tars' key order does
    not depend on which batch came back first. K = 0: every batch is labelled on the task's thread.

    With ``call.bytes_in_flight`` = B (bytes; None: no bound) the samples the task holds between decode and write
    (:func:`held_bytes`: gathered, at the actors, back but not yet written) stay below B plus one sample: a batch is
    sent off early when its gathered samples reach B, and before the task reads on, the oldest batches in flight
    are waited for and written until it holds less than B again.
    """

    def __init__(self, task: ShardTask, call: Callable, stats: _Stats, done: Callable):
        self.label = lambda items: _label_batch(task, items, call, stats)
        self.stats = stats

        def done_first(items, alive):  # every labelled batch back: when, and how many samples it had
            back = [round(time.time(), 3), len(items)]
            if stats.first_batch is None:
                stats.first_batch = back
            stats.timeline["batches"].append(back)
            stats.mark("last_result")
            done(items, alive)

        self.done = done_first
        self.gather = task.gather
        self.pending: list[_Item] = []
        self.depth = max(0, int(getattr(call, "in_flight", 0) or 0))
        self.pool = ThreadPoolExecutor(self.depth, thread_name_prefix="modalmill-label") if self.depth else None
        self.inflight: deque = deque()  # (items, future, bytes, {"thread": the labelling thread})
        self.await_in_flight = getattr(call, "await_in_flight", None) if self.pool is not None else None
        self.limit = getattr(call, "bytes_in_flight", None) or None
        self.pending_bytes = self.inflight_bytes = 0
        stats.held["limit"] = self.limit

    def _full(self, nbytes: int) -> bool:
        return self.limit is not None and nbytes >= self.limit

    def add(self, item: _Item) -> None:
        """Gather ``item``; a full batch (by count or by bytes) is sent off. Batches already back are written now
        (frees memory), and so are the oldest ones, waited for, while the task holds more than its byte bound."""
        size = held_bytes(item)
        self.pending.append(item)
        self.pending_bytes += size
        held = self.stats.held
        held["peak"] = max(held["peak"], self.pending_bytes + self.inflight_bytes)
        held["largest_sample"] = max(held["largest_sample"], size)
        if len(self.pending) >= self.gather or self._full(self.pending_bytes):
            self.submit()
        while self.inflight and (self.inflight[0][1].done() or self._full(self.inflight_bytes + self.pending_bytes)):
            self._wait_oldest()

    def finish(self) -> None:
        """Send off what is gathered and wait until every batch is done."""
        self.submit()
        self.stats.mark("read_done")
        while self.inflight:
            self._wait_oldest()

    def submit(self) -> None:
        items, self.pending = self.pending, []
        nbytes, self.pending_bytes = self.pending_bytes, 0
        if not items:
            return
        self.stats.mark("first_sent", once=True)
        if self.pool is None:
            self.done(items, self.label(items))
            return
        while self.inflight and (len(self.inflight) >= self.depth or self._full(self.inflight_bytes + nbytes)):
            self._wait_oldest()
        # the labelling thread that labels the batch (what ``await_in_flight`` waits on), set once it starts
        slot: dict[str, Any] = {"started": threading.Event()}

        def label(items: list[_Item]) -> list[_Item]:
            slot["thread"] = threading.get_ident()
            slot["started"].set()
            return self.label(items)

        self.inflight.append((items, self.pool.submit(label, items), nbytes, slot))
        self.inflight_bytes += nbytes

    def _wait_oldest(self) -> None:
        """Wait for the oldest batch and write it. Whenever the task waits for the actors (K batches out, or all
        read), ``call.await_in_flight(future, thread)`` (when given) blocks its main thread until ``future`` (the
        oldest batch) is done (``thread``: the labelling thread that labels it) in a way that lends its CPU to another
        shard task (Ray does so for a task blocked in ``ray.wait`` on its main thread): while this task's batches are
        at the actors, the next task reads, decodes and sends its own, so the actors' queue does not run dry when a
        task ends, commits and the next one starts. It waits until the *oldest* batch is back, not any: a younger
        batch back first would otherwise leave the main thread blocked in ``future.result()``, holding its CPU, for
        the rest of the oldest's time at the actor."""
        _, future, _, slot = self.inflight[0]
        if self.await_in_flight is not None and not future.done():
            # a batch just sent may not have its thread yet (the pool has a thread for each batch in flight, but
            # starting it takes a switch): without its thread the wait would not know which calls to wait on
            while not slot["started"].wait(0.05) and not future.done():
                pass
            self.await_in_flight(future, slot.get("thread"))
        self._complete_oldest()

    def _complete_oldest(self) -> None:
        items, future, nbytes, _ = self.inflight.popleft()
        self.inflight_bytes -= nbytes
        self.done(items, future.result())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------- write steps

#: Set by the test suite only (tests/conftest.py): a folder where ``crash.json`` names a write step at which a
#: shard task dies (tests/test_crash_points.py). Every write step a task reaches is also appended to ``steps.log``.
CRASH_DIR_ENV = "MODALMILL_TEST_CRASH_DIR"


class InjectedCrash(RuntimeError):
    """Raised at a write step named by the test-only crash hook (``how: raise``)."""


def _step(task: ShardTask, kind: str, modality: str = "") -> None:
    """Every write a shard task makes visible is preceded by this call: the task's fence (a lost lease raises and
    nothing more is written), then the test-only crash hook. ``kind`` names the write step (docs/reliability.md)."""
    fenced(task)
    folder = os.environ.get(CRASH_DIR_ENV)
    if folder:
        _crash_hook(folder, task, f"{kind}:{modality}" if modality else kind)


def _crash_hook(folder: str, task: ShardTask, step: str) -> None:
    try:
        with open(os.path.join(folder, "crash.json")) as f:
            spec = json.load(f)
    except (FileNotFoundError, ValueError):
        return
    if spec.get("output") != task.output or spec.get("shard") not in (None, task.shard):
        return
    with open(os.path.join(folder, "steps.log"), "a") as f:
        f.write(f"{task.shard} {task.mode} {step}\n")
    if spec.get("step") == step:
        if spec.get("how") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedCrash(f"injected crash before {step}")


# ---------------------------------------------------------------------- one shard task


@dataclass
class _Run:
    """One shard task as it runs. ``full`` and ``update`` differ only in where samples come from (the input, or
    the shard's own stored tars), which modalities are written (``task.write``) and which are kept (``kept``)."""

    task: ShardTask
    stats: _Stats
    found: dict | None  # the marker on storage when the task started (done or pending)
    prev: dict | None  # the done marker whose keys, tars and manifest rows this task starts from
    made_by: dict[str, dict]
    producers: dict[str, dict]
    rows: list[SampleRow] = field(default_factory=list)  # full: every sample read; update: the earlier rows
    keys: list[str] = field(default_factory=list)  # written to every tar, in order
    failed: dict[str, SampleRow] = field(default_factory=dict)  # update: samples that fail now
    caption_sources: dict[str, str] = field(default_factory=dict)  # key -> "input" / "model" (caption written)
    # the input_scores mapping of the labeler writing metadata (None: no metadata written) and, per written
    # sample, the score_sources its manifest row gets
    score_map: tuple | None = None
    score_sources: dict[str, str | None] = field(default_factory=dict)
    truncated: str | None = None
    read_mods: list[str] = field(default_factory=list)  # update: the stored modalities it reads
    side: int | None = None  # the largest crop side its labelers read (None: the full image; see crop_side)
    in_place: set[str] = field(default_factory=set)  # update: modalities rewritten from themselves

    @property
    def out(self) -> str:
        return self.task.output


def process_shard(task: ShardTask, call: Callable | None = None, progress: Callable[[int], None] | None = None) -> dict:
    """Run one shard task: read -> prepare -> label -> write -> commit. Returns a small summary dict (never raises
    for bad samples)."""
    call = call or call_local
    t0 = time.perf_counter()
    stats = _Stats()
    run = _start(task, call, stats)
    writers = ShardWriterSet(task.output, task.shard, {m: get_modality(m).ext for m in task.write})
    labelling: _Labelling | None = None
    try:
        labelling = _Labelling(task, call, stats, lambda batch, alive: _write(run, writers, batch, alive, progress))
        for item in (_read_input(run) if task.mode == FULL else _read_stored(run)):
            labelling.add(item)
        labelling.finish()
        result = _commit(run, writers)
    except BaseException:
        writers.abort()
        raise
    finally:
        if labelling is not None:
            labelling.close()
    result["seconds"] = {k: round(v, 4) for k, v in stats.seconds.items()}
    result["seconds"]["total"] = round(time.perf_counter() - t0, 4)
    result["finished_at"] = round(time.time(), 3)  # epoch seconds: when the shard was committed
    result["first_batch"] = stats.first_batch
    result["held_bytes"] = dict(stats.held)
    result["draft_decoded"] = stats.draft_decoded
    stats.mark("committed")
    result["timeline"] = stats.timeline
    return result


def _start(task: ShardTask, call: Callable, stats: _Stats) -> _Run:
    """What the task starts from: the marker on storage, the done marker it keeps or adds to, the producers."""
    found = manifest.read_marker(task.output, task.shard)
    prev = found if commit.state(found) == commit.DONE else None
    if task.mode == UPDATE and commit.state(found) == commit.PENDING:
        # a retry of an update that was interrupted: it may go on from the done marker it replaced as long as the
        # interrupted attempt touched only the tars this task rewrites anyway
        if found.get("previous") and set(found.get("rewrites") or ()) <= set(task.write):
            prev = found["previous"]
        else:
            raise ShardAbort(f"{task.shard}: an interrupted rewrite changed {found.get('rewrites')}; "
                             "the next run redoes the shard from its input")
    made_by = labeler_producers(task.labelers, getattr(call, "checkpoint", None))
    core = core_producers(task.decode, task.crops, task.seed) if task.mode == FULL else {}
    run = _Run(task, stats, found, prev, made_by, with_caption_source({**core, **made_by}, task.text, task.write),
               score_map=_score_mapping(task), side=crop_side(task))
    if task.mode == UPDATE:
        if prev is None:
            raise RuntimeError(f"{task.shard}: no completed output to update")
        needed: set[str] = set()
        for r in task.labelers:
            needed |= set(r.labeler_class().requires)
            run.in_place |= set(r.labeler_class().requires) & set(r.outputs)  # rewrites what it reads (pose tokens)
        run.read_mods = ["rgb", "crop_settings"] + sorted(((needed - set(task.write)) | run.in_place) - set(CORE))
        for m in run.read_mods:
            if m not in prev["modalities"]:
                raise RuntimeError(f"{task.shard}: {m!r} is needed but the output has no {m!r} yet")
        run.rows = sorted({(r.key, r.position): r for r in manifest.read_rows(task.output, task.shard)}.values(),
                          key=lambda r: r.position)
    return run


def _write(run: _Run, writers: ShardWriterSet, batch: list[_Item], alive: list[_Item], progress) -> None:
    """A labelled batch: its surviving samples go to every tar being written (in batch order)."""
    task = run.task
    with run.stats.timed("write"):
        for it in alive:
            writers.write_sample(it.row.key, {m: it.payloads[m] for m in task.write})
            run.keys.append(it.row.key)
            if run.score_map is not None:
                _record_score_sources(it, run.score_map)
                run.score_sources[it.row.key] = it.row.score_sources
            if "caption" in task.write:
                run.caption_sources[it.row.key] = it.row.caption_source
    for it in batch:
        if it.row.status == FAILED:
            run.failed[it.row.key] = it.row
    if progress:
        progress(len(batch))


# ---------------------------------------------------------------------- read and prepare


def _read_input(run: _Run):
    """Full: the input shard's samples, decoded and with their crops (failures are recorded in their rows)."""
    task, stats = run.task, run.stats
    source_iter = iter_samples(task.source)
    while True:
        with stats.timed("read"):
            raw = next(source_iter, None)
        if raw is None:
            return
        if isinstance(raw, ShardTruncated):
            run.truncated = raw.reason
            return
        row = SampleRow(shard=task.source.index, source=task.source.url, position=raw.position, key=raw.key)
        run.rows.append(row)
        item = _prepare_input(task, raw, row, stats, run.side)
        if item is not None:
            yield item


def _read_stored(run: _Run):
    """Update: the shard's own stored rgb, crops and the modalities its labelers need, read in lockstep."""
    task, stats = run.task, run.stats
    rows_by_key = {r.key: r for r in run.rows if r.status == OK}
    input_texts = _input_captions_of(task)  # --only caption with captions from the input: re-read the input's text
    zipped = zip_output(task.output, task.shard, run.read_mods)
    while True:
        with stats.timed("read"):
            nxt = next(zipped, None)
        if nxt is None:
            return
        key, files = nxt
        base = rows_by_key.get(key)
        row = dataclasses.replace(base) if base else SampleRow(shard=task.source.index, source=task.source.url,
                                                              position=-1, key=key)
        item = _prepare_stored(run, row, files, input_texts)
        if item is None:
            run.failed[key] = row
        else:
            yield item


def _prepare_stored(run: _Run, row: SampleRow, files: dict[str, bytes], input_texts) -> _Item | None:
    key = row.key
    with run.stats.timed("decode"):
        crops = get_modality("crop_settings").decode(files["crop_settings"])
        try:
            image, stored = _decode_stored(files["rgb"], crops, run.side)
        except DecodeError as e:
            row.fail("decode", f"stored rgb: {e.reason}")
            return None
        labels = {m: get_modality(m).decode(files[m]) for m in run.read_mods if m not in CORE}
    run.stats.draft_decoded += stored is not None
    w, h = stored or (image.shape[1], image.shape[0])
    size = (row.original_width or w, row.original_height or h)
    item = _Item(row=row, input=LabelInput(key=key, image=image, original_size=size, crops=crops, labels=labels,
                                           source=parse_source(row.source_json), stored_size=stored))
    if input_texts is not None:
        text, problem = input_texts.get(key, (None, "caption text: the sample is no longer in the input"))
        stage = "read"
        if problem is None and text is not None:
            try:
                _give_caption(item, text)
            except RecordError as e:
                stage, problem = "validate:caption", str(e)
        if problem:
            row.fail(stage, problem)
            return None
    return item


def _input_caption(task: ShardTask, members: dict[str, bytes]) -> tuple[str | None, str | None]:
    """(the sample's caption text from the input or None, a failure reason for the sample or None)."""
    if "caption" not in task.write or not task.text.uses_input:
        return None, None
    try:
        text, why = input_text(members, task.text)
    except TextError as e:
        return None, f"caption text: {e}"
    if text is None and task.text.caption_source == INPUT:
        return None, f"caption_source is 'input' but the sample has {why}"
    return text, None


def _give_caption(item: _Item, text: str) -> None:
    value = fit_to_crops("caption", text, len(item.input.crops), item.row.key)
    item.payloads["caption"] = get_modality("caption").encode(value, item.row.key)
    item.input.labels["caption"] = value
    item.provided.add("caption")
    item.row.caption_source = "input"


def _prepare_input(task: ShardTask, raw: RawSample, row: SampleRow, stats: _Stats, side: int | None) -> _Item | None:
    row.source_json, row.source_url, row.source_json_error = source_metadata(raw.members)
    if raw.error:
        row.fail("read", raw.error)
        return None
    picked = pick_image_member(raw.members)
    if picked is None:
        found = ", ".join(sorted(e or "(no extension)" for e in raw.members)) or "nothing"
        row.fail("read", f"no image member (found: {found})")
        return None
    text, problem = _input_caption(task, raw.members)
    if problem:
        row.fail("read", problem)
        return None
    with stats.timed("decode"):
        try:
            dec = decode_image(picked[1], task.decode, draft=draft_size(task, raw.key, side))
        except DecodeError as e:
            row.fail("decode", e.reason)
            return None
    w, h = dec.stored_size
    row.original_width, row.original_height = dec.original_size
    row.width, row.height = w, h
    crops = make_crop_settings(raw.key, h, w, task.crops, task.seed)
    stats.draft_decoded += dec.reduced
    item = _Item(row=row, input=LabelInput(key=raw.key, image=dec.image, original_size=dec.original_size, crops=crops,
                                           source=parse_source(row.source_json),
                                           stored_size=dec.stored_size if dec.reduced else None))
    if "rgb" in task.write:
        item.payloads["rgb"] = dec.stored_bytes
    if "crop_settings" in task.write:
        item.payloads["crop_settings"] = get_modality("crop_settings").encode(crops, raw.key)
    if text is not None:
        try:
            _give_caption(item, text)
        except RecordError as e:
            row.fail("validate:caption", str(e))
            return None
    return item


#: A reduced (draft) decode keeps every crop at least this many times the labelers' crop side a side, so the
#: labelers' own resize still shrinks by 2x or more (as ``Image.thumbnail``'s default ``reducing_gap``): their
#: inputs then match a full decode's within the tolerance tests/test_memory.py states
DRAFT_GAP = 2.0


def crop_side(task: ShardTask) -> int | None:
    """The largest crop side any labeler of the task reads (:meth:`Labeler.crop_side`; 0 when none reads pixels),
    or None when one reads the stored image at its full resolution."""
    sides = [run.instance().crop_side() for run in task.labelers]
    if any(s is None for s in sides):
        return None
    return max(sides, default=0)


def _needed(w: int, h: int, crops, side: int) -> tuple[int, int]:
    """The smallest (w, h) of a (w, h) image at which its smallest crop keeps ``side`` x DRAFT_GAP pixels a side."""
    f = min(1.0, side * DRAFT_GAP / max(1, int(crops[:, 2:4].min())))
    return max(1, math.ceil(w * f)), max(1, math.ceil(h * f))


def draft_size(task: ShardTask, key: str, side: int | None):
    """The ``draft`` of :func:`decode_image` for sample ``key``: given the stored (w, h), the smallest size at which
    the sample's smallest crop keeps ``side`` x DRAFT_GAP pixels a side (None: no reduced decode)."""
    if side is None:
        return None
    return lambda w, h: _needed(w, h, make_crop_settings(key, h, w, task.crops, task.seed), side)


def _decode_stored(data: bytes, crops, side: int | None):
    """Update: the stored rgb decoded reduced as :func:`draft_size` would (its crops are stored); returns the image
    and the stored (w, h) when the image is reduced, else None."""
    seen: list[tuple[int, int]] = []

    def need(w: int, h: int) -> tuple[int, int]:
        seen.append((w, h))
        return _needed(w, h, crops, side)

    image = decode_stored_rgb(data, draft=None if side is None else need)
    reduced = bool(seen) and seen[0] != (image.shape[1], image.shape[0])
    return image, seen[0] if reduced else None


def _score_mapping(task: ShardTask) -> tuple | None:
    """The input_scores mapping of the labeler that writes ``metadata`` in this task (None: no metadata written)."""
    for run in task.labelers:
        if "metadata" in run.outputs:
            return tuple(getattr(run.instance().config, "input_scores", ()))
    return None


def _record_score_sources(item: _Item, mapping: tuple) -> None:
    """The manifest row says which metadata scores came from the input (``score_sources``)."""
    found = score_sources(item.input.source, mapping)
    item.row.score_sources = json.dumps(found, sort_keys=True) if found else None


def _input_captions_of(task: ShardTask) -> dict[str, tuple[str | None, str | None]] | None:
    """For an update that writes ``caption`` from the input: key -> (text, failure) read from the shard's input
    (only the text members are kept); None when the update takes no caption from the input."""
    if "caption" not in task.write or not task.text.uses_input:
        return None
    out: dict[str, tuple[str | None, str | None]] = {}
    for raw in iter_samples(task.source):
        if isinstance(raw, ShardTruncated):
            break
        if raw.error is None and raw.key not in out:
            out[raw.key] = _input_caption(task, raw.members)
    return out


# ---------------------------------------------------------------------- commit


@dataclass
class _Outcome:
    """What the commit makes of the shard: its keys, the tars kept from before (realigned when the keys changed)
    and the tars removed."""

    keys: list[str]
    keep: list[str]  # earlier modalities kept as they are
    realign: list[str]  # earlier modalities kept, filtered to ``keys`` (update)
    remove: list[str]  # tars of earlier modalities dropped (full, when the keys changed or the rewrite was torn)

    @property
    def rewrites(self) -> list[str]:
        return self.realign + self.remove


def _outcome(run: _Run) -> _Outcome:
    task, prev = run.task, run.prev
    earlier = [m for m in (prev or {}).get("modalities", {}) if m not in task.write]
    if task.mode == UPDATE:
        written = set(run.keys)
        keys = [k for k in prev["keys"] if k in written]
        for k in prev["keys"]:  # in the marker but no longer in the stored rgb tar (an interrupted earlier repair)
            if k not in written and k not in run.failed:
                rows = [r for r in run.rows if r.key == k and r.status == OK]
                if rows:
                    run.failed[k] = dataclasses.replace(rows[0]).fail("read", "missing from the stored rgb tar")
        changed = keys != list(prev["keys"])
        return _Outcome(keys, [] if changed else earlier, earlier if changed else [], [])
    keep = [m for m in earlier if prev.get("keys") == run.keys and _unchanged(run, m)]
    # tars a torn earlier rewrite may have touched, and earlier ones no longer aligned with the new keys
    touched = set(earlier) | set((run.found or {}).get("rewrites") or ())
    touched |= set((((run.found or {}).get("previous")) or {}).get("modalities", {}))
    return _Outcome(list(run.keys), keep, [], sorted(touched - set(keep) - set(task.write)))


def _unchanged(run: _Run, m: str) -> bool:
    """Whether the stored tar of an earlier modality is still what the done marker says (one stat / HEAD)."""
    url = commit.tar_url(run.out, m, run.task.shard)
    return commit.tar_problem(m, run.prev["modalities"][m], storage.version(url), storage.is_s3(url)) is None


def _commit(run: _Run, writers: ShardWriterSet) -> dict:
    """Make the shard's new state visible, ordered so that no crash between two steps leaves a marker that says
    done over tars it does not describe: a pending marker first (when the shard had a marker), then the tars, the
    realigned or removed earlier tars, the manifest, and the done marker last (docs/reliability.md)."""
    task, stats, out, shard = run.task, run.stats, run.out, run.task.shard
    plan = _outcome(run)
    stats.mark("commit_start")
    with stats.timed("commit"):
        if run.found is not None:
            _step(task, "pending")
            manifest.write_marker(out, shard, commit.pending_marker(
                shard, task.source.index, task.source.url, list(task.write) + plan.rewrites, run.prev, __version__))
        infos = writers.commit(before=lambda m: _step(task, "tar", m))
    stats.mark("tars_committed")
    modalities = {m: run.prev["modalities"][m] for m in plan.keep}
    with stats.timed("realign"):
        for m in plan.realign:
            modalities[m] = {**run.prev["modalities"][m], **filter_tar(
                commit.tar_url(out, m, shard), plan.keys, before=lambda m=m: _step(task, "realign", m))}
    with stats.timed("commit"):
        for m in plan.remove:
            _step(task, "remove", m)
            storage.remove(commit.tar_url(out, m, shard))
        modalities.update({m: _produced(run, m, infos[m]) for m in task.write})
        rows = _final_rows(run)
        _step(task, "manifest")
        manifest.write_rows(out, shard, rows)
        stats.mark("manifest_written")
        summary = _summary_of(run, rows, plan)
        _step(task, "marker")
        manifest.write_marker(out, shard, _done_marker(run, plan.keys, modalities, summary))
        _step(task, "clear-failure")
        manifest.clear_failure(out, shard)
    return summary


def _produced(run: _Run, m: str, info: dict) -> dict:
    """The marker's entry of a modality this task wrote: its producer and the tar's record."""
    entry = {**run.producers[m], **info}
    before = (run.prev or {}).get("modalities", {}).get(m)
    if m in run.in_place and before is not None:
        # rewritten from itself (pose tokens added to human_poses): remember what first made it, so the job that
        # made it still sees it as its own output (see jobs.runner.plan_job)
        entry["refines"] = before.get("refines") or {
            k: before.get(k, "") for k in ("labeler", "version", "config_hash", "checkpoint")}
    return entry


def _final_rows(run: _Run) -> list[SampleRow]:
    """The shard's manifest: every sample read, with the modalities written for it or why it failed (an update
    keeps the earlier rows: the samples that fail now change status, the others gain the new modalities)."""
    task, written = run.task, set(run.keys)
    rows = []
    for r in run.rows:
        if task.mode == UPDATE and r.status == OK and r.key in run.failed:
            nf = run.failed[r.key]
            r = dataclasses.replace(r).fail(nf.stage, nf.error)
        elif r.status == OK and r.key in written:
            r = _with_outputs(run, r)
        rows.append(r)
    return rows


def _with_outputs(run: _Run, r: SampleRow) -> SampleRow:
    task = run.task
    mods = [m for m in r.modalities if m not in task.write] + list(task.write)
    prods = [p for p in r.producers if p["modality"] not in task.write] + [
        {"modality": m, **run.producers[m]} for m in task.write]
    r = dataclasses.replace(r, modalities=mods, producers=prods)
    if run.score_map is not None:  # the metadata was rewritten: so is where its scores came from
        r.score_sources = run.score_sources.get(r.key)
    source = run.caption_sources.get(r.key)
    if source:
        r.caption_source = source
        if task.text.caption_source == INPUT_OR_MODEL:
            # a caption read from the input names the input as its producer, one from the model the model
            own = input_caption_producer(task.text) if source == "input" else run.made_by.get("caption", {})
            r.producers = [{"modality": "caption", **own} if p["modality"] == "caption" else p for p in r.producers]
    return r


def _summary(task: ShardTask, rows: list[SampleRow], status: str = "done", **extra) -> dict:
    failed = [r for r in rows if r.status == FAILED]
    return {
        "shard": task.shard, "index": task.source.index, "source": task.source.url, "mode": task.mode,
        "status": status, "n_read": len(rows), "n_ok": len(rows) - len(failed), "n_failed": len(failed),
        "errors_by_reason": dict(Counter(r.reason_class for r in failed)), **extra,
    }


def _summary_of(run: _Run, rows: list[SampleRow], plan: _Outcome) -> dict:
    if run.task.mode == FULL:
        return _summary(run.task, rows, truncated=run.truncated, dropped_stale=plan.remove)
    touched = set(run.keys) | set(run.failed)
    summary = _summary(run.task, [r for r in rows if r.key in touched])
    summary["n_dropped"] = len(run.prev["keys"]) - len(plan.keys)
    return summary


def _done_marker(run: _Run, keys: list[str], modalities: dict, summary: dict) -> dict:
    task = run.task
    return {
        "state": commit.DONE, "shard": task.shard, "index": task.source.index, "source": task.source.url,
        "keys": keys, "n_samples": len(keys), "modalities": modalities,
        "stats": {k: summary[k] for k in ("n_read", "n_ok", "n_failed", "errors_by_reason", "truncated")
                  if k in summary},
        "seconds": {k: round(v, 4) for k, v in run.stats.seconds.items()},
        "modalmill_version": __version__,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
