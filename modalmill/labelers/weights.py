"""Finding and loading model weights safely.

A weights location is a local file or directory, an ``s3://`` URL (file or prefix, downloaded into a local
cache, ``MODALMILL_WEIGHTS_CACHE``, keyed by the URL and the objects' ETag/size/LastModified, so a replaced
object is fetched again and an unchanged one is not; when S3 cannot be reached, the most recently used cached
copy is used, with a warning; a cached version unused for ``MODALMILL_WEIGHTS_CACHE_KEEP_DAYS`` (default 7) is
removed once the URL holds another version), or a model-hub id (``org/name``, only when online; with
``HF_HUB_OFFLINE=1`` it must already be in the local hub cache). State dicts load from ``.safetensors`` or with
``torch.load(weights_only=True)`` only: nothing is ever unpickled as arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time

from ..io import storage

logger = logging.getLogger(__name__)

CACHE_DIR = os.environ.get("MODALMILL_WEIGHTS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "modalmill",
                                                                   "weights"))
# a cached version of an s3:// URL that has not been used for this long is removed when another version is in use
KEEP_UNUSED_S = float(os.environ.get("MODALMILL_WEIGHTS_CACHE_KEEP_DAYS", "7")) * 86400
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class WeightsError(RuntimeError):
    """Weights are missing or do not fit the model; the message says what was expected and where to get it."""


def resolve(location: str, *, expected: str = "", how_to_get: str = "") -> str:
    """A local path holding the weights at ``location`` (downloaded/cached when remote)."""
    hint = (f" Expected: {expected}." if expected else "") + (f" Get it: {how_to_get}." if how_to_get else "")
    if not location:
        raise WeightsError(f"no weights location given.{hint}")
    if storage.is_s3(location):
        return _from_s3(location, hint)
    path = os.path.expanduser(location[7:] if location.startswith("file://") else location)
    if os.path.exists(path):
        return path
    if _HUB_ID.match(location) and not location.startswith((".", "/")):
        return _from_hub(location, hint)
    raise WeightsError(f"weights not found at {location!r}.{hint}")


def _from_s3(url: str, hint: str) -> str:
    """The local copy of the weights at ``url`` (an object or a prefix), keyed by the URL *and* the version of
    what is there (every object's ETag, size and LastModified): an unchanged object is used from the cache, a
    replaced one is downloaded again. A version is downloaded into a staging directory and renamed into place
    in one step, so a cached version is always complete, even when several processes fetch it at once."""
    url_dir = os.path.join(CACHE_DIR, "s3", hashlib.sha256(url.encode()).hexdigest()[:24])
    for _attempt in range(3):
        try:
            objects = _s3_version(url)
        except ConnectionError as e:
            cached = _newest_version(url_dir)
            if cached is None:
                raise WeightsError(f"cannot reach S3 for {url!r} and no copy is cached ({e}).{hint}") from None
            logger.warning("%s: S3 unreachable (%s); using the cached copy %s, which may be out of date",
                           url, e, cached)
            return _single_or_dir(cached)
        except PermissionError as e:
            raise WeightsError(f"cannot read the weights at {url!r}: {e}.{hint}") from None
        if not objects:
            raise WeightsError(f"weights not found at {url!r} (no such object or prefix).{hint}")
        dest = os.path.join(url_dir, hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()[:16])
        if os.path.isdir(dest):
            return _in_use(dest)
        os.makedirs(url_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".tmp-", dir=url_dir)
        try:
            for obj in objects:
                if os.path.isabs(obj["path"]) or ".." in obj["path"].split("/"):
                    raise WeightsError(f"{obj['url']}: refusing an S3 key that would land outside the cache")
                target = os.path.join(staging, obj["path"])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with storage.open_read(obj["url"]) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)
            if _s3_version(url) != objects:  # replaced while we read it: what we have may be a mix
                logger.warning("%s changed while it was downloaded; downloading it again", url)
                continue
            with open(os.path.join(staging, ".source.json"), "w") as f:
                json.dump({"url": url, "objects": objects}, f, indent=1, sort_keys=True)
            try:
                os.rename(staging, dest)  # atomic; fails when another process installed this version first
            except OSError:
                if not os.path.isdir(dest):
                    raise
            return _in_use(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    raise WeightsError(f"{url!r} kept changing while it was downloaded (3 attempts); try again later.{hint}")


def _s3_version(url: str) -> list[dict]:
    """What is at ``url`` now: the object itself or every object under the prefix, each with the path it gets in
    the cache and its ETag, size and LastModified (sorted by path); empty when there is nothing."""
    from botocore.exceptions import ClientError

    bucket, _, key = url[5:].partition("/")
    client = storage.s3_client()
    with storage._s3_errors(url, "read the weights' metadata"):  # botocore errors -> clear built-in errors
        if key and not key.endswith("/"):
            try:
                head = client.head_object(Bucket=bucket, Key=key)
                return [{"url": url, "path": os.path.basename(key), "etag": head.get("ETag", ""),
                         "size": int(head["ContentLength"]), "modified": str(head.get("LastModified", ""))}]
            except ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                    raise
        prefix = key.rstrip("/") + "/" if key else ""
        out = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", ()):
                if not o["Key"].endswith("/"):
                    out.append({"url": f"s3://{bucket}/{o['Key']}", "path": o["Key"][len(prefix):],
                                "etag": o.get("ETag", ""), "size": int(o["Size"]),
                                "modified": str(o.get("LastModified", ""))})
    return sorted(out, key=lambda o: o["path"])


def _in_use(dest: str) -> str:
    """Mark the cached version ``dest`` as used now, remove the URL's other versions (and staging directories of
    killed downloads) unused for :data:`KEEP_UNUSED_S`, and return the path to load. A version is first renamed
    to a hidden name, in one step, then deleted: no process ever sees half of one; a process that has it open
    keeps reading it (POSIX)."""
    os.utime(dest)
    url_dir, now = os.path.dirname(dest), time.time()
    for name in os.listdir(url_dir):
        old = os.path.join(url_dir, name)
        if old == dest:
            continue
        if name.startswith(".gone-"):  # left by a process killed while deleting it
            shutil.rmtree(old, ignore_errors=True)
            continue
        try:
            if not os.path.isdir(old) or now - os.path.getmtime(old) <= KEEP_UNUSED_S:
                continue
            gone = os.path.join(url_dir, f".gone-{name}-{os.getpid()}")
            os.rename(old, gone)
        except OSError:  # another process removed or renamed it first
            continue
        logger.info("weights cache: removed %s (unused for %.0f days)", old, KEEP_UNUSED_S / 86400)
        shutil.rmtree(gone, ignore_errors=True)
    return _single_or_dir(dest)


def _newest_version(url_dir: str) -> str | None:
    """The most recently used cached version of a URL (None when there is none)."""
    try:
        versions = [os.path.join(url_dir, d) for d in os.listdir(url_dir) if not d.startswith(".")]
    except FileNotFoundError:
        return None
    versions = [v for v in versions if os.path.isdir(v)]
    return max(versions, key=os.path.getmtime) if versions else None


def _single_or_dir(dest: str) -> str:
    entries = [e for e in os.listdir(dest) if not e.startswith(".")]
    return os.path.join(dest, entries[0]) if len(entries) == 1 and os.path.isfile(os.path.join(dest, entries[0])) \
        else dest


def _from_hub(repo_id: str, hint: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
    except Exception as e:  # noqa: BLE001 - any hub failure is "not available here"
        offline = " (HF_HUB_OFFLINE=1: only the local hub cache is used)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise WeightsError(f"cannot get {repo_id!r} from the model hub{offline}: {type(e).__name__}.{hint}") from None


def load_state_dict(path: str) -> dict:
    """A flat ``{name: tensor}`` from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{path}: cannot load as a weights-only torch checkpoint ({type(e).__name__}: {e}); "
                           "only tensors are accepted, never pickled objects") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def load_into(model, state: dict, *, where: str, strict: bool = True) -> None:
    """Load ``state`` into ``model``; a mismatch is a WeightsError listing missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    shape_bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                 if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if shape_bad or (strict and (missing or unexpected)):
        parts = []
        if shape_bad:
            parts.append("shape mismatch: " + "; ".join(shape_bad[:5]))
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:5]}")
        raise WeightsError(f"{where}: checkpoint does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=strict)


def content_hash(path: str) -> str:
    """sha256 (first 16 hex) over a weights file, or over every file of a weights directory (sorted)."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if not f.startswith("."))
    for f in files:
        h.update(os.path.relpath(f, path if os.path.isdir(path) else os.path.dirname(path)).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def files_hash(files: list[str]) -> str:
    """One id (sha256, 16 hex) for weights that are several files found apart (e.g. models bundled in a package):
    over each file's name and :func:`content_hash`, in the order given."""
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.basename(f).encode())
        h.update(content_hash(f).encode())
    return h.hexdigest()[:16]


