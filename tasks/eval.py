"""Evaluation of one checkpoint on its own, as a Prefect task: in this process, or as a sharded job on the
launcher's workers for a checkpoint too large for it (palm.jobs.evaljob). (The eval stage is tasks.stage's.)"""

from __future__ import annotations

import json
from typing import Any, Sequence

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from palm.store import layout
from palm.evaluation.run import evaluate_checkpoint, results_markdown
from tasks.common import run_artifact_key
from palm.jobs.evaljob import evaluate_on_workers


def _train_node(checkpoint: str) -> str:
    """The training node's name from a checkpoint path: <root>/<node>/<key>/checkpoints/<step>."""
    return layout.node_of(layout.train_dir_of(checkpoint))


def _publish(result: dict[str, Any], checkpoint: str, spec_name: str, root: str) -> None:
    """`<run key>-<node>-eval-step-<step>` (tasks.common.run_key): this checkpoint's results."""
    create_markdown_artifact(key=run_artifact_key(spec_name, root, _train_node(checkpoint), "eval-step", result["step"]),
                             markdown=results_markdown(result["results"]), description=f"Evaluation of {checkpoint}")


def evaluation_rows(results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluated checkpoint, by step: each task's metrics as `<task> <metric>` columns (the
    same columns in every row, "-" where a checkpoint lacks one), then the checkpoint's path."""
    columns: list[str] = []
    rows = []
    for step, record in sorted(results.items()):
        values = {f"{task} {metric}": round(v, 4) if isinstance(v, float) else v
                  for task, metrics in (record.get("results") or {}).items() for metric, v in metrics.items()}
        columns += [c for c in values if c not in columns]
        rows.append((step, values, record.get("checkpoint", "")))
    return [{"step": step, **{c: values.get(c, "-") for c in columns}, "checkpoint": path}
            for step, values, path in rows]


def publish_evaluations(spec_name: str, root: str, train_dir: str, results: dict[int, dict[str, Any]],
                        if_stale: bool = False) -> str | None:
    """`<run key>-<node>-evaluations`: every evaluated checkpoint of the training node in `train_dir`
    (its ledger's results), a new version after each evaluation. With `if_stale`, only where the latest
    version lacks some of `results`' steps (two evaluation runs at once: the one that published last
    may have read the ledger before the other recorded). Returns the key, or None when nothing was
    published."""
    node = layout.node_of(train_dir)
    key = run_artifact_key(spec_name, root, node, "evaluations")
    if if_stale and set(results) <= set(published_steps(key)):
        return None
    create_table_artifact(key=key, table=evaluation_rows(results),
                          description=f"Evaluations of the checkpoints of {node} in {train_dir}, by step")
    return key


def published_steps(key: str) -> list[int]:
    """The steps in the latest version of an evaluations table artifact ([] when there is none)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    with get_client(sync_client=True) as client:
        latest = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key])), limit=1)
    if not latest:
        return []
    rows = json.loads(latest[0].data) if isinstance(latest[0].data, str) else latest[0].data
    return [row["step"] for row in rows or []]


@task(name="eval-checkpoint", task_run_name="eval[{checkpoint}]")
def eval_checkpoint_task(checkpoint: str, eval_spec: Any, spec_name: str, root: str) -> dict[str, Any]:
    """Evaluate one checkpoint (a step directory) in this process and publish its results table (keyed
    by the run: `spec_name` and its run root)."""
    result = evaluate_checkpoint(checkpoint, eval_spec)
    _publish(result, checkpoint, spec_name, root)
    return result


@task(name="eval-checkpoint-on-workers", task_run_name="eval-on-workers[{checkpoint}]")
def eval_on_workers_task(checkpoint: str, spec: Any, spec_path: str, overrides: Sequence[str], root: str) -> dict[str, Any]:
    """Evaluate one checkpoint as a sharded job on the spec's launcher (palm.jobs.evaljob.evaluate_on_workers):
    launch it (or re-attach to the running job of this checkpoint), follow it, its log lines into this
    task's log, and publish the result its host 0 wrote."""
    logger = get_run_logger()
    result = evaluate_on_workers(spec, spec_path, root, checkpoint, list(overrides),
                                 log=lambda line: logger.info("%s", line))
    _publish(result, checkpoint, spec.name, root)
    return result
