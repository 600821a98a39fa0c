"""The whole tiny pipeline with its storage root on gs://, against the GCS emulator on loopback.

Every stage's output, the checkpoints (Orbax, straight to the bucket), the metrics, the report and the
evaluation ledger live in the bucket; the machine keeps only its cache of local copies (what
SentencePiece reads). A second run finds every stage complete and reuses it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from palm.base import storage
from palm.store.ledger import EvalLedger
from palm.dag.runner import record_spec, run_dag, run_summary
from palm.dag.workflow import resolve_workflow
from palm.app.report import write_report
from palm.dag.workflow import load_spec
from tests.conftest import SPECS

QUICK = ["train.steps=6", "train.checkpoint.every_steps=3", "eval.max_examples=4", "eval.tasks=[validation_loss]"]


def run_pipeline(spec, root: str) -> dict:
    """What the pretrain flow does, in process: record the spec, run every stage, write the report."""
    record_spec(spec, root)
    outputs = run_dag(spec, root)
    return run_summary(root, write_report(root, spec.name, resolve_workflow(spec), outputs), outputs)


@dataclasses.dataclass
class GsRun:
    spec: Any
    root: str
    storage_root: str
    summary: dict
    workdir: Path
    cache: Path


@pytest.fixture(scope="module")
def gs_run(gcs_emulator, tmp_path_factory) -> Iterator[GsRun]:
    """The tiny pipeline run once on gs://bucket/<unique>/tiny, from an empty working directory, with the
    local cache beside it (not inside)."""
    base = tmp_path_factory.mktemp("gs-run")
    workdir, cache = base / "cwd", base / "cache"
    workdir.mkdir()
    storage_root = f"gs://bucket/{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.setenv("PALM_CACHE_DIR", str(cache))
        spec = load_spec(SPECS / "tiny.yaml", QUICK + [f"infra.storage_root={storage_root}"])
        root = f"{storage_root}/{spec.name}"
        yield GsRun(spec, root, storage_root, run_pipeline(spec, root), workdir, cache)


@pytest.mark.slow
def test_every_output_checkpoint_and_report_is_in_the_bucket(gs_run):
    # Cost: the module fixture, the tiny pipeline (6 steps) run once against the GCS emulator, shared by this
    # file's tests; this test only reads the bucket.
    root, first = gs_run.root, gs_run.summary
    assert first["root"] == root and first["report"] == f"{root}/report.md"
    stages = first["stages"]
    assert not any(s["cached"] for s in stages.values())
    for name, s in stages.items():
        assert s["output"] == f"{root}/{name}/{s['key']}"
        manifest = json.loads(storage.read_text(f"{s['output']}/manifest.json"))
        assert manifest["complete"] is True and manifest["key"] == s["key"]

    train = stages["train"]["output"]
    assert first["final_step"] == 6 and math.isfinite(first["final_loss"])
    assert first["checkpoint"] == f"{train}/checkpoints/6"
    assert checkpoint_steps(train) == [0, 3, 6]
    assert storage.exists(f"{train}/checkpoints/6/commit_success.txt")  # Orbax's commit marker on GCS
    metrics = [json.loads(line) for line in storage.read_text(f"{train}/metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics] == list(range(6))
    assert json.loads(storage.read_text(f"{train}/manifest.json"))["metrics"] == f"{train}/metrics.jsonl"
    assert json.loads(storage.read_text(f"{train}/context.json"))["inputs"]["pack"]["path"] == stages["pack"]["output"]

    eval_dir = stages["eval"]["output"]
    results = json.loads(storage.read_text(f"{eval_dir}/results.json"))
    assert results["checkpoint"] == f"{train}/checkpoints/6"
    assert math.isfinite(results["results"]["validation_loss"]["nll_per_token"]) and first["eval"] == results["results"]
    assert storage.exists(f"{root}/loss.png") and "## Evaluation" in storage.read_text(f"{root}/report.md")
    assert json.loads(storage.read_text(f"{root}/spec.json"))["name"] == "tiny"


def checkpoint_steps(train_dir: str) -> list[int]:
    return sorted(int(storage.name(p)) for p in storage.glob(f"{train_dir}/checkpoints/*") if storage.name(p).isdigit())


@pytest.mark.slow
def test_a_second_run_reuses_every_stage(gs_run):
    t0 = time.perf_counter()
    again = run_pipeline(gs_run.spec, gs_run.root)
    assert again["stages"] == {k: {**v, "cached": True} for k, v in gs_run.summary["stages"].items()}
    assert time.perf_counter() - t0 < 20  # seconds: nothing is recomputed


@pytest.mark.slow
def test_the_evaluation_flow_evaluates_each_gs_checkpoint_once(gs_run, prefect_server):
    from flows.evaluate import evaluate_new_checkpoints

    checkpoint = gs_run.summary["checkpoint"]
    train = gs_run.summary["stages"]["train"]["output"]
    triggered = evaluate_new_checkpoints(checkpoint=checkpoint)
    assert sorted(triggered["evaluated"]) == [f"{train}/checkpoints/{s}" for s in (0, 3, 6)]
    ledger = EvalLedger(f"{train}/evals")
    assert sorted(ledger.results()) == [0, 3, 6]
    assert math.isfinite(ledger.result(6)["results"]["validation_loss"]["nll_per_token"])
    assert storage.list_files(f"{train}/evals") == sorted(f"{s}.{e}" for s in (0, 3, 6) for e in ("claim", "json"))
    # The scheduled fallback lists the runs under the gs:// root and finds nothing left to do.
    assert storage.glob(f"{gs_run.root}/train/*/context.json") == [f"{train}/context.json"]
    scheduled = evaluate_new_checkpoints(spec_path=str(SPECS / "tiny.yaml"), overrides=QUICK,
                                         output=gs_run.root)
    assert scheduled == {"evaluated": [], "claimed_elsewhere": []}


@pytest.mark.slow
def test_nothing_is_written_outside_the_bucket_but_the_cache(gs_run):
    # The working directory (where a relative local run root would be) is as empty as it was, the
    # scratch build directories are gone, and the cache holds copies of this run's outputs only.
    assert list(gs_run.workdir.iterdir()) == []
    assert list((gs_run.cache / "tmp").iterdir()) == []
    assert [p.name for p in (gs_run.cache / "gcs" / "bucket").iterdir()] == [gs_run.storage_root.rsplit("/", 1)[1]]
