"""The registry of renderers: which function draws which modality.

A renderer takes ``(spec, value, ctx)`` (the modality's :class:`~modalmill.schemas.ModalitySpec`, its decoded
value, the :class:`~modalmill.jobs.show.canvas.Context`) and returns ``(picture, subtitle)``; the picture may be
any size, the grid fits it into its panel. A modality is drawn by the renderer registered for its name, else by
the one registered for its kind (so a plugin's modality of kind ``pixel`` is drawn like an edge map without any
code). The renderer modules of this package register themselves with :func:`renders` when the package is
imported; a plugin may register its own the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

from ...schemas.modalities import ModalitySpec
from .canvas import Context


Renderer = Callable[[ModalitySpec, Any, Context], tuple[Image.Image, str]]

RENDERERS: dict[str, Renderer] = {}  # modality name -> renderer
KIND_RENDERERS: dict[str, Renderer] = {}  # modality kind -> renderer of the modalities with none of their own


def renders(*modalities: str, kind: str | None = None) -> Callable[[Renderer], Renderer]:
    """Decorator: register the function as the renderer of ``modalities`` (by name) and, with ``kind``, of every
    modality of that kind that has no renderer of its own. A later registration replaces an earlier one."""

    def register(fn: Renderer) -> Renderer:
        for m in modalities:
            RENDERERS[m] = fn
        if kind is not None:
            KIND_RENDERERS[kind] = fn
        return fn

    return register


def renderer_for(spec: ModalitySpec) -> Renderer:
    """The renderer of a modality: by name, else by kind. Raises KeyError when there is none."""
    r = RENDERERS.get(spec.name) or KIND_RENDERERS.get(spec.kind)
    if r is None:
        raise KeyError(f"no renderer for modality {spec.name!r} (kind {spec.kind!r})")
    return r
