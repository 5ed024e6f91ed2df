"""Labelers used only by tests: real Labeler subclasses that fail on chosen samples."""

from dataclasses import dataclass

from modalmill.labelers.base import LabelFailure, Labeler, Resources, register_labeler


@register_labeler
class CaptionOrFail(Labeler):
    """Writes the key as a caption; fails (returns LabelFailure) or raises on the keys it is told to."""

    name = "test_caption_or_fail"
    outputs = ("caption",)

    @dataclass(frozen=True)
    class Config:
        fail_keys: tuple = ()
        raise_keys: tuple = ()

    def process_batch(self, batch):
        if any(inp.key in self.config.raise_keys for inp in batch):
            raise ValueError("boom on a chosen sample")
        return [LabelFailure(f"chosen to fail: {inp.key}") if inp.key in self.config.fail_keys
                else {"caption": [f"sample {inp.key}"]} for inp in batch]


@register_labeler
class BatchProbe(Labeler):
    """Writes the size of the batch it was called with as each sample's caption (``n=<size>``)."""

    name = "test_batch_probe"
    outputs = ("caption",)

    def process_batch(self, batch):
        return [{"caption": [f"n={len(batch)}"]} for _ in batch]


@register_labeler
class WherePrepared(Labeler):
    """A stateful (actor pool) labeler whose caption says which process ran ``prepare`` and which ran the model
    step: ``["prepared in <pid>", "labelled in <pid>", "<key>"]``."""

    name = "test_where_prepared"
    outputs = ("caption",)
    stateful = True

    def prepare(self, batch):
        import os

        from modalmill.labelers.base import Prepared

        return Prepared((inp.key, os.getpid()) for inp in batch)

    def process_batch(self, batch):
        import os

        from modalmill.labelers.base import Prepared

        items = batch if isinstance(batch, Prepared) else self.prepare(batch)
        return [{"caption": [f"prepared in {pid}", f"labelled in {os.getpid()}", key]} for key, pid in items]


def _crash(how: str) -> None:
    import ctypes
    import os

    if how == "segfault":
        ctypes.string_at(0)  # a real SIGSEGV in this process
    os._exit(17)


def _first_time(marker_dir: str, key: str) -> bool:
    """True the first time this is called for ``key`` (across processes, via a marker file)."""
    import os

    if not marker_dir:
        return True
    path = os.path.join(marker_dir, f"crashed-{key.replace('/', '_')}")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


@dataclass(frozen=True)
class _CrashConfig:
    crash_keys: tuple = ()  # samples that kill the labeler's process
    once_dir: str = ""  # when set: crash only the first time per key (a transient worker death)
    how: str = "segfault"  # "segfault" or "exit"
    sleep: float = 0.0  # seconds per batch (to make a job slow enough to interrupt)
    # when set: every batch but the first ``free_calls`` (across processes) notes itself in ``gate``.held and waits
    # until the file ``gate`` exists, then notes that it went on in ``gate``.released (a job held where a test wants)
    gate: str = ""
    free_calls: int = 0


