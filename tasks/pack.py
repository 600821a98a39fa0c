"""The pack stage as a retryable Prefect task."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from palm.pipeline import run_stage_named
from palm.stages import StageOutput
from tasks.common import artifact_key, publish_summary


@task(name="pack", task_run_name="pack[{spec.name}]")
def pack_task(spec: Any, root: str, data: StageOutput, tokenizer: StageOutput, force: bool = False) -> StageOutput:
    """Tokenize and pack the corpus into fixed-length sequences (Beam -> ArrayRecord)."""
    out = run_stage_named(spec, "pack", root, {"data": data, "tokenizer": tokenizer}, force=force)
    rows = [{"split": split, "source": source, "docs": c["docs"], "tokens": c["tokens"], "sequences": c["sequences"],
             "tokens_dropped": c["tokens_dropped"]}
            for split, by_source in out.manifest["splits"].items() for source, c in by_source.items()]
    create_table_artifact(key=artifact_key(spec, "pack", "sequences"), table=rows,
                          description=f"Tokens and sequences per split and source ({out.path})")
    publish_summary(spec, out)
    return out
