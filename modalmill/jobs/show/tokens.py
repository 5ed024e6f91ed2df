"""Token modalities: each crop's ids as a grid (a colour per id), or, with ``--tokenizer M=PATH``, the crops decoded
back into pictures through a ``modalmill.tokenize`` checkpoint (:class:`TokenDecoder`)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ...schemas.modalities import MODALITIES, TOKENS
from .canvas import INK, _draw_text, _fit, _font, _hstack, id_colours
from .registry import renders


class TokenizerUnavailable(ValueError):
    """``--tokenizer`` names a tokenizer whose tokens cannot be shown as pictures (vectors, diffusion decoders)."""


def _token_grid(ids: np.ndarray) -> np.ndarray:
    t = len(ids)
    side = round(float(np.sqrt(t)))
    cols = side if side * side == t else int(np.ceil(np.sqrt(t)))
    rows = -(-t // cols)
    grid = np.full(rows * cols, -1, np.int64)
    grid[:t] = ids
    cells = id_colours(np.maximum(grid, 0))
    cells[grid < 0] = 255
    return cells.reshape(rows, cols, 3)


@renders(kind=TOKENS)
def _r_tokens(spec, value, ctx):
    v = np.asarray(value)
    if v.ndim == 1:
        v = v[None]
    tok = ctx.tokenizers.get(spec.name)
    if tok is not None:
        decoded = np.asarray(tok.decode_tokens(v))
        tiles = [Image.fromarray(d.astype(np.uint8)) for d in decoded[:4]]
        return _hstack([_fit(t, 150) for t in tiles]), f"decoded with the tokenizer, {len(v)} crop(s)"
    tiles = []
    for row in v[:4]:
        grid = _token_grid(row)
        tile = _fit(Image.fromarray(grid), 150, nearest=True)
        if len(row) <= 16:  # small grids: write the ids into the cells
            draw = ImageDraw.Draw(tile)
            font = _font(11)
            gh, gw = grid.shape[:2]
            for j, tid in enumerate(row.tolist()):
                r, c = divmod(j, gw)
                _draw_text(draw, (c * tile.width / gw + 3, r * tile.height / gh + 3), str(tid), INK, font)
        tiles.append(tile)
    vocab = f", vocab {spec.vocab_size}" if spec.vocab_size else ""
    return (_hstack(tiles, labels=[f"crop {i}" for i in range(len(tiles))]),
            f"{v.shape[0]}x{v.shape[1]} ids{vocab}, {len(np.unique(v))} distinct")


def parse_tokenizers(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["tok_rgb@224=/ckpt/rgb", ...]`` -> {modality: path}, validated."""
    out = {}
    for item in items:
        m, sep, path = item.partition("=")
        if not sep or not m or not path:
            raise ValueError(f"--tokenizer {item!r}: expected MODALITY=PATH, e.g. tok_rgb@224=/ckpt/tok_rgb")
        spec = MODALITIES.get(m)
        if spec is None or spec.kind != TOKENS:
            raise ValueError(f"--tokenizer {item!r}: {m!r} is not a token modality "
                             f"({', '.join(n for n, s in MODALITIES.items() if s.kind == TOKENS)})")
        out[m] = path
    return out


class TokenDecoder:
    """Token ids -> pictures through a 4M-format tokenizer (``modalmill.tokenize.checkpoint.load_tokenizer``).

    Uses the VQ-VAE's ``decode_indices(ids [B, T]) -> output`` and the source modality's 4M-space adapter
    (``modalmill.tokenize.fourm_train.train_adapter_for``: ``reconstruct`` then ``to_rgb``). DiVAE tokenizers
    (diffusion decoders) are refused with a one-line message.
    Only tokenizers of image-like modalities decode to pictures; vector tokenizers (global embeddings, poses)
    are refused with a clear error.
    """

    def __init__(self, modality: str, path: str):
        from ...tokenize.checkpoint import load_tokenizer
        from ...tokenize.fourm_train import train_adapter_for

        model, config = load_tokenizer(path)
        mine = config.get("modalmill") or {}
        made_for = mine.get("token_modality")
        if made_for and made_for != modality:
            raise ValueError(f"--tokenizer {modality}={path}: this checkpoint makes {made_for!r}, not {modality!r}")
        source = mine.get("modality") or MODALITIES[modality].source
        self.adapter = train_adapter_for(source, model)
        if self.adapter.kind == "vector":
            raise TokenizerUnavailable(f"--tokenizer {modality}={path}: {source} tokens decode to vectors, not "
                                       "pictures; they are shown as id grids")
        if not model.has_decoder:
            raise TokenizerUnavailable(f"--tokenizer {modality}={path}: a {model.kind} (diffusion decoder): "
                                       "modalmill does not run diffusion decoders; decode with ml-4m's "
                                       "DiVAE.decode_tokens(ids, timesteps=N); shown as id grids")
        self.model, self.config = model, config

    def decode_tokens(self, ids: np.ndarray) -> np.ndarray:
        """[n_crops, T] ids -> uint8 [n_crops, S, S, 3] pictures."""
        import torch

        with torch.inference_mode():
            pred = self.model.decode_indices(torch.as_tensor(np.asarray(ids, np.int64)))
        rec = self.adapter.reconstruct(pred.float()).cpu()
        return np.stack([self.adapter.to_rgb(r) for r in rec])


def load_tokenizers(paths: dict[str, str]) -> dict[str, TokenDecoder]:
    """Load the tokenizers named by ``--tokenizer`` (raises :class:`TokenizerUnavailable` without issue 4)."""
    return {m: TokenDecoder(m, path) for m, path in paths.items()}
