"""Stage tasks under a real (ephemeral) Prefect server: retries from the spec, artifacts."""

from __future__ import annotations

import asyncio
import time

import pytest

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from palm.dag.workflow import load_spec
from palm.dag.runner import node_inputs
from palm.dag.workflow import resolve_workflow
from tasks.common import run_artifact_key, run_key, with_retry_policy
from tasks.stage import node_task, stage_task
from tests.conftest import SPECS, copy_of


def run_nodes(spec, root: str, names: list[str]) -> dict:
    """The named nodes of the spec's workflow as tasks, one after the other (call inside a flow)."""
    outputs: dict = {}
    for node in resolve_workflow(spec).nodes.values():
        if node.name in names:
            outputs[node.name] = node_task(node)(node, root, node_inputs(node, outputs))
    return outputs


async def _artifacts(key: str):
    async with get_client() as client:
        return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


@pytest.mark.slow
def test_data_task_publishes_the_accounting_table(prefect_server, tmp_path):
    spec = load_spec(SPECS / "tiny.yaml")

    @flow(name="data-only")
    def data_only():
        return run_nodes(spec, str(tmp_path), ["data"])["data"]

    out = data_only()
    assert out.manifest["complete"] is True
    table = asyncio.run(_artifacts(run_artifact_key("tiny", tmp_path, "data", "accounting")))
    assert table and table[0].type == "table"
    rows = table[0].data if isinstance(table[0].data, list) else __import__("json").loads(table[0].data)
    assert {r["source"] for r in rows} == {"stdlib-docs", "stdlib-code", "planted"}
    for row in rows:
        src = out.manifest["sources"][row["source"]]
        assert row["docs_in"] == src["docs_in"] and row["docs_kept"] == src["docs_kept"]
    assert asyncio.run(_artifacts(run_artifact_key("tiny", tmp_path, "data", "summary")))
    assert not asyncio.run(_artifacts("tiny-data-accounting"))  # the spec name alone is no run's key


@pytest.mark.slow
def test_quality_and_data_tasks_publish_the_classifier_and_its_keep_rates(prefect_server, tmp_path):
    # The planted web source sampled by the classifier trained on the builtin docs (kind books); Pareto(1)
    # rather than 9, so that this tiny source keeps about half of its documents.
    spec = load_spec(SPECS / "tiny.yaml", ["name=tiny-quality", "data.sources.2.filters.quality_sampling=true",
                                           "data.quality.alpha=1"])

    @flow(name="quality-and-data")
    def quality_and_data():
        return run_nodes(spec, str(tmp_path), ["quality", "data"])

    outs = quality_and_data()
    quality, data = outs["quality"].manifest, outs["data"].manifest
    assert quality["held_out_auc"] > 0.9 and quality["positive_sources"] == ["stdlib-docs"]
    assert data["quality"]["held_out_auc"] == quality["held_out_auc"]
    assert data["quality"]["classifier_key"] == outs["quality"].key
    planted = data["sources"]["planted"]["quality_sampling"]
    assert 0 < planted["kept"] < planted["scored"]
    table = asyncio.run(_artifacts(run_artifact_key("tiny-quality", tmp_path, "quality", "classifier")))
    assert table and f"{quality['held_out_auc']:.4f}" in table[0].description
    rows = asyncio.run(_artifacts(run_artifact_key("tiny-quality", tmp_path, "data", "accounting")))[0].data
    rows = rows if isinstance(rows, list) else __import__("json").loads(rows)
    keep = {r["source"]: r["quality_keep_rate"] for r in rows}
    assert keep == {"stdlib-docs": "-", "stdlib-code": "-", "planted": round(planted["keep_rate"], 4)}


def test_retry_policy_comes_from_the_spec():
    spec = load_spec(SPECS / "tiny.yaml", ["retries.data.retries=3", "retries.data.delay_seconds=2",
                                            "retries.data.backoff=3"])
    task = with_retry_policy(stage_task, spec, "data")
    assert task.retries == 3
    assert task.retry_delay_seconds == [2.0, 6.0, 18.0]


