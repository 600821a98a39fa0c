"""The deployments of infra/prefect.yaml end to end, all on loopback.

A real Prefect server (SQLite, its own PREFECT_HOME) in a subprocess, `prefect deploy --all`, a process
worker, `prefect deployment run pretrain/pretrain-tiny`; then the checkpoint events start
eval-new-checkpoints, which evaluates every checkpoint of the run exactly once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, copy_of
from palm.base.net import free_port

OVERRIDES = ["train.steps=6", "train.checkpoint.every_steps=3", "eval.max_examples=4"]
TERMINAL_BAD = {"FAILED", "CRASHED", "CANCELLED"}


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every process group at once (the worker and the server shut down side by side), SIGKILL to
    any still running 20 s later."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        running = [proc for proc in procs if proc.poll() is None]
        for proc in running:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


README_PORT = "4200"


def readme_section_5() -> list[str]:
    """The commands of README section 5's code block, as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### 5. Deploy to a cluster", 1)[1].split("\n### ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.fixture
def prefect_stack(tmp_path):
    """README section 5 run verbatim, in bash, from the repository root: the `export`s set the
    environment of the later commands, `... &` lines keep running (the server, the worker) and the
    others must succeed. The only changes: the port (4200 may be taken; a free one is put in its place)
    and, by the caller, `--params` added to the final `deployment run`. PREFECT_HOME and the database
    are the test's own, so nothing of the user's Prefect is touched.

    Yields (run the remaining README lines, env, api url, tmp)."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "PALM_PIPELINE_DIR"}
    env.update(PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
               PREFECT_UI_ENABLED="false", PREFECT_CLI_PROMPT="false")
    assert shutil.which("uv", path=env.get("PATH")), "README section 5 runs `uv run`: uv must be on PATH"
    lines = [line.replace(README_PORT, port) for line in readme_section_5()]
    procs: list[subprocess.Popen] = []
    state = {"api": None}

    def run(line: str) -> str:
        line = line.split("  #", 1)[0].strip()
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = value
            if key == "PREFECT_API_URL":
                state["api"] = value
            return ""
        if line.endswith("&"):
            log = tmp_path / f"bg{len(procs)}.log"
            procs.append(subprocess.Popen(["bash", "-c", f"exec {line[:-1].strip()}"], env=env, cwd=ROOT,
                                          stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
            if " server start" in line:
                wait_for_server(procs[-1], state["api"], log)
            return ""
        done = subprocess.run(["bash", "-c", line], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"README line failed: {line}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    try:
        yield lines, run, env, state, tmp_path, procs
    finally:
        stop(procs)


def wait_for_server(server: subprocess.Popen, api: str | None, log: Path) -> None:
    assert api, "README section 5 must export PREFECT_API_URL before it starts the server"
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, f"the Prefect server exited:\n{tail(log)}"
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the Prefect server did not answer:\n{tail(log)}"
        time.sleep(0.5)


#: The answers Prefect's own client retries (prefect.client.base): the SQLite server answers 503 when two of its
#: writers contend on a busy machine (see unexplained_tracebacks), and the caller is expected to try again.
RETRIED = {429, 502, 503}


def call(method: str, url: str, **kwargs) -> httpx.Response:
    """One request to the server's REST API, retried with backoff on RETRIED as a Prefect client would;
    any other error status raises."""
    for attempt in range(6):
        response = httpx.request(method, url, timeout=30, **kwargs)
        if response.status_code not in RETRIED or attempt == 5:
            return response.raise_for_status()
        time.sleep(min(2 ** attempt, 10))
    raise AssertionError("unreachable")


def flow_runs(api: str, flow_name: str) -> list[dict]:
    body = {"flows": {"name": {"any_": [flow_name]}}, "limit": 200}
    return call("POST", f"{api}/flow_runs/filter", json=body).json()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_section_5_deploys_and_its_events_evaluate_each_checkpoint_once(prefect_stack, shared_data,
                                                                               tiny_upstream):
    # Cost: the README's commands verbatim: a Prefect server, `prefect deploy`, a worker process, a pretrain run and
    # one evaluation flow run per saved checkpoint started by events; the point is that whole loop, end to end.
    # The run's directory starts with the session's data, tokenizer and pack (tiny_upstream): the deployed
    # flow finds them cached, and trains and evaluates.
    lines, run, env, state, tmp, procs = prefect_stack
    assert lines[0].startswith("export PREFECT_API_URL=http://127.0.0.1:")
    assert all(line.startswith(("export ", "uv run prefect ")) for line in lines), lines
    *setup, last = lines
    assert last == "uv run prefect deployment run pretrain/pretrain-tiny"
    before_worker = [i for i, line in enumerate(setup) if " worker start" in line][0]
    for line in setup[:before_worker]:
        run(line)
    api = state["api"]
    deployments = {d["name"]: d for d in call("POST", f"{api}/deployments/filter", json={}).json()}
    assert {"pretrain-tiny", "eval-new-checkpoints"} <= set(deployments), sorted(deployments)
    tiny = deployments["pretrain-tiny"]
    # No variable needed: `prefect deploy` recorded this checkout as the working directory.
    assert tiny["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    eval_dep = deployments["eval-new-checkpoints"]
    # Its trigger's automation carries the name and description of infra/prefect.yaml (not
    # `eval-new-checkpoints__automation_1`, "A custom trigger").
    import yaml

    trigger = next(d for d in yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "eval-new-checkpoints")["triggers"][0]
    automations = call("POST", f"{api}/automations/filter", json={}).json()
    assert [(a["name"], a["description"]) for a in automations] == [(trigger["name"], trigger["description"])]
    assert trigger["name"] == "evaluate-each-saved-checkpoint" and automations[0]["enabled"] is True
    assert [(a["type"], a.get("deployment_id")) for a in automations[0]["actions"]] == [("run-deployment", eval_dep["id"])]
    # The hourly fallback is not under test: pause it so only the events start evaluations.
    for sched in eval_dep.get("schedules") or []:
        call("PATCH", f"{api}/deployments/{eval_dep['id']}/schedules/{sched['id']}", json={"active": False})
    for flow_run in flow_runs(api, "eval-new-checkpoints"):  # any auto-scheduled run made before the pause
        call("DELETE", f"{api}/flow_runs/{flow_run['id']}")
    for line in setup[before_worker:]:
        run(line)
    worker, worker_log = procs[-1], tmp / f"bg{len(procs) - 1}.log"

    # The README's last line, with a small run of it into a temporary directory.
    out = copy_of(tiny_upstream, tmp / "run")
    params = json.dumps({"output": str(out), "overrides": OVERRIDES})
    text = run(f"{last} --params '{params}'")
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", text).group(1)

    deadline = time.monotonic() + 360
    while True:
        flow_state = call("GET", f"{api}/flow_runs/{run_id}").json()["state"]
        assert flow_state["type"] not in TERMINAL_BAD, \
            f"pretrain ended {flow_state['name']}: {flow_state.get('message')}\n{tail(worker_log)}"
        if flow_state["type"] == "COMPLETED":
            break
        assert worker.poll() is None, f"the worker exited:\n{tail(worker_log)}"
        assert time.monotonic() < deadline, f"pretrain still {flow_state['name']} after 6 minutes\n{tail(worker_log)}"
        time.sleep(2)

    # The run in the Prefect UI: its report, the training's progress, loss table and summary, under keys
    # that name this run (its spec and directory), read back through the API.
    from tasks.common import run_artifact_key

    def artifacts(body: dict) -> list[dict]:
        return call("POST", f"{api}/artifacts/filter", json=body).json()

    mine = {a["key"]: a for a in artifacts({"artifacts": {"flow_run_id": {"any_": [run_id]}}}) if a.get("key")}
    key = lambda *parts: run_artifact_key("tiny", out, *parts)  # noqa: E731
    assert {key("report"), key("train", "summary"), key("train", "progress"), key("train", "loss")} <= set(mine), sorted(mine)
    assert "final loss" in mine[key("train", "summary")]["data"].lower()
    assert mine[key("train", "progress")]["data"] == 100
    assert "| stage" in mine[key("report")]["data"].lower() or "stage" in mine[key("report")]["data"].lower()

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
    task_runs = call("POST", f"{api}/task_runs/filter", json=body).json()
    evaluated = Counter(tr["name"] for tr in task_runs if tr["task_key"].startswith("eval")
                        and tr["state_type"] == "COMPLETED")
    assert sum(evaluated.values()) == 3, [(tr["name"], tr["task_key"], tr["state_type"]) for tr in task_runs]
    assert len(evaluated) == 3 and set(evaluated.values()) == {1}, evaluated
    print("eval-checkpoint task runs:", dict(evaluated))
    # The evaluations-across-checkpoints table of this run: one row per evaluated step.
    tables = artifacts({"artifacts": {"key": {"any_": [key("train", "evaluations")]}}, "sort": "CREATED_DESC"})
    assert tables, "no evaluations table"
    rows = json.loads(tables[0]["data"]) if isinstance(tables[0]["data"], str) else tables[0]["data"]
    assert sorted(int(r["step"]) for r in rows) == [0, 3, 6], rows

    # Quiet: the server (its telemetry off by the repository's prefect.toml, as for a user, not by this
    # test's environment) and the worker that ran both flows logged no traceback and no Python warning,
    # except Prefect's own SQLite write contention (see unexplained_tracebacks).
    for log in sorted(tmp.glob("bg*.log")):
        text = log.read_text()
        assert not unexplained_tracebacks(text) and not re.search(r"\w+Warning: ", text), f"{log.name}:\n{tail(log)}"


LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| ", re.MULTILINE)
SQLITE_LOCKED = "(sqlite3.OperationalError) database is locked"


def unexplained_tracebacks(text: str) -> list[str]:
    """The log records of a Prefect server or worker log that hold a traceback, less those whose error is
    SQLite's `database is locked`. Prefect's server on SQLite raises that for a worker heartbeat or a
    deployment's status update when two of its own services write at once on a busy machine (an upstream
    fault: PrefectHQ/prefect issues 10188, 23051); the caller retries on its next poll and no run is
    affected, as the assertions above show. README section 5 says so, and PostgreSQL avoids it."""
    starts = [m.start() for m in LOG_RECORD.finditer(text)]
    records = [text[a:b] for a, b in zip([0, *starts], [*starts, len(text)])]
    return [r for r in records if "Traceback" in r and SQLITE_LOCKED not in r]


def test_only_sqlite_contention_is_forgiven_in_the_quiet_check():
    locked = ("17:05:15.700 | ERROR   | prefect.server - Encountered exception in request:\n"
              "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
              "sqlalchemy.exc.OperationalError: " + SQLITE_LOCKED + "\n")
    other = ("17:05:16.100 | ERROR   | prefect.flow_runs.worker - Failed to submit flow run\n"
             "Traceback (most recent call last):\n  File \"y.py\", line 2, in g\nKeyError: 'x'\n")
    quiet = "17:05:14.000 | INFO    | prefect.flow_runs.worker - Worker started\n"
    assert unexplained_tracebacks(quiet + locked) == []
    assert unexplained_tracebacks(quiet + locked + other) == [other]
    assert unexplained_tracebacks("Traceback (most recent call last):\nValueError\n")  # no record header


def test_deployment_runs_write_to_a_directory_of_their_own(monkeypatch):
    from flows.pretrain import run_root
    from palm.dag.workflow import load_spec

    spec = load_spec(ROOT / "specs" / "tiny.yaml")
    assert run_root(spec, None) == "runs/tiny"  # palm run, or the flow called directly
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", "pretrain-tiny")
    assert run_root(spec, None) == "runs/deployments/pretrain-tiny"
    assert run_root(spec, "/elsewhere") == "/elsewhere"  # the run's output parameter wins


def test_prefect_servers_started_here_send_no_telemetry():
    """The repository's prefect.toml turns off the server's anonymous usage heartbeat for every prefect
    command run from the repository root (README section 5's server and worker): its service writes to the
    SQLite database as the server starts and printed a `database is locked` traceback on a busy machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    code = "from prefect.settings import get_current_settings; print(get_current_settings().server.analytics_enabled)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