def _stat_key(path: str) -> list:
    """What identifies the bytes of a weights file or directory without reading them: each file's relative name,
    size, inode, mtime and ctime (ctime cannot be set back by a copy tool, so a file rewritten in place changes
    it)."""
    path = os.path.abspath(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if not f.startswith("."))
    base = path if os.path.isdir(path) else os.path.dirname(path)
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.relpath(f, base), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns])
    return out


def cached_content_hash(path: str) -> str:
    """:func:`content_hash` of ``path``, remembered on disk (``CACHE_DIR/hashes/``) by each file's size, inode,
    mtime and ctime: a checkpoint that has not changed is hashed once per machine, not once per job or actor; one
    that is replaced (even at the same path, with the same size) is hashed again. Combined with :func:`resolve`'s
    ETag/size/LastModified-keyed copy of ``s3://`` weights, an unchanged remote checkpoint is neither downloaded
    nor read again."""
    key = _stat_key(path)
    memo = os.path.join(CACHE_DIR, "hashes", hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:24] + ".json")
    try:
        with open(memo) as f:
            saved = json.load(f)
        if saved.get("files") == key:
            return saved["hash"]
    except (OSError, ValueError, KeyError):
        pass
    digest = content_hash(path)
    if _stat_key(path) == key:  # not changed while it was read
        try:
            os.makedirs(os.path.dirname(memo), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(memo))
            with os.fdopen(fd, "w") as f:
                json.dump({"path": os.path.abspath(path), "files": key, "hash": digest}, f)
            os.replace(tmp, memo)
        except OSError:  # a read-only cache only costs a re-hash next time
            pass
    return digest



def needs_download(location: str) -> bool:
    """True when resolving ``location`` would first download it from the model hub or the web (a hub id not in the
    local hub cache, while downloads are allowed): the driver then leaves fetching it to the workers instead of
    downloading a big checkpoint only to hash it. Local paths and ``s3://`` (whose cached copy is checked by
    ETag/size/LastModified and fetched only when it changed) are never "needs download"; with ``HF_HUB_OFFLINE=1``
    nothing is, so a hub id missing from the cache fails on the driver in one line."""
    if not location or storage.is_s3(location) or location.startswith(("file://", ".", "/", "~")):
        return False
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.path.exists(os.path.expanduser(location)):
        return False
    if "://" in location:  # another remote scheme (e.g. https://): fetched by the workers
        return True
    if not _HUB_ID.match(location):
        return False
    try:
        from huggingface_hub import snapshot_download

        repo, _, rev = location.partition("@")
        snapshot_download(repo, revision=rev or None, local_files_only=True)
        return False
    except Exception:  # noqa: BLE001 - not in the local hub cache (or no huggingface_hub)
        return True
