"""Adding a modality as a user does it (issue 27): the example plugin pip-installed, every command run from ANOTHER
working directory with relative paths, so each process modalmill starts (shard tasks, tokenizer actors, Ray Train
workers, a fresh interpreter for the Python API) must find the plugin and the files by itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.plugin_install import ROOT


def modalmill(*args, env, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "modalmill", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def plugin(example_plugin):
    env, _ = example_plugin
    return env


@pytest.fixture(scope="module")
def labeled(plugin, demo_corpus, tmp_path_factory):
    """``out`` (relative to ``work``) labeled with the plugin's grayscale, from a relative input pattern."""
    work = tmp_path_factory.mktemp("work")
    corpus = os.path.relpath(demo_corpus, work)
    assert not os.path.isabs(corpus) and not os.path.exists(os.path.join(ROOT, corpus, "shard-00000.tar"))
    r = modalmill("label", os.path.join(corpus, "shard-{00000..00001}.tar"), "out",
                  "-m", "rgb,crop_settings,grayscale", "--max-size", "96", "--num-cpus", "2", "--no-progress",
                  env=plugin, cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "10 sample(s) written, 0 failed" in r.stdout
    return work


@pytest.mark.slow
def test_train_tokenizer_and_tokenize_a_plugin_modality_with_relative_paths(plugin, labeled):
    work = labeled
    # Ray Train worker: relative --data (its working directory is Ray's) and the plugin's token modality
    r = modalmill("train-tokenizer", "--modality", "grayscale", "--data", "out", "--preset", "tiny", "--steps", "2",
                  "--no-progress", env=plugin, cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "grayscale tokenizer" in r.stdout and "psnr" in r.stdout and "edge_f1" not in r.stdout, r.stdout
    ckpt = work / "out" / "_modalmill" / "tokenizers" / "grayscale"
    report = json.loads((ckpt / "report.json").read_text())
    # a grey map is measured as a picture (mse, psnr), not as an edge map
    assert {"mse", "psnr"} <= set(report["after"]) and "edge_f1" not in report["after"], report["after"]
    # tokenizer actors unpickle the plugin's tokenizer labeler class (made by register_token_modality)
    r = modalmill("tokenize", "--data", "out", "-m", "grayscale", "--no-progress", env=plugin, cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "2 shard(s) processed" in r.stdout and "10 sample(s) written, 0 failed" in r.stdout, r.stdout
    assert sorted(os.listdir(work / "out" / "tok_grayscale@224")) == ["shard-00000.tar", "shard-00001.tar"]
    r = modalmill("check", "out", env=plugin, cwd=work)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout + r.stderr


def test_load_dataset_of_a_plugin_modality_in_a_fresh_interpreter(plugin, labeled):
    code = ("import modalmill\n"
            "ds = modalmill.load_dataset('out', ['rgb', 'grayscale'])\n"
            "s = next(iter(ds))\n"
            "import json; print(json.dumps([list(s['grayscale'].shape), list(s['rgb'].shape)]))\n")
    r = subprocess.run([sys.executable, "-c", code], env=plugin, cwd=labeled, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    gray, rgb = json.loads(r.stdout.strip().splitlines()[-1])
    assert gray[-2:] == rgb[-2:] and gray[0] == 1 and rgb[0] == 3, r.stdout


def test_a_plugin_is_loaded_by_a_registry_lookup_alone(plugin, tmp_path):
    """No CLI, no load_entry_points call: a lookup that misses (a modality, a token modality, a class unpickled
    by name, as a Ray worker does) loads the installed plugins."""
    code = ("import pickle\n"
            "from modalmill.schemas.modalities import get_modality\n"
            "print(get_modality('grayscale').kind)\n"
            "import modalmill.tokenize.labelers as tl\n"
            "cls = pickle.loads(PICKLED)\n"
            "print(cls.__name__, cls.outputs[0], tl.labeler_for_token_modality('grayscale') is cls)\n")
    # the class pickled by reference in a process that has the plugin loaded
    make = ("import pickle, sys\nfrom modalmill.labelers import load_entry_points\nload_entry_points()\n"
            "from modalmill.tokenize.labelers import TokGrayscaleLabeler\n"
            "sys.stdout.write(repr(pickle.dumps(TokGrayscaleLabeler)))\n")
    r = subprocess.run([sys.executable, "-c", make], env=plugin, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-c", code.replace("PICKLED", r.stdout)], env=plugin, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["pixel", "TokGrayscaleLabeler", "tok_grayscale@224", "True"], r.stdout


def test_a_one_channel_plugin_map_trains_as_a_picture_not_an_edge_map(monkeypatch):
    import torch

    from modalmill.tokenize.fourm_inputs import FourMInput, KINDS
    from modalmill.tokenize.fourm_train import FourMTrainAdapter

    monkeypatch.setitem(KINDS, "test_gray_map", "gray")
    a = FourMTrainAdapter(FourMInput("test_gray_map", size=32, n_channels=1))
    target = torch.rand(2, 1, 32, 32) * 2 - 1
    pred = target + 0.1 * torch.randn_like(target)
    assert torch.isclose(a.loss(pred, target), torch.nn.functional.mse_loss(pred, target))
    summary = a.summarise(a.metrics(pred, target))
    assert set(summary) == {"mse", "mae", "psnr"} and summary["psnr"] > 15, summary
    edge = FourMTrainAdapter(FourMInput("canny_edge", size=32, n_channels=1))
    assert "edge_f1" in edge.summarise(edge.metrics(pred, target))
    assert np.isfinite(summary["mse"])
