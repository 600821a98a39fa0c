"""`palm run`'s display: a live progress bar on a terminal, plain lines anywhere else."""

from __future__ import annotations

import io
import re

from palm.app.console import RunConsole
from palm.store.outputs import StageOutput
from palm.core.train import StepLog


def log(step: int, loss: float) -> StepLog:
    return StepLog(step=step, loss=loss, z_loss=0.0, accuracy=0.1, grad_norm=1.0, update_norm=0.1,
                   learning_rate=1e-2, global_batch=8, step_seconds=0.01, tokens_per_second=12_345.0, mfu=None)


def drive(console: RunConsole) -> None:
    with console:
        console.stage_started("data")
        console.stage_finished(StageOutput("data", "k1", "/runs/tiny/data/k1", {"seconds": 3.14}, cached=False))
        console.stage_started("train")
        for step in range(10):
            console.step(log(step, 8.0 - step * 0.5))
        console.checkpoint("/runs/tiny/train/k2/checkpoints/10", 10, {})
        console.stage_finished(StageOutput("train", "k2", "/runs/tiny/train/k2", {"seconds": 1.0}, cached=False))
        console.stage_finished(StageOutput("eval", "k3", "/runs/tiny/eval/k3", {}, cached=True))


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", text).replace("\r", "\n")


def test_a_terminal_gets_a_progress_bar_with_loss_and_tokens_per_second():
    stream = io.StringIO()
    drive(RunConsole(steps=10, log_every=5, stream=stream, live=True, width=120))
    text = plain(stream.getvalue())
    assert "━" in text  # the bar
    assert re.search(r"train .*10/10 loss 3\.5000\s+12,345 tokens/s", text)  # the last step, on the bar
    assert "stage data: built in 3.1 s; manifest /runs/tiny/data/k1/manifest.json" in text
    assert "checkpoint 10: /runs/tiny/train/k2/checkpoints/10" in text
    assert "stage eval: cached" in text
    assert "step 6/10" not in text  # no per-step lines under a live bar


def test_a_pipe_gets_one_plain_line_per_logged_step():
    stream = io.StringIO()
    drive(RunConsole(steps=10, log_every=5, stream=stream))  # a StringIO is not a terminal
    lines = stream.getvalue().splitlines()
    assert "\x1b" not in stream.getvalue() and "━" not in stream.getvalue()
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["1/10", "6/10", "10/10"]
    assert "step 10/10 loss 3.5000 lr 1.00e-02 batch 8 12,345 tokens/s" in lines
    assert lines[0] == "stage data: built in 3.1 s; manifest /runs/tiny/data/k1/manifest.json"
    assert lines[-1] == "stage eval: cached; manifest /runs/tiny/eval/k3/manifest.json"
