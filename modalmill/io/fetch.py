"""Fetch weights by location into the local weights cache (:data:`modalmill.io.hashes.CACHE_DIR`).

A weights location is one of:

- a local file or directory (``file://`` optional);
- an ``s3://`` URL (file or prefix), downloaded into the cache, ``MODALMILL_WEIGHTS_CACHE``, keyed by the URL
  and the objects' ETag/size/LastModified, so a replaced object is fetched again and an unchanged one is not;
  when S3 cannot be reached, the most recently used cached copy is used, with a warning; a cached version unused
  for ``MODALMILL_WEIGHTS_CACHE_KEEP_DAYS`` (default 7) is removed once the URL holds another version;
- an ``https://`` (or ``http://``) URL, downloaded once into the same cache (:func:`_from_http`): verified
  against the pinned sha256 when one is known (a mismatch is an error naming the file and both hashes), written
  to a partial file that a later run resumes (HTTP ``Range``) after an interruption, and renamed into place in
  one step, so a cached file is always complete and verified, even when several processes fetch it at once;
- a model-hub id, ``org/name`` or ``org/name@revision`` (only when online; with ``HF_HUB_OFFLINE=1`` it must
  already be in the local hub cache); a pinned file of the snapshot is checked against its sha256;
- any of these naming a tarball (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) followed by
  ``#member/path``: that one member, extracted (streaming, once) into the cache.

A ``pin`` is what is known of a default location (:class:`modalmill.labelers.pins.Pin`, or anything with its
``sha256``, ``size`` and ``file`` attributes): the fetched file is checked against it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any

from . import hashes, storage
from .hashes import sha256_file, verified_sha256

logger = logging.getLogger(__name__)


# a cached version of an s3:// URL that has not been used for this long is removed when another version is in use
KEEP_UNUSED_S = float(os.environ.get("MODALMILL_WEIGHTS_CACHE_KEEP_DAYS", "7")) * 86400
# https downloads: attempts (each resumes where the last one stopped) and the pause before the next one
HTTP_ATTEMPTS = int(os.environ.get("MODALMILL_WEIGHTS_HTTP_ATTEMPTS", "4"))
HTTP_BACKOFF_S = float(os.environ.get("MODALMILL_WEIGHTS_HTTP_BACKOFF_S", "2"))
HTTP_TIMEOUT_S = float(os.environ.get("MODALMILL_WEIGHTS_HTTP_TIMEOUT_S", "60"))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
_TAR_EXTS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class WeightsError(RuntimeError):
    """Weights are missing or do not fit the model; the message says what was expected and where to get it."""


def split_member(location: str) -> tuple[str, str | None]:
    """``(tarball location, member)`` for ``...tar.gz#path/in/tar``; ``(location, None)`` otherwise."""
    base, sep, member = location.partition("#")
    if sep and member and base.lower().endswith(_TAR_EXTS):
        return base, member
    return location, None


