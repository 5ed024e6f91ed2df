"""``modalmill export OUT DEST --layout 4m-folder``: ml-4m's simple hierarchical folder layout.

ml-4m's ``MultiModalDatasetFolder`` (``fourm/data/multimodal_dataset_folder.py``, README_DATA.md) reads
``root/<modality>/<folder>/<name>.<ext>``: it lists the sub-folders of the first modality, walks each modality's
copy of them in sorted order and zips the lists by position, so every modality must hold the same folders and the
same file names. Each modality's transform ``.load(path)`` reads the file by its extension: images with PIL
(``rgb`` .jpg/.png, ``depth`` 16-bit .png, ``normal`` / ``semseg_coco`` / edges .png), ``np.load`` for tokens and
``crop_settings`` (.npy), ``json`` for ``det``, captions, metadata. Those are exactly the members of modalmill's
tars, so each member is written as it is: ``DEST[/<split>]/<modality>/<shard>/<key>.<ext>`` (one folder per shard;
a ``/`` in a key becomes ``__``, as ml-4m takes the file name up to its first dot as the sample's name).

``tokens_only``: only the token modalities, ``crop_settings`` (4M's ``TokTransform`` picks the row of the crop
it uses) and the text-like modalities (det, caption, metadata, ...): a pre-tokenized set without pictures.
``DEST[/<split>]/modalmill_export.json`` records what was written and from where.
"""

from __future__ import annotations

import json
import os

from tqdm import tqdm

from ..io import manifest
from ..io.tars import iter_tar_groups
from ..io import storage
from ..schemas.modalities import TEXT, TOKENS, get_modality

LAYOUTS = ("4m-folder",)


class ExportError(ValueError):
    pass


def _kind(m: str) -> str | None:
    try:
        return get_modality(m).kind
    except KeyError:
        return None


def chosen_modalities(markers: dict[str, dict], modalities: list[str] | None, tokens_only: bool) -> list[str]:
    everywhere = set.intersection(*(set(mk.get("modalities", {})) for mk in markers.values()))
    if modalities:
        lacking = {m: sorted(s for s, mk in markers.items() if m not in mk.get("modalities", {}))
                   for m in modalities}
        lacking = {m: s for m, s in lacking.items() if s}
        if lacking:
            m, shards = next(iter(lacking.items()))
            raise ExportError(f"{m!r} is missing from {len(shards)} shard(s) (e.g. {shards[0]}); ml-4m's folder "
                              f"dataset needs every sample in every modality")
        chosen = list(dict.fromkeys(modalities))
    else:
        chosen = sorted(everywhere)
    if tokens_only:
        chosen = [m for m in chosen if _kind(m) in (TOKENS, TEXT) or m in ("crop_settings", "sam_instance")]
        if not any(_kind(m) == TOKENS for m in chosen):
            raise ExportError("--tokens-only: the output has no token modality (run `modalmill tokenize` first)")
    return chosen


def export_folder(out: str, dest: str, *, modalities: list[str] | None = None, split: str | None = None,
                  tokens_only: bool = False, layout: str = "4m-folder", show_progress: bool = True) -> dict:
    """Write the completed shards of ``out`` in ml-4m's folder layout under ``dest`` (local); returns a summary."""
    if layout not in LAYOUTS:
        raise ExportError(f"--layout {layout!r}: supported layouts are {', '.join(LAYOUTS)}")
    markers = manifest.list_markers(out)
    if not markers:
        raise ExportError(f"{out}: no completed shards to export")
    mods = chosen_modalities(markers, modalities, tokens_only)
    root = os.path.join(os.path.abspath(os.path.expanduser(dest)), split) if split else os.path.abspath(dest)
    taken = [m for m in mods if os.path.isdir(os.path.join(root, m)) and os.listdir(os.path.join(root, m))]
    if taken:
        raise ExportError(f"{root}: {taken[0]}/ already holds files; export into an empty folder")
    n = 0
    for shard, mk in tqdm(sorted(markers.items()), desc="export", unit="shard", disable=not show_progress):
        keys = list(mk["keys"])
        for m in mods:
            folder = os.path.join(root, m, shard)
            os.makedirs(folder, exist_ok=True)
            got = []
            for key, members in iter_tar_groups(storage.join(out, m, f"{shard}.tar")):
                got.append(key)
                for ext, data in members.items():
                    with open(os.path.join(folder, f"{key.replace('/', '__')}.{ext}"), "wb") as f:
                        f.write(data)
            if got != keys:
                raise ExportError(f"{out}/{m}/{shard}.tar: its keys differ from the shard's marker (run "
                                  f"`modalmill check {out}`)")
        n += len(keys)
    summary = {"output": out, "dest": root, "layout": layout, "modalities": mods, "shards": len(markers),
               "samples": n, "tokens_only": tokens_only}
    with open(os.path.join(root, "modalmill_export.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
