"""modalmill's implementation of 4M's tokenizer architecture (apple/ml-4m ``fourm/vq``), state-dict compatible.

A 4M tokenizer is ``encoder -> quant_proj (1x1 conv) -> quantizer [-> post_quant_proj -> decoder]``:

- encoders/decoders: a ViT over patches (``patch_proj``: a PxP conv; feature-map tokenizers use a 1x1 conv on the
  teacher's grid) with fixed 2-D sin-cos position embeddings resized bicubically to the input grid, pre-norm
  blocks (LayerNorm eps 1e-6, plain softmax attention, GELU MLP), an optional tanh MLP (``post_mlp``) and, in the
  decoder, a per-token linear head (+ two ConvNeXt blocks with ``out_conv``); or a point-wise MLP
  (``BottleneckMLP/B_<blocks>-Wi_<width>[-Ex_<expansion>]`` or ``MLP/...``) for global vectors and poses;
- quantizers: ``lucid`` (EMA vector quantizer; with ``norm_codes`` cosine similarity of l2-normalised latents and
  codes) and ``memcodes`` (attention over learned codes, one argmax per head);
- semantic segmentation embeds class ids (``n_labels``) with ``cls_emb`` before the encoder.

The config is exactly the constructor arguments of ml-4m's ``VQ``/``VQVAE``/``DiVAE`` (what
``PyTorchModelHubMixin`` writes to ``config.json``) and the parameter names are ml-4m's, so a hub folder
(``config.json`` + ``model.safetensors``) loads here and a folder written here loads in ml-4m's
``VQVAE.from_pretrained``. The forward computation follows ml-4m's operation order so token ids are identical.

ViT sizes are named as in ml-4m (``vit_s_enc``/``vit_b_enc``/``vit_l_enc`` and ``_dec``); modalmill adds
``vit_d<width>_l<depth>_h<heads>_enc`` / ``_dec`` for test-sized tokenizers, which unmodified ml-4m cannot build
(:func:`stock_ml4m_builders`; a test harness registers the same builder in ml-4m's ``vit_models`` module, see
``scripts/make_ml4m_tokenizer_fixtures.py``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# ml-4m's constructor defaults (VQ, then VQVAE); a config.json holds only what differs from them
VQ_DEFAULTS: dict[str, Any] = {
    "image_size": 224, "image_size_enc": None, "n_channels": 3, "n_labels": None, "enc_type": "vit_b_enc",
    "patch_proj": True, "post_mlp": False, "patch_size": 16, "quant_type": "lucid", "codebook_size": 16384,
    "num_codebooks": 1, "latent_dim": 32, "norm_codes": True, "norm_latents": False, "sync_codebook": True,
    "ema_decay": 0.99, "threshold_ema_dead_code": 0.25, "code_replacement_policy": "batch_random",
    "commitment_weight": 1.0, "kmeans_init": False, "undo_std": False,
}
VQVAE_DEFAULTS: dict[str, Any] = {"dec_type": "vit_b_dec", "out_conv": False, "image_size_dec": None,
                                  "patch_size_dec": None}
DIVAE_KEYS = ("num_train_timesteps", "beta_schedule", "prediction_type", "scheduler", "zero_terminal_snr",
              "cls_free_guidance_dropout", "conditioning", "dec_transformer_dropout", "thresholding",
              "clip_sample", "masked_cfg")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------- ViT parts


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """[1, dim, h, w] fixed 2-D sine-cosine position embedding (MoCo v3 layout: sin w, cos w, sin h, cos h)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    gw, gh = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                            indexing="ij")
    quarter = dim // 4
    omega = 1.0 / (temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ow = torch.einsum("m,d->md", gw.flatten(), omega)
    oh = torch.einsum("m,d->md", gh.flatten(), omega)
    emb = torch.cat([torch.sin(ow), torch.cos(ow), torch.sin(oh), torch.cos(oh)], dim=1)[None]
    return rearrange(emb, "b (h w) d -> b d h w", h=h, w=w)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, act=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention computed as softmax(q k^T * d^-0.5) v (no fused kernel, as ml-4m without
    xFormers), so results are bit-identical to ml-4m's on the same device."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3, bias=True), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _init_vit(module: nn.Module) -> None:
    """Xavier-uniform linears (q, k, v treated as separate matrices), zero biases, unit LayerNorms; patch
    projections initialised like a linear layer (as MAE)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            fan_out = m.weight.shape[0] // (3 if name.endswith("qkv") else 1)
            bound = math.sqrt(6.0 / float(fan_out + m.weight.shape[1]))
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d) and name == "proj":
            nn.init.xavier_uniform_(m.weight.data.view(m.weight.shape[0], -1))


def _pos(pos_emb: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    return rearrange(F.interpolate(pos_emb, size=(nh, nw), mode="bicubic", align_corners=False),
                     "b d nh nw -> b (nh nw) d")


class ViTEncoder(nn.Module):
    """Image [B, C, H, W] (or a feature grid with ``patch_proj=False``) -> latent grid [B, dim, H/P, W/P]."""

    def __init__(self, *, in_channels: int = 3, patch_size: int = 16, resolution: int = 224, dim_tokens: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, patch_proj: bool = True,
                 post_mlp: bool = False, **_ignored):
        super().__init__()
        self.in_channels, self.patch_size, self.dim_tokens, self.patch_proj = in_channels, patch_size, dim_tokens, \
            patch_proj
        if resolution % patch_size:
            raise ValueError(f"resolution {resolution} is not a multiple of patch size {patch_size}")
        g = resolution // patch_size
        self.pos_emb = nn.Parameter(sincos_2d(g, g, dim_tokens), requires_grad=False)
        k = patch_size if patch_proj else 1
        self.proj = nn.Conv2d(in_channels, dim_tokens, kernel_size=k, stride=k)
        self.blocks = nn.Sequential(*[Block(dim_tokens, num_heads, mlp_ratio) for _ in range(depth)])
        if post_mlp:
            self.norm_mlp = nn.LayerNorm(dim_tokens, eps=1e-6)
            self.post_mlp = FeedForward(dim_tokens, int(mlp_ratio * dim_tokens), act=nn.Tanh)
        _init_vit(self)

    def forward(self, x):
        if self.patch_proj:
            h, w = x.shape[-2:]
            if h % self.patch_size or w % self.patch_size:
                raise ValueError(f"input {h}x{w} is not a multiple of patch size {self.patch_size}")
            nh, nw = h // self.patch_size, w // self.patch_size
        else:
            nh, nw = x.shape[-2:]
        x = rearrange(self.proj(x), "b d nh nw -> b (nh nw) d") + _pos(self.pos_emb, nh, nw)
        x = self.blocks(x)
        if hasattr(self, "post_mlp"):
            x = x.float() + self.post_mlp(self.norm_mlp(x.float()))
        return rearrange(x, "b (nh nw) d -> b d nh nw", nh=nh, nw=nw)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x):
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ViTDecoder(nn.Module):
    """Latent grid [B, dim, nh, nw] -> image [B, C, nh*P, nw*P] (or a feature grid with ``patch_proj=False``)."""

    def __init__(self, *, out_channels: int = 3, patch_size: int = 16, resolution: int = 224, dim_tokens: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, patch_proj: bool = True,
                 post_mlp: bool = False, out_conv: bool = False, **_ignored):
        super().__init__()
        self.out_channels, self.patch_size, self.dim_tokens, self.patch_proj = out_channels, patch_size, \
            dim_tokens, patch_proj
        g = resolution // patch_size
        self.pos_emb = nn.Parameter(sincos_2d(g, g, dim_tokens), requires_grad=False)
        self.blocks = nn.Sequential(*[Block(dim_tokens, num_heads, mlp_ratio) for _ in range(depth)])
        if post_mlp:
            self.norm_mlp = nn.LayerNorm(dim_tokens, eps=1e-6)
            self.post_mlp = FeedForward(dim_tokens, int(mlp_ratio * dim_tokens), act=nn.Tanh)
        self.out_proj = nn.Linear(dim_tokens, out_channels * (patch_size ** 2 if patch_proj else 1))
        if out_conv:
            self.out_conv = nn.Sequential(ConvNeXtBlock(out_channels), ConvNeXtBlock(out_channels))
        _init_vit(self)

    def forward(self, x):
        nh, nw = x.shape[-2:]
        x = rearrange(x, "b d nh nw -> b (nh nw) d") + _pos(self.pos_emb, nh, nw)
        x = self.blocks(x)
        if hasattr(self, "post_mlp"):
            x = x + self.post_mlp(self.norm_mlp(x))
        p = self.patch_size if self.patch_proj else 1
        x = rearrange(self.out_proj(x), "b (nh nw) (c ph pw) -> b c (nh ph) (nw pw)", nh=nh, nw=nw, ph=p, pw=p,
                      c=self.out_channels)
        if hasattr(self, "out_conv"):
            x = self.out_conv(x)
        return x


VIT_SIZES = {"s": (512, 8, 8), "b": (768, 12, 12), "l": (1024, 24, 16)}  # width, depth, heads (as ml-4m)
_CUSTOM_VIT = re.compile(r"^vit_d(\d+)_l(\d+)_h(\d+)_(enc|dec)$")


def vit_dims(name: str) -> tuple[int, int, int, str]:
    """(width, depth, heads, 'enc'|'dec') of a ViT builder name (``vit_b_enc``, ``vit_d64_l2_h4_dec``, ...)."""
    m = _CUSTOM_VIT.match(name)
    if m:
        return int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
    m = re.match(r"^vit_([sbl])_(enc|dec)$", name)
    if m:
        return (*VIT_SIZES[m.group(1)], m.group(2))
    raise ValueError(f"unknown ViT type {name!r}: use vit_s/b/l_enc|dec or vit_d<width>_l<depth>_h<heads>_enc|dec")


def stock_ml4m_builders(name: str | None) -> bool:
    """Whether unmodified ml-4m builds an encoder/decoder type: its ViT presets (``vit_s/b/l_enc|dec``) and its
    point-wise MLPs (``BottleneckMLP/...``, ``MLP/...``); not modalmill's ``vit_d..`` test sizes."""
    return bool(name) and (re.match(r"^vit_[sbl]_(enc|dec)$", name) is not None
                           or re.match(r"^(BottleneckMLP|MLP)/", name) is not None)


def vit_name(width: int, depth: int, heads: int, part: str) -> str:
    for size, dims in VIT_SIZES.items():
        if dims == (width, depth, heads):
            return f"vit_{size}_{part}"
    return f"vit_d{width}_l{depth}_h{heads}_{part}"


# ---------------------------------------------------------------------- MLP parts (global vectors, poses)


class _Bottleneck(nn.Module):
    def __init__(self, thin: int, wide: int):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(thin, wide), nn.GELU(), nn.Linear(wide, thin))

    def forward(self, x):
        return self.block(x)


