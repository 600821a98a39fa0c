"""The `palm` command's exit codes and output: 0 success, 1 failure (stages not built), 2 bad input."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from palm.cli import main
from palm.dag.runner import nodes_to_build
from palm.dag.table import STAGES
from palm.dag.workflow import load_spec
from palm.dag.workflow import resolve_workflow
from tests.conftest import copy_of

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "specs" / "tiny.yaml")


@pytest.mark.slow
def test_run_runs_every_stage_and_writes_the_report(prefect_server, capsys, tmp_path, monkeypatch):
    import json

    rc = main(["run", TINY, "--output", str(tmp_path), "--json", "--set", "train.steps=4",
               "--set", "eval.max_examples=4"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    result = json.loads(out)
    assert "prefect: flow 'pretrain' on http://" in err  # the session's server stands in for ephemeral mode
    # `palm run` is the pretrain flow: one Completed flow run with one Completed task run per stage.
    flow_run, task_runs = flow_run_and_tasks(result["flow_run"])
    assert flow_run.state.is_completed() and flow_run.parameters["output"] == str(tmp_path)
    stages = list(resolve_workflow(load_spec(TINY)).nodes)  # the default graph: every default stage type but
    # Every default stage that applies to tiny: not the TPU pre-flight, nor the quality classifier (no source
    # of tiny samples by quality).
    assert stages == [s.name for s in STAGES.values() if s.default and s.name not in ("compile", "quality")]
    assert sorted(t.name.split("[")[0] for t in task_runs) == sorted(stages)
    assert all(t.state.is_completed() for t in task_runs)
    assert result["status"] == "completed" and result["final_step"] == 4
    assert set(result["stages"]) == set(stages)
    assert {"validation_loss", "memorization"} <= set(result["eval"])
    assert (tmp_path / "report.md").is_file() and (tmp_path / "loss.png").is_file()
    assert (tmp_path / "spec.json").is_file()
    for stage in stages:
        assert f"stage {stage}: built" in err
    assert "Traceback" not in err and "Warning: " not in err  # quiet: nothing a user cannot act on
    # What an ephemeral-mode run prepares while Prefect's server starts: the nodes it will build.
    workflow = resolve_workflow(load_spec(TINY, ["train.steps=4", "eval.max_examples=4"]))
    assert [n.name for n in nodes_to_build(workflow, tmp_path / "new", stages)] == stages
    assert nodes_to_build(workflow, tmp_path, stages) == []
    assert [n.name for n in nodes_to_build(workflow, tmp_path, stages, {"train"})] == ["train", "eval"]

    # Again, with every output complete: no flow run at all (Prefect is never called), the same outputs,
    # and the summary and report written again.
    import flows.pretrain

    def no_flow(*args, **kwargs):
        raise AssertionError("a run with nothing to do started the pretrain flow")

    (tmp_path / "report.md").unlink()
    monkeypatch.setattr(flows.pretrain, "pretrain", no_flow)
    rc = main(["run", TINY, "--output", str(tmp_path), "--json", "--set", "train.steps=4",
               "--set", "eval.max_examples=4"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    again = json.loads(out)
    assert "nothing to run, no Prefect flow run" in err and "Traceback" not in err
    assert again["flow_run"] is None and all(s["cached"] for s in again["stages"].values())
    assert {k: v["output"] for k, v in again["stages"].items()} == {k: v["output"] for k, v in result["stages"].items()}
    assert (again["final_step"], again["final_loss"], again["eval"]) == (4, result["final_loss"], result["eval"])
    assert (tmp_path / "report.md").is_file()
    # --force rebuilds through the flow, as before.
    with pytest.raises(AssertionError, match="started the pretrain flow"):
        main(["run", TINY, "--output", str(tmp_path), "--set", "train.steps=4", "--set", "eval.max_examples=4",
              "--force", "eval"])


@pytest.mark.slow
def test_run_with_a_relative_storage_root(prefect_server, tiny_upstream, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the README's command writes to the spec's relative root, runs/tiny
    copy_of(tiny_upstream, tmp_path / "runs" / "tiny")  # data, tokenizer and pack found there, cached
    rc = main(["run", TINY, "--set", "train.steps=2", "--set", "eval.tasks=[validation_loss]",
               "--set", "eval.max_examples=2"])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    assert list((tmp_path / "runs" / "tiny" / "train").glob("*/checkpoints/2"))
    assert (tmp_path / "runs" / "tiny" / "report.md").is_file()


def test_selected_stages_need_their_inputs_built_first(prefect_server, capsys, tmp_path):
    rc = main(["run", TINY, "--stages", "eval,data", "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "stage data: built" in err and "stage 'tokenizer' has no complete output" in err
    assert "Traceback" not in err  # one line naming what to do, not Prefect's log of the failure


def test_a_stage_whose_inputs_were_never_built_is_bad_input(prefect_server, capsys, tmp_path):
    rc = main(["run", TINY, "--stages", "train", "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "stage 'data' has no complete output" in err and "run it first" in err


@pytest.mark.slow
def test_bad_input_inside_a_task_is_not_retried(prefect_server, capsys, tmp_path):
    """The tiny spec gives train 2 retries; a PalmError fails the same way each time, so none is spent."""
    assert main(["run", TINY, "--stages", "data,tokenizer,pack", "--output", str(tmp_path), "--json"]) == 0
    capsys.readouterr()
    # More steps than the packed data holds: bad input the train stage reports before it trains.
    rc = main(["run", TINY, "--stages", "train", "--output", str(tmp_path), "--set", "train.steps=1000000"])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "train.steps=1000000" in err
    flows = prefect_flow_runs(parameter_output=str(tmp_path))
    failed = [f for f in flows if f.state.is_failed()]
    assert len(failed) == 1
    train = [t for t in flow_run_and_tasks(str(failed[0].id))[1] if t.name.startswith("train[")]
    assert len(train) == 1 and train[0].state.is_failed() and train[0].run_count == 1


def flow_run_and_tasks(flow_run_id: str):
    """The flow run and its task runs, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    return flow_run, task_runs


