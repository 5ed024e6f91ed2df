"""`modalmill dedup`: exact, perceptual and semantic duplicates on real photos with planted variants, on Ray."""

import os

import numpy as np
import pytest
from click.testing import CliRunner

from modalmill.cli import main
from modalmill.io import manifest
from modalmill.io.writers import TarShardWriter
from modalmill.jobs.dedup import DedupConfig, read_dedup, run_dedup
from modalmill.jobs.dedup.index import groups_from_pairs, keep_decisions, near_pairs
from modalmill.jobs.dedup.semantic import (SemanticConfig, normalise, rows_task, semantic_pairs, semantic_pairs_ray,
                                           take_rows)
from modalmill.jobs.runner import EXIT_OK, run_job
from modalmill.jobs.spec import job_from_dict
from modalmill.schemas import get_modality
from tests import dedup_corpus


def _precision_recall(pred: set, true: set) -> tuple[float, float]:
    hit = len(pred & true)
    return (hit / len(pred) if pred else 1.0), (hit / len(true) if true else 1.0)


@pytest.fixture(scope="module")
def planted(ray_local, tmp_path_factory):
    d = tmp_path_factory.mktemp("dedup")
    truth = dedup_corpus.build(str(d / "corpus"), n_shards=3)
    out = d / "out"
    job = job_from_dict({"input": str(d / "corpus" / "shard-{00000..00002}.tar"), "output": str(out),
                         "modalities": ["rgb", "crop_settings"], "crops": {"n_crops": 1},
                         "decode": {"max_size": 256}, "batch_size": 16})
    assert run_job(job, show_progress=False)["exit_code"] == EXIT_OK
    return str(out), truth


def test_exact_dedup_finds_the_pixel_identical_copies(planted):
    out, truth = planted
    summary = run_dedup(out, DedupConfig(method="exact"), progress=False)
    table, meta = read_dedup(out, "exact")
    assert meta["method"] == "exact" and meta["n_samples"] == len(truth["family"])
    true = dedup_corpus.true_pairs(truth["family"], truth["role"], {"original", "copy"})
    precision, recall = _precision_recall(dedup_corpus.predicted_pairs(table), true)
    assert precision >= 0.99 and recall >= 0.95, (precision, recall)
    assert summary["n_groups"] == len(true)  # one pair per photo: the variants changed pixels
    # one kept per group
    groups = table.column("group").to_pylist()
    assert sorted(g for g, k in zip(groups, table.column("keep").to_pylist()) if k) == sorted(set(groups))


def test_phash_dedup_finds_every_planted_variant_and_nothing_else(planted):
    out, truth = planted
    run_dedup(out, DedupConfig(method="phash", name="near"), progress=False)
    table, meta = read_dedup(out, "near")
    assert meta["settings"]["threshold_bits"] == 10
    everything = {"original", "copy", *dedup_corpus.VARIANTS}
    true = dedup_corpus.true_pairs(truth["family"], truth["role"], everything)
    pred = dedup_corpus.predicted_pairs(table)
    precision, recall = _precision_recall(pred, true)
    assert precision >= 0.99 and recall >= 0.95, (precision, recall)
    # each variant kind, on its own: found with its original
    for v in dedup_corpus.VARIANTS:
        pairs = dedup_corpus.true_pairs(truth["family"], truth["role"], {"original", v})
        assert len(pairs & pred) / len(pairs) >= 0.95, v
    # no unrelated image in any group
    unrelated = {k for k, r in truth["role"].items() if r.startswith("unrelated")}
    assert not unrelated & set(table.column("key").to_pylist())
    # the keep rule: the largest stored image of each group, ties to the first in output order
    rows = table.to_pylist()
    for g in set(r["group"] for r in rows):
        members = [r for r in rows if r["group"] == g]
        kept = [r for r in members if r["keep"]]
        assert len(kept) == 1
        best = max(members, key=lambda r: (r["area"], [-ord(c) for c in r["shard"]], -r["position"]))
        assert kept[0]["key"] == best["key"]


