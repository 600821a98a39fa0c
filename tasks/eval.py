"""Evaluation of one checkpoint on its own, as a Prefect task: in this process, or as a sharded job on the
launcher's workers for a checkpoint too large for it (palm.evaljob). (The eval stage is tasks.stage's.)"""

from __future__ import annotations

from typing import Any, Sequence

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from palm.evaltasks.run import evaluate_checkpoint, results_markdown


def _publish(result: dict[str, Any], checkpoint: str, spec_name: str) -> None:
    create_markdown_artifact(key=f"{spec_name}-eval-step-{result['step']}".lower().replace("_", "-"),
                             markdown=results_markdown(result["results"]), description=f"Evaluation of {checkpoint}")


@task(name="eval-checkpoint", task_run_name="eval[{checkpoint}]")
def eval_checkpoint_task(checkpoint: str, eval_spec: Any, spec_name: str) -> dict[str, Any]:
    """Evaluate one checkpoint (a step directory) in this process and publish its results table."""
    result = evaluate_checkpoint(checkpoint, eval_spec)
    _publish(result, checkpoint, spec_name)
    return result


@task(name="eval-checkpoint-on-workers", task_run_name="eval-on-workers[{checkpoint}]")
def eval_on_workers_task(checkpoint: str, spec: Any, spec_path: str, overrides: Sequence[str], root: str) -> dict[str, Any]:
    """Evaluate one checkpoint as a sharded job on the spec's launcher (palm.evaljob.evaluate_on_workers):
    launch it (or re-attach to the running job of this checkpoint), follow it, its log lines into this
    task's log, and publish the result its host 0 wrote."""
    from palm.evaljob import evaluate_on_workers

    logger = get_run_logger()
    result = evaluate_on_workers(spec, spec_path, root, checkpoint, list(overrides),
                                 log=lambda line: logger.info("%s", line))
    _publish(result, checkpoint, spec.name)
    return result
