"""The scaling report: several trained models compared, as the paper's scaling figures (Figures 1 and 5).

For every training node a scaling node collects: its parameters, the tokens and model FLOPs it trained
on (6N + 12·L·H·Q·T per token), its train loss (TRAIN_LOSS_DEFINITION: the mean of the last tenth of logged steps) and,
where an eval node of the same checkpoint is collected too, its validation loss. A power law
loss = a · x^b is fitted by least squares in log-log space against parameters and against training FLOPs
(at least two models), and written with the table and a plot.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from palm.base import storage
from palm.base.errors import PalmError
from palm.store.metrics import read_metrics


#: What "train loss" means wherever this project reports one (the scaling table, the run report): the mean
#: training cross-entropy of the last tenth of the logged steps, which smooths the batch-to-batch noise of
#: one step's loss. The manifest's `final_loss` is the last step's alone; the report names both.
TRAIN_LOSS_DEFINITION = "mean of the last 10% of logged steps"


def train_loss_of(metrics: list[dict[str, Any]]) -> float | None:
    """The train loss (TRAIN_LOSS_DEFINITION) of a run's metrics rows; None without rows."""
    if not metrics:
        return None
    tail = metrics[-max(1, len(metrics) // 10):]
    return sum(m["loss"] for m in tail) / len(tail)


def _final_train_loss(manifest: dict[str, Any]) -> float | None:
    metrics = read_metrics(manifest["metrics"]) if storage.exists(manifest["metrics"]) else []
    if not metrics:
        return manifest.get("final_loss")
    return train_loss_of(metrics)


def fit_power_law(xs: list[float], ys: list[float]) -> dict[str, float] | None:
    """a, b of y = a·x^b by least squares on (log x, log y), with R²; None with fewer than two distinct x."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len({p[0] for p in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    a = math.exp(my - b * mx)
    ss_res = sum((p[1] - (math.log(a) + b * p[0])) ** 2 for p in points)
    ss_tot = sum((p[1] - my) ** 2 for p in points)
    return {"a": a, "b": b, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def scaling_rows(inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per collected training node, smallest model first."""
    trained = {name: out for name, out in inputs.items() if out.stage in ("train", "finetune")}
    if not trained:
        raise PalmError("a scaling node needs training nodes among its needs")
    evals = {out.manifest.get("checkpoint"): out.manifest for out in inputs.values() if out.stage == "eval"}
    rows = []
    for name, out in trained.items():
        m = out.manifest
        validation = (evals.get(m["checkpoint"]) or {}).get("results", {}).get("validation_loss", {})
        rows.append({"model": name, "params": m["params"], "tokens": m["training_tokens"],
                     "training_flops": m["model_flops_per_token"] * m["training_tokens"],
                     "train_loss": _final_train_loss(m),
                     "validation_loss": validation.get("nll_per_token") if isinstance(validation, dict) else None})
    return sorted(rows, key=lambda r: (r["params"], r["training_flops"]))


def scaling_report(inputs: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write scaling.json, scaling.md and scaling.png into `out`; returns the manifest fields."""
    rows = scaling_rows(inputs)
    loss_key = "validation_loss" if all(r["validation_loss"] is not None for r in rows) else "train_loss"
    losses = [r[loss_key] for r in rows]
    fits = {x: fit_power_law([r[x] for r in rows], losses) for x in ("params", "training_flops")}
    fit_text = "; ".join(f"{loss_key} ≈ {f['a']:.4g} · {x}^{f['b']:.4f} (R² {f['r2']:.3f})"
                         for x, f in fits.items() if f is not None) or "too few models for a fit"
    (out / "scaling.json").write_text(json.dumps({"rows": rows, "loss": loss_key, "fits": fits}, indent=2))
    lines = [f"| model | params | tokens | training FLOPs | train loss ({TRAIN_LOSS_DEFINITION}) | validation loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        val = f"{r['validation_loss']:.4f}" if r["validation_loss"] is not None else "-"
        lines.append(f"| {r['model']} | {r['params']:,} | {r['tokens']:,} | {r['training_flops']:.3e} | "
                     f"{r['train_loss']:.4f} | {val} |")
    (out / "scaling.md").write_text("\n".join(lines) + f"\n\n{fit_text}\n")
    _plot(rows, loss_key, fits, out / "scaling.png")
    return {"rows": rows, "loss": loss_key, "fits": fits, "fit_text": fit_text, "models": len(rows)}


def _plot(rows: list[dict[str, Any]], loss_key: str, fits: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = scaling_figure(rows, loss_key, fits)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    path.write_bytes(png.getvalue())


def scaling_figure(rows: list[dict[str, Any]], loss_key: str, fits: dict[str, Any]) -> Any:
    """Loss against parameters and against training FLOPs, log-log, with the fitted power law. Each axis is
    ticked and labelled at the models' own values (a range inside one or two decades would otherwise show
    no labelled tick at all, or only 10^6 and 10^12)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, FuncFormatter, NullFormatter, NullLocator

    loss_label = "validation loss" if loss_key == "validation_loss" else f"train loss ({TRAIN_LOSS_DEFINITION})"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    for ax, x, label in zip(axes, ("params", "training_flops"), ("parameters", "training FLOPs")):
        xs, ys = [r[x] for r in rows], [r[loss_key] for r in rows]
        ax.scatter(xs, ys, color="tab:blue", zorder=3)
        for r in rows:
            ax.annotate(r["model"], (r[x], r[loss_key]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        fit = fits.get(x)
        if fit is not None:
            lo, hi = min(xs), max(xs)
            grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
            ax.plot(grid, [fit["a"] * g ** fit["b"] for g in grid], color="tab:orange", lw=1,
                    label=f"fit: {fit['a']:.4g}·x^{fit['b']:.4f} (R² {fit['r2']:.3f})")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sorted(set(xs))))
        ax.xaxis.set_major_formatter(FuncFormatter(short_number))
        ax.yaxis.set_major_locator(FixedLocator(_loss_ticks(ys)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_locator(NullLocator())
            axis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_xlabel(f"{label} (log scale)")
        ax.set_ylabel(f"{loss_label}, nats/token (log scale)")
        ax.set_title(f"{loss_label} vs {label}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Scaling: {len(rows)} models, loss = a·x^b fitted in log-log space", fontsize=11)
    fig.tight_layout()
    return fig


def short_number(value: float, _position: Any = None) -> str:
    """3 significant digits with an SI suffix: 127k, 1.78M, 175G."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _loss_ticks(ys: list[float], n: int = 5) -> list[float]:
    """About `n` evenly spaced (in log space) ticks spanning the losses, two decimals apart at least."""
    lo, hi = min(ys), max(ys)
    if hi <= lo * 1.0001:
        return [lo]
    ticks = sorted({round(lo * (hi / lo) ** (i / (n - 1)), 2) for i in range(n)})
    return ticks
