"""One Prefect task for every workflow node: the spec's retry policy around one palm call, then the stage
type's artifacts. Training nodes go through tasks.train (launchers, checkpoint events); the rest build in
this process (palm.dag.runner.run_node)."""

from __future__ import annotations

from typing import Any, Callable

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from palm.dag.table import STAGES
from palm.dag.runner import attached, run_node
from palm.store.outputs import StageOutput
from tasks.train import run_training_node
from tasks.common import artifact_key, as_environment_fault, publish_summary, with_retry_policy
from palm.evaluation.run import results_markdown


def accounting_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per source: documents in, kept, dropped by reason, and the achieved mixture share."""
    rows = []
    for name, src in manifest["sources"].items():
        rows.append({
            "source": name,
            "docs_in": src["docs_in"],
            "docs_kept": src["docs_kept"],
            "dropped": ", ".join(f"{reason} {count}" for reason, count in src["dropped"].items()) or "-",
            "weight": src["weight"],
            "share": round(src["share"], 4),
            # Sources sampled by quality score: the share of scored documents the Pareto rule kept.
            "quality_keep_rate": (round(src["quality_sampling"]["keep_rate"], 4)
                                  if src.get("quality_sampling", {}).get("keep_rate") is not None else "-"),
        })
    return rows


def _publish_quality(node: Any, root: str, out: StageOutput) -> None:
    m = out.manifest
    rows = [{"source": name, "class": s["class"], "sampled": s["sampled"], "held_out": s["held_out"],
             "median score (held out)": round(s["held_out_scores"].get("p50", float("nan")), 4),
             "expected keep rate": round(s["expected_keep_rate"], 4) if s["expected_keep_rate"] is not None else "-"}
            for name, s in m["sources"].items()]
    create_table_artifact(key=artifact_key(node, root, "classifier"), table=rows,
                          description=f"Quality classifier: held-out AUC {m['held_out_auc']:.4f} ({out.path})")


def _publish_data(node: Any, root: str, out: StageOutput) -> None:
    create_table_artifact(key=artifact_key(node, root, "accounting"), table=accounting_rows(out.manifest),
                          description=f"Documents in, kept and dropped by reason, per source ({out.path})")


def _publish_pack(node: Any, root: str, out: StageOutput) -> None:
    rows = [{"split": split, "source": source, "docs": c["docs"], "tokens": c["tokens"], "sequences": c["sequences"],
             "tokens_dropped": c["tokens_dropped"]}
            for split, by_source in out.manifest["splits"].items() for source, c in by_source.items()]
    create_table_artifact(key=artifact_key(node, root, "sequences"), table=rows,
                          description=f"Tokens and sequences per split and source ({out.path})")


def _publish_compile(node: Any, root: str, out: StageOutput) -> None:
    rows = [{"step": s["kind"], "global_batch": s["global_batch"],
             "GiB per chip": round(s["memory_per_device_bytes"] / 2**30, 2),
             "GiB estimated": round(s["estimated_memory_per_device_bytes"] / 2**30, 2),
             "compile seconds": round(s["compile_seconds"], 1)} for s in out.manifest["steps"]]
    create_table_artifact(key=artifact_key(node, root, "memory"), table=rows,
                          description=f"Per-chip memory of each step on {out.manifest['devices']} "
                                      f"{out.manifest['accelerator']} chips ({out.path})")


def _publish_eval(node: Any, root: str, out: StageOutput) -> None:
    create_markdown_artifact(key=artifact_key(node, root, "results"), markdown=results_markdown(out.manifest["results"]),
                             description=f"Evaluation of {out.manifest['checkpoint']}")


def _publish_scaling(node: Any, root: str, out: StageOutput) -> None:
    create_table_artifact(key=artifact_key(node, root, "table"), table=out.manifest["rows"],
                          description=f"Loss against parameters and training FLOPs ({out.path})")


#: Artifacts per stage type, before the summary every node publishes (a training node's has its result:
#: tasks.common.publish_summary; its loss curve is in the run's report, tasks.report). Keys: run_key.
PUBLISHERS: dict[str, Callable[[Any, str, StageOutput], None]] = {
    "data": _publish_data, "pack": _publish_pack, "compile": _publish_compile, "eval": _publish_eval,
    "quality": _publish_quality,
    "scaling": _publish_scaling,
}


@task(name="stage", task_run_name="{node.name}[{node.spec.name}]", cache_policy=NO_CACHE)
def stage_task(node: Any, root: str, inputs: dict[str, StageOutput], force: bool = False) -> StageOutput:
    """Build (or reuse) one workflow node's content-addressed output and publish its artifacts."""
    hooks = attached()
    if hooks.on_stage_start is not None:
        hooks.on_stage_start(node.name)
    try:
        if STAGES[node.stage].trains:
            out = run_training_node(node, root, inputs, force, get_run_logger())
        else:
            out = run_node(node, root, inputs, force=force, hooks=hooks)
    except Exception as e:  # noqa: BLE001 - a full disk, a forbidden or wrong kind of path: one line, no retry
        fault = as_environment_fault(e, root)
        if fault is e:
            raise
        raise fault from e  # the original stays in the task run's log
    if node.stage in PUBLISHERS:
        PUBLISHERS[node.stage](node, root, out)
    publish_summary(node, root, out)
    if hooks.on_stage is not None:
        hooks.on_stage(out)
    return out


def node_task(node: Any) -> Task:
    """The stage task with the node's retry policy (from its spec, by stage type)."""
    return with_retry_policy(stage_task, node.spec, node.stage)
