"""One labelled output for the whole session: the demo corpus labelled, in one job on the session's embedded Ray, by
every model labeler whose family test needs a Ray-pipeline run (tiny random configurations of the real
architectures, saved once in the layouts their real weights come in), so that each actor pool starts once per
session instead of once per test file.

Used by tests/test_all_labelers.py and the per-family ``... in the pipeline`` tests (text, features, dense, SAM,
humans, derived). A test that must change the output (``--only ... --force``) works on a copy
(:meth:`SharedLabels.copy`), never on the shared folder. Fixtures: ``shared_weights`` (each model labeler's config,
plus the checkpoints the family tests' re-runs use) and ``shared_labels`` (the job's output and settings)."""

from __future__ import annotations

import copy
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# no GPU, no memory reservation, and small CPU shares: eleven actor pools and two shard tasks fit 2 CPUs
CPU = {"num_cpus": 0.1, "num_gpus": 0, "memory_mb": 0}
DERIVED = "metadata_derived_4m21"  # the derived metadata variant that reads det, semseg_coco, normal, caption, sam_mask
# modality -> the labeler that must have produced it. Labelers that read other modalities (t5_caption: caption;
# hmr2: det; the derived metadata: det, semseg_coco, normal, caption, sam_mask) are listed after those. det: the
# default detector (D-FINE).
PRODUCER = {
    "canny_edge": "canny_edge", "color_palette": "color_palette", "caption": "caption", "det": "dfine_coco",
    "depth": "omnidata_depth", "normal": "omnidata_normal", "semseg_coco": "mask2former_coco",
    "clip": "clip", "clip_global": "clip", "dinov2": "dinov2", "dinov2_global": "dinov2",
    "imagebind": "imagebind", "imagebind_global": "imagebind", "sam_mask": "sam", "sam_edge": "sam",
    "t5_caption": "t5_caption", "human_poses": "hmr2", "metadata": DERIVED,
}
MODALITIES = ["rgb", "crop_settings", *PRODUCER]
SHARDS = ("shard-00000", "shard-00001")
# the model labelers of the shared job (the others of PRODUCER run in the shard tasks)
MODEL_LABELERS = ("sam", "dinov2", "imagebind", "clip", "dfine_coco", "hmr2", "omnidata_depth", "omnidata_normal",
                  "caption", "t5_caption", "mask2former_coco")
N_CROPS = 2  # two crops per sample: the feature labelers' rows are per crop
MAX_SIZE = 128


def tar_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def keys_of(path) -> list[str]:
    return [name.split(".", 1)[0] for name, _ in tar_members(path)]


def save_all_weights(d: Path) -> dict:
    """Each model labeler's config (a tiny checkpoint in the layout its real weights come in, with the settings that
    suit it), for the shared job's labelers and for those the family tests' re-runs swap in."""
    from modalmill.labelers import get_labeler
    from tests.tiny_models import (TEST_SETTINGS, save_official_omnidata, save_tiny_blip, save_tiny_clip,
                                   save_tiny_depth_anything, save_tiny_detr, save_tiny_dfine, save_tiny_dinov2,
                                   save_tiny_hmr2, save_tiny_imagebind, save_tiny_mask2former, save_tiny_sam,
                                   save_tiny_t5)

    imagebind, _ = save_tiny_imagebind(d)
    normal_ckpt = save_official_omnidata(str(d / "omnidata_dpt_normal_v2.ckpt"), 3, seed=1)
    return {
        "sam": {"weights": save_tiny_sam(d / "sam_tiny.pth"), **TEST_SETTINGS["sam"]},
        "dinov2": {"weights": save_tiny_dinov2(d / "dinov2")},
        "imagebind": imagebind,
        "clip": save_tiny_clip(d),
        # a tiny D-FINE (the default detector) that sees people, so that HMR 2.0 has persons to regress
        "dfine_coco": {"weights": save_tiny_dfine(str(d / "dfine"), favour="person"), **TEST_SETTINGS["dfine_coco"]},
        "hmr2": {"weights": save_tiny_hmr2(d / "hmr2_tiny.safetensors")},
        # depth from Omnidata's official .ckpt layout; normal through the converter (what `convert-weights` runs)
        "omnidata_depth": {"weights": save_official_omnidata(str(d / "omnidata_dpt_depth_v2.ckpt"), 1)},
        "omnidata_normal": {"weights": get_labeler("omnidata_normal").convert_weights(normal_ckpt,
                                                                                       str(d / "normal-hf"))},
        "caption": {"weights": save_tiny_blip(d / "blip")},
        "t5_caption": {"weights": save_tiny_t5(d / "t5")},
        "mask2former_coco": {"weights": save_tiny_mask2former(str(d / "mask2former")),
                             **TEST_SETTINGS["mask2former_coco"]},
        # not in the shared job: swapped in by the family tests' --only re-runs, or read by their in-process tests
        "omnidata_normal_ckpt": {"weights": normal_ckpt},
        "detr_coco": {"weights": save_tiny_detr(str(d / "detr")), **TEST_SETTINGS["detr_coco"]},
        "depth_anything": {"weights": save_tiny_depth_anything(str(d / "depth-anything")),
                           **TEST_SETTINGS["depth_anything"]},
    }


def shared_job(demo_corpus: str, out: str, weights: dict) -> dict:
    """The shared job's settings (a dict for ``job_from_dict``)."""
    labelers = {name: {"config": weights[name], "resources": CPU} for name in MODEL_LABELERS}
    labelers[DERIVED] = {}  # listed: preferred over the model-free metadata labeler
    return {"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": out,
            "modalities": MODALITIES, "batch_size": 5, "crops": {"n_crops": N_CROPS},
            "decode": {"max_size": MAX_SIZE}, "labelers": labelers, "ray": {"shard_cpus": 0.4}}


@dataclass
class SharedLabels:
    """The shared job's output (read it, never write into it), its settings and its summary."""

    out: Path
    weights: dict
    data: dict
    summary: dict

    def copy(self, dest: Path) -> Path:
        """A private copy of the output (for a test that re-runs part of the job on it)."""
        shutil.copytree(self.out, dest)
        return dest

    def rerun(self, dest: Path, only: list[str], labelers: dict | None = None):
        """``--only <only> --force`` on a copy of the output at ``dest`` (made by the first re-run there): the shared
        job's settings, its labelers replaced by ``labelers`` (name -> settings) when given. Returns (the copy, the
        run's summary)."""
        from modalmill.jobs.runner import run_job
        from modalmill.jobs.spec import job_from_dict

        out = dest if dest.exists() else self.copy(dest)
        data = {**copy.deepcopy(self.data), "output": str(out)}
        if labelers is not None:
            data["labelers"] = copy.deepcopy(labelers)
        return out, run_job(job_from_dict(data), only=only, force=True, show_progress=False)


@pytest.fixture(scope="session")
def shared_weights(tmp_path_factory):
    return save_all_weights(tmp_path_factory.mktemp("shared-weights"))


@pytest.fixture(scope="session")
def shared_labels(ray_local, demo_corpus, shared_weights, tmp_path_factory) -> SharedLabels:
    """The demo corpus (2 shards of 5) labelled by every modality of PRODUCER in one job, on the CPU."""
    from modalmill.jobs.runner import run_job
    from modalmill.jobs.spec import job_from_dict

    out = tmp_path_factory.mktemp("shared-labels") / "out"
    data = shared_job(demo_corpus, str(out), shared_weights)
    summary = run_job(job_from_dict(copy.deepcopy(data)), show_progress=False)
    return SharedLabels(out, shared_weights, data, summary)
