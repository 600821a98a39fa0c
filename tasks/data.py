"""The data stage as a retryable Prefect task, with the per-source accounting as a table artifact."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from palm.pipeline import run_stage_named
from palm.stages import StageOutput
from tasks.common import artifact_key, publish_summary


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
        })
    return rows


@task(name="data", task_run_name="data[{spec.name}]")
def data_task(spec: Any, root: str, force: bool = False) -> StageOutput:
    """Clean, deduplicate and mix the corpus (Beam), or reuse the complete output for this config."""
    out = run_stage_named(spec, "data", root, {}, force=force)
    create_table_artifact(key=artifact_key(spec, "data", "accounting"), table=accounting_rows(out.manifest),
                          description=f"Documents in, kept and dropped by reason, per source ({out.path})")
    publish_summary(spec, out)
    return out
