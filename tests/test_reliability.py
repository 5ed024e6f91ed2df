"""Reliability: dirty inputs, dying workers, a dying driver, flaky or full storage — nothing lost, nothing
duplicated, nothing corrupt. docs/reliability.md maps each fault to the test here that proves it."""

import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from click.testing import CliRunner

import tests.labelers_for_tests  # noqa: F401  (registers the fault-injecting labelers)
from modalmill.cli import main
from modalmill.jobs.democorpus import build_corpus, jpeg_bytes, photos, write_shard
from modalmill.jobs.runner import EXIT_OK, EXIT_SAMPLES_FAILED, EXIT_SHARDS_FAILED, run_job
from modalmill.jobs.spec import job_from_dict, load_job
from modalmill.io import manifest, storage
from modalmill.schemas import get_modality
from tests.badimages import CASES, EXPECTED

MODS = ["rgb", "crop_settings", "canny_edge", "metadata"]


def job(inp, out, modalities=MODS, **kw):
    return job_from_dict({"input": str(inp), "output": str(out), "modalities": list(modalities),
                          "batch_size": 4, "crops": {"n_crops": 2}, **kw})


def read_tar(path):
    """Every member of an output tar, parsed fully (raises on a corrupt tar)."""
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def assert_output_sound(out):
    """Every shard tar of every modality parses, every member decodes with its codec, keys align per shard."""
    out = str(out)
    markers = manifest.list_markers(out)
    for shard, marker in markers.items():
        keys = None
        for m in marker["modalities"]:
            members = read_tar(os.path.join(out, m, f"{shard}.tar"))
            spec = get_modality(m)
            for name, data in members:
                assert not name.startswith("/") and ".." not in name.split("/"), name
                spec.decode(data)
            k = [n.split(".", 1)[0] for n, _ in members]
            assert keys is None or k == keys, f"{shard}/{m} misaligned"
            keys = k
        assert keys == marker["keys"]
    for dirpath, _, files in os.walk(out):
        assert not [f for f in files if ".tmp-" in f], f"temporary files left in {dirpath}"


def rows_by_key(out):
    return {r["key"]: r for r in manifest.read_manifest(str(out)).to_pylist()}


# ---------------------------------------------------------------------------------------------- bad inputs

def _ext(name):
    for ext in ("png", "gif", "webp", "bmp", "ppm", "tiff"):  # others (html, svg, ico, ...) arrive named .jpg
        if ext in name:
            return "tif" if ext == "tiff" else ext
    return "jpg"


@pytest.fixture(scope="module")
def dirty_run(tmp_path_factory, ray_local):
    d = tmp_path_factory.mktemp("dirty")
    inp, out = d / "in", d / "out"
    photo = jpeg_bytes(photos()["astronaut"][:120, :160])
    # shard 0: every bad / odd image file, one sample each
    write_shard(str(inp / "shard-00000.tar"), [(name, {_ext(name): CASES[name]()}) for name in sorted(CASES)])
    # shard 1: tar-level problems
    members = [("noext", "", photo), ("dup", "jpg", photo), ("other", "jpg", photo), ("dup", "jpg", photo),
               ("../evil", "jpg", photo), ("/abs/evil", "jpg", photo), ("txtonly", "txt", b"no image here"),
               ("ok2", "jpg", photo)]
    os.makedirs(inp, exist_ok=True)
    with tarfile.open(inp / "shard-00001.tar", "w") as t:
        for key, ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}" if ext else key)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    # shard 2: an empty tar
    with tarfile.open(inp / "shard-00002.tar", "w"):
        pass
    # shard 3: a tar cut in the middle of its third sample
    write_shard(str(inp / "full.tar"), [(f"t{i}", {"jpg": photo}) for i in range(4)])
    raw = (inp / "full.tar").read_bytes()
    os.remove(inp / "full.tar")
    (inp / "shard-00003.tar").write_bytes(raw[: 2 * (512 + len(photo) + 512) + 700])
    summary = run_job(job(inp / "shard-{00000..00003}.tar", out), show_progress=False)
    return summary, out, d


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_image_is_processed_or_recorded(dirty_run, case):
    summary, out, _ = dirty_run
    row = rows_by_key(out)[case]
    if EXPECTED[case] == "ok":
        assert row["status"] == "ok", row["error"]
        assert row["modalities"] == MODS
    else:
        assert row["status"] == "failed" and row["stage"] == "decode"
        assert row["error"].startswith(EXPECTED[case]), row["error"]


