"""Checkpoints too large for the evaluating process: the eval-new-checkpoints flow evaluates them as a
sharded job on the spec's launcher (palm/jobs/evaljob.py), records each result exactly once, releases the
claim when the job fails, and never launches a second job for a checkpoint. One test runs the real
local launcher: two JAX processes on this machine evaluate a real checkpoint sharded over both, and
their numbers are the in-process evaluation's."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

import palm.jobs.launch
from flows.evaluate import evaluate_new_checkpoints
from palm.jobs import evaljob
from palm.base.errors import PalmError
from palm.jobs.evaljob import placement, result_path, write_result
from palm.jobs.launching import JobFailed, WorkerRejected
from palm.store.ledger import EvalLedger
from palm.store.layout import SPEC_RECORD
from palm.dag.workflow import load_spec
from tests.conftest import SPECS, TINY_TRAINED

TINY = str(SPECS / "tiny.yaml")
QUICK = [*TINY_TRAINED, "eval.max_examples=4"]  # the training of tests.conftest.tiny_trained
#: The run's launcher as its recorded spec names it: two local worker processes, one CPU device each.
TWO_PROCESSES = ["infra.launcher.processes=2", "infra.hardware.num_devices=2", "infra.launcher.poll_seconds=0.05"]


@pytest.fixture(scope="module")
def trained(tiny_trained) -> Path:
    """The session's tiny run trained for 6 steps (checkpoints 0, 3 and 6), its spec recorded; tests copy it
    (copy_run records the spec with their overrides)."""
    return tiny_trained


def copy_run(trained: Path, tmp_path: Path, overrides: list[str]) -> tuple[Path, Path]:
    """(root, train dir) of a copy of the trained run whose recorded spec has `overrides` applied, as if
    the run had been started with them (the train stage's key does not depend on infra or eval)."""
    root = tmp_path / "run"
    shutil.copytree(trained, root)
    spec = load_spec(TINY, QUICK + overrides)
    (root / SPEC_RECORD).write_text(spec.model_dump_json(indent=2))
    return root, next((root / "train").glob("*/checkpoints")).parent


class FakeLauncher:
    """Stands in for palm.jobs.launch.launch: records each plan and plays host 0 of the job (writes the result
    file where the workers would), or raises what a failed job raises."""

    def __init__(self, fail: BaseException | None = None, write: bool = True):
        self.plans, self.fail, self.write = [], fail, write

    def __call__(self, plan, stop=None, log=None, replace=False):
        self.plans.append(plan)
        if self.fail is not None:
            raise self.fail
        if not self.write:
            return
        argv = list(plan.workers[0].argv)
        checkpoint = argv[argv.index("--eval-checkpoint") + 1]
        spec = load_spec(argv[2], [argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
        step = int(Path(checkpoint).name)
        write_result(str(Path(checkpoint).parent.parent), {"checkpoint": checkpoint, "step": step,
                                                          "results": {"validation_loss": {"bits_per_byte": 2.5}}},
                     spec, {"name": plan.name, "processes": len(plan.workers)})


def sets(argv) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, word in enumerate(argv) if word == "--set")


@pytest.mark.slow
def test_a_too_large_checkpoint_is_evaluated_by_a_launched_job_and_recorded_once(prefect_server, trained, tmp_path,
                                                                                 monkeypatch):
    root, train_dir = copy_run(trained, tmp_path, TWO_PROCESSES)
    # This process holds 1 MiB: the tiny model's 2.3 MiB of parameters do not fit (eval.launch is auto).
    monkeypatch.setattr(evaljob, "process_capacity", lambda: (2**20, "a test's 1 MiB"))
    fake = FakeLauncher()
    monkeypatch.setattr(palm.jobs.launch, "launch", fake)

    first = evaluate_new_checkpoints(checkpoint=str(train_dir / "checkpoints" / "6"))
    assert [Path(c).name for c in first["evaluated"]] == ["0", "3", "6"]
    assert [p.name for p in fake.plans] == ["tiny-eval-0", "tiny-eval-3", "tiny-eval-6"]  # one job per checkpoint
    plan = fake.plans[-1]
    assert plan.kind == "local" and len(plan.workers) == 2
    for i, worker in enumerate(plan.workers):
        argv = list(worker.argv)
        assert argv[:5] == ["palm", "worker", str(root / SPEC_RECORD), "--output", str(root)]  # the run's spec
        assert argv[argv.index("--eval-checkpoint") + 1] == str(train_dir / "checkpoints" / "6")
        assert {k: v for k, v in sets(argv).items() if k.startswith("infra.mesh.")} == {
            "infra.mesh.data": "1", "infra.mesh.fsdp": "2", "infra.mesh.model": "1"}  # training's mesh
        assert dict(worker.env)["JAX_NUM_PROCESSES"] == "2" and dict(worker.env)["JAX_PROCESS_ID"] == str(i)
    ledger = EvalLedger(train_dir / "evals")
    assert sorted(ledger.results()) == [0, 3, 6]
    record = ledger.result(6)
    assert record["results"] == {"validation_loss": {"bits_per_byte": 2.5}}
    assert record["job"]["name"] == "tiny-eval-6" and record["evaluated_by"]
    # One record per checkpoint; the jobs' own results stay beside them, out of the ledger's sight.
    assert sorted(p.name for p in (train_dir / "evals").glob("*.json")) == ["0.json", "3.json", "6.json"]
    assert sorted(p.name for p in (train_dir / "evals" / "launched").iterdir()) == ["0.json", "3.json", "6.json"]

    again = evaluate_new_checkpoints(checkpoint=str(train_dir / "checkpoints" / "6"))
    assert again["evaluated"] == [] and len(fake.plans) == 3  # nothing new: no job, no record
    assert ledger.result(6) == record

    # The job of step 3 finished and wrote its result, but the flow died before recording it; its claim
    # went stale (7 hours old). The next run takes the claim over and records that result without
    # launching anything.
    (train_dir / "evals" / "3.json").unlink()
    old = time.time() - 7 * 3600
    os.utime(train_dir / "evals" / "3.claim", (old, old))
    third = evaluate_new_checkpoints(checkpoint=str(train_dir / "checkpoints" / "3"))
    assert [Path(c).name for c in third["evaluated"]] == ["3"] and len(fake.plans) == 3
    assert ledger.result(3)["job"]["name"] == "tiny-eval-3"


@pytest.mark.parametrize("fail, message", [
    (JobFailed("tiny-eval-0 (local): worker 1 failed with exit code 1"), "worker 1 failed with exit code 1"),
    (WorkerRejected("tiny-eval-0 (local): worker 0 rejected its input (exit 2)"), "rejected its input"),
    (None, "the workers finished but wrote no result for step 0"),
], ids=["job-failed", "bad-input", "no-result"])
@pytest.mark.slow
def test_a_failed_job_releases_the_claim_and_fails_the_flow(prefect_server, trained, tmp_path, monkeypatch, fail,
                                                            message):
    root, train_dir = copy_run(trained, tmp_path, TWO_PROCESSES + ["eval.launch=workers"])
    fake = FakeLauncher(fail=fail, write=False)
    monkeypatch.setattr(palm.jobs.launch, "launch", fake)
    with pytest.raises(Exception) as info:
        evaluate_new_checkpoints(checkpoint=str(train_dir / "checkpoints" / "6"))
    assert type(info.value) is (type(fail) if fail is not None else JobFailed)
    assert message in str(info.value)
    assert len(fake.plans) == 1  # the first checkpoint's job failed; the flow stopped there
    evals = train_dir / "evals"
    assert not list(evals.glob("*.claim")) and EvalLedger(evals).results() == {}  # released, nothing recorded

    # The claim was given back: the next run takes the checkpoint and evaluates it.
    monkeypatch.setattr(palm.jobs.launch, "launch", FakeLauncher())
    after = evaluate_new_checkpoints(checkpoint=str(train_dir / "checkpoints" / "6"))
    assert [Path(c).name for c in after["evaluated"]] == ["0", "3", "6"]


@pytest.mark.slow
def test_a_too_large_checkpoint_without_workers_to_run_it_is_refused_before_anything_is_claimed(
        prefect_server, trained, tmp_path, monkeypatch):
    root, train_dir = copy_run(trained, tmp_path, [])  # the launcher is this process
    monkeypatch.setattr(evaljob, "process_capacity", lambda: (2**20, "a test's 1 MiB"))
    with pytest.raises(PalmError, match="more than a test's 1 MiB .* set infra.launcher"):
        evaluate_new_checkpoints(checkpoint=str(train_dir / "checkpoints" / "6"))
    assert not (train_dir / "evals").exists() or not any((train_dir / "evals").iterdir())


def test_placement_by_size_and_setting():
    tiny, s540 = load_spec(TINY), load_spec(str(SPECS / "palm-540b.yaml"))
    gib = 2**30
    assert placement(tiny, tiny.model, (8 * gib, "8 GiB"))[0] == "local"
    assert placement(s540, s540.model, (4096 * gib, "4 TiB"))[0] == "local"  # 2 TB of parameters, twice that
    where, why = placement(s540, s540.model, (2048 * gib, "2 TiB"))
    assert where == "workers" and "2,013.0 GiB of parameters" in why and "tpu-vm launcher" in why
    assert placement(s540, s540.model)[0] == "workers"  # this machine's own memory
    assert placement(tiny, tiny.model)[0] == "local"
    forced = load_spec(TINY, ["eval.launch=workers"])
    assert placement(forced, forced.model, (8 * gib, "8 GiB")) == ("workers", "eval.launch is workers")
    local = load_spec(str(SPECS / "palm-540b.yaml"), ["eval.launch=local"])
    assert placement(local, local.model, (gib, "1 GiB"))[0] == "local"
    with pytest.raises(PalmError, match="infra.launcher runs in this process"):
        placement(tiny, tiny.model, (2**20, "1 MiB"))


def test_where_evaluation_runs_does_not_change_the_eval_stage_key():
    from palm.dag.table import STAGES

    config = STAGES["eval"].config
    assert config(load_spec(TINY)) == config(load_spec(TINY, ["eval.launch=workers"]))
    assert config(load_spec(TINY)) != config(load_spec(TINY, ["eval.max_examples=3"]))


@pytest.mark.slow
def test_two_local_processes_evaluate_a_real_checkpoint_sharded_and_match_one_process(prefect_server, trained,
                                                                                      tmp_path):
    """The real local launcher: `palm worker --eval-checkpoint` in two JAX processes (gloo), the
    parameters restored sharded over fsdp=2 across them; host 0's result is recorded in the ledger."""
    from palm.evaluation.run import evaluate_checkpoint

    root, train_dir = copy_run(trained, tmp_path, TWO_PROCESSES + ["eval.launch=workers"])
    ledger = EvalLedger(train_dir / "evals")
    for step in (0, 3):  # evaluated before: this run has only checkpoint 6 left to do
        ledger.record(step, {"step": step, "results": {}})
    checkpoint = str(train_dir / "checkpoints" / "6")
    out = evaluate_new_checkpoints(checkpoint=checkpoint)
    assert out["evaluated"] == [checkpoint]
    record = ledger.result(6)
    assert record["job"] == {"name": "tiny-eval-6", "processes": 2, "devices": 2,
                             "mesh": {"data": 1, "fsdp": 2, "model": 1}}
    assert json.loads(Path(result_path(str(train_dir), 6)).read_text())["results"] == record["results"]

    alone = evaluate_checkpoint(checkpoint, load_spec(TINY, QUICK).eval)  # one process, one device
    launched, here = record["results"], alone["results"]
    assert launched["validation_loss"]["tokens"] == here["validation_loss"]["tokens"]
    assert launched["validation_loss"]["loglikelihood"] == pytest.approx(here["validation_loss"]["loglikelihood"],
                                                                         rel=1e-5)
    assert launched["memorization"]["examples"] == here["memorization"]["examples"] == 4
    assert launched["memorization"]["token_match"] == pytest.approx(here["memorization"]["token_match"], abs=0.03)


@pytest.mark.parametrize("where, message", [
    ("checkpoints", "is not a checkpoint step directory"),
    ("checkpoints/6", "is not inside a train stage directory"),
])
def test_an_eval_worker_with_a_bad_checkpoint_is_bad_input_before_joining(capsys, tmp_path, where, message):
    from palm.cli import main

    (tmp_path / where).mkdir(parents=True)
    rc = main(["worker", TINY, "--output", str(tmp_path), "--eval-checkpoint", str(tmp_path / where)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("palm: error:") and "Traceback" not in err


@pytest.mark.slow
def test_the_pipelines_eval_stage_launches_a_job_for_a_model_too_large_for_it(trained, tmp_path, monkeypatch):
    """The pretrain flow's own eval node (the final checkpoint) takes the same path: a model too large for
    the process is evaluated by the launched job (its plan on the run's recorded spec), its result kept."""
    from palm.dag.runner import Hooks
    from palm.dag.table import STAGES
    from palm.store.outputs import StageOutput, read_manifest

    root, train_dir = copy_run(trained, tmp_path, TWO_PROCESSES)
    fake = FakeLauncher()
    monkeypatch.setattr(palm.jobs.launch, "launch", fake)
    monkeypatch.setattr(evaljob, "process_capacity", lambda: (1 << 20, "this test's 1 MiB"))
    spec = load_spec(str(root / SPEC_RECORD))
    inputs = {}
    for kind in ("train", "pack", "tokenizer"):
        path = train_dir if kind == "train" else next((root / kind).glob("*/manifest.json")).parent
        inputs[kind] = StageOutput(kind, path.name, str(path), read_manifest(path), cached=True)
    out = tmp_path / "eval-out"
    out.mkdir()
    fields = STAGES["eval"].build(spec, inputs, Hooks())(out)
    [plan] = fake.plans
    assert plan.name == "tiny-eval-6" and len(plan.workers) == 2
    assert plan.workers[0].argv[2] == str(root / SPEC_RECORD)
    assert fields["step"] == 6 and fields["results"] == {"validation_loss": {"bits_per_byte": 2.5}}
    assert fields["evaluated_on"]["where"] == "workers" and "1 MiB" in fields["evaluated_on"]["why"]
    assert json.loads((out / "results.json").read_text())["results"] == fields["results"]
