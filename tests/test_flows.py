"""The pretrain flow under a real (ephemeral) Prefect server: caching, lineage, selective re-runs."""

from __future__ import annotations

import time
from pathlib import Path

from flows.pretrain import pretrain
from tests.conftest import SPECS

TINY = str(SPECS / "tiny.yaml")
QUICK = ["train.steps=6", "train.checkpoint.every_steps=3", "eval.max_examples=4"]
STAGES = "data,tokenizer,pack,train"
ALL = "data,tokenizer,pack,train,eval"


def test_rerun_is_cached_and_a_changed_stage_reruns_with_its_downstream(prefect_server, tmp_path):
    first = pretrain(TINY, QUICK, str(tmp_path), STAGES)
    assert first["status"] == "completed" and first["final_step"] == 6
    assert not any(s["cached"] for s in first["stages"].values())
    assert (tmp_path / "report.md").is_file() and (tmp_path / "loss.png").is_file()

    t0 = time.perf_counter()
    again = pretrain(TINY, QUICK, str(tmp_path), STAGES)
    assert all(s["cached"] for s in again["stages"].values())
    assert time.perf_counter() - t0 < 30  # seconds: nothing is recomputed
    assert {k: v["output"] for k, v in again["stages"].items()} == {k: v["output"] for k, v in first["stages"].items()}

    longer = pretrain(TINY, ["train.steps=8", "train.checkpoint.every_steps=4"], str(tmp_path), STAGES)
    cached = {name: s["cached"] for name, s in longer["stages"].items()}
    assert cached == {"data": True, "tokenizer": True, "pack": True, "train": False}
    assert longer["stages"]["train"]["output"] != first["stages"]["train"]["output"]

    evaluated = pretrain(TINY, QUICK, str(tmp_path), ALL)
    assert evaluated["stages"]["eval"]["cached"] is False and "validation_loss" in evaluated["eval"]
    re_eval = pretrain(TINY, QUICK[:2] + ["eval.max_examples=2"], str(tmp_path), ALL)  # only eval settings change
    cached = {name: s["cached"] for name, s in re_eval["stages"].items()}
    assert cached == {"data": True, "tokenizer": True, "pack": True, "train": True, "eval": False}

    retok = pretrain(TINY, QUICK + ["tokenizer.vocab_size=512"], str(tmp_path), STAGES)
    cached = {name: s["cached"] for name, s in retok["stages"].items()}
    assert cached == {"data": True, "tokenizer": False, "pack": False, "train": False}


def test_forced_stage_reruns(prefect_server, tmp_path):
    pretrain(TINY, QUICK, str(tmp_path), "data")
    forced = pretrain(TINY, QUICK, str(tmp_path), "data", force=["data"])
    assert forced["stages"]["data"]["cached"] is False


def test_two_simultaneous_evaluation_runs_evaluate_each_checkpoint_once(prefect_server, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from flows.evaluate import evaluate_new_checkpoints
    from palm.ledger import EvalLedger

    out = pretrain(TINY, QUICK + ["eval.max_examples=4"], str(tmp_path), STAGES)
    checkpoint = out["checkpoint"]  # .../checkpoints/6; the run also kept 0 and 3
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: evaluate_new_checkpoints(checkpoint=checkpoint), range(2)))
    evaluated = sorted(c for r in runs for c in r["evaluated"])
    assert [Path(c).name for c in evaluated] == ["0", "3", "6"]  # each exactly once, split between the runs
    ledger = EvalLedger(Path(checkpoint).parent.parent / "evals")
    assert sorted(ledger.results()) == [0, 3, 6]
    assert "validation_loss" in ledger.result(6)["results"]
    again = evaluate_new_checkpoints(spec_path=TINY, overrides=QUICK, output=str(tmp_path))  # the scheduled path
    assert again["evaluated"] == []
