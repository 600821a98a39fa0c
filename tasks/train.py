"""The train stage as a retryable Prefect task: progress in the logs, an event per checkpoint.

A retry (after a crash, a preemption or a bad host) runs the same content-addressed stage again,
which resumes from its latest valid checkpoint: it never starts again from step 0.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from palm.pipeline import Hooks, run_stage_named
from palm.stages import StageOutput
from tasks.common import publish_summary

CHECKPOINT_SAVED = "palm.checkpoint.saved"


def emit_checkpoint_saved(spec: Any, path: str, step: int, record: dict[str, Any]) -> None:
    """Tell Prefect a checkpoint is on disk; evaluation deployments trigger on this event."""
    from prefect.events import emit_event

    loss = (record.get("metrics") or {}).get("loss")
    emit_event(event=CHECKPOINT_SAVED,
               resource={"prefect.resource.id": f"palm.checkpoint.{path}", "palm.checkpoint.path": path,
                         "palm.run": spec.name},
               payload={"run": spec.name, "step": step, "loss": loss, "path": path})


@task(name="train", task_run_name="train[{spec.name}]")
def train_task(spec: Any, root: str, pack: StageOutput, force: bool = False) -> StageOutput:
    """Train (or resume training) the model on the packed data; checkpoints as the spec says."""
    logger = get_run_logger()

    def on_step(log, state) -> None:
        if log.step % spec.train.log_every == 0 or log.step + 1 == spec.train.steps:
            logger.info("step %d/%d loss %.4f lr %.2e batch %d %.0f tokens/s", log.step + 1, spec.train.steps,
                        log.loss, log.learning_rate, log.global_batch, log.tokens_per_second)

    def on_checkpoint(path: str, step: int, record: dict[str, Any]) -> None:
        logger.info("checkpoint %d saved: %s", step, path)
        emit_checkpoint_saved(spec, path, step, record)

    out = run_stage_named(spec, "train", root, {"pack": pack}, force=force,
                          hooks=Hooks(on_step=on_step, on_checkpoint=on_checkpoint))
    publish_summary(spec, out)
    return out
