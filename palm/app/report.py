"""The run report: `report.md` with the stages (built or cached, seconds), the data stage's statistics, the
loss curve (PNG) and the evaluation table, in the run directory (local or gs://; each file is written whole,
never seen half-written). `report_markdown` is the same report for the Prefect UI, with the loss curve as a
table of sampled steps instead of the image.

Steps: a training step is one optimizer update. Checkpoint N holds the state after N updates (checkpoint
0 is the initialization), so the last checkpoint of a run of `train.steps` steps is `train.steps`.
metrics.jsonl and the metrics stored with a checkpoint count the update being made from 0 (row `step` k
is the update from the state of checkpoint k to that of checkpoint k + 1); the report, its loss curve, the
progress lines and the TensorBoard events count updates done (k + 1), the checkpoints' numbering. "Train loss" is TRAIN_LOSS_DEFINITION
(palm.analysis.scaling); the last step's loss is named as such."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from palm.analysis.scaling import TRAIN_LOSS_DEFINITION, train_loss_of
from palm.base import storage
from palm.dag.table import STAGES
from palm.store import layout
from palm.store.metrics import read_metrics


def throughput(metrics_path: str | Path) -> dict[str, float | None]:
    """Mean tokens/s and MFU (None where the chip's peak is unknown) over the steps of metrics.jsonl after
    the first of each attempt (which compiles the step), or {} when there are no metrics."""
    if not storage.exists(metrics_path):
        return {}
    rows = read_metrics(metrics_path)
    if not rows:
        return {}
    steady = rows[1:] or rows
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return {"tokens_per_second": sum(r["tokens_per_second"] for r in steady) / len(steady),
            "mfu": sum(mfus) / len(mfus) if mfus else None}


def loss_rows(metrics: list[dict[str, Any]], samples: int = 20) -> list[dict[str, Any]]:
    """The loss curve as at most `samples` rows (step, loss, learning rate, tokens/s), evenly spaced from
    the first step to the last; steps are counted from 1, as the logs and the plot count them."""
    if not metrics:
        return []
    n = len(metrics)
    picks = sorted({round(i * (n - 1) / (samples - 1)) for i in range(samples)}) if n > samples else range(n)
    return [{"step": metrics[i]["step"] + 1, "loss": round(metrics[i]["loss"], 4),
             "learning_rate": float(f"{metrics[i]['learning_rate']:.3g}"),
             "tokens_per_second": round(metrics[i]["tokens_per_second"])} for i in picks]


def load_plotting() -> Any:
    """matplotlib's pyplot, drawing to files (Agg). A heavy import (about 1.5 s), so only for the reports
    that plot; `palm run` loads it while Prefect's server starts."""
    import matplotlib  # heavy: only for the plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(metrics: list[dict[str, Any]], path: str | Path, title: str) -> str | Path:
    """Loss (and learning rate on a second axis) against step, as a PNG."""
    plt = load_plotting()

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


def stage_row(name: str, out: Any) -> dict[str, Any]:
    """One row of the report's stage table."""
    seconds = out.manifest.get("seconds")
    return {"stage": name, "type": out.stage, "built/cached": "cached" if out.cached else "built",
            "seconds": round(seconds, 1) if isinstance(seconds, (int, float)) else "-", "output": out.path}


def data_summary(manifest: dict[str, Any]) -> list[str]:
    """The data stage's statistics (its manifest, from accounting.json): documents read, kept and dropped
    per source and why, estimated tokens and mixture share, near-duplicate pairs."""
    rows = []
    for source, e in manifest["sources"].items():
        dropped = sorted(e.get("dropped", {}).items(), key=lambda kv: -kv[1])
        rows.append({"source": source, "docs in": e["docs_in"], "kept": e["docs_kept"],
                     "train/validation": f"{e['kept_by_split']['train']}/{e['kept_by_split']['validation']}",
                     "dropped (top reasons)": ", ".join(f"{r} {n}" for r, n in dropped[:3]) or "-",
                     "est. tokens": f"{round(e['estimated_tokens']):,}" if "estimated_tokens" in e else "-",
                     "share": round(e["share"], 3) if isinstance(e.get("share"), float) else "-",
                     "weight": e.get("weight", "-")})
    near = manifest.get("near_duplicates", {})
    return [f"- documents: {manifest.get('docs_in', 0):,} read, {manifest.get('docs_kept', 0):,} kept; "
            f"{len(manifest.get('shards', []))} shard files; token budget "
            f"{f'{round(budget):,}' if isinstance(budget := manifest.get('token_budget'), (int, float)) else 'all'}",
            f"- near-duplicates: {near.get('candidate_pairs', 0):,} candidate pairs, {near.get('verified_pairs', 0):,} "
            f"verified, {near.get('documents_dropped', 0):,} documents dropped", "", _table(rows)]


def write_report(root: str | Path, spec_name: str, workflow: Any, outputs: dict[str, Any]) -> str:
    """Write `report.md` (with a loss curve per training node, and each evaluation and scaling table)
    into the run directory; returns the report's path."""
    path = layout.report(root)
    storage.write_text_atomic(path, _report(root, spec_name, workflow, outputs, plots=True))
    return path


def report_markdown(root: str | Path, spec_name: str, workflow: Any, outputs: dict[str, Any]) -> str:
    """The report as `write_report` writes it, for a viewer that cannot open the run directory's files
    (the Prefect UI): each loss curve a table of sampled steps (loss_rows), no images."""
    return _report(root, spec_name, workflow, outputs, plots=False)


def _report(root: str | Path, spec_name: str, workflow: Any, outputs: dict[str, Any], plots: bool) -> str:
    lines = [f"# Run report: {spec_name}", "", "## Stages", "",
             "Built: run now; cached: an earlier run's output of the same key, reused. Seconds: the build's own "
             "(for a cached stage, that of the run that built it).", "",
             _table([stage_row(name, o) for name, o in outputs.items()])]
    for name, out in outputs.items():
        if STAGES[out.stage].trains:
            m = out.manifest
            metrics = read_metrics(m["metrics"]) if storage.exists(m["metrics"]) else []
            train_loss = train_loss_of(metrics)
            lines += [f"## Training: {name}" if workflow.declared else "## Training", "",
                      f"- steps (optimizer updates): {m['final_step']}; checkpoint N holds the state after N updates",
                      f"- train loss: {train_loss:.4f} ({TRAIN_LOSS_DEFINITION})" if train_loss is not None else None,
                      f"- last step's loss: {m['final_loss']:.4f}" if m.get("final_loss") is not None else None,
                      f"- checkpoint: `{m['checkpoint']}` (digest `{m['digest'][:16]}`)",
                      f"- started from: `{m['init_from']}`" if m.get("init_from") else None,
                      f"- resumed from step: {m['resumed_from']}" if m.get("resumed_from") else "- not resumed",
                      f"- microbatches per batch-ramp stage: {', '.join(map(str, m['microbatches']))}"
                      if m.get("microbatches") else None,
                      f"- loss spikes handled: {len(m.get('loss_spikes', []))}", ""]
            if metrics and plots:
                png = "loss.png" if name == "train" else f"loss-{name}.png"
                plot_loss(metrics, storage.join(root, png), f"{spec_name}: {name} loss")
                lines += [f"![loss curve]({png})", ""]
            elif metrics:
                lines += ["Loss curve (sampled steps):", "", _table(loss_rows(metrics))]
        elif out.stage == "quality":
            m = out.manifest
            lines += [f"## Quality classifier: {name}" if workflow.declared else "## Quality classifier", "",
                      f"- held-out AUC: {m['held_out_auc']:.4f}", "",
                      _table([{"source": s, "class": r["class"], "sampled": r["sampled"],
                               "expected keep rate": r["expected_keep_rate"] if r["expected_keep_rate"] is not None
                               else "-"} for s, r in m["sources"].items()])]
        elif out.stage == "data" and "sources" in out.manifest:
            lines += [f"## Data: {name}" if workflow.declared else "## Data", "", *data_summary(out.manifest)]
            if any("quality_sampling" in s for s in out.manifest["sources"].values()):
                lines += ["", "### Quality sampling", "",
                          _table([{"source": s, "scored": r["quality_sampling"]["scored"],
                                   "kept": r["quality_sampling"]["kept"],
                                   "keep rate": r["quality_sampling"]["keep_rate"]}
                                  for s, r in out.manifest["sources"].items() if "quality_sampling" in r])]
        elif out.stage == "eval":
            lines += [f"## Evaluation: {name}" if workflow.declared else "## Evaluation", "", _table(eval_rows(out.manifest))]
        elif out.stage == "scaling":
            lines += [f"## Scaling: {name}", "", _table(out.manifest["rows"]), out.manifest.get("fit_text", ""), ""]
            if plots:
                lines += [f"![scaling]({name}/{out.key}/scaling.png)", ""]
    return "\n".join(line for line in lines if line is not None)