def offline() -> bool:
    """No downloads at all (https or hub): ``MODALMILL_WEIGHTS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``."""
    return os.environ.get("MODALMILL_WEIGHTS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


def is_http(location: str) -> bool:
    return location.startswith(("https://", "http://"))


def is_hub_id(location: str) -> bool:
    return bool(_HUB_ID.match(location)) and not location.startswith((".", "/")) and not os.path.exists(location)


def resolve(location: str, *, expected: str = "", how_to_get: str = "", pin: Any = None) -> str:
    """A local path holding the weights at ``location`` (downloaded, verified and cached when remote).

    ``pin`` (the registry's knowledge of a default location) is checked: the sha256 of an https:// file or tarball,
    or of ``pin.file`` in a hub snapshot."""
    hint = (f" Expected: {expected}." if expected else "") + (f" Get it: {how_to_get}." if how_to_get else "")
    if not location:
        raise WeightsError(f"no weights location given.{hint}")
    base, member = split_member(location)
    if member is not None:
        tarball = resolve(base, expected=expected, how_to_get=how_to_get, pin=pin)
        return _tar_member(tarball, member, hint)
    if storage.is_s3(location):
        return _from_s3(location, hint)
    if is_http(location):
        return _from_http(location, pin, hint)
    path = os.path.expanduser(location[7:] if location.startswith("file://") else location)
    if os.path.exists(path):
        if pin is not None and pin.sha256 and os.path.isfile(path):
            check_sha256(path, pin.sha256, what=location)
        return path
    if is_hub_id(location):
        return _from_hub(location, pin, hint)
    raise WeightsError(f"weights not found at {location!r}.{hint}")


def cached(location: str, pin: Any = None) -> str | None:
    """The local path of ``location`` if it is already here (local, or in the weights/hub cache), else None.
    Never touches the network."""
    if not location:
        return None
    base, member = split_member(location)
    if member is not None:
        tarball = cached(base, pin)
        if tarball is None:
            return None
        final = os.path.join(_member_dir(tarball, member), os.path.basename(member))
        return final if os.path.isfile(final) else None
    if storage.is_s3(location):
        v = _newest_version(os.path.join(hashes.CACHE_DIR, "s3", hashlib.sha256(location.encode()).hexdigest()[:24]))
        return _single_or_dir(v) if v else None
    if is_http(location):
        final = _http_paths(location, pin)[2]
        return final if os.path.isfile(final) and os.path.isfile(_http_marker(final)) else None
    path = os.path.expanduser(location[7:] if location.startswith("file://") else location)
    if os.path.exists(path):
        return path
    if is_hub_id(location):
        try:
            from huggingface_hub import snapshot_download

            repo, _, rev = location.partition("@")
            return snapshot_download(repo, revision=rev or None, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the hub cache
            return None
    return None


def check_sha256(path: str, sha256: str, *, what: str = "") -> None:
    """Raise a WeightsError naming the file and both hashes unless ``path`` has the sha256 ``sha256``."""
    got = verified_sha256(path)
    if got != sha256:
        raise WeightsError(f"{os.path.basename(path)}{' (' + what + ')' if what else ''}: sha256 mismatch: expected "
                           f"{sha256}, got {got} ({path}); not the pinned weights")


def _from_s3(url: str, hint: str) -> str:
    """The local copy of the weights at ``url`` (an object or a prefix), keyed by the URL *and* the version of
    what is there (every object's ETag, size and LastModified): an unchanged object is used from the cache, a
    replaced one is downloaded again. A version is downloaded into a staging directory and renamed into place
    in one step, so a cached version is always complete, even when several processes fetch it at once."""
    url_dir = os.path.join(hashes.CACHE_DIR, "s3", hashlib.sha256(url.encode()).hexdigest()[:24])
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
    with storage.s3_errors(url, "read the weights' metadata"):  # botocore errors -> clear built-in errors
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


def _from_hub(location: str, pin: Any, hint: str) -> str:
    repo_id, _, revision = location.partition("@")
    local_only = offline()
    try:
        from huggingface_hub import snapshot_download

        # weights of other frameworks are never read here: do not download them; nor pickled copies of weights the
        # pin says are read from safetensors
        ignore = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite", "flax_model*", "tf_model*", "rust_model*",
                  "coreml/*", "onnx/*", "openvino/*"]
        if pin is not None and (pin.file or "").endswith(".safetensors"):
            ignore += ["*.bin", "*.pt", "*.pth", "*.ckpt"]
        path = snapshot_download(repo_id, revision=revision or None, local_files_only=local_only,
                                 ignore_patterns=ignore)
    except Exception as e:  # noqa: BLE001 - any hub failure is "not available here"
        why = " (downloads are off: only the local hub cache is used)" if local_only else ""
        raise WeightsError(f"cannot get {location!r} from the model hub{why}: {type(e).__name__}.{hint}") from None
    if pin is not None and pin.sha256:
        file = os.path.join(path, pin.file or "model.safetensors")
        if not os.path.isfile(file):
            raise WeightsError(f"{location}: the pinned file {pin.file or 'model.safetensors'} is not in the hub "
                               f"snapshot {path}.{hint}")
        check_sha256(file, pin.sha256, what=location)
    return path


# ---------------------------------------------------------------------- https://


def _url_filename(url: str) -> str:
    from urllib.parse import unquote, urlsplit

    name = os.path.basename(unquote(urlsplit(url).path)) or "download"
    return re.sub(r"[^\w.=+-]", "_", name)


def _http_paths(url: str, pin: Any) -> tuple[str, str, str]:
    """(directory of the URL in the cache, directory of this version, the cached file)."""
    url_dir = os.path.join(hashes.CACHE_DIR, "https", hashlib.sha256(url.encode()).hexdigest()[:24])
    version = os.path.join(url_dir, pin.sha256[:16] if pin is not None and pin.sha256 else "unpinned")
    return url_dir, version, os.path.join(version, _url_filename(url))


def _http_marker(final: str) -> str:
    return os.path.join(os.path.dirname(final), ".source.json")


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock (flock) on ``path``: one process downloads a file, the others wait and then use it."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _from_http(url: str, pin: Any, hint: str) -> str:
    """The cached, verified local copy of the file at ``url`` (downloaded once; see the module docstring)."""
    url_dir, version, final = _http_paths(url, pin)
    if os.path.isfile(final) and os.path.isfile(_http_marker(final)):
        return final
    if offline():
        raise WeightsError(f"{url} is not in the weights cache ({hashes.CACHE_DIR}) and downloads are off "
                           f"(HF_HUB_OFFLINE=1 or MODALMILL_WEIGHTS_OFFLINE=1).{hint}")
    os.makedirs(url_dir, exist_ok=True)
    key = os.path.basename(version)
    with _locked(os.path.join(url_dir, f".lock-{key}")):
        if os.path.isfile(final) and os.path.isfile(_http_marker(final)):  # another process finished it meanwhile
            return final
        partial = os.path.join(url_dir, f".partial-{key}")
        _download(url, partial, pin.size if pin is not None else None, hint)
        digest = sha256_file(partial)
        if pin is not None and pin.sha256 and digest != pin.sha256:
            size = os.path.getsize(partial)
            os.remove(partial)  # a wrong file is not resumed from
            raise WeightsError(f"{os.path.basename(final)} ({url}): sha256 mismatch: expected {pin.sha256}, got "
                               f"{digest} ({size} bytes downloaded, removed); not the pinned weights.{hint}")
        if pin is None or not pin.sha256:
            logger.warning("%s: no pinned sha256 is known; downloaded %s (sha256 %s) is used as it is", url,
                           os.path.basename(final), digest)
        staging = tempfile.mkdtemp(prefix=".tmp-", dir=url_dir)
        try:
            os.rename(partial, os.path.join(staging, os.path.basename(final)))
            with open(os.path.join(staging, ".source.json"), "w") as f:
                json.dump({"url": url, "sha256": digest, "size": os.path.getsize(os.path.join(staging, os.path.basename(
                    final))), "pinned": bool(pin is not None and pin.sha256), "fetched": time.time()}, f, indent=1)
            if os.path.isdir(version):  # an incomplete version (no marker) from an older, killed layout
                shutil.rmtree(version, ignore_errors=True)
            os.rename(staging, version)  # atomic: the version appears complete and verified, or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        hashes.remember_sha256(final, digest)  # so that later checks of this file cost nothing
    return final


def _download(url: str, partial: str, size: int | None, hint: str) -> None:
    """Download ``url`` into ``partial``, resuming what is already there (HTTP Range); retried on connection errors,
    each attempt resuming. A server that ignores Range gets the file from the start again."""
    import http.client
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    last: BaseException | None = None
    for attempt in range(max(1, HTTP_ATTEMPTS)):
        if attempt:
            time.sleep(HTTP_BACKOFF_S * attempt)
        have = os.path.getsize(partial) if os.path.exists(partial) else 0
        if size is not None and have == size:
            return
        if size is not None and have > size:
            os.remove(partial)
            have = 0
        headers = {"User-Agent": "modalmill-weights"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=HTTP_TIMEOUT_S) as r:
                resumed = have > 0 and r.status == 206
                if have and not resumed:
                    logger.info("%s: the server does not resume (HTTP %s); downloading from the start", url, r.status)
                    have = 0
                length = r.headers.get("Content-Length")
                total = have + int(length) if length is not None else size
                if resumed:
                    logger.info("%s: resuming at byte %d", url, have)
                with open(partial, "ab" if resumed else "wb") as f, \
                        tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=f"weights {os.path.basename(url)[:40]}", leave=False) as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            got = os.path.getsize(partial)
            if total is not None and got < total:
                raise http.client.IncompleteRead(b"", total - got)
            if size is not None and got != size:
                raise WeightsError(f"{url}: downloaded {got} bytes, the pinned size is {size}.{hint}")
            return
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # asked past the end: what we have is no prefix of this file; start over
                os.remove(partial)
                last = e
                continue
            if e.code in (401, 403, 404, 410):
                raise WeightsError(f"cannot download {url}: HTTP {e.code} {e.reason}.{hint}") from None
            last = e
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as e:
            last = e
            logger.warning("%s: download interrupted (%s: %s); %d bytes kept, resuming", url, type(e).__name__, e,
                           os.path.getsize(partial) if os.path.exists(partial) else 0)
    kept = os.path.getsize(partial) if os.path.exists(partial) else 0
    raise WeightsError(f"cannot download {url} ({HTTP_ATTEMPTS} attempts; last: {type(last).__name__}: {last}); "
                       f"{kept} bytes are kept in the cache and the next run resumes from there.{hint}")