@pytest.mark.slow
def test_train_task_emits_an_event_per_checkpoint(prefect_server, tiny_upstream, tmp_path):
    import time

    from prefect.events.filters import EventFilter, EventNameFilter

    from tasks.train import CHECKPOINT_SAVED

    spec = load_spec(SPECS / "tiny.yaml", ["train.steps=6", "train.checkpoint.every_steps=3"])
    root = str(copy_of(tiny_upstream, tmp_path / "run"))  # data, tokenizer and pack are cached tasks here

    @flow(name="tiny-train")
    def tiny_train():
        return run_nodes(spec, root, ["data", "tokenizer", "pack", "train"])["train"]

    out = tiny_train()
    assert out.manifest["final_step"] == 6

    async def saved_events():
        async with get_client() as client:
            page = await client.read_events(filter=EventFilter(event=EventNameFilter(name=[CHECKPOINT_SAVED])),
                                            limit=50)  # the server caps pages at 50
            return [e for e in page.events if e.resource.get("palm.core.checkpoint.path", "").startswith(root)]

    deadline = time.time() + 60
    events = []
    while time.time() < deadline and len(events) < 3:  # events reach the server asynchronously
        events = asyncio.run(saved_events())
        time.sleep(1)
    assert sorted(e.payload["step"] for e in events) == [0, 3, 6]
    for e in events:
        assert e.payload["run"] == "tiny" and e.resource["palm.run"] == "tiny"
        assert e.payload["path"].endswith(f"/checkpoints/{e.payload['step']}")

    # The live progress bar ended at 100%, and the train summary says how training went.
    progress = asyncio.run(_artifacts(run_artifact_key("tiny", root, "train", "progress")))
    assert len(progress) == 1 and progress[0].type == "progress"
    assert float(progress[0].data) == 100.0
    assert progress[0].description.startswith("6/6 steps, loss ")
    summary = asyncio.run(_artifacts(run_artifact_key("tiny", root, "train", "summary")))
    text = summary[0].data
    assert "- steps: 6" in text and f"- final loss: {out.manifest['final_loss']:.4f}" in text
    assert f"- checkpoint: `{out.manifest['checkpoint']}`" in text and f"- key: `{out.key}`" in text
    tps = float(text.split("- tokens/s: ")[1].split("\n")[0].replace(",", ""))
    assert tps > 0
    assert "- MFU: unknown (no peak FLOPs known for this chip)" in text  # a CPU has no peak in palm's table


@pytest.mark.slow
def test_a_train_task_that_crashes_mid_run_is_retried_and_resumes(prefect_server, tiny_upstream, tmp_path,
                                                                  monkeypatch):
    from palm.core.train import Trainer

    spec = load_spec(SPECS / "tiny.yaml", ["train.steps=8", "train.checkpoint.every_steps=3",
                                            "retries.train.retries=2", "retries.train.delay_seconds=0"])
    root = str(copy_of(tiny_upstream, tmp_path / "run"))
    real_step, calls = Trainer.step, {"n": 0}

    def crash_once(self, state, tokens, weights=None, global_batch=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the fifth step of the first attempt: after the checkpoint at step 3
            raise RuntimeError("simulated host failure")
        return real_step(self, state, tokens, weights, global_batch, **kwargs)

    monkeypatch.setattr(Trainer, "step", crash_once)

    @flow(name="tiny-train-retry")
    def tiny_train():
        return run_nodes(spec, root, ["data", "tokenizer", "pack", "train"])["train"]  # train: 2 retries

    out = tiny_train()
    assert out.manifest["final_step"] == 8
    assert out.manifest["resumed_from"] == 3  # the retry continued from the checkpoint, not from step 0
    assert calls["n"] == 4 + 1 + 5  # 4 good steps, the crash, then steps 3..7 again


def test_sigterm_during_training_sets_the_stop_event_and_the_old_handler_comes_back():
    import os
    import signal
    import threading

    from tasks.train import sigterm_sets

    seen = []
    before = signal.signal(signal.SIGTERM, lambda *a: seen.append("outer"))
    try:
        stop = threading.Event()
        with sigterm_sets(stop) as previous:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.wait(5) and seen == []  # the train stage checkpoints and stops; nothing else runs
        assert callable(previous)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):
            if seen:
                break
            threading.Event().wait(0.01)
        assert seen == ["outer"]  # the handler it replaced (Prefect's, under a worker) is back
    finally:
        signal.signal(signal.SIGTERM, before)


