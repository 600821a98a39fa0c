"""The run's report in the Prefect UI: artifacts of the pretrain flow run (keys: tasks.common.run_key).

- `<run key>-report` (markdown): what palm.app.report writes to report.md (the stages, each training node's
  result and loss curve, the evaluation and scaling tables), the loss curve as a table of sampled steps;
- `<run key>-<node>-loss` (table), for each training node with metrics: the sampled loss curve.
"""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from palm.base import storage
from palm.app.report import loss_rows, report_markdown
from palm.store.metrics import read_metrics
from tasks.common import run_artifact_key
from palm.dag.table import STAGES


def publish_run_report(root: str, spec_name: str, workflow: Any, outputs: dict[str, Any]) -> str:
    """Publish the report and the loss tables; returns the report's key."""
    key = run_artifact_key(spec_name, root, "report")
    create_markdown_artifact(key=key, markdown=report_markdown(root, spec_name, workflow, outputs),
                             description=f"Run report of {spec_name} ({root})")
    for name, out in outputs.items():
        metrics_path = out.manifest.get("metrics") if STAGES[out.stage].trains else None
        if metrics_path and storage.exists(metrics_path):
            rows = loss_rows(read_metrics(metrics_path))
            if rows:
                create_table_artifact(key=run_artifact_key(spec_name, root, name, "loss"), table=rows,
                                      description=f"Loss curve of {name} (sampled steps; {metrics_path})")
    return key
