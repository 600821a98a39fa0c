"""TensorBoard event files of a run, read back with TensorBoard's own reader; jax.profiler traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from palm.cli import main
from palm.store.tensorboard import TRAIN_SCALARS, write_eval_results
from tests.conftest import SPECS, copy_of


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_a_run_writes_training_and_evaluation_event_files(prefect_server, tiny_upstream, tmp_path, capsys):
    root = copy_of(tiny_upstream, tmp_path / "run")  # the event files are the train and eval stages'
    rc = main(["run", str(SPECS / "tiny.yaml"), "--output", str(root), "--json", "--set", "train.steps=5",
               "--set", "eval.max_examples=4", "--set", "train.profile_steps=[2, 4]"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    summary = json.loads(out)
    train_dir = Path(summary["stages"]["train"]["path"])
    train = scalars(train_dir / "tensorboard")
    metrics = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    # Every training scalar but MFU (the CPU has no known peak), one point per step, equal to metrics.jsonl.
    assert set(train) == {f"train/{k}" for k in TRAIN_SCALARS if k != "mfu"}
    # At the updates done, as the checkpoints count them (metrics.jsonl's step + 1), so step 5's point
    # and the evaluation of checkpoint 5 line up.
    assert [s for s, _ in train["train/loss"]] == [m["step"] + 1 for m in metrics] == [1, 2, 3, 4, 5]
    assert [v for _, v in train["train/loss"]] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert [v for _, v in train["train/learning_rate"]] == pytest.approx([m["learning_rate"] for m in metrics], rel=1e-6)

    eval_dir = Path(summary["stages"]["eval"]["path"])
    results = json.loads((eval_dir / "results.json").read_text())
    evals = scalars(eval_dir / "tensorboard")
    nll = results["results"]["validation_loss"]["nll_per_token"]
    assert evals["eval/validation_loss/nll_per_token"] == [(5, pytest.approx(nll, rel=1e-6))]
    assert "eval/memorization/exact_match" in evals

    # The profiler traced steps 2 and 3 into the train stage's profile/ directory.
    traces = list((train_dir / "profile").rglob("*.xplane.pb"))
    assert traces, sorted(p.name for p in (train_dir / "profile").rglob("*"))


def test_eval_results_across_checkpoints_form_one_curve(tmp_path):
    for step, value in ((4, 3.0), (8, 2.5), (12, 2.0)):
        write_eval_results(tmp_path, step, {"gsm8k": {"exact_match": value / 10, "n": 4, "note": "x"}})
    read = scalars(tmp_path)
    assert read["eval/gsm8k/exact_match"] == [(4, pytest.approx(0.3)), (8, pytest.approx(0.25)), (12, pytest.approx(0.2))]
    assert "eval/gsm8k/note" not in read  # not a number


@pytest.mark.parametrize("value", ["[3, 2]", "[0, 100000]", "[-1, 2]"])
def test_profile_steps_are_checked(value, capsys):
    assert main(["spec", "show", str(SPECS / "tiny.yaml"), "--set", f"train.profile_steps={value}"]) == 2
    assert "train.profile_steps" in capsys.readouterr().err