def test_dedup_is_deterministic_and_the_cli_writes_the_same_result(planted):
    out, _ = planted
    first, _ = read_dedup(out, "near")
    r = CliRunner().invoke(main, ["dedup", out, "--method", "phash", "--name", "near2", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "duplicate group(s)" in r.output and "keep rule" in r.output
    second, _ = read_dedup(out, "near2")
    assert first.equals(second)


def test_semantic_dedup_of_an_output_groups_the_known_clusters(planted):
    """A dinov2_global tar written for the planted output: each family's samples share a direction (plus noise of
    cosine ~0.99), unrelated samples are random directions: the groups are exactly the families."""
    out, truth = planted
    spec = get_modality("dinov2_global")
    rng = np.random.default_rng(1)
    centre = {f: rng.standard_normal(64) for f in set(truth["family"].values()) if f}
    for shard, marker in manifest.list_markers(out).items():
        w = TarShardWriter(os.path.join(out, "dinov2_global", f"{shard}.tar"))
        for key in marker["keys"]:
            fam = truth["family"][key]
            v = centre[fam] + 0.1 * rng.standard_normal(64) if fam else rng.standard_normal(64)
            w.write(key, spec.ext, spec.encode(v[None].astype(np.float16), key))
        marker["modalities"]["dinov2_global"] = {"labeler": "test", **w.commit()}
        manifest.write_marker(out, shard, marker)
    run_dedup(out, DedupConfig(method="semantic", threshold=0.95,
                               semantic=SemanticConfig(cluster_size=16)), progress=False)
    table, meta = read_dedup(out, "semantic")
    true = dedup_corpus.true_pairs(truth["family"], truth["role"], {"original", "copy", *dedup_corpus.VARIANTS})
    precision, recall = _precision_recall(dedup_corpus.predicted_pairs(table), true)
    assert precision == 1.0 and recall >= 0.95, (precision, recall)
    assert meta["settings"]["modality"] == "dinov2_global"


@pytest.mark.slow
def test_semantic_dedup_on_a_two_node_cluster_equals_the_embedded_run(planted, two_node_cluster):
    """`modalmill dedup --method semantic --address` on a loopback cluster of two `ray start` nodes: the shard
    tasks, the assignment and the within-cluster tasks run on the cluster; the groups equal the embedded run's
    (the previous test wrote the output's dinov2_global tars and its result)."""
    import subprocess
    import sys

    out, _ = planted
    embedded, _ = read_dedup(out, "semantic")
    r = subprocess.run([sys.executable, "-m", "modalmill", "dedup", out, "--method", "semantic", "--threshold",
                        "0.95", "--cluster-size", "16", "--name", "sem_cluster", "--address",
                        two_node_cluster["address"], "--no-progress"], env=two_node_cluster["env"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cluster, meta = read_dedup(out, "sem_cluster")
    assert meta["settings"]["kmeans"].endswith("Ray tasks")
    cols = ["group", "shard", "position", "key", "keep"]
    assert cluster.select(cols).equals(embedded.select(cols)) and len(cluster) > 0


def test_semantic_pairs_two_level_kmeans_on_known_clusters():
    """5,000 embeddings: 400 clusters of near-duplicates (cosine > 0.97 to their centre) among 3,000 singletons,
    with leaves of ~100: two-level k-means, every near-duplicate pair found, no false pair."""
    rng = np.random.default_rng(0)
    d, n_clusters, per = 96, 400, 5
    centres = rng.standard_normal((n_clusters, d))
    dup = np.repeat(centres, per, axis=0) + 0.04 * rng.standard_normal((n_clusters * per, d))
    single = rng.standard_normal((3000, d))
    emb = np.concatenate([dup, single]).astype(np.float32)
    perm = rng.permutation(len(emb))
    emb, label = emb[perm], np.concatenate([np.repeat(np.arange(n_clusters), per), -1 - np.arange(3000)])[perm]
    pairs, sims, leaf = semantic_pairs(emb, SemanticConfig(threshold=0.9, cluster_size=100, seed=3))
    assert leaf.max() + 1 >= 30  # two levels: sqrt(50) coarse clusters, each split again
    assert (sims >= 0.9).all()
    assert (label[pairs[:, 0]] == label[pairs[:, 1]]).all()
    groups = groups_from_pairs(len(emb), pairs)
    found = {tuple(sorted(p)) for p in pairs}
    want = sum(per * (per - 1) // 2 for _ in range(n_clusters))
    assert len(found) >= 0.95 * want
    # the same seed gives the same result
    again, _, _ = semantic_pairs(emb, SemanticConfig(threshold=0.9, cluster_size=100, seed=3))
    assert np.array_equal(np.sort(pairs, axis=0), np.sort(again, axis=0))
    keep = keep_decisions(groups)
    assert keep.sum() == len(emb) - (groups >= 0).sum() + len(set(groups[groups >= 0]))


def test_semantic_pairs_as_ray_tasks_equal_the_in_process_result(ray_local):
    """The k-means assignment and the within-cluster step as Ray tasks over object-store blocks of uneven sizes
    (not aligned with the in-process blocks) give exactly the in-process pairs and leaves."""
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((150, 64))
    emb = np.concatenate([np.repeat(centres, 4, axis=0) + 0.05 * rng.standard_normal((600, 64)),
                          rng.standard_normal((1400, 64))])[rng.permutation(2000)]
    cfg = SemanticConfig(threshold=0.9, cluster_size=60, seed=1)
    pairs, sims, leaf = semantic_pairs(emb, cfg, block_rows=512)
    x = normalise(emb)
    cuts = [0, 333, 900, 901, 1700, 2000]
    blocks = [(a, ray_local.put(x[a:b])) for a, b in zip(cuts[:-1], cuts[1:])]
    rpairs, rsims, rleaf = semantic_pairs_ray(blocks, len(x), cfg)
    assert leaf.max() + 1 >= 20 and len(pairs) >= 0.95 * 150 * 6
    assert np.array_equal(leaf, rleaf)
    order, rorder = np.lexsort(pairs.T[::-1]), np.lexsort(rpairs.T[::-1])
    assert np.array_equal(pairs[order], rpairs[rorder])
    np.testing.assert_allclose(sims[order], rsims[rorder], atol=1e-5)
    want = np.array([0, 332, 333, 900, 1699, 1999])
    assert np.array_equal(take_rows(blocks, want, rows_task()), x[want])


def test_multi_index_hashing_is_exact_against_brute_force():
    rng = np.random.default_rng(5)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 300, dtype=np.uint64)
    flips = np.array([sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 14), replace=False))
                      for _ in range(300)], dtype=np.uint64)
    hashes = np.concatenate([base, base ^ flips])
    pairs, dist = near_pairs(hashes, 10)
    xor = hashes[:, None] ^ hashes[None, :]
    from modalmill.jobs.dedup.hashes import popcount64
    brute = popcount64(xor)
    i, j = np.nonzero(np.triu(brute <= 10, 1))
    assert {tuple(p) for p in pairs.tolist()} == set(zip(i.tolist(), j.tolist()))
    assert (dist == brute[pairs[:, 0], pairs[:, 1]]).all()


def test_bad_arguments_are_clear_errors(planted, tmp_path):
    out, _ = planted
    with pytest.raises(ValueError, match="--method"):
        DedupConfig(method="md5")
    with pytest.raises(FileNotFoundError, match="no dedup result"):
        read_dedup(out, "nope")
    with pytest.raises(FileNotFoundError, match="clip_global"):
        run_dedup(out, DedupConfig(method="semantic", modality="clip_global"), progress=False)


def test_show_draws_a_duplicate_group_and_stats_runs(planted, tmp_path):
    from PIL import Image

    out, truth = planted
    run_dedup(out, DedupConfig(method="phash", name="near"), progress=False)
    png = tmp_path / "group.png"
    r = CliRunner().invoke(main, ["show", out, "--dedup", "near", "--out", str(png)])
    assert r.exit_code == 0, r.output
    table, _ = read_dedup(out, "near")
    sizes = {}
    for g in table.column("group").to_pylist():
        sizes[g] = sizes.get(g, 0) + 1
    img = Image.open(png)
    assert img.width > max(sizes.values()) * 200  # one panel per member of the largest group
    r = CliRunner().invoke(main, ["show", out, "--dedup", "near", "--group", "999", "--out", str(png)])
    assert r.exit_code == 1 and "no group 999" in r.output
