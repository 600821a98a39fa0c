"""Evaluation of one checkpoint on its own, as a Prefect task (the eval stage is tasks.stage's)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from palm.evaltasks.run import evaluate_checkpoint, results_markdown


@task(name="eval-checkpoint", task_run_name="eval[{checkpoint}]")
def eval_checkpoint_task(checkpoint: str, eval_spec: Any, spec_name: str) -> dict[str, Any]:
    """Evaluate one checkpoint (a step directory) and publish its results table."""
    result = evaluate_checkpoint(checkpoint, eval_spec)
    create_markdown_artifact(key=f"{spec_name}-eval-step-{result['step']}".lower().replace("_", "-"),
                             markdown=results_markdown(result["results"]), description=f"Evaluation of {checkpoint}")
    return result