def test_dirty_job_completes_with_every_sample_accounted_for(dirty_run):
    summary, out, d = dirty_run
    assert summary["exit_code"] == EXIT_SAMPLES_FAILED and summary["shards_failed"] == 0
    rows = rows_by_key(out)
    assert set(CASES) <= set(rows)
    assert_output_sound(out)
    # nothing was written outside the output root
    assert not [p for p in d.rglob("*evil*")]


def test_tar_level_problems(dirty_run):
    _, out, _ = dirty_run
    rows = manifest.read_rows(str(out), "shard-00001")
    by = [(r.key, r.status, r.error or "") for r in rows]
    assert [k for k, _, _ in by] == ["noext", "dup", "other", "dup", "../evil", "/abs/evil", "txtonly", "ok2"]
    status = {(k, i): (s, e) for i, (k, s, e) in enumerate(by)}
    assert status[("noext", 0)][0] == "ok"  # an image with no extension is still an image
    assert status[("dup", 1)][0] == "ok" and "duplicate key" in status[("dup", 3)][1]
    assert "'..'" in status[("../evil", 4)][1] and "absolute path" in status[("/abs/evil", 5)][1]
    assert "no image member" in status[("txtonly", 6)][1]
    assert manifest.read_marker(str(out), "shard-00001")["keys"] == ["noext", "dup", "other", "ok2"]


def test_empty_and_truncated_shards(dirty_run):
    _, out, _ = dirty_run
    empty = manifest.read_marker(str(out), "shard-00002")
    assert empty["keys"] == [] and set(empty["modalities"]) == set(MODS)
    assert all(read_tar(out / m / "shard-00002.tar") == [] for m in MODS)
    cut = manifest.read_marker(str(out), "shard-00003")
    assert cut["keys"] == ["t0", "t1"] and "truncated" in cut["stats"]["truncated"]
    rows = {r.key: r for r in manifest.read_rows(str(out), "shard-00003")}
    assert rows["t2"].status == "failed" and "truncated" in rows["t2"].error


def test_exif_rotated_photo_is_stored_upright(dirty_run):
    _, out, _ = dirty_run
    from tests.badimages import upright_pattern

    members = dict(read_tar(out / "rgb" / "shard-00000.tar"))
    img = get_modality("rgb").decode(members["exif_rot6_jpeg.jpg"])
    want = upright_pattern()
    assert img.shape == want.shape
    assert np.abs(img.astype(int) - want).mean() < 12


# ---------------------------------------------------------------------------------------------- dying workers

@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    build_corpus(str(d), n_shards=2, per_shard=4, size_range=(120, 160))
    return str(d / "shard-{00000..00001}.tar")


def keys_of(out, shard):
    return manifest.read_marker(str(out), shard)["keys"]


@pytest.mark.slow
def test_poisoned_sample_that_kills_the_shard_worker_is_isolated(ray_local, small_corpus, tmp_path):
    clean = tmp_path / "clean"
    run_job(job(small_corpus, clean, ["rgb", "caption"],
                labelers={"test_crash_task": {"config": {}}}), show_progress=False)
    poison = keys_of(clean, "shard-00000")[2]
    out = tmp_path / "out"
    s = run_job(job(small_corpus, out, ["rgb", "caption"],
                    labelers={"test_crash_task": {"config": {"crash_keys": [poison]}}}, ray={"max_retries": 1}),
                show_progress=False)
    assert s["exit_code"] == EXIT_SAMPLES_FAILED and s["shards_failed"] == 0
    row = rows_by_key(out)[poison]
    assert row["status"] == "failed" and row["stage"] == "label:test_crash_task" and "WorkerDied" in row["error"]
    assert keys_of(out, "shard-00000") == [k for k in keys_of(clean, "shard-00000") if k != poison]
    assert keys_of(out, "shard-00001") == keys_of(clean, "shard-00001")
    assert_output_sound(out)


@pytest.mark.slow
@pytest.mark.parametrize("labeler", ["test_crash_task", "test_crash_actor"])
def test_a_worker_that_dies_once_is_retried_and_nothing_is_lost(ray_local, small_corpus, tmp_path, labeler):
    clean, out = tmp_path / "clean", tmp_path / "out"
    run_job(job(small_corpus, clean, ["rgb", "caption"], labelers={labeler: {"config": {}}}), show_progress=False)
    victim = keys_of(clean, "shard-00001")[1]
    (tmp_path / "once").mkdir()
    cfg = {"crash_keys": [victim], "once_dir": str(tmp_path / "once"), "how": "exit"}
    s = run_job(job(small_corpus, out, ["rgb", "caption"], labelers={labeler: {"config": cfg}}), show_progress=False)
    assert s["exit_code"] == EXIT_OK and s["samples_failed"] == 0
    assert os.listdir(tmp_path / "once")  # it really died once
    for shard in ("shard-00000", "shard-00001"):
        for m in ("rgb", "caption", "crop_settings"):
            assert (out / m / f"{shard}.tar").read_bytes() == (clean / m / f"{shard}.tar").read_bytes()


