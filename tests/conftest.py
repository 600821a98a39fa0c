"""Shared fixtures. Tests run against the real data in ../shared/data, read in place."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Tests never touch the user's ~/.prefect: one private Prefect home for the whole session.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="palm-test-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The tests install libtpu (to compile for TPU topologies ahead of time); on these chip-less hosts JAX
# would otherwise try to start a TPU backend at first use and print libtpu's complaints. palm's CLI does
# the same for its users, and so do the flows a Prefect worker runs (palm.base.jaxenv).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One JAX persistent compilation cache for the session, as `palm run` keeps one for its users (palm.base.jaxenv):
# the xdist workers and every subprocess the tests start (stage subprocesses, several-process runs, the
# CLI) inherit it from here, so a program compiled once (the tiny model's train step, for one) is loaded
# by every later process instead of compiled again. Set before any JAX import; a fresh directory per
# session, so no test sees another session's entries.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="palm-test-jax-cache-"))
# palm's own setting, for subprocesses started without the JAX_ variables (tests/test_multihost.py): the
# session's directory too, never the user's ~/.cache/palm/jax.
os.environ.setdefault("PALM_COMPILATION_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])
# The programs that compile in 0.2 s or more are kept, as palm keeps them (palm.base.jaxenv).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# XLA:CPU compiles the suite's programs cheaply (user runs keep XLA's defaults): at LLVM optimization level 1
# and with XLA's older fusion emitters, which compile several times faster than its newer ones. The suite's
# programs are small and run a few steps each, so compiling is most of their cost: the tiny spec's train
# step compiles in 1.0 s against 2.3 s with the defaults, and runs at 10.2k against 12.6k tokens/s (at
# level 0: 0.4 s, but 5.8k tokens/s, which the several-step tests lose again). The whole suite: 20.1 to 18.7
# CPU-minutes. Every comparison the suite makes is between programs compiled with the same setting, or
# within a tolerance; a test whose point is the numerics a user gets compiles with XLA_USER_OPTIONS. The
# TPU compiler ignores them (the 540B step ahead of time: the same bytes per chip at level 0). Set before any
# JAX import; subprocesses that build their own XLA_FLAGS take it from cpu_devices.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"
#: XLA:CPU's own defaults of what TEST_XLA_FLAGS changes, as `compiler_options` for `Lowered.compile`.
XLA_USER_OPTIONS = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}
os.environ["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()


def cpu_devices(devices: int) -> str:
    """XLA_FLAGS for a subprocess with `devices` simulated CPU devices, compiled as the suite compiles."""
    return f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"


# Python's default: each module's compiled bytecode is written to __pycache__ once and read by every later
# process. The suite starts a few hundred Python processes (xdist workers, stage and worker subprocesses,
# the CLI, Prefect's server and workers), each importing JAX, Prefect or Beam; where the environment sets
# PYTHONDONTWRITEBYTECODE (some containers and CI images do), each of them would compile those sources
# again, about 6 of the 10 s that importing JAX, Prefect, Beam and palm's CLI takes on a 2-core VM.
# Only the suite's processes are affected (the variable is dropped here, before the workers start).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
SHARED_DATA = Path(os.environ.get("PALM_SHARED_DATA", ROOT.parent / "shared" / "data"))
TINY = SPECS / "tiny.yaml"
#: The overrides of `tiny_trained`'s training: 6 steps, checkpoints 0, 3 and 6.
TINY_TRAINED = ["train.steps=6", "train.checkpoint.every_steps=3"]


#: Seconds each module's tests take on a 2-core VM, summed from `pytest --durations=0` (2026-12-07), for the
#: modules of 8 s or more. xdist hands each worker whole modules (--dist loadscope); by default it orders
#: them by their number of tests, which put the longest ones (few tests each: the 540B compile, the
#: several-process runs, the deployment) last, one worker running them while the other had nothing left.
#: The modules go out longest first instead (--no-loadscope-reorder keeps this order), so the last to
#: finish are short. A stale figure costs only balance, never a test.
MODULE_SECONDS = {
    "test_aot.py": 143, "test_train.py": 136, "test_multihost.py": 104, "test_evaluation.py": 77,
    "test_train_stage.py": 76, "test_deployment.py": 65, "test_workflow.py": 55, "test_bench_data.py": 50,
    "test_flows.py": 43, "test_data_pipeline.py": 38, "test_quality_classifier.py": 33, "test_checkpoint.py": 32,
    "test_digest.py": 30, "test_tokenizer.py": 29, "test_cli.py": 27, "test_evaltasks.py": 25,
    "test_eval_launch.py": 25, "test_gcs_pipeline.py": 23, "test_sandbox.py": 22, "test_attention.py": 21,
    "test_prefect_tasks.py": 21, "test_eval_model.py": 20, "test_model.py": 18, "test_dataflow.py": 15,
    "test_orphans.py": 14, "test_optimizer.py": 12, "test_launch.py": 10, "test_bench_input.py": 8,
    "test_runlock.py": 8,
}


def pytest_collection_modifyitems(config, items) -> None:
    """The longest modules first (MODULE_SECONDS); a stable sort, so each module's tests keep their order."""
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.name, 0))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a loud failure (never a skip) when it is missing."""
    if not (SHARED_DATA / "tinyshakespeare" / "input.txt").is_file():
        pytest.fail(f"the shared test data is missing: expected {SHARED_DATA} (set PALM_SHARED_DATA to its "
                    "location); tests that read real corpora cannot run without it")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_server():
    """One ephemeral Prefect server (SQLite) shared by the whole test session."""
    from prefect.logging.configuration import setup_logging
    from prefect.testing.utilities import prefect_test_harness

    # Prefect configures its console handlers lazily, binding them to whatever sys.stderr is then. If that
    # happens inside a test using capsys, the handlers (the root logger's among them) keep writing to
    # capsys's stream after pytest closed it, and pytest's own capture fails in later tests. So bind
    # them now, to the session's stream.
    setup_logging()
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def gcs_emulator():
    """A GCS emulator on loopback (tests/gcs.py) with bucket "bucket", named by STORAGE_EMULATOR_HOST.

    Fails, never skips, when it cannot start. palm.base.storage.gcs_settings derives the rest of the
    storage settings from STORAGE_EMULATOR_HOST; everything it sets is put back afterwards.
    """
    from palm.base.storage import gcs_settings
    from tests.gcs import Emulator

    keys = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
    saved = {key: os.environ.get(key) for key in keys}
    try:
        emulator = Emulator(bucket="bucket")
    except Exception as e:  # noqa: BLE001 - any failure to start is a test failure
        pytest.fail(f"the GCS emulator could not start: {e}")
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.host
    gcs_settings()  # before anything imports gcsfs, which reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT once
    try:
        yield emulator
    finally:
        emulator.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A directory built once per test session and shared by every xdist worker: the first worker to ask
    builds it while the others wait on a lock, then all read it. It is built where it stays (stage
    manifests record their inputs' absolute paths) and marked complete last, so a failed build is redone
    by the next test that asks. Tests must not write into it; they copy it (`copy_of`)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's directory, above each worker's own
    path, built = base / name, base / f"{name}.built"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            built.touch()
    return path


def copy_of(shared: Path, where: Path) -> Path:
    """A writable copy of a session-shared run root at `where` (which must not exist yet)."""
    shutil.copytree(shared, where)
    return where


@pytest.fixture(scope="session")
def tiny_upstream(tmp_path_factory) -> Path:
    """A run root holding the data, tokenizer and pack stages of specs/tiny.yaml, built once per session
    for every test whose point lies downstream of them (training, evaluation, several processes)."""
    def build(root: Path) -> None:
        from palm.dag.runner import run_dag
        from palm.dag.workflow import load_spec

        run_dag(load_spec(TINY), root, ["data", "tokenizer", "pack"])

    return _built_once(tmp_path_factory, "tiny-upstream", build)


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory, tiny_upstream) -> Path:
    """`tiny_upstream` plus the train stage with TINY_TRAINED (checkpoints 0, 3 and 6) and the run's
    recorded spec, as `palm run specs/tiny.yaml --set ...` leaves them; built once per session."""
    def build(root: Path) -> None:
        from palm.dag.runner import record_spec, run_dag
        from palm.dag.workflow import load_spec

        shutil.copytree(tiny_upstream, root)
        spec = load_spec(TINY, TINY_TRAINED)
        record_spec(spec, root)
        run_dag(spec, root, ["train"])

    return _built_once(tmp_path_factory, "tiny-trained", build)