def test_checkpoints_of_launched_workers_are_announced_once_each(tmp_path, monkeypatch):
    """The task following a launched job emits palm.core.checkpoint.saved for each checkpoint the workers
    commit, as it appears and once at the end, never twice, so evaluation triggers on launched runs too."""
    import logging

    import numpy as np

    import tasks.train as train_module
    from palm.core.checkpoint import Checkpoints
    from palm.spec.config import CheckpointConfig
    from tasks.train import announcing_checkpoints

    emitted = []
    monkeypatch.setattr(train_module, "emit_checkpoint_saved",
                        lambda spec, path, step, record: emitted.append((path, step, record["metrics"]["loss"])))
    directory = str(tmp_path / "train" / "k" / "checkpoints")
    writer = None
    with announcing_checkpoints(None, directory, 0.05, logging.getLogger("test")) as watcher:
        time.sleep(0.2)  # nothing yet: the directory does not exist
        writer = Checkpoints(directory, CheckpointConfig(async_save=False))
        for step in (0, 3):
            writer.save(step, {"params": {"w": np.full(3, step, np.float32)}}, {"position": step},
                        {"digest": "x", "metrics": {"loss": 10.0 - step}})
        writer.wait()
        for _ in range(100):
            if len(emitted) == 2:
                break
            time.sleep(0.05)
        assert [e[1] for e in emitted] == [0, 3]  # seen while the job runs
        writer.save(6, {"params": {"w": np.full(3, 6, np.float32)}}, {"position": 6},
                    {"digest": "x", "metrics": {"loss": 4.0}})
        writer.close()
    assert emitted == [(f"{directory}/0", 0, 10.0), (f"{directory}/3", 3, 7.0), (f"{directory}/6", 6, 4.0)]
    assert watcher.new() == []  # each once


def test_run_keys_name_the_run_not_only_the_spec(tmp_path, monkeypatch):
    import re

    a, b = run_key("tiny", tmp_path / "a"), run_key("tiny", tmp_path / "b")
    assert a != b and a.startswith("tiny-") and b.startswith("tiny-")
    monkeypatch.chdir(tmp_path)
    assert run_key("tiny", "a") == a == run_key("tiny", f"{tmp_path}/x/../a")  # any spelling of one directory
    assert run_key("tiny", "gs://bucket/runs/tiny/") == run_key("tiny", "gs://bucket/runs/tiny")
    key = run_artifact_key("My_Spec.v2", "gs://bucket/r", "train_2", "eval-step", 300)
    assert re.fullmatch(r"[a-z0-9-]+", key) and key.startswith("my-spec-v2-") and key.endswith("-train-2-eval-step-300")


def test_training_progress_is_throttled_ends_at_the_last_step_and_never_fails_training(monkeypatch):
    import logging

    import tasks.train as train_module
    from tasks.train import TrainingProgress

    calls, now = [], [0.0]
    monkeypatch.setattr(train_module, "_create_progress", lambda p, key, text: calls.append(("create", p, text)) or "id")
    monkeypatch.setattr(train_module, "_update_progress", lambda i, p, text: calls.append(("update", p, text)))
    progress = TrainingProgress("k", 100, logging.getLogger("test"), every_seconds=5.0, clock=lambda: now[0])
    sent = []
    for step in range(1, 101):
        now[0] = step * 0.5  # two steps a second
        sent.append(progress.update(step, 2.0))
    assert calls[0] == ("create", 0.0, "0/100 steps")
    assert [c[1] for c in calls[1:]] == [1.0, 11.0, 21.0, 31.0, 41.0, 51.0, 61.0, 71.0, 81.0, 91.0, 100.0]
    assert calls[-1][2] == "100/100 steps, loss 2.0000" and sum(sent) == 11

    def down(*_):
        raise ConnectionError("the API is down")

    monkeypatch.setattr(train_module, "_update_progress", down)
    failing = TrainingProgress("k", 10, logging.getLogger("test"), clock=lambda: now[0])
    assert failing.update(10) is False  # logged, not raised
    monkeypatch.setattr(train_module, "_update_progress", lambda *a: calls.append(a))
    n = len(calls)
    assert failing.update(10, force=True) is False and len(calls) == n  # no more calls after a failure
