"""Render one sample of an output as a single PNG: every modality as a titled picture in a grid.

``show_sample(root, key)`` finds the sample (through the completion markers, or by scanning the tars of an
output without markers), reads its member from every modality tar of that shard, decodes each with the
registry's codec and draws one panel per modality:

- ``rgb``: the stored image; ``crop_settings``: the crops as rectangles on it (crop 0 thick, ``f`` = flipped);
- ``depth``: turbo colour map (2nd-98th percentile); ``normal``: the normal image; edges: the edge map;
- ``semseg_coco``: classes as a colour overlay on the rgb (255 = unlabelled stays clear), largest classes
  labelled with their ids; ``sam_instance``: crop 0 of the rgb at 224x224 with each instance's contours filled;
- ``det``: boxes on the rgb (score >= the detector's box threshold bold and coloured, the rest thin grey);
  ``human_poses``: each person's box (scaled from the original image) with its 8 pose token ids (a skeleton
  from the SMPL parameters would need the SMPL body model, which modalmill does not ship);
  ``pose_keypoints``: the 33 MediaPipe landmarks and their skeleton; ``ocr``: text-line polygons and their
  text; ``sam_mask``: each instance's polygons filled on the rgb; ``person_mask``: the mask tinted over the rgb;
- ``color_palette``: swatches, one row per k = 1..7; ``caption`` and ``metadata``: text;
- feature maps (``clip``, ``dinov2``, ``imagebind`` ``[n_crops, h, w, C]``): the first three principal
  components as RGB, up to four crops side by side; ``t5_caption``: the same over the token embeddings (one row
  per caption, padding grey); global vectors (``[n_crops, C]``): crop 0's as a diverging heat grid;
- token modalities: each crop's ids as a grid (a colour per id), up to four crops side by side.

Decoding tokens back into pictures: ``tokenizers={"tok_rgb@224": PATH}`` (``--tokenizer M=PATH``) loads a
4M-format tokenizer through ``modalmill.tokenize`` (see :class:`TokenDecoder`) and shows the decoded crops
instead of the id grid. Tokenizers whose tokens decode to vectors, or whose decoder is a diffusion model, raise
:class:`TokenizerUnavailable` with a one-line reason.

One module per kind of picture, each registering its renderers in :mod:`.registry` (by modality name, else by
kind): :mod:`.images` (pictures of their own), :mod:`.overlays` (labels drawn over the rgb), :mod:`.features`
(PCA and heat grids), :mod:`.text` (text-like modalities), :mod:`.tokens` (id grids, decoded tokens); the
shared drawing helpers are in :mod:`.canvas`, the grid in :mod:`.grid`, finding and reading a sample in
:mod:`.sample`. Pillow, numpy and OpenCV's colour maps only (no matplotlib).
"""

from __future__ import annotations

# The renderer modules register themselves in .registry when imported: import every one of them here.
from . import features, images, overlays, text, tokens  # noqa: F401
from .canvas import BG, COLUMNS, HEADER_H, INK, PAD, PANEL, TITLE_H, Context, id_colours, pca_rgb
from .grid import Panel, ShowResult, render_values
from .overlays import POSE_EDGES, SCORE_THRESHOLD, hash_name
from .registry import KIND_RENDERERS, RENDERERS, Renderer, renderer_for, renders
from .sample import default_path, find_sample, read_sample, show_sample
from .tokens import TokenDecoder, TokenizerUnavailable, load_tokenizers, parse_tokenizers

__all__ = [
    "BG", "COLUMNS", "HEADER_H", "INK", "KIND_RENDERERS", "PAD", "PANEL", "POSE_EDGES", "RENDERERS", "SCORE_THRESHOLD",
    "TITLE_H", "Context", "Panel", "Renderer", "ShowResult", "TokenDecoder", "TokenizerUnavailable", "default_path",
    "find_sample", "hash_name", "id_colours", "load_tokenizers", "parse_tokenizers", "pca_rgb", "read_sample",
    "render_values", "renderer_for", "renders", "show_sample",
]
