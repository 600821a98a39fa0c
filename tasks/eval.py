"""Evaluation as retryable Prefect tasks: the eval stage, and one checkpoint on its own."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from palm.evaltasks.run import evaluate_checkpoint, results_markdown
from palm.pipeline import run_stage_named
from palm.stages import StageOutput
from tasks.common import artifact_key, publish_summary


@task(name="eval", task_run_name="eval[{spec.name}]")
def eval_task(spec: Any, root: str, train: StageOutput, pack: StageOutput, tokenizer: StageOutput,
              force: bool = False) -> StageOutput:
    """Evaluate the final checkpoint of the train stage on the spec's tasks."""
    out = run_stage_named(spec, "eval", root, {"train": train, "pack": pack, "tokenizer": tokenizer}, force=force)
    create_markdown_artifact(key=artifact_key(spec, "eval", "results"), markdown=results_markdown(out.manifest["results"]),
                             description=f"Evaluation of {out.manifest['checkpoint']}")
    publish_summary(spec, out)
    return out


@task(name="eval-checkpoint", task_run_name="eval[{checkpoint}]")
def eval_checkpoint_task(checkpoint: str, eval_spec: Any, spec_name: str) -> dict[str, Any]:
    """Evaluate one checkpoint (a step directory) and publish its results table."""
    result = evaluate_checkpoint(checkpoint, eval_spec)
    create_markdown_artifact(key=f"{spec_name}-eval-step-{result['step']}".lower().replace("_", "-"),
                             markdown=results_markdown(result["results"]), description=f"Evaluation of {checkpoint}")
    return result
