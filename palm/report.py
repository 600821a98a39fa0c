"""The run report: `report.md` with the loss curve (PNG) and the evaluation table, in the run directory
(local or gs://; each file is written whole, never seen half-written)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from palm import storage


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Per-step metrics from the train stage's metrics.jsonl; after a resume the later line for a step wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in storage.read_text(path).splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(metrics: list[dict[str, Any]], path: str | Path, title: str) -> str | Path:
    """Loss (and learning rate on a second axis) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] + 1 for m in metrics]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [m["loss"] for m in metrics], color="tab:blue", lw=1.2, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot(steps, [m["learning_rate"] for m in metrics], color="tab:orange", lw=1, alpha=0.7, label="learning rate")
    lr.set_ylabel("learning rate")
    ax.set_title(title)
    fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.88), fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    storage.write_bytes_atomic(path, png.getvalue())
    return path


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_none_\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def eval_rows(eval_manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    """(task, metric, value) rows from the eval stage's manifest."""
    if not eval_manifest:
        return []
    return [{"task": task, "metric": metric, "value": value}
            for task, metrics in eval_manifest.get("results", {}).items()
            for metric, value in metrics.items() if isinstance(value, (int, float))]


def write_report(root: str | Path, spec_name: str, workflow: Any, outputs: dict[str, Any]) -> str:
    """Write `report.md` (with a loss curve per training node, and each evaluation and scaling table)
    into the run directory; returns the report's path."""
    from palm.pipeline import STAGES

    lines = [f"# Run report: {spec_name}", "", "## Stages", "",
             _table([{"stage": name, "type": o.stage, "cached": o.cached, "output": o.path} for name, o in outputs.items()])]
    for name, out in outputs.items():
        if STAGES[out.stage].trains:
            m = out.manifest
            metrics = read_metrics(m["metrics"]) if storage.exists(m["metrics"]) else []
            lines += [f"## Training: {name}" if workflow.declared else "## Training", "",
                      f"- steps: {m['final_step']}, final loss {m['final_loss']:.4f}" if m.get("final_loss") is not None
                      else f"- steps: {m['final_step']}",
                      f"- checkpoint: `{m['checkpoint']}` (digest `{m['digest'][:16]}`)",
                      f"- started from: `{m['init_from']}`" if m.get("init_from") else None,
                      f"- resumed from step: {m['resumed_from']}" if m.get("resumed_from") else "- not resumed",
                      f"- loss spikes handled: {len(m.get('loss_spikes', []))}", ""]
            if metrics:
                png = "loss.png" if name == "train" else f"loss-{name}.png"
                plot_loss(metrics, storage.join(root, png), f"{spec_name}: {name} loss")
                lines += [f"![loss curve]({png})", ""]
        elif out.stage == "eval":
            lines += [f"## Evaluation: {name}" if workflow.declared else "## Evaluation", "", _table(eval_rows(out.manifest))]
        elif out.stage == "scaling":
            lines += [f"## Scaling: {name}", "", _table(out.manifest["rows"]), out.manifest.get("fit_text", ""), "",
                      f"![scaling]({name}/{out.key}/scaling.png)", ""]
    path = storage.join(root, "report.md")
    storage.write_text_atomic(path, "\n".join(line for line in lines if line is not None))
    return path
