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


def write_report(root: str | Path, spec_name: str, outputs: dict[str, Any]) -> str:
    """Write `report.md` (and `loss.png`) into the run directory; returns the report's path."""
    lines = [f"# Run report: {spec_name}", "", "## Stages", "",
             _table([{"stage": s, "cached": o.cached, "output": o.path} for s, o in outputs.items()])]
    train = outputs.get("train")
    if train is not None:
        m = train.manifest
        metrics = read_metrics(m["metrics"]) if storage.exists(m["metrics"]) else []
        lines += ["## Training", "",
                  f"- steps: {m['final_step']}, final loss {m['final_loss']:.4f}" if m.get("final_loss") is not None
                  else f"- steps: {m['final_step']}",
                  f"- checkpoint: `{m['checkpoint']}` (digest `{m['digest'][:16]}`)",
                  f"- resumed from step: {m['resumed_from']}" if m.get("resumed_from") else "- not resumed",
                  f"- loss spikes handled: {len(m.get('loss_spikes', []))}", ""]
        if metrics:
            plot_loss(metrics, storage.join(root, "loss.png"), f"{spec_name}: training loss")
            lines += ["![loss curve](loss.png)", ""]
    if "eval" in outputs:
        lines += ["## Evaluation", "", _table(eval_rows(outputs["eval"].manifest))]
    path = storage.join(root, "report.md")
    storage.write_text_atomic(path, "\n".join(lines))
    return path
