"""Every command's exit code (docs/cli.md, "Exit codes"), and the CLI paths no other test ran: --shards
selections (good, out of range, malformed), --only, --force, an unwritable output (one line), and `modalmill demo`
failing visibly when its job has failed samples (so `make demo` fails too).

Runs that need Ray use the session's embedded Ray through click's runner (the real `main`, in-process); the
ones that must prove "one line on stderr" run the real CLI as a subprocess."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.io import lease
from modalmill.jobs.democorpus import build_corpus, jpeg_bytes, photos, write_shard
from modalmill.jobs.spec import JobSpecError, parse_shard_selection

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODS = "rgb,crop_settings,canny_edge"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sub(*args, env=None):
    return subprocess.run([f"{BIN}/python", "-m", "modalmill", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def tars(root, mod):
    d = os.path.join(root, mod)
    return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest() for n in sorted(os.listdir(d))}


def test_shard_selection_parsing():
    assert parse_shard_selection("0-9,42", 43) == list(range(10)) + [42]
    assert parse_shard_selection(" 3 , 1-2 ", 5) == [1, 2, 3] and parse_shard_selection(None, 3) == [0, 1, 2]
    assert parse_shard_selection("all", 2) == [0, 1]
    for text, msg in [("0-9,42", r"\[42\] out of range; the input has 42 shard\(s\) \(0-41\)"),
                      ("a-b", "cannot read 'a-b'"), ("5-3", "'5-3' is an empty range"), ("1;2", "cannot read '1;2'"),
                      (",", "selects no shard"), ("-1", "cannot read '-1'"), ("100-200", r"\[100, 101, 102, 103, "
                                                                                       r"104\] and more out of range")]:
        with pytest.raises(JobSpecError, match=msg):
            parse_shard_selection(text, 42)


def test_label_shards_only_force_and_their_exit_codes(ray_local, demo_corpus, tmp_path):
    inp = os.path.join(demo_corpus, "shard-{00000..00001}.tar")
    out = str(tmp_path / "out")
    # --shards: only shard 1 is made
    r = cli("label", inp, out, "-m", MODS, "--shards", "1", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "1 shard(s) processed" in r.output and sorted(os.listdir(os.path.join(out, "rgb"))) == ["shard-00001.tar"]
    # out of range and malformed selections: one line, exit 1, nothing written
    for bad, msg in [("0-2", "[2] out of range"), ("x", "cannot read 'x'"), ("1-0", "empty range")]:
        r = cli("label", inp, out, "-m", MODS, "--shards", bad, "--no-progress")
        assert r.exit_code == 1 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
    # the rest; then a rerun is all done (exit 0)
    assert cli("label", inp, out, "-m", MODS, "--no-progress").exit_code == 0
    r = cli("label", inp, out, "-m", MODS, "--no-progress")
    assert r.exit_code == 0 and "0 shard(s) processed, 2 already done" in r.output
    before = {m: tars(out, m) for m in MODS.split(",")}
    # --only adds one modality to every shard, leaving the others' bytes alone
    r = cli("label", inp, out, "-m", MODS + ",color_palette", "--only", "color_palette", "--no-progress")
    assert r.exit_code == 0 and "2 shard(s) processed" in r.output, r.output
    assert {m: tars(out, m) for m in MODS.split(",")} == before and len(tars(out, "color_palette")) == 2
    # other settings: refused (exit 1, naming shards and modality) until --force; --force recomputes
    r = cli("label", inp, out, "-m", MODS, "--n-crops", "2", "--no-progress")
    assert r.exit_code == 1 and "['crop_settings'] were made with other settings" in r.output, r.output
    r = cli("label", inp, out, "-m", MODS, "--n-crops", "2", "--force", "--no-progress")
    assert r.exit_code == 0 and "2 shard(s) processed" in r.output, r.output
    assert tars(out, "crop_settings") != before["crop_settings"] and tars(out, "rgb") == before["rgb"]
    # --force with the original settings gives the original bytes back (deterministic)
    r = cli("label", inp, out, "-m", MODS, "--force", "--no-progress")
    assert r.exit_code == 0 and {m: tars(out, m) for m in MODS.split(",")} == before


def test_exit_codes_3_and_4(ray_local, tmp_path):
    pics = photos()
    good = [("a", {"jpg": jpeg_bytes(pics["coffee"][:96, :96])}), ("b", {"jpg": jpeg_bytes(pics["rocket"][:96, :96])})]
    write_shard(str(tmp_path / "in" / "shard-00000.tar"), good)
    write_shard(str(tmp_path / "in" / "shard-00001.tar"), good[:1] + [("bad", {"jpg": b"\xff\xd8\xffgarbage"})])
    os.makedirs(tmp_path / "in" / "shard-00002.tar")  # unreadable as a tar: that shard fails
    inp = str(tmp_path / "in" / "shard-{00000..00002}.tar")
    r = cli("label", inp, tmp_path / "out3", "-m", "rgb", "--shards", "0-1", "--no-progress")
    assert r.exit_code == 3 and "1 failed" in r.output, r.output
    r = cli("label", inp, tmp_path / "out4", "-m", "rgb", "--no-progress")
    assert r.exit_code == 4 and "failed shard shard-00002" in r.output, r.output
    r = cli("status", tmp_path / "out4", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["shards_failed"] == 1


def test_exit_codes_without_a_job_1_2_5(tmp_path, demo_corpus):
    inp = os.path.join(demo_corpus, "shard-{00000..00001}.tar")
    # 2: usage errors (click)
    r = sub("label", inp)
    assert r.returncode == 2 and "Missing argument" in r.stderr
    r = sub("label", inp, tmp_path / "o", "--no-such-flag")
    assert r.returncode == 2
    # 1: config error
    r = sub("label", inp, tmp_path / "o", "-m", "rgb,nope")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == ["error: " + r.stderr.split("error: ", 1)[1].strip()]
    # 1: check with violations; 0: status and check of a clean output are covered by test_check / test_cli
    (tmp_path / "bad" / "rgb").mkdir(parents=True)
    (tmp_path / "bad" / "rgb" / "shard-00000.tar").write_bytes(b"not a tar")
    assert sub("check", tmp_path / "bad").returncode == 1
    # 5: another live driver (this test process) holds the output's lease
    out = str(tmp_path / "held")
    with lease.hold(out):
        r = sub("label", inp, out, "--no-progress")
    assert r.returncode == 5, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and f"pid {os.getpid()}" in r.stderr


@pytest.mark.parametrize("where", ["local", "s3"])
def test_unwritable_output_is_exactly_one_line(tmp_path, demo_corpus, where, request):
    if where == "local":
        (tmp_path / "afile").write_text("x")
        out, env = str(tmp_path / "afile" / "out"), None
    else:
        server, _ = request.getfixturevalue("s3_env")
        out, env = "s3://no-such-bucket-for-modalmill/out", server.env()
    r = sub("label", os.path.join(demo_corpus, "shard-00000.tar"), out, "-m", "rgb", "--no-progress", env=env)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and r.stdout == "", r.stderr
    assert ("afile" if where == "local" else "no-such-bucket-for-modalmill") in lines[0]


@pytest.mark.slow
def test_demo_with_failed_samples_exits_non_zero_and_says_what_it_skipped(ray_local, tmp_path):
    work = tmp_path / "demo"
    corpus = work / "corpus"
    build_corpus(str(corpus), n_shards=2, per_shard=2, size_range=(96, 128))
    pics = photos()  # shard 1 gets a sample that cannot be decoded
    write_shard(str(corpus / "shard-00001.tar"),
                [("ok", {"jpg": jpeg_bytes(pics["coffee"][:96, :96]), "txt": b"a cup of coffee"}),
                 ("bad", {"jpg": b"\xff\xd8\xffgarbage", "txt": b"not a picture"})])
    r = cli("demo", "--workdir", work, "--no-progress")
    assert r.exit_code == 3, r.output[-3000:]
    assert "1 failed" in r.stdout
    assert "skipped: tokenizer training and tokenization, because the labeling job did not finish cleanly " \
           "(1 sample(s) failed; exit 3)" in r.stderr, r.stderr[-2000:]
    assert not (work / "output" / "_modalmill" / "tokenizers").exists()
