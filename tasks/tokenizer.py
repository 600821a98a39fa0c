"""The tokenizer stage as a retryable Prefect task."""

from __future__ import annotations

from typing import Any

from prefect import task

from palm.pipeline import run_stage_named
from palm.stages import StageOutput
from tasks.common import publish_summary


@task(name="tokenizer", task_run_name="tokenizer[{spec.name}]")
def tokenizer_task(spec: Any, root: str, data: StageOutput, force: bool = False) -> StageOutput:
    """Train the lossless SentencePiece vocabulary on a sample of the data stage's output."""
    out = run_stage_named(spec, "tokenizer", root, {"data": data}, force=force)
    publish_summary(spec, out)
    return out