def prefect_flow_runs(parameter_output: str):
    """The pretrain flow runs whose `output` parameter is this directory."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
    return [r for r in runs if r.parameters.get("output") == parameter_output]


def test_an_ephemeral_server_that_cannot_start_is_one_error_and_is_stopped(monkeypatch):
    """palm.cli._EphemeralServer, the process Prefect's ephemeral mode would start, launched by `palm run`: one
    whose app cannot load (uvicorn's startup failure, exit code 3: tried on three ports, as for a port taken
    meanwhile) ends with an error naming its exit code, not a wait for the whole timeout."""
    from palm.cli import _EphemeralServer

    monkeypatch.setattr(_EphemeralServer, "APP", "palm_no_such_module:create_app")
    server = _EphemeralServer(timeout=120)
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"ephemeral API server exited with code 3"):
            server.wait()
        assert time.monotonic() - t0 < 60 and server.process.poll() == 3 and server.starts == 3
    finally:
        server.stop()


def test_run_unknown_stage_is_bad_input(capsys):
    rc = main(["run", TINY, "--stages", "bogus"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bogus" in err and "--stages" in err
    assert "Traceback" not in err


def test_run_force_stage_not_selected_is_bad_input(capsys):
    rc = main(["run", TINY, "--stages", "data", "--force", "train"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--force train" in err


def test_run_broken_spec_is_bad_input_before_stages(capsys):
    rc = main(["run", TINY, "--set", "model.num_layers=0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "model.num_layers" in err and "tiny.yaml" in err


def test_spec_show_applies_overrides_and_inherits(capsys):
    rc = main(["spec", "show", str(ROOT / "specs" / "palm-8b.yaml"), "--set", "train.steps=5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "steps: 5" in out
    shown = yaml.safe_load(out)
    assert shown["train"]["steps"] == 5
    assert shown["model"]["head_dim"] == 256  # from palm-base.yaml
    assert shown["model"]["num_layers"] == 32  # from palm-8b.yaml
    assert "extends" not in shown


def test_spec_show_output_is_a_loadable_spec(tmp_path, capsys):
    from palm.dag.workflow import load_spec

    assert main(["spec", "show", TINY]) == 0
    path = tmp_path / "shown.yaml"
    path.write_text(capsys.readouterr().out, encoding="utf-8")
    assert load_spec(path) == load_spec(TINY)


def test_missing_subcommand_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_version_names_the_package_and_the_commit(capsys, monkeypatch, tmp_path):
    import subprocess

    import palm

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert out.startswith(f"palm-pipeline {palm.__version__} (commit {head}")
    # Outside a checkout (the worker image): the commit the image was built from.
    monkeypatch.setattr(palm, "__file__", str(tmp_path / "palm" / "__init__.py"))
    monkeypatch.setenv("PALM_COMMIT", "0123abcd")
    assert palm.version_info() == {"version": palm.__version__, "commit": "0123abcd", "dirty": None, "source": "image"}
    monkeypatch.delenv("PALM_COMMIT")
    assert palm.version_info()["commit"] == "unknown"
