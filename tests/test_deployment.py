"""The deployments of infra/prefect.yaml end to end, all on loopback.

A real Prefect server (SQLite, its own PREFECT_HOME) in a subprocess, `prefect deploy --all`, a process
worker, `prefect deployment run pretrain/pretrain-tiny`; then the checkpoint events start
eval-new-checkpoints, which evaluates every checkpoint of the run exactly once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT

PREFECT = str(Path(sys.executable).with_name("prefect"))
OVERRIDES = ["train.steps=6", "train.checkpoint.every_steps=3", "eval.max_examples=4"]
TERMINAL_BAD = {"FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def cli(env: dict[str, str], *args: str, timeout: float = 180) -> str:
    done = subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.fixture
def prefect_stack(tmp_path):
    """A Prefect server on a free loopback port; yields (env for CLI calls, api url, start(), tmp)."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api,
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_CLI_PROMPT="false", PALM_PIPELINE_DIR=str(ROOT))
    procs: list[subprocess.Popen] = []

    def spawn(cmd: list[str], log: Path) -> subprocess.Popen:
        procs.append(start(cmd, env, log))
        return procs[-1]

    server_log = tmp_path / "server.log"
    server = spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_log)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"the Prefect server exited:\n{tail(server_log)}"
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the Prefect server did not answer:\n{tail(server_log)}"
            time.sleep(0.5)
        yield env, api, spawn, tmp_path
    finally:
        for proc in reversed(procs):
            stop(proc)


def flow_runs(api: str, flow_name: str) -> list[dict]:
    body = {"flows": {"name": {"any_": [flow_name]}}, "limit": 200}
    r = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployed_pretrain_tiny_runs_and_its_events_evaluate_each_checkpoint_once(prefect_stack, shared_data):
    env, api, spawn, tmp = prefect_stack

    cli(env, "work-pool", "create", "local-process", "--type", "process")
    # `deploy --all` also deploys the TPU deployments, and refuses a pool that does not exist: give them
    # their pool (no worker polls it here, so nothing runs there).
    cli(env, "work-pool", "create", "tpu-v4", "--type", "process")
    cli(env, "deploy", "--all", "--prefect-file", "infra/prefect.yaml", "--no-prompt", timeout=300)
    deployments = {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=30).json()}
    assert {"pretrain-tiny", "eval-new-checkpoints"} <= set(deployments), sorted(deployments)
    eval_dep = deployments["eval-new-checkpoints"]
    # The hourly fallback is not under test: pause it so only the events start evaluations.
    for sched in eval_dep.get("schedules") or []:
        httpx.patch(f"{api}/deployments/{eval_dep['id']}/schedules/{sched['id']}", json={"active": False},
                    timeout=30).raise_for_status()
    for run in flow_runs(api, "eval-new-checkpoints"):  # any auto-scheduled run made before the pause
        httpx.delete(f"{api}/flow_runs/{run['id']}", timeout=30).raise_for_status()

    worker_log = tmp / "worker.log"
    worker = spawn([PREFECT, "worker", "start", "--pool", "local-process"], worker_log)

    out = tmp / "run"
    params = json.dumps({"output": str(out), "overrides": OVERRIDES})
    text = cli(env, "deployment", "run", "pretrain/pretrain-tiny", "--params", params)
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", text).group(1)

    deadline = time.monotonic() + 360
    while True:
        state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json()["state"]
        assert state["type"] not in TERMINAL_BAD, f"pretrain ended {state['name']}: {state.get('message')}\n{tail(worker_log)}"
        if state["type"] == "COMPLETED":
            break
        assert worker.poll() is None, f"the worker exited:\n{tail(worker_log)}"
        assert time.monotonic() < deadline, f"pretrain still {state['name']} after 6 minutes\n{tail(worker_log)}"
        time.sleep(2)

    # The outputs of the deployed run.
    assert (out / "report.md").is_file()
    manifests = list(out.glob("train/*/manifest.json"))
    assert len(manifests) == 1, manifests
    train_dir = manifests[0].parent
    assert json.loads(manifests[0].read_text())["final_step"] == 6
    assert sorted(int(p.name) for p in (train_dir / "checkpoints").iterdir() if p.name.isdigit()) == [0, 3, 6]

    # The checkpoint events start eval-new-checkpoints; together they evaluate each checkpoint once.
    evals = train_dir / "evals"
    deadline = time.monotonic() + 240
    while True:
        results = sorted(int(p.stem) for p in evals.glob("*.json") if p.stem.isdigit()) if evals.is_dir() else []
        runs = flow_runs(api, "eval-new-checkpoints")
        bad = [r for r in runs if r["state_type"] in TERMINAL_BAD]
        assert not bad, f"eval runs ended badly: {[(r['name'], r['state_name']) for r in bad]}\n{tail(worker_log)}"
        if results == [0, 3, 6] and runs and all(r["state_type"] == "COMPLETED" for r in runs):
            break
        assert time.monotonic() < deadline, (
            f"evaluations: {results}; runs: {[(r['name'], r['state_name']) for r in runs]}\n{tail(worker_log)}")
        time.sleep(2)

    run_ids = {r["id"] for r in runs}
    assert all(r["deployment_id"] == eval_dep["id"] for r in runs)
    # The schedule is paused, so every evaluation run was started by a checkpoint event of this run.
    for r in runs:
        assert Path(r["parameters"]["checkpoint"]).parent == train_dir / "checkpoints", r["parameters"]
        assert (r.get("created_by") or {}).get("type") == "AUTOMATION", r.get("created_by")
    print(f"{len(runs)} eval-new-checkpoints runs:",
          [(r["name"], (r.get("created_by") or {}).get("type"), Path(r["parameters"]["checkpoint"]).name) for r in runs])
    for step in (0, 3, 6):
        record = json.loads((evals / f"{step}.json").read_text())
        assert record["evaluated_by"] in run_ids
        assert record["checkpoint"].endswith(f"checkpoints/{step}")
        assert "validation_loss" in record["results"]

    # Exactly once: one eval-checkpoint task run per checkpoint over all the evaluation flow runs.
    body = {"flow_runs": {"id": {"any_": sorted(run_ids)}}, "limit": 200}
    task_runs = httpx.post(f"{api}/task_runs/filter", json=body, timeout=30).json()
    evaluated = Counter(tr["name"] for tr in task_runs if tr["task_key"].startswith("eval")
                        and tr["state_type"] == "COMPLETED")
    assert sum(evaluated.values()) == 3, [(tr["name"], tr["task_key"], tr["state_type"]) for tr in task_runs]
    assert len(evaluated) == 3 and set(evaluated.values()) == {1}, evaluated
    print("eval-checkpoint task runs:", dict(evaluated))


