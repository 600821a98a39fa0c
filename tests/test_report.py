"""The run report a person reads first (palm.app.report) and the scaling plot (palm.analysis.scaling), from
hand-made stage outputs: labelled, titled plots with ticks a person can read, one defined train loss, each
stage's duration and whether it was built or cached, and the data stage's statistics."""

from __future__ import annotations

import json
from types import SimpleNamespace

from palm.analysis.scaling import TRAIN_LOSS_DEFINITION, scaling_figure, train_loss_of
from palm.app.report import report_markdown
from palm.store.outputs import StageOutput

DATA = {"seconds": 4.2, "docs_in": 120, "docs_kept": 100, "shards": ["train-00000.jsonl.gz"], "token_budget": None,
        "near_duplicates": {"candidate_pairs": 7, "verified_pairs": 5, "documents_dropped": 5},
        "sources": {"stdlib": {"docs_in": 120, "docs_kept": 100, "kept_by_split": {"train": 98, "validation": 2},
                               "dropped": {"near_duplicate": 5, "too_few_words": 15}, "estimated_tokens": 31337,
                               "share": 1.0, "weight": 1.0}}}


def test_the_report_names_its_train_loss_durations_and_data_statistics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": k, "loss": 5.0 - k / 10, "learning_rate": 0.01, "tokens_per_second": 100.0} for k in range(20)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = {"seconds": 37.5, "final_step": 20, "final_loss": rows[-1]["loss"], "checkpoint": "ckpt/20",
             "digest": "0" * 64, "metrics": str(metrics)}
    outputs = {"data": StageOutput("data", "k1", "/run/data/k1", DATA, True),
               "train": StageOutput("train", "k2", "/run/train/k2", train, False)}
    text = report_markdown(tmp_path, "tiny", SimpleNamespace(declared=False), outputs)
    assert "| data | data | cached | 4.2 | /run/data/k1 |" in text
    assert "| train | train | built | 37.5 | /run/train/k2 |" in text
    assert "## Data" in text and "120 read, 100 kept" in text and "5 verified" in text
    assert "| stdlib | 120 | 100 | 98/2 | too_few_words 15, near_duplicate 5 | 31,337 |" in text
    assert f"- train loss: {train_loss_of(rows):.4f} ({TRAIN_LOSS_DEFINITION})" in text
    assert train_loss_of(rows) == (rows[-2]["loss"] + rows[-1]["loss"]) / 2  # the last tenth of 20 steps
    assert "- last step's loss: 3.1000" in text and "checkpoint N holds the state after N updates" in text
    assert "| 20 | 3.1 |" in text  # the loss curve's steps count updates done, as the checkpoints do


def test_the_scaling_plot_is_titled_and_labels_its_log_ticks():
    rows = [{"model": m, "params": p, "training_flops": p * 6e6, "validation_loss": loss, "train_loss": loss}
            for m, p, loss in (("s", 127_000, 4.6), ("m", 607_000, 4.4), ("l", 1_780_000, 4.3))]
    fits = {"params": {"a": 5.657, "b": -0.0254, "r2": 0.97}, "training_flops": None}
    fig = scaling_figure(rows, "validation_loss", fits)
    fig.canvas.draw()
    for ax in fig.axes:
        assert ax.get_title() and "log scale" in ax.get_xlabel() and "nats/token" in ax.get_ylabel()
        xlabels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        ylabels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert len(xlabels) == 3 and len(ylabels) >= 3, (xlabels, ylabels)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["127k", "607k", "1.78M"]
    assert fig._suptitle.get_text()
