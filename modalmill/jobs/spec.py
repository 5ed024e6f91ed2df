"""Job specs: a YAML file saying what to read, which modalities to make with which settings, and where to.

```yaml
name: my-corpus
input: s3://bucket/raw/shard-{00000..00099}.tar   # a pattern (tars or .parquet files), a list of them, or a folder
output: s3://bucket/4m/                            # local path or s3:// root
modalities: [rgb, crop_settings, caption, canny_edge, color_palette, metadata]
seed: 0
batch_size: 16            # samples a shard task gathers before labelling (at least the labelers' own)
shard_size: 1000          # images per shard when the input is a folder; rows per shard of a parquet file
text:                     # the samples' own text (img2dataset: KEY.txt, or a field of KEY.json)
  caption_source: input   # input | model | input_or_model (default: input, or model when `labelers:` names a
                          # labeler that writes caption)
  member: txt             # the member extension holding the text
  json_key: caption       # else this field of the sample's json (null: do not look there)
parquet: {image_column: image, text_column: null, id_column: null}   # parquet input only
shards: "0-9,42"          # optional: only these output shards
decode: {max_size: 768, jpeg_quality: 95}
crops: {n_crops: 4, scale_min: 0.8}
labelers:                 # per-labeler settings, keyed by labeler name; a labeler listed here is
  canny_edge:             # preferred for the modalities it produces
    config: {low_threshold: 50, high_threshold: 150}
    batch_size: 32        # samples per call of this labeler (default: the labeler's own)
    resources: {num_cpus: 1, num_gpus: 0, memory_mb: 0, custom: {}}  # custom: Ray custom resources
    workers: 1            # actor-pool size (model labelers); auto (the default): resized while the job runs
    min_workers: 1        # with workers: auto, the pool's bounds (max_workers: null = no bound)
ray: {address: null, num_cpus: null, shard_cpus: 1, max_retries: 3, batches_in_flight: null,
      bytes_in_flight: null}   # bytes_in_flight: e.g. 2GiB; null: a quarter of a shard task's part of node memory
weights_from: s3://bucket/weights/   # optional: every model labeler without a `weights` setting of its own reads
                                     # PREFIX/<labeler> (staged by `modalmill weights fetch --to PREFIX`);
                                     # MODALMILL_WEIGHTS_FROM does the same for every job
```
Every key is checked: an unknown or mistyped key is an error that names it and suggests the closest one. Paths are
made absolute on the driver (workers run elsewhere): a job file's relative paths against its folder
(:func:`load_job`), those of a spec built in Python or by ``modalmill label`` against the current directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..io import storage
from ..io.crops import CropConfig
from ..io.decode import DecodeConfig
from ..io.readers import ParquetColumns
from ..io.captions import INPUT, MODEL, TextConfig


class JobSpecError(ValueError):
    pass


@dataclass(frozen=True)
class LabelerSettings:
    config: dict = field(default_factory=dict)
    batch_size: int | None = None
    resources: dict = field(default_factory=dict)
    # "auto": sized while the job runs from measured costs, within min/max (pipeline/resize.py, docs/cluster.md;
    # `modalmill plan` projects it beforehand); a whole number fixes the pool
    workers: int | str = "auto"
    min_workers: int = 1
    max_workers: int | None = None

    def __post_init__(self):
        w = self.workers
        if w != "auto" and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"'workers' must be 'auto' or a whole number >= 1, got {w!r}")
        lo, hi = self.min_workers, self.max_workers
        if isinstance(lo, bool) or not isinstance(lo, int) or lo < 1 or (
                hi is not None and (isinstance(hi, bool) or not isinstance(hi, int) or hi < lo)):
            raise ValueError(f"'min_workers' must be a whole number >= 1 and 'max_workers' null or >= it, "
                             f"got {lo!r} and {hi!r}")

    def actors(self) -> int:
        """How many actors a running job starts for this pool."""
        return self.workers if isinstance(self.workers, int) else self.min_workers

    def bounds(self) -> dict:
        """The pool's bounds for :class:`modalmill.pipeline.autoscale.PoolShape`."""
        if isinstance(self.workers, int):
            return {"fixed": self.workers}
        return {"min": self.min_workers, "max": self.max_workers}


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None
    num_cpus: int | None = None
    shard_cpus: float = 1.0
    max_retries: int = 3
    # batches per shard task at the model actors; None: 2 per actor of the pools the task uses, at most 8
    batches_in_flight: int | None = None
    # bytes of decoded samples a shard task holds between decode and write (gathered, at the actors, back but not
    # yet written): a number of bytes or a size such as "512MiB" / "2GB"; None: a quarter of the task's part of its
    # node's memory (pipeline.execute.default_bytes_in_flight, docs/cluster.md)
    bytes_in_flight: int | str | None = None

    def __post_init__(self):
        b = self.batches_in_flight
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"'batches_in_flight' must be a whole number >= 1 or null, got {b!r}")
        if self.bytes_in_flight is not None:
            object.__setattr__(self, "bytes_in_flight", parse_bytes("bytes_in_flight", self.bytes_in_flight))