@pytest.mark.slow
def test_poisoned_sample_that_kills_the_actor_is_isolated(ray_local, small_corpus, tmp_path):
    out = tmp_path / "out"
    run_job(job(small_corpus, out, ["rgb"]), show_progress=False)
    poison = keys_of(out, "shard-00001")[0]
    s = run_job(job(small_corpus, out, ["rgb"], labelers={"test_crash_actor": {"config": {"crash_keys": [poison],
                                                                                           "how": "exit"}}}),
                only=["caption"], show_progress=False)
    assert s["exit_code"] == EXIT_SAMPLES_FAILED and s["samples_dropped"] == 1 and s["shards_failed"] == 0
    row = rows_by_key(out)[poison]
    assert row["status"] == "failed" and "WorkerDied" in row["error"]
    assert poison not in keys_of(out, "shard-00001") and len(keys_of(out, "shard-00000")) == 4
    assert_output_sound(out)


def test_out_of_memory_batches_are_split_and_retried(ray_local, small_corpus, tmp_path):
    out = tmp_path / "out"
    s = run_job(job(small_corpus, out, ["rgb", "caption"], batch_size=8,
                    labelers={"test_oom": {"config": {"max_batch": 2}}}), show_progress=False)
    assert s["exit_code"] == EXIT_OK and s["samples_failed"] == 0 and s["samples_written"] == 8
    assert_output_sound(out)


# ---------------------------------------------------------------------------------------------- a dying driver