def _wait_at_gate(gate: str, free_calls: int) -> None:
    import os
    import time

    for i in range(free_calls):  # O_EXCL: each free call is taken by exactly one batch
        try:
            os.close(os.open(f"{gate}.free-{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return
        except FileExistsError:
            continue
    with open(f"{gate}.held", "a") as f:
        f.write("x")
    deadline = time.time() + 600
    while not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.05)
    with open(f"{gate}.released", "a") as f:
        f.write("x")


def _crashy_batch(config, batch):
    import time

    if config.gate:
        _wait_at_gate(config.gate, config.free_calls)
    if config.sleep:
        time.sleep(config.sleep)
    for inp in batch:
        if inp.key in config.crash_keys and _first_time(config.once_dir, inp.key):
            _crash(config.how)
    return [{"caption": [f"sample {inp.key}"]} for inp in batch]


@register_labeler
class CrashInShardTask(Labeler):
    """Model-free (runs inside the shard task): kills its process on chosen samples."""

    name = "test_crash_task"
    outputs = ("caption",)
    Config = _CrashConfig

    def process_batch(self, batch):
        return _crashy_batch(self.config, batch)


@register_labeler
class CrashInActor(Labeler):
    """Stateful (runs in a Ray actor pool): kills its actor process on chosen samples."""

    name = "test_crash_actor"
    outputs = ("caption",)
    stateful = True
    Config = _CrashConfig

    def process_batch(self, batch):
        return _crashy_batch(self.config, batch)


@register_labeler
class OutOfMemoryOnBigBatches(Labeler):
    """Raises CUDA's out-of-memory error for batches larger than ``max_batch`` (as a GPU model would)."""

    name = "test_oom"
    outputs = ("caption",)

    @dataclass(frozen=True)
    class Config:
        max_batch: int = 2

    def process_batch(self, batch):
        import torch

        if len(batch) > self.config.max_batch:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (batch of {len(batch)})")
        return [{"caption": [f"n={len(batch)}"]} for inp in batch]


@dataclass(frozen=True)
class _SetupFailsConfig:
    count_file: str = ""  # each set-up attempt appends a line here


@register_labeler
class SetupFailsOnWorkers(Labeler):
    """Stateful; its weights are visible to the driver (preflight passes) but not to the workers: ``setup`` raises
    a WeightsError, as a node-local path missing on a cluster's nodes would. Counts its set-up attempts."""

    name = "test_setup_fails"
    outputs = ("caption",)
    stateful = True
    Config = _SetupFailsConfig

    def setup(self):
        from modalmill.io.fetch import WeightsError

        with open(self.config.count_file, "a") as f:
            f.write("setup\n")
        raise WeightsError("weights not found at '/node-local/ckpt.pt'. Get it: copy it to every node")

    def process_batch(self, batch):
        return [{"caption": ["never"]} for _ in batch]


@register_labeler
class OutOfMemoryInActor(Labeler):
    """A model labeler (runs in an actor pool) that raises the real ``torch.cuda.OutOfMemoryError`` for batches
    larger than ``max_batch``, and for ``huge_keys`` even alone (a photo too big for the device)."""

    name = "test_oom_actor"
    outputs = ("caption",)
    stateful = True
    default_batch_size = 16

    @dataclass(frozen=True)
    class Config:
        max_batch: int = 4
        huge_keys: tuple = ()

    def process_batch(self, batch):
        import torch

        if len(batch) > self.config.max_batch or any(inp.key in self.config.huge_keys for inp in batch):
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (batch of {len(batch)})")
        return [{"caption": [f"n={len(batch)}"]} for inp in batch]


@dataclass(frozen=True)
class _CropReaderConfig:
    side: int | None = 64  # crop_side(): None reads the image at its full resolution
    sleep_s: float = 0.0  # per batch, in the actor (batches then wait there)


@register_labeler
class CropReader(Labeler):
    """A model labeler (actor pool) that reads only its crops resized to ``side`` (``crop_images``), as DINOv2 does,
    or (``side: null``) the whole image. Its caption says what its ``prepare`` saw: ``[key, "HxW" of the image it was
    given, "WxH" of the stored rgb, the crops' mean pixel value]``."""

    name = "test_crop_reader"
    outputs = ("caption",)
    stateful = True
    Config = _CropReaderConfig
    default_resources = Resources(num_cpus=0)

    def crop_side(self):
        return self.config.side

    def prepare(self, batch):
        from modalmill.labelers.base import Prepared
        from modalmill.labelers.dinov2 import crop_images

        out = Prepared()
        for inp in batch:
            h, w = inp.image.shape[:2]
            pixels = crop_images(inp, self.config.side) if self.config.side else inp.image[::16, ::16]
            stored = inp.stored_size or (w, h)
            out.append([inp.key, f"{h}x{w}", f"{stored[0]}x{stored[1]}", f"{float(pixels.mean()):.2f}"])
        return out

    def process_batch(self, batch):
        import time

        from modalmill.labelers.base import Prepared

        items = batch if isinstance(batch, Prepared) else self.prepare(batch)
        time.sleep(self.config.sleep_s)
        return [{"caption": list(it)} for it in items]


@register_labeler
class WaitsForAnotherTask(Labeler):
    """A model labeler (actor pool) whose ``prepare`` (run in the shard task) leaves a file per sample in ``folder``,
    and whose model step holds each batch until a sample of *another* batch was prepared (at most ``wait_s``):
    its caption says whether one was (``["other task prepared: True", key]``). With one shard task at a time, only a
    task that lends its CPU while its batch is at the actor lets the next task prepare meanwhile."""

    name = "test_waits_for_another_task"
    outputs = ("caption",)
    stateful = True

    @dataclass(frozen=True)
    class Config:
        folder: str = ""
        wait_s: float = 60.0

    def prepare(self, batch):
        import os

        from modalmill.labelers.base import Prepared

        for inp in batch:
            open(os.path.join(self.config.folder, inp.key), "w").close()
        return Prepared(inp.key for inp in batch)

    def process_batch(self, batch):
        import os
        import time

        keys = list(batch)
        deadline = time.time() + self.config.wait_s
        while not (seen := set(os.listdir(self.config.folder)) - set(keys)) and time.time() < deadline:
            time.sleep(0.05)
        return [{"caption": [f"other task prepared: {bool(seen)}", key]} for key in keys]


@register_labeler
class OldestWaitsForAnotherTask(WaitsForAnotherTask):
    """As ``test_waits_for_another_task``, but only the batch of each shard's first sample (keys are numbered,
    ``per_shard`` a shard) is held, until a sample of *another shard* was prepared; every other batch comes back at
    once. With two actors, a task's younger batches are back while its oldest is still held."""

    name = "test_oldest_waits_for_another_task"

    @dataclass(frozen=True)
    class Config:
        folder: str = ""
        wait_s: float = 20.0
        per_shard: int = 5

    def process_batch(self, batch):
        import os
        import time

        keys = list(batch)
        shards = {int(k) // self.config.per_shard for k in keys}
        if not any(int(k) % self.config.per_shard == 0 for k in keys):
            return [{"caption": ["not held", key]} for key in keys]
        deadline = time.time() + self.config.wait_s
        def others():
            return {f for f in os.listdir(self.config.folder) if int(f) // self.config.per_shard not in shards}
        while not (seen := others()) and time.time() < deadline:
            time.sleep(0.05)
        return [{"caption": [f"other task prepared: {bool(seen)}", key]} for key in keys]