@pytest.mark.timeout(600)
def test_the_evaluation_automation_has_the_name_and_description_of_prefect_yaml(prefect_stack):
    """`prefect deploy` names the automation of eval-new-checkpoints' trigger as infra/prefect.yaml says,
    not `eval-new-checkpoints__automation_1`, "A custom trigger"."""
    import yaml

    env, api, _, _ = prefect_stack
    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    trigger = next(d for d in spec["deployments"] if d["name"] == "eval-new-checkpoints")["triggers"][0]
    assert trigger["name"] == "evaluate-each-saved-checkpoint" and "palm.checkpoint.saved" in trigger["description"]

    cli(env, "work-pool", "create", "local-process", "--type", "process")
    cli(env, "deploy", "--name", "eval-new-checkpoints", "--prefect-file", "infra/prefect.yaml", "--no-prompt",
        timeout=300)
    deployment = httpx.post(f"{api}/deployments/filter", json={}, timeout=30).json()
    assert [d["name"] for d in deployment] == ["eval-new-checkpoints"]
    automations = httpx.post(f"{api}/automations/filter", json={}, timeout=30).json()
    assert [(a["name"], a["description"]) for a in automations] == [(trigger["name"], trigger["description"])]
    automation = automations[0]
    assert automation["enabled"] is True and automation["trigger"]["expect"] == ["palm.checkpoint.saved"]
    assert [(a["type"], a.get("deployment_id")) for a in automation["actions"]] == [("run-deployment", deployment[0]["id"])]
