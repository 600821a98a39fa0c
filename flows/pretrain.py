"""The pretraining flow: one Prefect flow built from a spec, one retryable task per stage.

    data -> tokenizer -> pack -> train -> eval

Stage outputs are content-addressed (palm.stages), so a re-run skips complete stages, a changed stage
re-runs with everything downstream, and a retried train task resumes from its checkpoints.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from palm.errors import StageNotBuiltError
from palm.pipeline import BUILT, PLANNED_BY, STAGE_INPUTS, STAGE_ORDER, existing_output, needed_stages, select_stages
from palm.report import write_report
from palm.spec import load_spec
from tasks.common import with_retry_policy
from tasks.data import data_task
from tasks.eval import eval_task
from tasks.pack import pack_task
from tasks.tokenizer import tokenizer_task
from tasks.train import train_task

TASKS = {"data": data_task, "tokenizer": tokenizer_task, "pack": pack_task, "train": train_task, "eval": eval_task}


def run_root(spec: Any, output: str | None) -> str:
    return output or f"{spec.infra.storage_root.rstrip('/')}/{spec.name}"


def record_spec(spec: Any, root: str) -> None:
    """Keep the resolved spec beside the run's outputs, for evaluations triggered by its events."""
    from pathlib import Path

    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / "spec.json").write_text(spec.model_dump_json(indent=2))


@flow(name="pretrain", log_prints=True)
def pretrain(spec_path: str, overrides: list[str] | None = None, output: str | None = None,
             stages: str | None = None, force: list[str] | None = None) -> dict[str, Any]:
    """Run a spec's pipeline; returns the same summary `palm run --json` prints."""
    logger = get_run_logger()
    spec = load_spec(spec_path, overrides or [])
    root = run_root(spec, output)
    record_spec(spec, root)
    selected = select_stages(stages)
    force = set(force or [])
    outputs = {}
    for stage in STAGE_ORDER:
        if stage not in needed_stages(selected):
            continue
        inputs = {dep: outputs[dep] for dep in STAGE_INPUTS[stage]}
        if stage in selected:
            task = with_retry_policy(TASKS[stage], spec, stage)
            outputs[stage] = task(spec, root, **inputs, force=stage in force)
        else:
            outputs[stage] = existing_output(spec, stage, root, inputs)
        logger.info("stage %s: %s (%s)", stage, outputs[stage].path, "cached" if outputs[stage].cached else "built")
    missing = [s for s in selected if s not in BUILT]
    if missing:
        raise StageNotBuiltError("not built yet: " + ", ".join(f"{s} (issue {PLANNED_BY[s]})" for s in missing))
    report = write_report(root, spec.name, outputs)
    summary: dict[str, Any] = {
        "status": "completed", "root": root, "report": str(report),
        "stages": {s: {"output": o.path, "cached": o.cached, "key": o.key} for s, o in outputs.items()}}
    if "train" in outputs:
        m = outputs["train"].manifest
        summary.update(final_step=m["final_step"], final_loss=m["final_loss"], checkpoint=m["checkpoint"])
    if "eval" in outputs:
        summary["eval"] = outputs["eval"].manifest.get("results")
    return summary
