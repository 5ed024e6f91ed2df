"""Processing one shard: the unit of work.

``full`` mode reads an input shard, decodes every sample into the stored rgb image, makes its crop
settings, runs the labelers batch by batch and writes every modality's tar from one key list: a sample
that fails anywhere is written to no tar and recorded in the manifest with its stage and reason.

``update`` mode adds or recomputes modalities of an existing output shard (``--only``). It reads the
shard's own ``rgb`` and ``crop_settings`` tars (and any modality a derived labeler needs) in lockstep, so
labels are always computed from exactly what is stored. Samples that fail the new modality are dropped
from every other tar of the shard too (streamed filter, no recomputation), so the shard stays aligned.

The marker written last (``_modalmill/shards/shard-N.json``) is the commit point.

Captions from the input (``ShardTask.text``, see :mod:`modalmill.io.text`): with ``caption_source`` ``input`` or
``input_or_model`` the shard task reads the sample's own text and stores it as ``caption`` (one entry per crop
row) before any labeler runs; a labeler whose outputs a sample already has is not called for that sample, so
with ``input_or_model`` the captioner sees only the samples without text. The manifest row says where each
caption came from (``caption_source``) and keeps the sample's source json (``source_json``, ``source_url``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import __version__
from ..labelers.base import LabelFailure, LabelInput, get_labeler
from ..schemas.manifest import FAILED, OK, SampleRow
from ..schemas.modalities import RecordError, get_modality
from ..io import manifest, storage
from ..io.crops import CropConfig, make_crop_settings
from ..io.decode import DecodeConfig, DecodeError, decode_image, decode_stored_rgb
from ..io.readers import RawSample, ShardSource, ShardTruncated, iter_samples, pick_image_member, zip_output
from ..io.text import INPUT, INPUT_OR_MODEL, MODEL, TextConfig, TextError, input_text, source_metadata
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
    # the driver's lease (io.lease.Fence): called before every write step, raises LeaseLost to abort; None: unfenced
    fence: Callable[[], None] | None = field(default=None, compare=False)

    @property
    def shard(self) -> str:
        return self.source.name

    @property
    def gather(self) -> int:
        """How many samples the task gathers before labelling them: the job's batch size, or more when a
        labeler asks for bigger batches (each labeler is then called on chunks of its own ``batch_size``)."""
        return max([self.batch_size] + [r.batch_size for r in self.labelers])


def core_producers(decode: DecodeConfig, crops: CropConfig, seed: int) -> dict[str, dict]:
    def h(obj):
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {
        "rgb": {"labeler": "modalmill.decode", "version": "1", "config_hash": h(dataclasses.asdict(decode)),
                "checkpoint": ""},
        "crop_settings": {"labeler": "modalmill.crops", "version": "1",
                          "config_hash": h({**dataclasses.asdict(crops), "seed": seed}), "checkpoint": ""},
    }


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
                "checkpoint": (checkpoint_of(run) if checkpoint_of else "") or ""}
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

    def timed(self, stage: str):
        stats = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                stats.seconds[stage] += time.perf_counter() - self.t

        return _T()


def process_shard(task: ShardTask, call: Callable | None = None, progress: Callable[[int], None] | None = None) -> dict:
    """Run one shard task; returns a small summary dict (never raises for bad samples)."""
    call = call or call_local
    t0 = time.perf_counter()
    stats = _Stats()
    if task.mode == FULL:
        result = _process_full(task, call, progress, stats)
    else:
        result = _process_update(task, call, progress, stats)
    result["seconds"] = {k: round(v, 4) for k, v in stats.seconds.items()}
    result["seconds"]["total"] = round(time.perf_counter() - t0, 4)
    result["finished_at"] = round(time.time(), 3)  # epoch seconds: when the shard was committed
    result["first_batch"] = stats.first_batch
    return result


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
                    hw = it.input.image.shape[:2]
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
    """

    def __init__(self, task: ShardTask, call: Callable, stats: _Stats, done: Callable):
        self.label = lambda items: _label_batch(task, items, call, stats)
        self.stats = stats

        def done_first(items, alive):  # the first labelled batch back: when, and how many samples it had
            if stats.first_batch is None:
                stats.first_batch = [round(time.time(), 3), len(items)]
            done(items, alive)

        self.done = done_first
        self.gather = task.gather
        self.pending: list[_Item] = []
        self.depth = max(0, int(getattr(call, "in_flight", 0) or 0))
        self.pool = ThreadPoolExecutor(self.depth, thread_name_prefix="modalmill-label") if self.depth else None
        self.inflight: deque = deque()

    def add(self, item: _Item) -> None:
        """Gather ``item``; a full batch is sent off. Batches already back are written now (frees memory)."""
        self.pending.append(item)
        if len(self.pending) >= self.gather:
            self.submit()
        while self.inflight and self.inflight[0][1].done():
            self._complete_oldest()

    def finish(self) -> None:
        """Send off what is gathered and wait until every batch is done."""
        self.submit()
        while self.inflight:
            self._complete_oldest()

    def submit(self) -> None:
        items, self.pending = self.pending, []
        if not items:
            return
        if self.pool is None:
            self.done(items, self.label(items))
            return
        while len(self.inflight) >= self.depth:
            self._complete_oldest()
        self.inflight.append((items, self.pool.submit(self.label, items)))

    def _complete_oldest(self) -> None:
        items, future = self.inflight.popleft()
        self.done(items, future.result())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _summary(task: ShardTask, rows: list[SampleRow], status: str = "done", **extra) -> dict:
    failed = [r for r in rows if r.status == FAILED]
    return {
        "shard": task.shard, "index": task.source.index, "source": task.source.url, "mode": task.mode,
        "status": status, "n_read": len(rows), "n_ok": len(rows) - len(failed), "n_failed": len(failed),
        "errors_by_reason": dict(Counter(r.reason_class for r in failed)), **extra,
    }