_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "kib": 2 ** 10, "m": 10 ** 6, "mb": 10 ** 6, "mib": 2 ** 20,
          "g": 10 ** 9, "gb": 10 ** 9, "gib": 2 ** 30}


def parse_bytes(name: str, value: Any) -> int:
    """A size in bytes from a whole number or a string such as '512MiB', '1.5 GB', '800M' (>= 1 MiB)."""
    n = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        num = text.rstrip("kmgib")
        unit = text[len(num):]
        try:
            n = int(float(num) * _UNITS[unit]) if unit in _UNITS and num else None
        except ValueError:
            n = None
    if n is None or n < 2 ** 20:
        raise ValueError(f"'{name}' must be a size of at least 1 MiB (bytes, or e.g. '512MiB', '2GB') or null, "
                         f"got {value!r}")
    return n


@dataclass(frozen=True)
class JobSpec:
    input: Any
    output: str
    modalities: tuple[str, ...]
    name: str = "job"
    seed: int = 0
    batch_size: int = 16
    shard_size: int = 1000
    shards: str | None = None
    decode: DecodeConfig = DecodeConfig()
    crops: CropConfig = CropConfig()
    labelers: dict[str, LabelerSettings] = field(default_factory=dict)
    ray: RaySettings = RaySettings()
    weights_from: str | None = None  # staged weights: PREFIX/<labeler> for each model labeler without its own
    text: TextConfig = TextConfig()
    parquet: ParquetColumns = ParquetColumns()

    def with_overrides(self, **kw) -> "JobSpec":
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    def selected_shards(self, n: int) -> list[int]:
        return parse_shard_selection(self.shards, n)


def parse_shard_selection(text: str | None, n: int) -> list[int]:
    if text in (None, "", "all"):
        return list(range(n))
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise JobSpecError(f"shards: {part!r} is an empty range (write the lower index first)")
                out.update(range(lo, hi + 1))
            elif part:
                out.add(int(part))
        except JobSpecError:
            raise
        except ValueError:
            raise JobSpecError(f"shards: cannot read {part!r} (use e.g. '0-9,42')") from None
    if not out:
        raise JobSpecError(f"shards: {text!r} selects no shard (use e.g. '0-9,42')")
    bad = sorted(i for i in out if not 0 <= i < n)
    if bad:
        shown = f"{bad[:5]}{' and more' if len(bad) > 5 else ''}"
        raise JobSpecError(f"shards: {shown} out of range; the input has {n} shard(s) (0-{n - 1})")
    return sorted(out)


def _check_keys(where: str, given: dict, allowed: list[str]) -> None:
    for k in given:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}"
            raise JobSpecError(f"{where}: unknown key {k!r}{hint}")


def _build(where: str, cls, data: Any):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise JobSpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    _check_keys(where, data, names)
    kwargs = dict(data)
    for f in dataclasses.fields(cls):
        if f.name in kwargs and isinstance(getattr(cls(), f.name, None), tuple) and isinstance(kwargs[f.name], list):
            kwargs[f.name] = tuple(kwargs[f.name])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise JobSpecError(f"{where}: {e}") from None


def _typed(where: str, value: Any, typ: type | tuple, name: str):
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        tname = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise JobSpecError(f"{where}: {name!r} must be {tname}, got {value!r}")
    return value


