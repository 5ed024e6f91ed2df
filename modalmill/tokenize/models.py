"""Tokenizer architectures: a ViT VQ-VAE for image-like inputs and an MLP tokenizer for vectors.

- :class:`SpatialVQVAE`: patch embedding -> ViT encoder (timm ``Block``s) -> (optional tanh MLP, as 4M's
  ``post_mlp``) -> projection to the quantizer's latent width -> quantizer -> ViT decoder -> per-patch linear head
  -> image. At 224 with patch 16 it makes 14 x 14 = 196 tokens; on teacher feature maps (14 x 14 or 16 x 16 grids)
  it uses patch 1, so a 16 x 16 DINOv2/ImageBind map makes 256 tokens; on 64 x 64 SAM instance masks with patch 16
  it makes 16 tokens per instance.
- :class:`MLPTokenizer`: pre-norm residual bottleneck MLP -> ``n_tokens`` latent slots (Memcodes heads, or
  positions of a shared VQ/FSQ codebook) -> MLP decoder. Used for global embeddings (16 tokens) and the 207-d
  body pose (8 tokens).

Both expose ``forward(x) -> (reconstruction, QuantizerOutput)``, ``encode(x) -> indices [B, n_tokens]`` and
``decode_indices(indices) -> reconstruction``. Everything is configured by one JSON-able dict (see
:func:`build_model`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .quantizers import QuantizerOutput, build_quantizer, quantizer_dim


class _ViTStack(nn.Module):
    def __init__(self, n_tokens: int, dim: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.pos = nn.Parameter(torch.zeros(1, n_tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def _init_linear(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SpatialVQVAE(nn.Module):
    family = "spatial"

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.cfg = cfg
        self.in_channels, self.out_channels = int(cfg["in_channels"]), int(cfg["out_channels"])
        self.image_size, self.patch_size = int(cfg["image_size"]), int(cfg["patch_size"])
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.grid = self.image_size // self.patch_size
        n = self.grid * self.grid
        dim, heads = int(cfg["dim"]), int(cfg["heads"])
        qdim = quantizer_dim(cfg["quantizer"])
        self.patch_embed = nn.Conv2d(self.in_channels, dim, self.patch_size, self.patch_size)
        self.encoder = _ViTStack(n, dim, int(cfg["enc_depth"]), heads, float(cfg.get("mlp_ratio", 4.0)))
        self.post_mlp = nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) if cfg.get("post_mlp") else nn.Identity()
        self.quant_proj = nn.Linear(dim, qdim)
        self.quantizer = build_quantizer(cfg["quantizer"])
        if self.quantizer.tokens_per_vector != 1:
            raise ValueError("spatial tokenizers need a one-token-per-position quantizer (vq or fsq)")
        self.post_quant_proj = nn.Linear(qdim, dim)
        self.decoder = _ViTStack(n, dim, int(cfg["dec_depth"]), heads, float(cfg.get("mlp_ratio", 4.0)))
        self.head = nn.Linear(dim, self.patch_size * self.patch_size * self.out_channels)
        for part in (self.encoder, self.post_mlp, self.quant_proj, self.post_quant_proj, self.decoder, self.head):
            _init_linear(part)

    @property
    def n_tokens(self) -> int:
        return self.grid * self.grid

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"expected input [B, {self.in_channels}, {self.image_size}, {self.image_size}], "
                             f"got {tuple(x.shape)}")
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, dim]
        return self.quant_proj(self.post_mlp(self.encoder(h)))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        h = self.head(self.decoder(self.post_quant_proj(codes)))  # [B, N, p*p*C]
        b, p, g, c = h.shape[0], self.patch_size, self.grid, self.out_channels
        h = h.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        q = self.quantizer(self.latents(x))
        return self.decode_codes(q.quantized), q

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.encode(self.latents(x))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decode_codes(self.quantizer.indices_to_codes(indices))


class _ResMLP(nn.Module):
    def __init__(self, width: int, blocks: int, expansion: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width * expansion), nn.GELU(),
                                                  nn.Linear(width * expansion, width)) for _ in range(blocks))
        self.out_norm = nn.LayerNorm(width)

    def forward(self, x):
        for norm, blk in zip(self.norms, self.blocks):
            x = x + blk(norm(x))
        return self.out_norm(x)


class MLPTokenizer(nn.Module):
    family = "mlp"

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.cfg = cfg
        self.in_channels = int(cfg["in_channels"])
        width, blocks, exp = int(cfg["width"]), int(cfg["blocks"]), int(cfg.get("expansion", 4))
        qcfg = cfg["quantizer"]
        self.quantizer = build_quantizer(qcfg)
        self._n_tokens = int(cfg["n_tokens"])
        tpv = self.quantizer.tokens_per_vector
        if self._n_tokens % tpv:
            raise ValueError(f"n_tokens {self._n_tokens} is not a multiple of the quantizer's {tpv} heads")
        self.positions = self._n_tokens // tpv
        qdim = quantizer_dim(qcfg)
        self.qdim = qdim
        self.enc_in = nn.Linear(self.in_channels, width)
        self.encoder = _ResMLP(width, blocks, exp)
        self.to_latent = nn.Linear(width, self.positions * qdim)
        self.from_latent = nn.Linear(self.positions * qdim, width)
        self.decoder = _ResMLP(width, blocks, exp)
        self.dec_out = nn.Linear(width, self.in_channels)
        _init_linear(self)

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}], got {tuple(x.shape)}")
        z = self.to_latent(self.encoder(self.enc_in(x)))
        return z.reshape(x.shape[0], self.positions, self.qdim)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.dec_out(self.decoder(self.from_latent(codes.reshape(codes.shape[0], -1))))

    def forward(self, x):
        q = self.quantizer(self.latents(x))
        return self.decode_codes(q.quantized), q

    def encode(self, x):
        return self.quantizer.encode(self.latents(x))

    def decode_indices(self, indices):
        return self.decode_codes(self.quantizer.indices_to_codes(indices))


def build_model(cfg: dict[str, Any]) -> nn.Module:
    """``cfg["family"]`` is ``spatial`` or ``mlp``; the rest is the architecture (see the presets in train.py)."""
    family = cfg.get("family")
    if family == "spatial":
        return SpatialVQVAE(cfg)
    if family == "mlp":
        return MLPTokenizer(cfg)
    raise ValueError(f"unknown tokenizer family {family!r} (spatial or mlp)")
