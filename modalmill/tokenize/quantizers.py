"""Quantizers behind one small interface, wrapped so that a library upgrade cannot silently change tokens.

Every quantizer maps latents ``x`` of shape ``[B, N, dim]`` to discrete indices and back:

- ``forward(x) -> QuantizerOutput(quantized [B, N, dim], indices [B, T], aux_loss)``;
- ``encode(x) -> indices [B, T]`` (no state change, the exact computation used when writing tokens);
- ``indices_to_codes(indices) -> codes [B, N, dim]``: in eval mode ``indices_to_codes(forward(x).indices)``
  equals ``forward(x).quantized``.

``T = N * tokens_per_vector`` (1 for VQ and FSQ, ``heads`` for Memcodes).

Three kinds:

- :class:`VQQuantizer`: 4M's recipe, cosine-similarity VQ with EMA codebook updates and dead-code replacement,
  trained with ``vector_quantize_pytorch.VectorQuantize``. The wrapper owns the exported codebook (the
  ``codebook`` buffer, L2-normalised, synchronised from the library after every training step) and computes
  indices itself at encode time (argmax of the cosine similarity; ties go to the lowest index).
- :class:`FSQQuantizer`: finite scalar quantisation (Mentzer et al. 2023), trained through
  ``vector_quantize_pytorch.FSQ``; the wrapper owns ``levels``/``basis`` and the bound-and-round formula.
- :class:`MemcodesQuantizer`: a Memcodes-style multi-head quantiser for global vectors (as 4M's MLP tokenizers
  use): each head attends over its own learned codebook, straight-through Gumbel-softmax while training,
  argmax at eval. vector-quantize-pytorch 1.32.0 offers multi-head *VQ* (``heads=..., separate_codebook_per_head``)
  and ``LatentQuantize``, but nothing attention-based like Memcodes, so this one is written here.

Only the wrapper's own tensors go into exported checkpoints (``export_state_dict`` drops the library's training
buffers); the library's EMA state travels with the resumable training state only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZER_TYPES = ("vq", "fsq", "memcodes")
_LIB_PREFIX = "lib."  # submodule name of the wrapped library quantizer: excluded from exported checkpoints


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [B, N, dim]
    indices: torch.Tensor  # [B, T] int64
    aux_loss: torch.Tensor  # scalar (commitment loss for VQ, 0 otherwise)


class Quantizer(nn.Module):
    """The interface every quantizer implements."""

    kind: str = ""
    dim: int
    codebook_size: int
    tokens_per_vector: int = 1

    def forward(self, x: torch.Tensor) -> QuantizerOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def after_load(self) -> None:
        """Called after exported weights were loaded: push the owned tensors into the training library."""

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"{self.kind} quantizer expects latents [B, N, {self.dim}], got {tuple(x.shape)}")


def is_library_key(name: str) -> bool:
    """True for state-dict keys that belong to a wrapped library's training state (not exported)."""
    return f".{_LIB_PREFIX}" in f".{name}"


# ---------------------------------------------------------------------- VQ (cosine, EMA, dead codes)