# ---------------------------------------------------------------------- tarball members


def _member_dir(tarball: str, member: str) -> str:
    st = os.stat(tarball)
    key = f"{os.path.realpath(tarball)}|{st.st_size}|{st.st_mtime_ns}|{_norm_member(member)}"
    return os.path.join(hashes.CACHE_DIR, "members", hashlib.sha256(key.encode()).hexdigest()[:24])


def _norm_member(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def _tar_member(tarball: str, member: str, hint: str) -> str:
    """The file ``member`` of the local ``tarball``, extracted once (streaming; nothing else is written) into the
    cache and renamed into place in one step."""
    import tarfile

    want = _norm_member(member)
    if not want or ".." in want.split("/"):
        raise WeightsError(f"{tarball}: refusing the tarball member {member!r}")
    dest = _member_dir(tarball, member)
    final = os.path.join(dest, os.path.basename(want))
    if os.path.isfile(final):
        return final
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(dest))
    seen = []
    try:
        try:
            with tarfile.open(tarball, "r|*") as tf:
                for m in tf:
                    name = _norm_member(m.name)
                    if name != want:
                        if len(seen) < 8 and m.isfile():
                            seen.append(name)
                        continue
                    if not m.isfile():
                        raise WeightsError(f"{tarball}: member {member!r} is not a regular file.{hint}")
                    src = tf.extractfile(m)
                    with open(os.path.join(staging, os.path.basename(want)), "wb") as dst:
                        shutil.copyfileobj(src, dst, 8 << 20)
                    break
                else:
                    raise WeightsError(f"{tarball}: no member {member!r} in the tarball (it holds e.g. "
                                       f"{seen}).{hint}")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise WeightsError(f"{tarball}: cannot read it as a tarball ({type(e).__name__}: {e}).{hint}") from None
        try:
            os.rename(staging, dest)
        except OSError:
            if not os.path.isfile(final):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


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