def _process_full(task: ShardTask, call, progress, stats: _Stats) -> dict:
    out, shard = task.output, task.shard
    made_by = labeler_producers(task.labelers, getattr(call, "checkpoint", None))
    producers = with_caption_source({**core_producers(task.decode, task.crops, task.seed), **made_by},
                                    task.text, task.write)
    producer_rows = [{"modality": m, **producers[m]} for m in task.write]
    # with input_or_model, a caption read from the input names the input as its producer, one from the model the model
    caption_rows = {"input": {"modality": "caption", **input_caption_producer(task.text)},
                    "model": {"modality": "caption", **made_by.get("caption", {})}}
    rows: list[SampleRow] = []
    keys: list[str] = []
    truncated = None
    writers = ShardWriterSet(out, shard, {m: get_modality(m).ext for m in task.write})
    labelling: _Labelling | None = None
    try:
        def done(batch: list[_Item], alive: list[_Item]) -> None:
            with stats.timed("write"):
                for it in alive:
                    writers.write_sample(it.row.key, {m: it.payloads[m] for m in task.write})
                    it.row.modalities = list(task.write)
                    it.row.producers = producer_rows
                    if task.text.caption_source == INPUT_OR_MODEL and it.row.caption_source in caption_rows:
                        it.row.producers = [caption_rows[it.row.caption_source] if p["modality"] == "caption" else p
                                            for p in producer_rows]
                    keys.append(it.row.key)
            if progress:
                progress(len(batch))

        labelling = _Labelling(task, call, stats, done)

        source_iter = iter_samples(task.source)
        while True:
            with stats.timed("read"):
                raw = next(source_iter, None)
            if raw is None:
                break
            if isinstance(raw, ShardTruncated):
                truncated = raw.reason
                break
            row = SampleRow(shard=task.source.index, source=task.source.url, position=raw.position, key=raw.key)
            rows.append(row)
            item = _prepare_full(task, raw, row, stats)
            if item is None:
                continue
            labelling.add(item)
        labelling.finish()
        with stats.timed("commit"):
            fenced(task)
            infos = writers.commit()
    except BaseException:
        writers.abort()
        raise
    finally:
        if labelling is not None:
            labelling.close()

    # modalities an earlier run added (--only) that this run did not rewrite: keep them only if still aligned
    prev = manifest.read_marker(out, shard)
    modalities = {m: {**producers[m], **infos[m]} for m in task.write}
    dropped_stale = []
    if prev:
        for m, info in prev.get("modalities", {}).items():
            if m in modalities:
                continue
            if prev.get("keys") == keys:
                modalities[m] = info
            else:
                fenced(task)
                storage.remove(storage.join(out, m, f"{shard}.tar"))
                dropped_stale.append(m)
    summary = _summary(task, rows, truncated=truncated, dropped_stale=dropped_stale)
    with stats.timed("commit"):
        fenced(task)
        manifest.write_rows(out, shard, rows)
        _commit_marker(task, keys, modalities, summary, stats)
    return summary


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


