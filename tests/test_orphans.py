"""Nothing `palm run` starts outlives it, SIGKILL included (palm/base/orphans.py): Prefect's ephemeral API
server (about 200 MB each) used to stay after every `kill -9` of `palm run`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from palm.base.orphans import descendants

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "specs" / "tiny.yaml")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int, start: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()
    except OSError:
        return False
    return int(fields[19]) == start and fields[0] != b"Z"


@pytest.mark.slow
def test_sigkill_of_palm_run_leaves_no_process_behind(tmp_path):
    started: dict[int, int] = {}
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL" and not k.startswith("PALM_RUN_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")  # ephemeral mode, a database of its own
    run = subprocess.Popen([sys.executable, "-m", "palm.cli", "run", TINY, "--output", str(tmp_path / "run"),
                            "--set", "train.steps=100000"], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and run.poll() is None:
            started.update(descendants({run.pid}))
            if any("uvicorn" in cmdline(p) for p in started) and (tmp_path / "run" / "spec.json").exists():
                break  # the ephemeral server is up and the flow is running
            time.sleep(0.5)
        assert run.poll() is None, "palm run ended before it could be killed"
        server = [p for p in started if "uvicorn" in cmdline(p)]
        watchdog = [p for p in started if "palm.base.orphans" in cmdline(p)]
        assert server and watchdog, {p: cmdline(p) for p in started}
        assert len(server) == 1, {p: cmdline(p) for p in server}  # the flow runs on the server palm started
        started.update(descendants({run.pid}))
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(alive(p, s) for p, s in started.items()):
            time.sleep(0.5)
        left = {p: cmdline(p) for p, s in started.items() if alive(p, s)}
        assert not left, f"left behind after SIGKILL of palm run: {left}"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for pid, start in started.items():  # nothing of ours stays, whatever the outcome
            if alive(pid, start):
                os.kill(pid, signal.SIGKILL)