@pytest.mark.slow
def test_killed_driver_leaves_no_partial_tar_and_rerun_finishes_identically(ray_local, tmp_path):
    corpus = tmp_path / "corpus"
    build_corpus(str(corpus), n_shards=6, per_shard=3, size_range=(100, 140))
    inp = str(corpus / "shard-{00000..00005}.tar")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def jobfile(out, sleep=1.0):
        path = tmp_path / f"job-{out.name}.yaml"
        path.write_text(f"input: '{inp}'\noutput: {out}\nmodalities: [rgb, caption]\nbatch_size: 3\n"
                        f"labelers: {{test_crash_task: {{config: {{sleep: {sleep}}}}}}}\nray: {{num_cpus: 2}}\n")
        return str(path)

    def cli(out):
        # the CLI, with the test-only labelers registered
        return [sys.executable, "-c", "import sys, tests.labelers_for_tests; from modalmill.cli import main; "
                "sys.argv[0] = 'modalmill'; main()", "run", jobfile(out), "--no-progress"]

    # the uninterrupted run of the same job, in this process on the session's Ray
    reference = tmp_path / "reference"
    assert run_job(load_job(jobfile(reference)), show_progress=False)["exit_code"] == EXIT_OK

    out = tmp_path / "out"
    proc = subprocess.Popen(cli(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "_modalmill" / "shards" / "shard-00000.json").exists() and not (
            out / "_modalmill" / "shards" / "shard-00001.json").exists():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = manifest.list_markers(str(out))
    assert 0 < len(done_before) < 6, "the driver should be killed mid-job"
    for m in ("rgb", "caption", "crop_settings"):  # only complete tars are visible under their final names
        for f in os.listdir(out / m) if (out / m).exists() else []:
            if not f.startswith("."):
                read_tar(out / m / f)

    # the rerun: the same CLI command in this process, on the session's Ray (it takes the dead driver's lease over)
    r = CliRunner().invoke(main, ["run", jobfile(out), "--no-progress"])
    assert r.exit_code == 0, r.output[-2000:]
    assert "took over the lease" in r.stderr and f"pid {proc.pid}" in r.stderr, r.stderr
    # workers of the killed driver may have finished a shard or two more before they died: still only complete ones
    already = int(re.search(r"(\d+) already done", r.stdout).group(1))
    assert len(done_before) <= already < 6 and f"{6 - already} shard(s) processed" in r.stdout
    for m in ("rgb", "caption", "crop_settings"):
        for i in range(6):
            name = f"shard-{i:05d}.tar"
            assert (out / m / name).read_bytes() == (reference / m / name).read_bytes(), f"{m}/{name}"
    assert_output_sound(out)


# ---------------------------------------------------------------------------------------------- storage faults

@pytest.mark.slow
@pytest.mark.s3
def test_flaky_s3_is_retried_and_nothing_is_lost(ray_local, flaky_s3, small_corpus, tmp_path, monkeypatch):
    proxy, bucket = flaky_s3
    client = proxy.upstream.client()  # setup and checks go straight to the server
    corpus_dir = os.path.dirname(small_corpus)
    for name in sorted(os.listdir(corpus_dir)):
        client.upload_file(os.path.join(corpus_dir, name), bucket, f"raw/{name}")
    reference = tmp_path / "ref"
    run_job(job(small_corpus, reference, ["rgb", "canny_edge"], batch_size=16, crops={"n_crops": 1}),
            show_progress=False)
    env = {**os.environ, **proxy.env(), "RAY_AUTH_MODE": "disabled"}

    proxy.throttle(times=4)
    proxy.fail(times=3, status=500)
    proxy.drop_body(times=2, after_bytes=2000, method="GET", path_contains="raw/shard-")
    cmd = [sys.executable, "-m", "modalmill", "label", f"s3://{bucket}/raw/shard-{{00000..00001}}.tar",
           f"s3://{bucket}/out", "-m", "rgb,canny_edge", "--no-progress", "--num-cpus", "1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    outcomes = [req.outcome for req in proxy.requests]
    assert sum(o.startswith("drop after") for o in outcomes) == 2
    assert "slowdown" in outcomes and "error 500" in outcomes
    for m in ("rgb", "canny_edge", "crop_settings"):
        for shard in ("shard-00000", "shard-00001"):
            got = client.get_object(Bucket=bucket, Key=f"out/{m}/{shard}.tar")["Body"].read()
            assert got == (reference / m / f"{shard}.tar").read_bytes()

    # a shard whose object always fails is reported failed with the reason; the other one is fine. The same CLI
    # in this process, on the session's Ray (its shard tasks get this process' S3 settings, the proxy's)
    proxy.clear_faults()
    proxy.fail(times=-1, status=500, path_contains="raw/shard-00001")
    cmd[5] = f"s3://{bucket}/out2"
    # fewer attempts keep the test short; the retry path itself was proven above
    monkeypatch.setenv("MODALMILL_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("MODALMILL_S3_READ_RETRIES", "1")
    storage.clear_s3_client_cache()
    r = CliRunner().invoke(main, cmd[3:])
    assert r.exit_code == EXIT_SHARDS_FAILED, r.output[-3000:]
    assert "failed shard shard-00001" in r.stdout and "500" in r.stdout
    assert proxy.requests_matching("GET", "raw/shard-00001")[-1].outcome == "error 500"
    proxy.clear_faults()
    st = CliRunner().invoke(main, ["status", f"s3://{bucket}/out2", "--json"])
    assert '"shards_done": 1' in st.stdout and '"shards_failed": 1' in st.stdout


def test_full_disk_is_a_clear_shard_failure_with_no_partial_files(ray_local, small_corpus, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk")
    try:
        s = run_job(job(small_corpus, small / "out", ["rgb", "canny_edge"]), show_progress=False)
        assert s["exit_code"] == EXIT_SHARDS_FAILED and s["shards_failed"] >= 1
        assert all("No space left on device" in f["error"] for f in s["failed_shards"])
        leftovers = [os.path.join(d, f) for d, _, fs in os.walk(small) for f in fs if ".tmp-" in f]
        assert not leftovers
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_unwritable_output_is_a_one_line_error(tmp_path, small_corpus):
    (tmp_path / "afile").write_text("x")
    r = subprocess.run([sys.executable, "-m", "modalmill", "label", small_corpus, str(tmp_path / "afile" / "out"),
                        "-m", "rgb", "--no-progress"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert r.returncode in (1, EXIT_SHARDS_FAILED) and "Traceback" not in r.stderr
    assert "afile" in r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------- security

def test_checkpoints_never_unpickle_objects(tmp_path):
    import torch

    from modalmill.io.fetch import WeightsError
    from modalmill.labelers.state_dicts import load_state_dict

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    torch.save({"w": torch.zeros(2), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="weights-only"):
        load_state_dict(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert load_state_dict(str(tmp_path / "ok.pt"))["w"].sum() == 2


def test_npy_labels_never_unpickle():
    arr = np.array([{"a": 1}], dtype=object)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    with pytest.raises(ValueError):
        get_modality("crop_settings").decode(buf.getvalue())
