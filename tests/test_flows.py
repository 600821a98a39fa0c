"""The pretrain and evaluate flows under a real (ephemeral) Prefect server: caching, lineage, selective
re-runs, and exactly-once evaluation of every checkpoint by concurrent evaluation runs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flows.evaluate import evaluate_new_checkpoints
from flows.pretrain import pretrain
from palm.ledger import EvalLedger
from tests.conftest import SPECS

TINY = str(SPECS / "tiny.yaml")
QUICK = ["train.steps=6", "train.checkpoint.every_steps=3", "eval.max_examples=4"]
ALL = "data,tokenizer,pack,train,eval"


def cached(result: dict) -> dict[str, bool]:
    return {name: s["cached"] for name, s in result["stages"].items()}


def test_caching_lineage_and_exactly_once_evaluation(prefect_server, tmp_path):
    first = pretrain(TINY, QUICK, str(tmp_path), ALL)
    assert first["status"] == "completed" and first["final_step"] == 6
    assert not any(cached(first).values())
    assert "validation_loss" in first["eval"]
    assert (tmp_path / "report.md").is_file() and (tmp_path / "loss.png").is_file()
    assert (tmp_path / "spec.json").is_file()

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
    scheduled = evaluate_new_checkpoints(spec_path=TINY, overrides=QUICK, output=str(tmp_path))
    assert scheduled["evaluated"] == []  # the scheduled fallback finds nothing left to do

    re_eval = pretrain(TINY, QUICK[:2] + ["eval.max_examples=2"], str(tmp_path), ALL)  # only eval settings change
    assert cached(re_eval) == {"data": True, "tokenizer": True, "pack": True, "train": True, "eval": False}

    retok = pretrain(TINY, QUICK + ["tokenizer.vocab_size=512"], str(tmp_path), "data,tokenizer,pack,train")
    assert cached(retok) == {"data": True, "tokenizer": False, "pack": False, "train": False}
    assert retok["stages"]["train"]["output"] != first["stages"]["train"]["output"]

    forced = pretrain(TINY, QUICK, str(tmp_path), "data", force=["data"])
    assert forced["stages"]["data"]["cached"] is False