class _PointwiseMLP(nn.Module):
    """Applied to each position of a [B, C, H, W] grid (global vectors come as [B, C, 1, 1])."""

    def forward(self, x):
        if x.ndim == 4:
            h, w = x.shape[-2:]
            out = self.mlp(rearrange(x, "b d h w -> b (h w) d"))
            return rearrange(out, "b (h w) d -> b d h w", h=h, w=w)
        return self.mlp(x)


class BottleneckMLP(_PointwiseMLP):
    def __init__(self, dim_in: int, dim_out: int, thin: int, wide: int, blocks: int):
        super().__init__()
        self.dim_in, self.dim_out = dim_in, dim_out
        self.linear_in, self.linear_out = nn.Linear(dim_in, thin), nn.Linear(thin, dim_out)
        self.blocks = nn.ModuleList(_Bottleneck(thin, wide) for _ in range(blocks))
        self.layernorms = nn.ModuleList(nn.LayerNorm(thin) for _ in range(blocks))

    def mlp(self, x):
        x = self.linear_in(x)
        for block, norm in zip(self.blocks, self.layernorms):
            x = x + block(norm(x))
        return self.linear_out(x)


class PlainMLP(_PointwiseMLP):
    def __init__(self, dim_in: int, dim_out: int, width: int, blocks: int):
        super().__init__()
        self.dim_in, self.dim_out = dim_in, dim_out
        self.linear_in, self.linear_out = nn.Linear(dim_in, width), nn.Linear(width, dim_out)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks - 1))
        self.layernorms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks - 1))

    def mlp(self, x):
        z = self.linear_in(x)
        for layer, norm in zip(self.layers, self.layernorms):
            z = layer(norm(z))
        return self.linear_out(z)


