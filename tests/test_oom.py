"""Out of memory in a model labeler (modalmill/labelers/oom.py): the batch is split and retried down to one sample,
a sample that fails alone is recorded as ``oom``, and the worker keeps the smaller batch size, saying so once.

The errors are the real ones: ``torch.cuda.OutOfMemoryError`` raised by a labeler above a batch-size threshold
(tests/labelers_for_tests.py ``test_oom_actor``), and the CPU allocator's own error from a real failed allocation.
End to end, the labeler runs in its Ray actor pool under a real job."""

import tarfile

import pytest

import tests.labelers_for_tests  # noqa: F401  (registers test_oom_actor)
from modalmill.io import manifest
from modalmill.jobs.democorpus import build_corpus
from modalmill.jobs.runner import EXIT_SAMPLES_FAILED, run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.labelers.base import LabelFailure
from modalmill.labelers.oom import BatchLimiter, is_oom
from modalmill.schemas import get_modality


def _model(threshold=4, huge=()):
    """A labeler function that runs out of CUDA memory above ``threshold`` items, or on any item of ``huge``."""
    import torch

    calls = []

    def fn(batch):
        calls.append(len(batch))
        if len(batch) > threshold or set(batch) & set(huge):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [f"ok {x}" for x in batch]

    return fn, calls


def test_a_batch_of_16_over_a_threshold_of_4_is_split_and_all_16_are_labelled_then_4_is_kept():
    said = []
    limiter = BatchLimiter("m", say=said.append)
    fn, calls = _model(threshold=4)
    assert limiter.run(fn, list(range(16))) == [f"ok {i}" for i in range(16)]
    assert calls == [16, 8, 4, 4, 8, 4, 4]
    assert limiter.limit == 4 and len(said) == 1 and "batch of 16" in said[0] and "at most 4" in said[0]
    calls.clear()
    assert limiter.run(fn, list(range(16, 32))) == [f"ok {i}" for i in range(16, 32)]
    assert calls == [4, 4, 4, 4] and len(said) == 1  # the lowered size holds, and is said once


def test_parts_keep_the_batch_type_a_labeler_relies_on():
    from modalmill.labelers.base import Prepared

    seen = []

    def fn(batch):
        seen.append(type(batch))
        if len(batch) > 2:
            raise MemoryError()
        return list(batch)

    limiter = BatchLimiter("m", say=lambda line: None)
    assert limiter.run(fn, Prepared(range(8))) == list(range(8))
    assert set(seen) == {Prepared}
    assert limiter.run(fn, Prepared(range(2))) == [0, 1] and seen[-1] is Prepared


def test_a_sample_too_big_alone_is_recorded_as_oom_and_costs_only_its_half():
    said = []
    limiter = BatchLimiter("m", say=said.append)
    fn, calls = _model(threshold=64, huge=[5])
    out = limiter.run(fn, list(range(16)))
    assert len(out) == 16  # every sample of the failing batch is labelled or recorded
    assert [i for i, r in enumerate(out) if isinstance(r, LabelFailure)] == [5]
    assert out[5].reason.startswith("oom: OutOfMemoryError: CUDA out of memory")
    assert all(out[i] == f"ok {i}" for i in range(16) if i != 5)
    assert limiter.limit == 8 and len(said) == 1  # the other half went through whole


def test_the_cpu_allocators_real_error_counts_and_other_errors_propagate():
    import torch

    with pytest.raises(RuntimeError) as e:
        torch.empty(2**50, dtype=torch.uint8)  # a real allocation failure of torch's CPU allocator
    assert is_oom(e.value) and is_oom(torch.cuda.OutOfMemoryError("x")) and is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of range"))

    def cpu_model(batch):
        if len(batch) > 2:
            torch.empty(2**50, dtype=torch.uint8)
        return list(batch)

    limiter = BatchLimiter("m", say=lambda line: None)
    assert limiter.run(cpu_model, list(range(8))) == list(range(8)) and limiter.limit == 2

    def broken(batch):
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError):
        BatchLimiter("m").run(broken, [1, 2, 3])


def _keys(tar_path):
    with tarfile.open(tar_path) as t:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in t.getmembers()))


def test_model_actor_out_of_memory_end_to_end(ray_local, tmp_path):
    """Two shards of 16 through the ``test_oom_actor`` pool (batches of 16, CUDA OOM above 4): shard 0 ends with
    16 written, each labelled in a batch of 4; in shard 1 one photo fails even alone: 15 written, 1 recorded
    with reason ``oom``."""
    paths = build_corpus(str(tmp_path / "in"), n_shards=2, per_shard=16, size_range=(64, 96))
    huge = _keys(paths[1])[7]
    out = tmp_path / "out"
    spec = job_from_dict({"input": str(tmp_path / "in" / "shard-{00000..00001}.tar"), "output": str(out),
                          "modalities": ["rgb", "caption"], "batch_size": 16, "crops": {"n_crops": 1},
                          "labelers": {"test_oom_actor": {"config": {"max_batch": 4, "huge_keys": [huge]}}},
                          "ray": {"num_cpus": 2}})
    s = run_job(spec, show_progress=False)
    assert s["exit_code"] == EXIT_SAMPLES_FAILED and s["shards_failed"] == 0
    assert s["samples_read"] == 32 and s["samples_written"] == 31 and s["samples_failed"] == 1
    assert s["errors_by_reason"] == {"label:test_oom_actor: oom": 1}
    m0, m1 = manifest.read_marker(str(out), "shard-00000"), manifest.read_marker(str(out), "shard-00001")
    assert m0["n_samples"] == 16 and m1["n_samples"] == 15 and huge not in m1["keys"]
    with tarfile.open(out / "caption" / "shard-00000.tar") as t:
        captions = [get_modality("caption").decode(t.extractfile(m).read()) for m in t.getmembers()]
    assert len(captions) == 16 and all(c == ["n=4"] for c in captions), captions[:3]
    row = next(r for r in manifest.read_rows(str(out), "shard-00001") if r.key == huge)
    assert row.status == "failed" and row.stage == "label:test_oom_actor" and row.error.startswith("oom:")
    assert sum(r.status == "ok" for r in manifest.read_rows(str(out), "shard-00001")) == 15
