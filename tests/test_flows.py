"""The pretrain and evaluate flows under a real (ephemeral) Prefect server: caching, lineage, selective
re-runs, and exactly-once evaluation of every checkpoint by concurrent evaluation runs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactCollectionFilter, ArtifactCollectionFilterKey, ArtifactFilter,
                                            ArtifactFilterFlowRunId, ArtifactFilterKey)

from flows.evaluate import evaluate_new_checkpoints
from flows.pretrain import pretrain
from palm.store.ledger import EvalLedger
from tasks.common import run_artifact_key
from tests.conftest import ROOT, SPECS

TINY = str(SPECS / "tiny.yaml")
QUICK = ["train.steps=6", "train.checkpoint.every_steps=3", "eval.max_examples=4"]
ALL = "data,tokenizer,pack,train,eval"


def cached(result: dict) -> dict[str, bool]:
    return {name: s["cached"] for name, s in result["stages"].items()}


def artifacts(key: str | None = None, flow_run_id=None) -> list:
    """Every version of the artifacts with `key` (and/or of one flow run), from the server."""
    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]) if key else None,
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]) if flow_run_id else None))
    return asyncio.run(read())


def latest(key: str):
    async def read():
        async with get_client() as client:
            return await client.read_latest_artifacts(
                artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key])))
    found = asyncio.run(read())
    assert len(found) == 1, (key, found)
    return found[0]


def rows(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


@pytest.mark.slow
def test_caching_lineage_and_exactly_once_evaluation(prefect_server, tmp_path):
    # Cost: the tiny pipeline (data to eval, 6 steps) through Prefect, then reruns that each redo only what a
    # change reaches (a new tokenizer retrains); the flow's caching, artifacts and lineage are the point.
    state = pretrain(TINY, QUICK, str(tmp_path), ALL, return_state=True)
    first, run_id = state.result(), state.state_details.flow_run_id
    assert first["status"] == "completed" and first["final_step"] == 6
    assert not any(cached(first).values())
    assert "validation_loss" in first["eval"]
    assert (tmp_path / "report.md").is_file() and (tmp_path / "loss.png").is_file()
    assert (tmp_path / "spec.json").is_file()

    # The run in the Prefect UI: its report (stages, loss curve as sampled steps, evaluation) and loss
    # table are artifacts of this flow run, keyed by the run (spec name and run directory).
    key = lambda *parts: run_artifact_key("tiny", tmp_path, *parts)  # noqa: E731
    of_run = {a.key: a for a in artifacts(flow_run_id=run_id)}
    assert {key("report"), key("train", "loss"), key("train", "summary"), key("train", "progress"),
            key("data", "accounting"), key("eval", "results")} <= set(of_run), sorted(of_run)
    report = of_run[key("report")]
    assert report.type == "markdown"
    for section in ("# Run report: tiny", "## Stages", "## Training", "Loss curve (sampled steps):", "## Evaluation",
                    "| validation_loss |", f"`{first['checkpoint']}`"):
        assert section in report.data, section
    assert "![" not in report.data  # no image the UI could not open
    loss = rows(of_run[key("train", "loss")])
    assert [r["step"] for r in loss] == [1, 2, 3, 4, 5, 6] and loss[-1]["loss"] == round(first["final_loss"], 4)

    t0 = time.perf_counter()
    again = pretrain(TINY, QUICK, str(tmp_path), ALL)
    assert all(cached(again).values())
    assert time.perf_counter() - t0 < 30  # seconds: nothing is recomputed
    assert {k: v["output"] for k, v in again["stages"].items()} == {k: v["output"] for k, v in first["stages"].items()}

    # Two evaluation runs started together on the first run's checkpoints (steps 0, 3 and 6).
    checkpoint = first["checkpoint"]
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: evaluate_new_checkpoints(checkpoint=checkpoint), range(2)))
    evaluated = sorted(c for r in runs for c in r["evaluated"])
    assert [Path(c).name for c in evaluated] == ["0", "3", "6"]  # each exactly once, split between the runs
    ledger = EvalLedger(Path(checkpoint).parent.parent / "evals")
    assert sorted(ledger.results()) == [0, 3, 6]
    assert "validation_loss" in ledger.result(6)["results"]
    # The table of evaluations across checkpoints: a version after each evaluation, the latest with all.
    table = latest(key("train", "evaluations"))
    assert [r["step"] for r in rows(table)] == [0, 3, 6]
    for r in rows(table):
        result = ledger.result(r["step"])["results"]
        assert r["checkpoint"] == ledger.result(r["step"])["checkpoint"]
        assert {c: v for c, v in r.items() if c not in ("step", "checkpoint")} == {
            f"{task} {metric}": round(v, 4) if isinstance(v, float) else v
            for task, metrics in result.items() for metric, v in metrics.items()}
    assert len(artifacts(key("train", "evaluations"))) >= 3
    assert [bool(artifacts(key("train", "eval-step", s))) for s in (0, 3, 6)] == [True, True, True]
    scheduled = evaluate_new_checkpoints(spec_path=TINY, overrides=QUICK, output=str(tmp_path))
    assert scheduled["evaluated"] == []  # the scheduled fallback finds nothing left to do

    re_eval = pretrain(TINY, QUICK[:2] + ["eval.max_examples=2"], str(tmp_path), ALL)  # only eval settings change
    assert cached(re_eval) == {"data": True, "tokenizer": True, "pack": True, "train": True, "eval": False}

    retok = pretrain(TINY, QUICK + ["tokenizer.vocab_size=512"], str(tmp_path), "data,tokenizer,pack,train")
    assert cached(retok) == {"data": True, "tokenizer": False, "pack": False, "train": False}
    assert retok["stages"]["train"]["output"] != first["stages"]["train"]["output"]

    forced = pretrain(TINY, QUICK, str(tmp_path), "data", force=["data"])
    assert forced["stages"]["data"]["cached"] is False

    # The same spec into another directory is another run: its own keys, its own history.
    other_dir = tmp_path / "other"
    other = pretrain(TINY, QUICK, str(other_dir), "data", return_state=True)
    other_key = run_artifact_key("tiny", other_dir, "data", "accounting")
    assert other_key != key("data", "accounting")
    mine, theirs = artifacts(key("data", "accounting")), artifacts(other_key)
    assert [a.flow_run_id for a in theirs] == [other.state_details.flow_run_id]
    assert other.state_details.flow_run_id not in {a.flow_run_id for a in mine} and run_id in {a.flow_run_id for a in mine}



WORKER_LOADS_FLOW = """
import sys
from prefect.utilities.importtools import load_script_as_module
load_script_as_module(sys.argv[1])  # as a Prefect process worker's flow run loads the deployment's entrypoint
import jax
config = jax.config
print(jax.devices()[0].platform, config.jax_compilation_cache_dir, config.jax_persistent_cache_min_compile_time_secs)
"""


@pytest.mark.parametrize("flow", ["flows/pretrain.py", "flows/evaluate.py"])
def test_a_flow_a_prefect_worker_runs_sets_jax_up_as_palm_does(tmp_path, flow):
    """A deployment's flow run is a fresh process that loads the flow's file by its path, not `palm`: in a
    user's environment (no JAX_ or PALM_ variables) it too uses the CPU of a chip-less host that has libtpu
    installed, without libtpu's complaints, and keeps its programs in palm's compilation cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "PALM_"))}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", WORKER_LOADS_FLOW, flow], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cpu", str(tmp_path / "palm" / "jax"), "0.2"]
    assert not re.search(r"^[EWF]\d{4} |InitGoogle|libtpu", done.stderr, re.M), done.stderr