def build_mlp(model_id: str, dim_in: int | None, dim_out: int | None) -> nn.Module:
    """``BottleneckMLP/B_<blocks>-Wi_<width>[-Ex_<expansion>]`` or ``MLP/B_<blocks>-Wi_<width>``; a missing input
    or output width defaults to the MLP width."""
    try:
        kind, arch = model_id.split("/")
        parts = arch.split("-")
        blocks, width = int(parts[0].split("_")[1]), int(parts[1].split("_")[1])
        expansion = int(parts[2].split("_")[1]) if len(parts) == 3 else 4
    except (ValueError, IndexError):
        raise ValueError(f"bad MLP type {model_id!r}: expected e.g. BottleneckMLP/B_6-Wi_1024") from None
    dim_in, dim_out = dim_in or width, dim_out or width
    if kind == "BottleneckMLP":
        return BottleneckMLP(dim_in, dim_out, width, expansion * width, blocks)
    if kind == "MLP":
        return PlainMLP(dim_in, dim_out, width, blocks)
    raise ValueError(f"bad MLP type {model_id!r}: BottleneckMLP/... or MLP/...")


# ---------------------------------------------------------------------- quantizers


def l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, p=2, dim=-1)


class _Codebook(nn.Module):
    """The codebook buffers of the 'lucid' quantizer (``embed``, ``cluster_size``, ``initted`` and, for the
    Euclidean variant, ``embed_avg``) with EMA updates and dead-code replacement for training."""

    def __init__(self, dim: int, size: int, cosine: bool, decay: float, threshold_dead: float, kmeans_init: bool,
                 eps: float = 1e-5):
        super().__init__()
        self.cosine, self.decay, self.eps, self.threshold_dead, self.size = cosine, decay, eps, threshold_dead, size
        if kmeans_init:
            embed = torch.zeros(size, dim)
        else:
            embed = torch.empty(size, dim)
            nn.init.kaiming_uniform_(embed)
            if cosine:
                embed = l2norm(embed)
        self.register_buffer("initted", torch.tensor([float(not kmeans_init)]))
        self.register_buffer("cluster_size", torch.zeros(size))
        if not cosine:
            self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("embed", embed)

    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """Nearest code of each row of ``flat`` [N, d] (already l2-normalised for the cosine variant)."""
        if self.cosine:
            return (flat @ l2norm(self.embed).t()).argmax(dim=-1)
        e = self.embed.t()
        dist = -(flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e + e.pow(2).sum(0, keepdim=True))
        return dist.argmax(dim=-1)

    @torch.no_grad()
    def kmeans_init_(self, flat: torch.Tensor, iters: int = 10) -> None:
        means = flat[torch.randperm(len(flat), device=flat.device)[:self.size]] if len(flat) >= self.size else \
            flat[torch.randint(0, len(flat), (self.size,), device=flat.device)]
        bins = torch.zeros(self.size, device=flat.device)
        for _ in range(iters):
            sim = flat @ means.t() if self.cosine else -torch.cdist(flat, means)
            buckets = sim.argmax(-1)
            bins = torch.bincount(buckets, minlength=self.size).float()
            new = torch.zeros_like(means).index_add_(0, buckets, flat) / bins.clamp_min(1)[:, None]
            if self.cosine:
                new = l2norm(new)
            means = torch.where((bins == 0)[:, None], means, new)
        self.embed.copy_(means)
        if hasattr(self, "embed_avg"):
            self.embed_avg.copy_(means)
        self.cluster_size.copy_(bins)
        self.initted.fill_(1.0)

    @torch.no_grad()
    def ema_update_(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        onehot = F.one_hot(idx, self.size).type(flat.dtype)
        bins = onehot.sum(0)
        self.cluster_size.mul_(self.decay).add_(bins, alpha=1 - self.decay)
        embed_sum = flat.t() @ onehot
        if self.cosine:
            zero = bins == 0
            mean = l2norm((embed_sum / bins.masked_fill(zero, 1.0)[None]).t())
            mean = torch.where(zero[:, None], l2norm(self.embed), mean)
            self.embed.mul_(self.decay).add_(mean, alpha=1 - self.decay)
        else:
            self.embed_avg.mul_(self.decay).add_(embed_sum.t(), alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.size * self.eps) * n
            self.embed.copy_(self.embed_avg / smoothed[:, None])
        dead = self.cluster_size < self.threshold_dead
        if self.threshold_dead > 0 and bool(dead.any()):  # replace dead codes by random latents of the batch
            pick = torch.randint(0, len(flat), (int(dead.sum()),), device=flat.device) if len(flat) < int(
                dead.sum()) else torch.randperm(len(flat), device=flat.device)[:int(dead.sum())]
            self.embed[dead] = l2norm(flat[pick])


class LucidQuantizer(nn.Module):
    """4M's 'lucid' vector quantizer: latents [B, D, H, W] -> (codes [B, D, H, W], loss, ids [B, H, W] or
    [B, heads, H, W]); EMA codebook; with ``use_cosine_sim`` (``norm_codes``) latents and codes are compared by
    cosine similarity. Commitment loss = MSE(latent, sg(code)) x ``commitment_weight``."""

    def __init__(self, dim: int, codebook_size: int, heads: int = 1, use_cosine_sim: bool = True, decay: float = 0.99,
                 threshold_ema_dead_code: float = 0.0, commitment_weight: float = 1.0, norm_latents: bool = False,
                 kmeans_init: bool = False):
        super().__init__()
        self.heads, self.codebook_size, self.norm_latents = heads, codebook_size, norm_latents
        self.commitment_weight = commitment_weight
        inner = dim * heads
        self.project_in = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if inner != dim else nn.Identity()
        self._codebook = _Codebook(dim, codebook_size, use_cosine_sim, decay, threshold_ema_dead_code, kmeans_init)

    @property
    def codebook(self) -> torch.Tensor:
        return self._codebook.embed

    def indices_to_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return rearrange(F.embedding(ids, self.codebook), "b h w c -> b c h w")

    def forward(self, x):
        h, w = x.shape[-2:]
        x = self.project_in(rearrange(x, "b c h w -> b (h w) c"))
        if self.heads > 1:
            x = rearrange(x, "b n (h d) -> (b h) n d", h=self.heads)
        if self.norm_latents:
            x = l2norm(x)
        cb = self._codebook
        flat = rearrange(x.float(), "... d -> (...) d")
        if cb.cosine:
            flat = l2norm(flat)
        if self.training and not bool(cb.initted):
            cb.kmeans_init_(flat.detach())
        idx = cb.assign(flat)
        ids = idx.view(*x.shape[:-1])
        quant = F.embedding(ids, cb.embed)
        loss = torch.zeros(1, device=x.device)
        if self.training:
            cb.ema_update_(flat.detach(), idx)
            quant = x + (quant - x).detach()
            if self.commitment_weight > 0:
                loss = loss + F.mse_loss(quant.detach(), x) * self.commitment_weight
        if self.heads > 1:
            quant = rearrange(quant, "(b h) n d -> b n (h d)", h=self.heads)
            ids = rearrange(ids, "(b h) n -> b n h", h=self.heads)
        quant = rearrange(self.project_out(quant), "b (h w) c -> b c h w", h=h, w=w)
        ids = rearrange(ids, "b (h w) ... -> b h w ...", h=h, w=w)
        if self.heads > 1:
            ids = rearrange(ids, "b h w ... -> b ... h w")
        return quant, loss, ids


class Memcodes(nn.Module):
    """4M's 'memcodes' quantizer: per head, attention of the latent over ``codebook_size`` learned codes (keys and
    values are linear maps of the codes); the token is the argmax (straight-through Gumbel softmax when
    training). Latents [B, D, H, W] -> (values [B, D, H, W], 0, ids [B, H, W] or [B, heads, H, W])."""

    def __init__(self, dim: int, codebook_size: int, heads: int = 1, temperature: float = 1.0):
        super().__init__()
        from einops.layers.torch import EinMix

        if dim % heads:
            raise ValueError(f"memcodes: latent width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.codebook_size, self.temperature = dim, heads, codebook_size, temperature
        self.scale = (dim // heads) ** -0.5
        d = dim // heads
        self.codes = nn.Parameter(torch.randn(heads, codebook_size, d))
        self.to_k = EinMix("h n d -> h n c", weight_shape="h d c", h=heads, d=d, c=d)
        self.to_v = EinMix("h n d -> h n c", weight_shape="h d c", h=heads, d=d, c=d)

    def indices_to_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        values = self.to_v(self.codes)  # [heads, n, d]
        if ids.ndim == 3:  # [B, H, W], one head
            ids = ids[:, None]
        b, _, hh, ww = ids.shape
        flat = rearrange(ids, "b k h w -> b k (h w)")
        out = torch.stack([values[k][flat[:, k]] for k in range(self.heads)], dim=1)  # [B, heads, HW, d]
        return rearrange(out, "b k (h w) d -> b (k d) h w", h=hh, w=ww)

    def forward(self, x):
        h, w = x.shape[-2:]
        x = rearrange(x, "b c h w -> b (h w) c")
        if x.shape[-1] != self.dim:
            raise ValueError(f"memcodes expects latent width {self.dim}, got {x.shape[-1]}")
        q = rearrange(x, "b n (h d) -> b h n d", h=self.heads) * self.scale
        k, v = self.to_k(self.codes), self.to_v(self.codes)
        logits = torch.einsum("b h i d, h j d -> b h i j", q, k)
        if self.training:
            attn = F.gumbel_softmax(logits, tau=self.temperature, dim=-1, hard=True)
            ids = attn.argmax(dim=-1)
        else:
            ids = logits.argmax(dim=-1)
            attn = F.one_hot(ids, num_classes=self.codebook_size).float()
        if self.heads == 1:
            ids = ids.squeeze(1)
        out = rearrange(torch.einsum("b h i j, h j d -> b h i d", attn, v), "b h n d -> b n (h d)")
        out = rearrange(out, "b (h w) c -> b c h w", h=h, w=w)
        if self.heads == 1:
            ids = rearrange(ids, "b (h w) -> b h w", h=h, w=w)
        else:
            ids = rearrange(ids, "b n (h w) -> b n h w", h=h, w=w)
        return out, torch.zeros(1, device=x.device), ids


# ---------------------------------------------------------------------- the tokenizer


@dataclass
class QuantOut:
    indices: torch.Tensor
    aux_loss: torch.Tensor



@dataclass(frozen=True)
class FourMSpec:
    """What a 4M tokenizer takes and makes, read from its config alone (no weights)."""

    image_size: int
    patch_size: int
    n_channels: int
    n_labels: int | None
    patch_proj: bool
    is_global: bool
    codebook_size: int
    num_codebooks: int
    kind: str

    @classmethod
    def of(cls, config: dict[str, Any]) -> FourMSpec:
        c = {**VQ_DEFAULTS, **config}
        return cls(int(c["image_size"]), int(c["patch_size"]), int(c["n_channels"]),
                   None if c["n_labels"] is None else int(c["n_labels"]), bool(c["patch_proj"]),
                   "MLP" in str(c["enc_type"]), int(c["codebook_size"]), int(c["num_codebooks"]), model_kind(config))

    @property
    def grid(self) -> int:
        return 1 if self.is_global else self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        return self.grid * self.grid * max(1, self.num_codebooks)


def model_kind(config: dict[str, Any]) -> str:
    """'VQVAE' or 'DiVAE' (a diffusion decoder: UNet/UViT ``dec_type`` or diffusion settings in the config)."""
    dec = str(config.get("dec_type") or "")
    if dec.startswith(("unet", "uvit")) or any(k in config for k in DIVAE_KEYS):
        return "DiVAE"
    return "VQVAE"


class FourMTokenizer(nn.Module):
    """A 4M tokenizer (ml-4m's ``VQ`` + the ``VQVAE`` ViT/MLP decoder) built from ml-4m's constructor arguments.

    ``with_decoder=False`` builds only the encoder and quantizer (all tokenizing needs; DiVAE configs always
    build it this way since their diffusion decoders are not implemented here). ``tokenize(x)`` returns ids as
    4M's ``save_vq_tokens.py`` stores them: [B, n_tokens] (row-major grid, or one per head for global vectors)."""

    def __init__(self, config: dict[str, Any], with_decoder: bool = True):
        super().__init__()
        cfg = {**VQ_DEFAULTS, **VQVAE_DEFAULTS, **{k: v for k, v in config.items() if k != "config"}}
        self.config = dict(config)
        self.kind = model_kind(config)
        self.image_size, self.patch_size = int(cfg["image_size"]), int(cfg["patch_size"])
        self.n_channels, self.n_labels = int(cfg["n_channels"]), cfg["n_labels"]
        self.latent_dim, self.undo_std = int(cfg["latent_dim"]), bool(cfg["undo_std"])
        self.enc_type, self.quant_type = str(cfg["enc_type"]), str(cfg["quant_type"])
        self.codebook_size, self.num_codebooks = int(cfg["codebook_size"]), int(cfg["num_codebooks"])
        self.patch_proj = bool(cfg["patch_proj"])
        if self.n_labels is not None:
            self.cls_emb = nn.Embedding(int(self.n_labels), self.n_channels)
        enc_size = int(cfg["image_size_enc"] or self.image_size)
        if "vit" in self.enc_type:
            width, depth, heads, part = vit_dims(self.enc_type)
            if part != "enc":
                raise ValueError(f"enc_type {self.enc_type!r} is a decoder")
            self.encoder = ViTEncoder(in_channels=self.n_channels, patch_size=self.patch_size, resolution=enc_size,
                                      dim_tokens=width, depth=depth, num_heads=heads, patch_proj=self.patch_proj,
                                      post_mlp=bool(cfg["post_mlp"]))
            enc_dim = width
        elif "MLP" in self.enc_type:
            self.encoder = build_mlp(self.enc_type, self.n_channels, None)
            enc_dim = self.encoder.dim_out
        else:
            raise ValueError(f"enc_type {self.enc_type!r} is not a 4M encoder (vit_*_enc or (Bottleneck)MLP/...)")
        self.quant_proj = nn.Conv2d(enc_dim, self.latent_dim, 1)
        if self.quant_type == "lucid":
            self.quantize = LucidQuantizer(self.latent_dim, self.codebook_size, heads=self.num_codebooks,
                                           use_cosine_sim=bool(cfg["norm_codes"]), decay=float(cfg["ema_decay"]),
                                           threshold_ema_dead_code=float(cfg["threshold_ema_dead_code"]),
                                           commitment_weight=float(cfg["commitment_weight"]),
                                           norm_latents=bool(cfg["norm_latents"]), kmeans_init=bool(cfg["kmeans_init"]))
        elif self.quant_type == "memcodes":
            self.quantize = Memcodes(self.latent_dim, self.codebook_size, heads=self.num_codebooks)
        else:
            raise ValueError(f"quant_type {self.quant_type!r} is not supported (lucid or memcodes)")
        self.has_decoder = bool(with_decoder) and self.kind == "VQVAE"
        if self.has_decoder:
            out_ch = self.n_channels if self.n_labels is None else int(self.n_labels)
            dec_type = str(cfg["dec_type"])
            dec_size = int(cfg["image_size_dec"] or self.image_size)
            dec_patch = int(cfg["patch_size_dec"] or self.patch_size)
            if "vit" in dec_type:
                width, depth, heads, part = vit_dims(dec_type)
                if part != "dec":
                    raise ValueError(f"dec_type {dec_type!r} is an encoder")
                self.decoder = ViTDecoder(out_channels=out_ch, patch_size=dec_patch, resolution=dec_size,
                                          dim_tokens=width, depth=depth, num_heads=heads, patch_proj=self.patch_proj,
                                          post_mlp=bool(cfg["post_mlp"]), out_conv=bool(cfg["out_conv"]))
                dec_dim = width
            elif "MLP" in dec_type:
                self.decoder = build_mlp(dec_type, None, out_ch)
                dec_dim = self.decoder.dim_in
            else:
                raise ValueError(f"dec_type {dec_type!r} is not a 4M VQ-VAE decoder")
            self.post_quant_proj = nn.Conv2d(self.latent_dim, dec_dim, 1)

    # ------------------------------------------------------------------ geometry
    @property
    def is_global(self) -> bool:
        return "MLP" in self.enc_type

    @property
    def grid(self) -> int:
        """Tokens per side of the input (1 for MLP tokenizers)."""
        if self.is_global:
            return 1
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        heads = self.num_codebooks if self.num_codebooks > 1 else 1
        return self.grid * self.grid * heads

    @property
    def vocab_size(self) -> int:
        return self.codebook_size

    # ------------------------------------------------------------------ forward
    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.undo_std:
            mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
            std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)[:, None, None]
            x = 2.0 * (x * std + mean) - 1.0
        if self.n_labels is not None:
            x = rearrange(self.cls_emb(x), "b h w c -> b c h w")
        return x

    def encode(self, x: torch.Tensor):
        """(quantized latents [B, D, h, w], codebook loss, ids [B, h, w] or [B, heads, h, w])."""
        h = self.quant_proj(self.encoder(self.prepare_input(x)))
        return self.quantize(h)

    def encode_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids [B, n_tokens] (int64)."""
        ids = self.encode(x)[2]
        if ids.shape[-1] == 1:  # global tokenizers: [B, heads, 1, 1] -> [B, heads, 1]
            ids = ids.squeeze(2)
        return rearrange(ids, "b h w -> b (h w)") if ids.ndim == 3 else ids.reshape(ids.shape[0], -1)

    def ids_to_grid(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, n_tokens] -> the quantizer's id layout ([B, h, w] or [B, heads, 1, 1])."""
        if self.is_global or self.num_codebooks > 1:
            return ids.reshape(ids.shape[0], self.num_codebooks, self.grid, self.grid) if self.num_codebooks > 1 \
                else ids.reshape(ids.shape[0], self.grid, self.grid)
        return ids.reshape(ids.shape[0], self.grid, self.grid)

    def _need_decoder(self) -> None:
        if not self.has_decoder:
            raise ValueError(f"this {self.kind} tokenizer was loaded without a decoder"
                             + (" (diffusion decoders are not implemented in modalmill: decode with ml-4m's "
                                "DiVAE.decode_tokens)" if self.kind == "DiVAE" else ""))

    def decode_quant(self, quant: torch.Tensor) -> torch.Tensor:
        self._need_decoder()
        return self.decoder(self.post_quant_proj(quant))

    def decode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids [B, n_tokens] -> reconstruction (the decoder's output space: [-1, 1] images, class logits, ...)."""
        self._need_decoder()
        return self.decode_quant(self.quantize.indices_to_embedding(self.ids_to_grid(ids)))

    @property
    def quantizer(self) -> nn.Module:
        return self.quantize

    def decode_indices(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decode_tokens(ids)

    def forward(self, x: torch.Tensor):
        """Training: (reconstruction, :class:`QuantOut` with the ids and the quantizer's loss)."""
        quant, loss, ids = self.encode(x)
        return self.decode_quant(quant), QuantOut(ids, loss.sum())