class VQQuantizer(Quantizer):
    kind = "vq"

    def __init__(self, dim: int, codebook_size: int, decay: float = 0.99, threshold_ema_dead_code: float = 2.0,
                 commitment_weight: float = 1.0, kmeans_init: bool = False):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.dim, self.codebook_size = int(dim), int(codebook_size)
        self.commitment_weight = float(commitment_weight)
        self.lib = VectorQuantize(dim=self.dim, codebook_size=self.codebook_size, use_cosine_sim=True, decay=decay,
                                  threshold_ema_dead_code=threshold_ema_dead_code,
                                  commitment_weight=commitment_weight, kmeans_init=kmeans_init,
                                  rotation_trick=False, channel_last=True)
        self.register_buffer("codebook", self._lib_codebook().detach().clone())

    def _lib_codebook(self) -> torch.Tensor:
        return self.lib._codebook.embed[0]

    @torch.no_grad()
    def _sync_from_lib(self) -> None:
        self.codebook.copy_(self._lib_codebook())

    @torch.no_grad()
    def after_load(self) -> None:
        self.lib._codebook.embed[0].copy_(self.codebook)

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        self._check(x)
        if self.training:
            quantized, indices, loss = self.lib(x)
            self._sync_from_lib()
            return QuantizerOutput(quantized, indices.long(), loss.reshape(()))
        indices = self.encode(x)
        quantized = self.indices_to_codes(indices)
        commit = F.mse_loss(F.normalize(x.float(), dim=-1), quantized) * self.commitment_weight
        return QuantizerOutput(quantized, indices, commit)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        sims = F.normalize(x.float(), dim=-1) @ self.codebook.t()
        return sims.argmax(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codebook[indices.long()]


# ---------------------------------------------------------------------- FSQ


class FSQQuantizer(Quantizer):
    kind = "fsq"
    _EPS = 1e-3  # the FSQ paper's bound slack

    def __init__(self, levels: list[int] | tuple[int, ...]):
        super().__init__()
        from vector_quantize_pytorch import FSQ

        levels = [int(v) for v in levels]
        if not levels or any(v < 3 for v in levels):
            raise ValueError(f"FSQ levels must all be >= 3, got {levels}")
        self.dim = len(levels)
        self.codebook_size = int(math.prod(levels))
        self.lib = FSQ(levels=levels)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.int64))
        basis = [1]
        for v in levels[:-1]:
            basis.append(basis[-1] * v)
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.int64))

    def _normalised_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Bound each channel to its level range and round: values (k - L//2) / (L//2), k = 0..L-1."""
        levels = self.levels.to(z.dtype)
        half_l = (levels - 1) * (1 + self._EPS) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_l)
        bounded = torch.tanh(z + shift) * half_l - offset
        return torch.round(bounded) / (self.levels // 2).to(z.dtype)

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        self._check(x)
        if self.training:
            quantized, indices = self.lib(x.float())
            return QuantizerOutput(quantized, indices.long(), x.new_zeros(()))
        indices = self.encode(x)
        return QuantizerOutput(self.indices_to_codes(indices), indices, x.new_zeros(()))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        codes = self._normalised_codes(x.float())
        half = self.levels // 2
        level_idx = torch.round(codes * half + half).long()
        return (level_idx * self.basis).sum(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        level_idx = (indices.long().unsqueeze(-1) // self.basis) % self.levels
        half = self.levels // 2
        return (level_idx - half).float() / half.float()


# ---------------------------------------------------------------------- Memcodes (multi-head, attention)


class MemcodesQuantizer(Quantizer):
    kind = "memcodes"

    def __init__(self, dim: int, codebook_size: int, heads: int = 1, temperature: float = 1.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"memcodes: dim {dim} must be divisible by heads {heads}")
        self.dim, self.codebook_size, self.heads = int(dim), int(codebook_size), int(heads)
        self.tokens_per_vector = self.heads
        self.head_dim = self.dim // self.heads
        self.temperature = float(temperature)
        self.codes = nn.Parameter(torch.randn(self.heads, self.codebook_size, self.head_dim))
        bound = 1 / math.sqrt(self.head_dim)
        self.to_k = nn.Parameter(torch.empty(self.heads, self.head_dim, self.head_dim).uniform_(-bound, bound))
        self.to_v = nn.Parameter(torch.empty(self.heads, self.head_dim, self.head_dim).uniform_(-bound, bound))

    def _values(self) -> torch.Tensor:
        return torch.einsum("hkd,hde->hke", self.codes, self.to_v)  # [H, K, d]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = x.float().reshape(b, n, self.heads, self.head_dim) * self.head_dim ** -0.5
        keys = torch.einsum("hkd,hde->hke", self.codes, self.to_k)
        return torch.einsum("bnhd,hkd->bnhk", q, keys)  # [B, N, H, K]

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        self._check(x)
        logits = self._logits(x)
        if self.training:
            attn = F.gumbel_softmax(logits, tau=self.temperature, dim=-1, hard=True)
            idx = attn.argmax(dim=-1)
            out = torch.einsum("bnhk,hke->bnhe", attn, self._values())
            b, n = x.shape[:2]
            return QuantizerOutput(out.reshape(b, n, self.dim), idx.reshape(b, -1), x.new_zeros(()))
        indices = logits.argmax(dim=-1).reshape(x.shape[0], -1)
        return QuantizerOutput(self.indices_to_codes(indices), indices, x.new_zeros(()))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self._logits(x).argmax(dim=-1).reshape(x.shape[0], -1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        b = indices.shape[0]
        idx = indices.long().reshape(b, -1, self.heads)  # [B, N, H]
        values = self._values()  # [H, K, d]
        heads = torch.arange(self.heads, device=idx.device).expand_as(idx)
        return values[heads, idx].reshape(b, idx.shape[1], self.dim)


# ---------------------------------------------------------------------- factory


def quantizer_dim(cfg: dict[str, Any]) -> int:
    """The latent width a quantizer config expects."""
    if cfg["type"] == "fsq":
        return len(cfg["levels"])
    return int(cfg["dim"])


def build_quantizer(cfg: dict[str, Any]) -> Quantizer:
    kind = cfg.get("type")
    if kind == "vq":
        return VQQuantizer(cfg["dim"], cfg["codebook_size"], decay=cfg.get("decay", 0.99),
                           threshold_ema_dead_code=cfg.get("threshold_ema_dead_code", 2.0),
                           commitment_weight=cfg.get("commitment_weight", 1.0),
                           kmeans_init=cfg.get("kmeans_init", False))
    if kind == "fsq":
        return FSQQuantizer(cfg["levels"])
    if kind == "memcodes":
        return MemcodesQuantizer(cfg["dim"], cfg["codebook_size"], heads=cfg.get("heads", 1),
                                 temperature=cfg.get("temperature", 1.0))
    raise ValueError(f"unknown quantizer type {kind!r}; known: {', '.join(QUANTIZER_TYPES)}")


def codebook_size_of(cfg: dict[str, Any]) -> int:
    if cfg["type"] == "fsq":
        return int(math.prod(int(v) for v in cfg["levels"]))
    return int(cfg["codebook_size"])
