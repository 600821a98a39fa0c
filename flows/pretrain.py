"""The pretraining flow: one Prefect flow built from a spec, one retryable task per stage.

    [compile] -> data -> tokenizer -> pack -> train -> eval

(compile: TPU specs only, the pre-flight check that every step fits the pods' chips, run first; palm.aot.)

Stage outputs are content-addressed (palm.stages), so a re-run skips complete stages, a changed stage
re-runs with everything downstream, and a retried train task resumes from its checkpoints.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from palm.pipeline import Hooks, attached, record_spec, run_dag, run_summary, select_stages
from palm.report import write_report
from palm.spec import load_spec
from tasks.common import with_retry_policy
from tasks.compile import compile_task
from tasks.data import data_task
from tasks.eval import eval_task
from tasks.pack import pack_task
from tasks.tokenizer import tokenizer_task
from tasks.train import train_task

TASKS = {"data": data_task, "tokenizer": tokenizer_task, "pack": pack_task, "compile": compile_task,
         "train": train_task, "eval": eval_task}


def run_root(spec: Any, output: str | None) -> str:
    return output or f"{spec.infra.storage_root.rstrip('/')}/{spec.name}"


@flow(name="pretrain", log_prints=True)
def pretrain(spec_path: str, overrides: list[str] | None = None, output: str | None = None,
             stages: str | None = None, force: list[str] | None = None) -> dict[str, Any]:
    """Run a spec's pipeline; returns the same summary `palm run --json` prints.

    Each selected stage is its spec's retryable task; stages not selected must already have a complete
    output. Hooks attached in this process (`palm run`'s progress display) hear every stage.
    """
    logger = get_run_logger()
    spec = load_spec(spec_path, overrides or [])
    root = run_root(spec, output)
    record_spec(spec, root)

    def run(stage: str, inputs: dict[str, Any], forced: bool) -> Any:
        return with_retry_policy(TASKS[stage], spec, stage)(spec, root, **inputs, force=forced)

    def done(out: Any) -> None:
        logger.info("stage %s: %s (%s)", out.stage, out.path, "cached" if out.cached else "built")

    outputs = run_dag(spec, root, select_stages(spec, stages), frozenset(force or ()), run=run,
                      hooks=Hooks(on_stage=done) + attached())
    return run_summary(root, write_report(root, spec.name, outputs), outputs)