def _prepare_full(task: ShardTask, raw: RawSample, row: SampleRow, stats: _Stats) -> _Item | None:
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
            dec = decode_image(picked[1], task.decode)
        except DecodeError as e:
            row.fail("decode", e.reason)
            return None
    h, w = dec.image.shape[:2]
    row.original_width, row.original_height = dec.original_size
    row.width, row.height = w, h
    crops = make_crop_settings(raw.key, h, w, task.crops, task.seed)
    item = _Item(row=row, input=LabelInput(key=raw.key, image=dec.image, original_size=dec.original_size, crops=crops))
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


def _commit_marker(task: ShardTask, keys: list[str], modalities: dict, summary: dict, stats: _Stats) -> None:
    marker = {
        "shard": task.shard, "index": task.source.index, "source": task.source.url,
        "keys": keys, "n_samples": len(keys), "modalities": modalities,
        "stats": {k: summary[k] for k in ("n_read", "n_ok", "n_failed", "errors_by_reason", "truncated")
                  if k in summary},
        "seconds": {k: round(v, 4) for k, v in stats.seconds.items()},
        "modalmill_version": __version__,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fenced(task)
    manifest.write_marker(task.output, task.shard, marker)
    manifest.clear_failure(task.output, task.shard)


def _process_update(task: ShardTask, call, progress, stats: _Stats) -> dict:
    out, shard = task.output, task.shard
    prev = manifest.read_marker(out, shard)
    if prev is None:
        raise RuntimeError(f"{shard}: no completed output to update")
    prev_rows = {(r.key, r.position): r for r in manifest.read_rows(out, shard)}
    rows_by_key = {r.key: r for r in prev_rows.values() if r.status == OK}
    made_by = labeler_producers(task.labelers, getattr(call, "checkpoint", None))
    producers = with_caption_source(made_by, task.text, task.write)
    input_texts = _input_captions_of(task)  # --only caption with captions from the input: re-read the input's text
    needed, in_place = set(), set()
    for run in task.labelers:
        needed |= set(run.labeler_class().requires)
        in_place |= set(run.labeler_class().requires) & set(run.outputs)  # rewrites what it reads (pose tokens)
    read_mods = ["rgb", "crop_settings"] + sorted(((needed - set(task.write)) | in_place) - set(CORE))
    for m in read_mods:
        if m not in prev["modalities"]:
            raise RuntimeError(f"{shard}: {m!r} is needed but the output has no {m!r} yet")

    prev_keys = list(prev["keys"])
    ok_keys: list[str] = []
    newly_failed: dict[str, SampleRow] = {}
    writers = ShardWriterSet(out, shard, {m: get_modality(m).ext for m in task.write})
    labelling: _Labelling | None = None
    try:
        def done(batch: list[_Item], alive: list[_Item]) -> None:
            with stats.timed("write"):
                for it in alive:
                    writers.write_sample(it.row.key, {m: it.payloads[m] for m in task.write})
                    ok_keys.append(it.row.key)
            for it in batch:
                if it.row.status == FAILED:
                    newly_failed[it.row.key] = it.row
            if progress:
                progress(len(batch))

        labelling = _Labelling(task, call, stats, done)

        zipped = zip_output(out, shard, read_mods)
        while True:
            with stats.timed("read"):
                nxt = next(zipped, None)
            if nxt is None:
                break
            key, files = nxt
            base = rows_by_key.get(key)
            row = dataclasses.replace(base) if base else SampleRow(shard=task.source.index, source=task.source.url,
                                                                  position=-1, key=key)
            with stats.timed("decode"):
                try:
                    image = decode_stored_rgb(files["rgb"])
                except DecodeError as e:
                    row.fail("decode", f"stored rgb: {e.reason}")
                    newly_failed[key] = row
                    continue
                crops = get_modality("crop_settings").decode(files["crop_settings"])
                labels = {m: get_modality(m).decode(files[m]) for m in read_mods if m not in CORE}
            size = (row.original_width or image.shape[1], row.original_height or image.shape[0])
            item = _Item(row=row, input=LabelInput(key=key, image=image, original_size=size, crops=crops,
                                                   labels=labels))
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
                    newly_failed[key] = row
                    continue
            labelling.add(item)
        labelling.finish()
        with stats.timed("commit"):
            fenced(task)
            infos = writers.commit()
    except BaseException:
        writers.abort()
        raise
    finally:
        if labelling is not None:
            labelling.close()

    ok_set = set(ok_keys)
    final_keys = [k for k in prev_keys if k in ok_set]
    for k in prev_keys:  # in the marker but no longer in the stored rgb tar (an interrupted earlier repair)
        if k not in ok_set and k not in newly_failed and k in rows_by_key:
            newly_failed[k] = dataclasses.replace(rows_by_key[k]).fail("read", "missing from the stored rgb tar")
    modalities = dict(prev["modalities"])
    for m in task.write:
        modalities[m] = {**producers[m], **infos[m]}
        if m in in_place and m in prev["modalities"]:
            # rewritten from itself (pose tokens added to human_poses): remember what first made it, so the job
            # that made it still sees it as its own output (see jobs.runner.plan_job)
            before = prev["modalities"][m]
            modalities[m]["refines"] = before.get("refines") or {
                k: before.get(k, "") for k in ("labeler", "version", "config_hash", "checkpoint")}
    with stats.timed("realign"):
        if final_keys != prev_keys:
            for m in modalities:
                if m not in task.write:
                    fenced(task)
                    modalities[m] = {**modalities[m], **filter_tar(storage.join(out, m, f"{shard}.tar"), final_keys)}

    # manifest: earlier rows stay; rows of newly failed samples change status; ok rows gain the modalities
    new_producers = {m: {"modality": m, **producers[m]} for m in task.write}
    sources = {}  # key -> where its caption came from, for the rows of samples that got one now
    if "caption" in task.write:
        sources = {k: ("input" if input_texts is not None and input_texts.get(k, (None,))[0] is not None
                       else "model") for k in ok_set}
    rows = []
    for r in sorted(prev_rows.values(), key=lambda r: r.position):
        if r.key in newly_failed and r.status == OK:
            nf = newly_failed[r.key]
            r = dataclasses.replace(r).fail(nf.stage, nf.error)
        elif r.status == OK and r.key in ok_set:
            mods = [m for m in r.modalities if m not in task.write] + list(task.write)
            prods = [p for p in r.producers if p["modality"] not in task.write] + list(new_producers.values())
            r = dataclasses.replace(r, modalities=mods, producers=prods)
            if r.key in sources:
                r.caption_source = sources[r.key]
                if task.text.caption_source == INPUT_OR_MODEL:
                    own = (input_caption_producer(task.text) if sources[r.key] == "input"
                           else made_by.get("caption", {}))
                    r.producers = [{"modality": "caption", **own} if p["modality"] == "caption" else p
                                   for p in r.producers]
        rows.append(r)
    summary = _summary(task, [r for r in rows if r.key in ok_set or r.key in newly_failed])
    summary["n_dropped"] = len(prev_keys) - len(final_keys)
    with stats.timed("commit"):
        fenced(task)
        manifest.write_rows(out, shard, rows)
        _commit_marker(task, final_keys, modalities, summary, stats)
    return summary



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
