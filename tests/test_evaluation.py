"""Evaluation of a real tiny checkpoint: `palm eval`, YAML multiple choice, lm-eval, GSM8K, HumanEval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palm.cli import main
from tests.conftest import SPECS


@pytest.fixture(scope="module")
def checkpoint(prefect_server, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    rc = main(["run", str(SPECS / "tiny.yaml"), "--stages", "data,tokenizer,pack,train", "--output", str(root),
               "--set", "train.steps=6", "--set", "train.checkpoint.every_steps=3"])
    assert rc == 0
    return next((root / "train").glob("*/checkpoints"))


def mc_task(tmp_path: Path) -> Path:
    docs = [{"question": f"Question {i}: which word is a colour?", "choices": ["red", "table", "run"], "answer": 0}
            for i in range(6)]
    (tmp_path / "colours.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "colours.yaml").write_text("data: colours.jsonl\nnum_shots: 2\nanswer_prefix: ' '\n")
    return tmp_path / "colours.yaml"


def run_eval(capsys, *args) -> dict:
    rc = main(["eval", *args, "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    return json.loads(captured.out)


def test_palm_eval_on_a_checkpoint_step(checkpoint, capsys, tmp_path):
    task = mc_task(tmp_path)
    out = run_eval(capsys, str(checkpoint / "6"), "--tasks", f"validation_loss,memorization,mc:{task}",
                   "--set", "max_examples=8")
    assert out["step"] == 6
    r = out["results"]
    assert r["validation_loss"]["bits_per_byte"] > 0 and r["validation_loss"]["perplexity"] > 1
    assert 0 <= r["memorization"]["exact_match"] <= 1 and r["memorization"]["examples"] == 8
    assert r[f"mc:{task}"]["examples"] == 4 and 0 <= r[f"mc:{task}"]["acc"] <= 1


def test_lm_eval_task_with_local_data_runs_through_the_palm_backend(checkpoint, capsys, tmp_path):
    docs = [{"question": f"Is {i} an even number?", "choices": ["yes", "no"], "answer": i % 2} for i in range(10)]
    (tmp_path / "even.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "palm_even.yaml").write_text(f"""task: palm_even
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'even.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    out = run_eval(capsys, str(checkpoint), "--tasks", "lm_eval:palm_even", "--set", f"lm_eval_include_path={tmp_path}")
    metrics = out["results"]["lm_eval:palm_even"]
    assert 0 <= metrics["acc"] <= 1


def test_gsm8k_and_humaneval_run_end_to_end(checkpoint, capsys, shared_data):
    out = run_eval(capsys, str(checkpoint), "--tasks", "gsm8k,humaneval", "--set", "max_examples=2",
                   "--set", "max_new_tokens=16", "--set", f"data_dir={shared_data}")
    assert out["results"]["gsm8k"]["n"] == 2 and 0 <= out["results"]["gsm8k"]["exact_match"] <= 1
    assert out["results"]["humaneval"]["tasks"] == 2 and out["results"]["humaneval"]["pass@1"] == 0.0


def test_bad_tasks_and_paths_are_clear_errors(checkpoint, capsys, tmp_path):
    assert main(["eval", str(checkpoint), "--tasks", "bogus"]) == 2
    assert "unknown task 'bogus'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", "validation_loss"]) == 2
    assert "not inside a train stage directory" in capsys.readouterr().err
