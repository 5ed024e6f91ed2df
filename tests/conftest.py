import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests never reach the network and never phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray Train's controller polls its workers every 2 s (Ray's default), so each tiny training run here waited up to 2 s
# to see every state change: ~4 s of each ~14 s run. The real controller and workers, polled every 0.2 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# The shard tasks' test-only crash hook (modalmill.pipeline.shard._step, tests/test_crash_points.py): a folder of this
# session where crash.json names a write step to die at. Set before any Ray starts, so that its workers inherit it.
os.environ.setdefault("MODALMILL_TEST_CRASH_DIR", __import__("tempfile").mkdtemp(prefix="modalmill-crash-"))
# --- pytest-xdist (s9-xdist) ---------------------------------------------------------------------------------------
# Under `pytest -n N` every worker inherits the controller's environment, this folder included: one worker's
# crash.json would then kill the shard tasks of a run in another worker. Each worker gets a folder of its own.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["MODALMILL_TEST_CRASH_DIR"] = __import__("tempfile").mkdtemp(
        prefix=f"modalmill-crash-{os.environ['PYTEST_XDIST_WORKER']}-")
# --- end pytest-xdist ------------------------------------------------------------------------------------------------
# Ray workers inherit the environment: let them import test-only labelers from tests/.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest_plugins = ["tests.fixtures_s3"] if os.path.exists(os.path.join(ROOT, "tests", "fixtures_s3.py")) else []


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session (2 CPUs, as on CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """Two tar shards of real photos (scikit-image), 5 samples each, at web-like sizes."""
    from modalmill.jobs.democorpus import build_corpus

    d = tmp_path_factory.mktemp("corpus")
    build_corpus(str(d), n_shards=2, per_shard=5, size_range=(200, 320))
    return str(d)


@pytest.fixture(scope="session")
def labeled_edges(ray_local, demo_corpus, tmp_path_factory):
    """The demo corpus labelled with rgb, crop_settings and canny_edge (2 crops, 256 px): tokenizer training input.
    Shared by the tokenizer-training test files; tests write their tokenizers elsewhere or under its
    ``_modalmill/tokenizers/``, never into its shards."""
    from modalmill.jobs.runner import EXIT_OK, run_job
    from modalmill.jobs.spec import job_from_dict

    out = tmp_path_factory.mktemp("labeled_edges") / "out"
    spec = job_from_dict({"input": os.path.join(demo_corpus, "shard-{00000..00001}.tar"), "output": str(out),
                          "modalities": ["rgb", "crop_settings", "canny_edge"], "batch_size": 5,
                          "crops": {"n_crops": 2}, "decode": {"max_size": 256}})
    assert run_job(spec, show_progress=False)["exit_code"] == EXIT_OK
    return str(out)


@pytest.fixture(scope="session")
def example_plugin(tmp_path_factory):
    """examples/third_party_labeler pip-installed once for the session (tests/plugin_install.py): (environment with
    it installed, the same environment without it). Tests read the installed folder, never write into it."""
    from tests.plugin_install import install_example_plugin

    return install_example_plugin(str(tmp_path_factory.mktemp("plugin")))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train fastest on one torch thread (and 2-core CI machines are shared)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cluster(nodes):
    from tests import ray_cluster

    c = ray_cluster.shared(nodes)
    return {"address": c.address, "dashboard": c.dashboard, "env": c.env, "python": c.python}


@pytest.fixture
def loopback_cluster():
    """A real Ray cluster on loopback, one `ray start --head` node (2 CPUs, no GPU, the dashboard), shared by the
    tests that ask for it in a row (tests/ray_cluster.py): ``{"address", "dashboard", "env", "python"}`` (the nodes'
    python)."""
    return _cluster(1)


@pytest.fixture
def two_node_cluster():
    """``loopback_cluster`` with a second `ray start` node (1 CPU) joined to it."""
    return _cluster(2)


CLUSTER_FIXTURES = {"loopback_cluster", "two_node_cluster"}


def pytest_runtest_teardown(item, nextitem):
    """Stop the shared loopback cluster as soon as the next test does not use it."""
    if nextitem is None or not CLUSTER_FIXTURES & set(getattr(nextitem, "fixturenames", ())):
        mod = sys.modules.get("tests.ray_cluster")
        if mod is not None:
            mod.stop_shared()


def pytest_sessionfinish(session, exitstatus):
    mod = sys.modules.get("tests.ray_cluster")
    if mod is not None:
        mod.stop_shared()


# ---------------------------------------------------------------------- shared labelled output (issue: suite time)
# One job labels the demo corpus with every model labeler, once per session (tests/shared_labels.py): the fixtures
# ``shared_weights`` and ``shared_labels``, used by tests/test_all_labelers.py and the labeler families' pipeline
# tests. Kept in its own module so that this block stays two lines.
from tests.shared_labels import shared_labels, shared_weights  # noqa: E402,F401  (session fixtures)
