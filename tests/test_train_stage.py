"""The train stage of the tiny spec as real `palm run` processes: SIGKILL and SIGTERM, then resume."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SPECS

STEPS = 30
TRAIN = ["--set", f"train.steps={STEPS}", "--set", "train.checkpoint.every_steps=5", "--set", "train.log_every=1",
         "--set", "train.checkpoint.keep_last=20"]


@pytest.fixture(scope="module")
def upstream(prefect_server, tiny_upstream):
    """data, tokenizer and pack for the tiny spec, built once per session and copied into each test's root;
    the runs here are `palm run` processes whose flow runs go to the session's Prefect server."""
    return tiny_upstream


def fresh_root(upstream: Path, tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    shutil.copytree(upstream, root)
    return root


def palm_run(root: Path, *extra: str) -> subprocess.Popen:
    """`palm run` in its own process, its flow run on the session's Prefect server (not an ephemeral one)."""
    from prefect.settings import PREFECT_API_URL

    cmd = [sys.executable, "-m", "palm.cli", "run", str(SPECS / "tiny.yaml"), "--stages", "train",
           "--output", str(root), "--json", *TRAIN, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", PREFECT_API_URL=PREFECT_API_URL.value()))


def wait_for_step(proc: subprocess.Popen, step: int) -> list[str]:
    """Read the progress lines until training has finished `step` steps."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
            return seen
    raise AssertionError("the run ended before step %d:\n%s" % (step, "".join(seen[-30:])))


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


def train_manifest(root: Path) -> dict:
    return json.loads(next((root / "train").glob("*/manifest.json")).read_text())


@pytest.fixture(scope="module")
def straight(upstream, tmp_path_factory):
    root = fresh_root(upstream, tmp_path_factory.mktemp("straight"), "run")
    result = finish(palm_run(root))
    manifest = train_manifest(root)
    assert result["final_step"] == STEPS and manifest["resumed_from"] is None
    return manifest


@pytest.mark.slow
def test_tiny_loss_falls(straight):
    # Cost: the module fixtures (data, tokenizer and pack once, then one uninterrupted 30-step `palm run`), which
    # the SIGKILL and SIGTERM tests compare against; the test itself only reads the metrics.
    losses = [json.loads(line)["loss"] for line in Path(straight["metrics"]).read_text().splitlines()]
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.slow
def test_sigkill_at_three_random_steps_then_resume_gives_the_same_digest(upstream, straight, tmp_path):
    # Cost: four real `palm run` processes (Python, JAX, Prefect each), three killed at random steps; the point is
    # resume after SIGKILL in a real process, so it cannot run in-process.
    root = fresh_root(upstream, tmp_path, "killed")
    kills = sorted(random.Random(2026).sample(range(3, STEPS - 2), 3))
    for step in kills:
        proc = palm_run(root)
        wait_for_step(proc, step)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    result = finish(palm_run(root))
    manifest = train_manifest(root)
    assert result["final_step"] == STEPS
    assert manifest["resumed_from"] is not None and manifest["resumed_from"] > 0
    assert manifest["digest"] == straight["digest"]


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits_75(upstream, straight, tmp_path):
    # Cost: two real `palm run` processes, one stopped by SIGTERM and one resuming; the point is the signal handler
    # and exit code 75 of a real process.
    root = fresh_root(upstream, tmp_path, "preempted")
    proc = palm_run(root)
    wait_for_step(proc, 12)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    stopped = int(err.split("preempted at step ")[1].split(";")[0])
    assert stopped >= 12
    checkpoints = next((root / "train").glob("*/checkpoints"))
    assert (checkpoints / str(stopped)).is_dir()  # a checkpoint at exactly that step
    assert not list((root / "train").glob("*/manifest.json"))  # the stage is not complete
    result = finish(palm_run(root))
    manifest = train_manifest(root)
    assert manifest["resumed_from"] == stopped and result["final_step"] == STEPS
    assert manifest["digest"] == straight["digest"]


PREPARED = """
import json, os, sys
import jax
import numpy as np
from palm.dag.workflow import load_spec
from palm.core.checkpoint import params_digest, state_digest
from palm.stages.train import prepare, stage_trainer

hits = []
jax.monitoring.register_event_listener(lambda name, **_: hits.append(name) if name.endswith("cache_hits") else None)
cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
spec = load_spec(sys.argv[1], ["train.steps=101"])  # past the ramp's second stage (batch 16 from step 100)
prepare(spec)
prepared = set(os.listdir(cache))
trainer = stage_trainer(spec)  # what the stage then does
state = trainer.init()
for batch in sorted({s.global_batch for s in spec.train.batch_ramp}):
    state, _ = trainer.step(state, np.zeros((batch, spec.model.seq_len), np.int32))
state_digest(state), params_digest(state.params)  # what each checkpoint records
print(json.dumps({"prepared": sorted(prepared), "compiled_after": sorted(set(os.listdir(cache)) - prepared),
                  "hits": len(hits)}))
"""


@pytest.mark.slow
def test_prepare_compiles_every_training_program_the_stage_then_loads(tmp_path):
    """`palm run` prepares the train stage while Prefect's server starts: initialisation and the step at each
    batch size of the ramp are compiled into the persistent cache, and the stage's own trainer loads them all
    (cache hits) and compiles none of them again; nor the state's and parameters' digests."""
    # Cost: a Python process that compiles the tiny model's three training programs, into a cache of its own.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    out = subprocess.run([sys.executable, "-c", PREPARED, str(SPECS / "tiny.yaml")], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    programs = [name.split("-")[0] for name in result["prepared"]]
    assert programs.count("jit__step_fn") == 2 and programs.count("jit__init_fn") == 1  # batches 8 and 16
    assert programs.count("jit__lambda") == 2  # the digests' (palm.core.checkpoint._leaf_sums_jit)
    assert not [n for n in result["compiled_after"] if n.startswith(("jit__step_fn", "jit__init_fn", "jit__lambda"))]
    assert result["hits"] >= 3
