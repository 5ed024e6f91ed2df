"""Quantizers: round trips, the wrapper's own index computation vs the library, EMA/dead codes, checkpoints."""

import json
import os

import pytest
import torch

from modalmill.tokenize import checkpoint as ckpt
from modalmill.tokenize.models import build_model
from modalmill.tokenize.quantizers import (FSQQuantizer, MemcodesQuantizer, VQQuantizer, build_quantizer,
                                           is_library_key)
from modalmill.tokenize.train import default_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUANTIZERS = {
    "vq": lambda: VQQuantizer(16, 64, decay=0.9, threshold_ema_dead_code=1.0),
    "fsq": lambda: FSQQuantizer([8, 5, 5, 5]),
    "memcodes": lambda: MemcodesQuantizer(32, 64, heads=4),
}


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_indices_to_codes_equals_the_quantised_output(kind):
    torch.manual_seed(0)
    q = QUANTIZERS[kind]()
    x = torch.randn(4, 10, q.dim)
    q.train()
    for _ in range(3):  # a few training steps move the codebook (EMA / gumbel) first
        out = q(x)
        assert out.indices.shape == (4, 10 * q.tokens_per_vector)
        assert out.quantized.shape == x.shape
    q.eval()
    out = q(x)
    assert out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
    assert torch.equal(q.indices_to_codes(out.indices), out.quantized)
    assert torch.equal(q.encode(x), out.indices)


def test_vq_own_indices_match_the_library_and_ema_moves_the_codebook():
    torch.manual_seed(1)
    q = VQQuantizer(8, 32, decay=0.5, threshold_ema_dead_code=0.0)
    before = q.codebook.clone()
    x = torch.randn(2, 50, 8)
    q.train()
    _, lib_idx, _ = q.lib(x)  # the library's own training-mode assignment, before its EMA update lands
    q._sync_from_lib()
    assert not torch.equal(before, q.codebook), "EMA update did not reach the exported codebook"
    assert torch.equal(q.codebook, q.lib._codebook.embed[0])
    q.eval()
    q.lib.eval()
    _, lib_eval_idx, _ = q.lib(x)
    assert torch.equal(lib_eval_idx, q.encode(x))
    assert lib_idx.shape == lib_eval_idx.shape


def test_vq_dead_codes_are_replaced_by_batch_vectors():
    torch.manual_seed(2)
    q = VQQuantizer(4, 64, decay=0.5, threshold_ema_dead_code=1.0)
    q.train()
    x = torch.randn(1, 8, 4)  # 8 vectors cannot keep 64 codes alive
    for _ in range(4):
        q(x)
    xn = torch.nn.functional.normalize(x[0], dim=-1)
    sims = q.codebook @ xn.t()
    replaced = (sims.max(dim=1).values > 0.9999).sum()
    assert replaced >= 8, "dead codes were not re-seeded from batch vectors"


def test_fsq_wrapper_formula_matches_the_library():
    torch.manual_seed(3)
    q = FSQQuantizer([8, 6, 5])
    x = torch.randn(5, 33, 3) * 3
    q.train()
    lib_out, lib_idx = q.lib(x)
    assert torch.equal(lib_idx.long(), q.encode(x))
    assert torch.allclose(lib_out, q.indices_to_codes(lib_idx), atol=1e-6)
    assert q.codebook_size == 240
    every = torch.arange(240)
    assert torch.equal(q.lib.codes_to_indices(q.indices_to_codes(every)).long(), every)  # a bijection onto 0..239
    idx = q.encode(torch.randn(2000, 1, 3) * 4)
    assert int(idx.min()) >= 0 and int(idx.max()) < 240


def test_unknown_quantizer_and_bad_levels_are_clear_errors():
    with pytest.raises(ValueError, match="unknown quantizer type"):
        build_quantizer({"type": "rvq"})
    with pytest.raises(ValueError, match=">= 3"):
        FSQQuantizer([2, 5])


def test_checkpoint_round_trip_is_safetensors_and_encodes_identically(tmp_path):
    cfg = default_config("rgb", "tiny")
    torch.manual_seed(0)
    model = build_model(cfg["model"])
    model.train()
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    model(x)  # one training forward: the VQ codebook moves away from its initialisation
    model.eval()
    url = ckpt.save_tokenizer(model, {"modality": "rgb", "token_modality": "tok_rgb@224", "model": cfg["model"]},
                              str(tmp_path))
    assert url.endswith("model.safetensors") and os.path.exists(tmp_path / "config.json")
    with open(url, "rb") as f:
        blob = f.read()
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    assert not any(is_library_key(k) for k in header if k != "__metadata__"), "library buffers were exported"
    assert "quantizer.codebook" in header
    loaded, config = ckpt.load_tokenizer(str(tmp_path))
    assert config["token_modality"] == "tok_rgb@224"
    with torch.inference_mode():
        assert torch.equal(loaded.encode(x), model.encode(x))
    assert ckpt.checkpoint_hash(str(tmp_path)) == ckpt.checkpoint_hash(url)


def test_a_file_that_is_not_a_tokenizer_is_refused(tmp_path):
    from safetensors.torch import save_file

    from modalmill.labelers.weights import WeightsError

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="not a modalmill tokenizer"):
        ckpt.load_tokenizer(str(tmp_path))
    with pytest.raises(WeightsError, match="not found"):
        ckpt.load_tokenizer(str(tmp_path / "nothing"))


def test_checkpoint_headers_are_canonical_whatever_order_safetensors_writes(tmp_path):
    """safetensors keeps __metadata__ in a hash map: the same checkpoint could come out with its metadata keys in
    another order. modalmill rewrites the header sorted (same length, tensors untouched)."""
    from safetensors.torch import load, save

    blob = save({"b": torch.arange(3.0), "a": torch.ones(2, 2)}, metadata={"format": "x", "config": "{}"})
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    reordered = {"__metadata__": dict(reversed(list(header["__metadata__"].items())))}
    reordered.update({k: header[k] for k in reversed([k for k in header if k != "__metadata__"])})
    raw = json.dumps(reordered, separators=(",", ":")).encode()
    other = blob[:8] + raw + b" " * (n - len(raw)) + blob[8 + n:]
    assert other != blob  # reversing >= 2 keys always changes the order
    assert ckpt.canonical_safetensors(other) == ckpt.canonical_safetensors(blob)
    loaded = load(ckpt.canonical_safetensors(other))
    assert torch.equal(loaded["a"], torch.ones(2, 2)) and torch.equal(loaded["b"], torch.arange(3.0))