def job_from_dict(data: dict, where: str = "job") -> JobSpec:
    from ..labelers import LABELERS, load_entry_points
    from ..schemas.modalities import MODALITIES

    if not isinstance(data, dict):
        raise JobSpecError(f"{where}: a job spec is a mapping, got {type(data).__name__}")
    allowed = [f.name for f in dataclasses.fields(JobSpec)]
    _check_keys(where, data, allowed)
    for req in ("input", "output", "modalities"):
        if req not in data or data[req] in (None, "", []):
            raise JobSpecError(f"{where}: {req!r} is required")
    inp = data["input"]
    if not (isinstance(inp, str) or (isinstance(inp, list) and all(isinstance(i, str) for i in inp))):
        raise JobSpecError(f"{where}: 'input' must be a path/pattern or a list of them")
    # every path absolute (against the current directory) here, on the driver: workers run elsewhere
    inp = storage.absolute(inp) if isinstance(inp, str) else [storage.absolute(i) for i in inp]
    mods = data["modalities"]
    if isinstance(mods, str):
        mods = [m.strip() for m in mods.split(",") if m.strip()]
    _typed(where, mods, list, "modalities")
    load_entry_points()  # third-party labelers (entry points) may register modalities of their own
    for m in mods:
        if m not in MODALITIES:
            close = difflib.get_close_matches(str(m), list(MODALITIES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise JobSpecError(f"{where}: unknown modality {m!r}{hint} (see `modalmill modalities`)")
    labelers = {}
    for name, settings in (data.get("labelers") or {}).items():
        if name not in LABELERS:
            close = difflib.get_close_matches(str(name), list(LABELERS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise JobSpecError(f"{where}: labelers: unknown labeler {name!r}{hint} (see `modalmill labelers`)")
        ls = _build(f"{where}: labelers.{name}", LabelerSettings, settings)
        if isinstance(ls.config, dict):
            ls = dataclasses.replace(ls, config=_local_paths_absolute(ls.config, os.getcwd()))
        _check_keys(f"{where}: labelers.{name}.resources", ls.resources,
                    ["num_cpus", "num_gpus", "memory_mb", "custom"])
        custom = ls.resources.get("custom", {})
        if not isinstance(custom, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in custom.values()):
            raise JobSpecError(f"{where}: labelers.{name}.resources.custom must map Ray resource names to amounts "
                               f"(e.g. {{TPU: 1}}), got {custom!r}")
        try:
            LABELERS[name].make_config(ls.config)
        except (TypeError, ValueError) as e:
            raise JobSpecError(f"{where}: labelers.{name}.config: {e}") from None
        labelers[name] = ls
    text = dict(data.get("text") or {}) if isinstance(data.get("text") or {}, dict) else data.get("text")
    if isinstance(text, dict) and text.get("caption_source") is None:
        # default: the input's text, unless the job configures a labeler that writes captions
        text["caption_source"] = MODEL if any("caption" in LABELERS[n].outputs for n in labelers) else INPUT
    spec = JobSpec(
        input=inp,
        output=storage.absolute(_typed(where, data["output"], str, "output")),
        modalities=tuple(dict.fromkeys(mods)),
        name=str(data.get("name", "job")),
        seed=_typed(where, data.get("seed", 0), int, "seed"),
        batch_size=_typed(where, data.get("batch_size", 16), int, "batch_size"),
        shard_size=_typed(where, data.get("shard_size", 1000), int, "shard_size"),
        shards=None if data.get("shards") is None else str(data["shards"]),
        decode=_build(f"{where}: decode", DecodeConfig, data.get("decode")),
        crops=_build(f"{where}: crops", CropConfig, data.get("crops")),
        labelers=labelers,
        ray=_build(f"{where}: ray", RaySettings, data.get("ray")),
        weights_from=None if data.get("weights_from") in (None, "") else storage.absolute(
            _typed(where, data["weights_from"], str, "weights_from")),
        text=_build(f"{where}: text", TextConfig, text),
        parquet=_build(f"{where}: parquet", ParquetColumns, data.get("parquet")),
    )
    if spec.batch_size < 1 or spec.shard_size < 1:
        raise JobSpecError(f"{where}: batch_size and shard_size must be >= 1")
    return spec


PATH_SETTINGS = ("weights", "checkpoint")  # labeler settings that may name a local file or folder


def _local_paths_absolute(config: dict, base: str) -> dict:
    """A labeler config whose ``weights``/``checkpoint`` naming an existing file or folder relative to ``base`` is
    made absolute (a hub id such as ``org/name``, which names nothing here, stays as it is)."""
    out = dict(config)
    for k in PATH_SETTINGS:
        v = out.get(k)
        if isinstance(v, str) and v and "://" not in v and not os.path.isabs(os.path.expanduser(v)):
            p = os.path.join(base, os.path.expanduser(v))
            if os.path.exists(p):
                out[k] = os.path.normpath(p)
    return out


def load_job(path: str, **overrides) -> JobSpec:
    """Read a job YAML. Relative paths in it are resolved against the file's folder: ``input``, ``output``,
    ``weights_from``, and a labeler's ``weights``/``checkpoint`` that names a file or folder there; overrides
    (``output=`` from the command line) against the current directory."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise JobSpecError(f"{path}: no such job file") from None
    except yaml.YAMLError as e:
        raise JobSpecError(f"{path}: not valid YAML: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    if isinstance(data, dict):
        data = dict(data)
        for k in ("input", "output", "weights_from"):
            v = data.get(k)
            if isinstance(v, str) and v:
                data[k] = _resolve(base, v)
            elif isinstance(v, list):
                data[k] = [_resolve(base, x) if isinstance(x, str) else x for x in v]
        if isinstance(data.get("labelers"), dict):
            data["labelers"] = {name: ({**ls, "config": _local_paths_absolute(ls["config"], base)}
                                       if isinstance(ls, dict) and isinstance(ls.get("config"), dict) else ls)
                                for name, ls in data["labelers"].items()}
        data.update({k: v for k, v in overrides.items() if v is not None})
    return job_from_dict(data, where=path)


def _resolve(base: str, p: str) -> str:
    if "://" in p or os.path.isabs(p):
        return p
    return os.path.normpath(os.path.join(base, os.path.expanduser(p)))
