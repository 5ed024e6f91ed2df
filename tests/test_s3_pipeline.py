"""End to end through a real S3 server on loopback (SeaweedFS, credentials enforced): read shards from a
bucket, write the output to a bucket, and get exactly the bytes of the local run."""

import hashlib
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.jobs.runner import run_job
from modalmill.jobs.spec import job_from_dict

pytestmark = [pytest.mark.s3, pytest.mark.slow]
MODS = ["rgb", "crop_settings", "canny_edge", "color_palette", "metadata"]


def test_s3_in_s3_out_equals_local_run(ray_local, s3_env, demo_corpus, tmp_path):
    server, bucket = s3_env
    client = server.client()
    for name in sorted(os.listdir(demo_corpus)):
        client.upload_file(os.path.join(demo_corpus, name), bucket, f"raw/{name}")

    local = tmp_path / "local"
    run_job(job_from_dict({"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": str(local),
                           "modalities": MODS}), show_progress=False)

    env = {**os.environ, **server.env()}
    cmd = [sys.executable, "-m", "modalmill", "label", f"s3://{bucket}/raw/shard-{{00000..00001}}.tar",
           f"s3://{bucket}/out", "-m", ",".join(MODS), "--no-progress", "--num-cpus", "2"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert server.secret_key not in r.stdout + r.stderr and server.access_key not in r.stdout + r.stderr

    for m in MODS:
        for shard in ("shard-00000", "shard-00001"):
            remote = client.get_object(Bucket=bucket, Key=f"out/{m}/{shard}.tar")["Body"].read()
            assert hashlib.sha256(remote).hexdigest() == hashlib.sha256(
                (local / m / f"{shard}.tar").read_bytes()).hexdigest(), f"{m}/{shard}"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/_modalmill/")["Contents"]}
    assert {"out/_modalmill/shards/shard-00000.json", "out/_modalmill/manifest/shard-00001.parquet"} <= keys
    assert not [k for k in keys if ".tmp" in k]
    for k in keys:  # credentials never reach manifests, markers or run records
        body = client.get_object(Bucket=bucket, Key=k)["Body"].read()
        assert server.secret_key.encode() not in body and server.access_key.encode() not in body, k

    # the second run does nothing; status reads the S3 output (the CLI in this process: s3_env set its S3 settings)
    r = CliRunner().invoke(main, cmd[3:])
    assert r.exit_code == 0 and "0 shard(s) processed, 2 already done" in r.stdout, r.output
    r = CliRunner().invoke(main, ["status", f"s3://{bucket}/out"])
    assert r.exit_code == 0 and "2 done" in r.stdout, r.output
