"""The pre-flight compile stage as a retryable Prefect task: the TPU steps compiled before any chip-hour."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from palm.pipeline import run_stage_named
from palm.stages import StageOutput
from tasks.common import artifact_key, publish_summary


@task(name="compile", task_run_name="compile[{spec.name}]")
def compile_task(spec: Any, root: str, force: bool = False) -> StageOutput:
    """Compile the train step at every batch of the ramp, and the evaluation step, for the spec's TPU pods
    ahead of time; fails (never retried) with what to change when a step does not fit a chip."""
    out = run_stage_named(spec, "compile", root, {}, force=force)
    rows = [{"step": s["kind"], "global_batch": s["global_batch"],
             "GiB per chip": round(s["memory_per_device_bytes"] / 2**30, 2),
             "GiB estimated": round(s["estimated_memory_per_device_bytes"] / 2**30, 2),
             "compile seconds": round(s["compile_seconds"], 1)} for s in out.manifest["steps"]]
    create_table_artifact(key=artifact_key(spec, "compile", "memory"), table=rows,
                          description=f"Per-chip memory of each step on {out.manifest['devices']} "
                                      f"{out.manifest['accelerator']} chips ({out.path})")
    publish_summary(spec, out)
    return out
