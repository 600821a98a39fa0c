"""One run per run directory (palm/store/runlock.py), and leftovers of killed builds removed at stage start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from palm.cli import main
from palm.base.errors import PalmError
from palm.store.layout import LOCK_FILE
from palm.store.runlock import run_lock
from palm.store.outputs import run_stage

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "specs" / "tiny.yaml")

HOLDER = """
import sys, time
from palm.store.runlock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def held(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_run_on_the_same_directory_exits_2_naming_the_holder(prefect_server, held, tmp_path, capsys):
    rc = main(["run", TINY, "--output", str(tmp_path / "run"), "--stages", "data"])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    line = next(l for l in err.splitlines() if "in use by another run" in l)
    assert f"pid {held.pid}" in line and "give this run another --output" in line
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "data").exists()  # nothing was done twice


def test_the_lock_goes_with_its_holder_however_it_ends(held, tmp_path):
    with pytest.raises(PalmError, match=f"pid {held.pid}"):
        with run_lock(tmp_path / "run"):
            pass
    held.kill()  # SIGKILL: no cleanup code runs; the kernel drops the flock
    held.wait()
    with run_lock(tmp_path / "run") as fd:
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "run" / LOCK_FILE))
    # gs:// roots are not locked (documented in palm/store/runlock.py).
    with run_lock("gs://bucket/run") as fd:
        assert fd is None


def test_a_run_directory_that_is_a_file_is_one_clear_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PalmError, match="is a file, not a directory"):
        with run_lock(tmp_path / "file"):
            pass


def test_leftovers_of_killed_builds_are_removed_at_stage_start(tmp_path):
    def build(out: Path) -> dict:
        (out / "x.txt").write_text("built")
        return {}

    first = run_stage("demo", {"a": 1}, {}, tmp_path, build)
    parent = Path(first.path).parent
    # What a killed build of the same output, and of another output, leave behind.
    for name in (f".tmp-{first.key}-0badc0de", f".stale-{first.key}-0badf00d", ".tmp-otherkey-12345678"):
        (parent / name).mkdir()
        (parent / name / "partial").write_text("half")
    again = run_stage("demo", {"a": 1}, {}, tmp_path, build, force=True)
    assert again.key == first.key and (Path(again.path) / "x.txt").read_text() == "built"
    assert sorted(p.name for p in parent.iterdir()) == [".tmp-otherkey-12345678", first.key]


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path, capsys):
    """A `.palm-run.lock` that is a symbolic link used to truncate its target: it is opened with O_NOFOLLOW."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(target)
    rc = main(["run", TINY, "--output", str(tmp_path / "run"), "--stages", "data"])
    err = capsys.readouterr().err
    assert rc == 2 and "is a symbolic link" in err and "Traceback" not in err, err
    assert target.read_text() == "keep me"
    assert not (tmp_path / "run" / "data").exists()


def test_palm_worker_holds_the_lock_and_a_local_launch_passes_it_to_its_workers(held, tmp_path, capsys):
    """`palm worker` and a local `palm launch` used to take no lock: both trained into one run's checkpoints."""
    run = str(tmp_path / "run")
    for args in (["worker", TINY, "--output", run], ["launch", TINY, "--output", run]):
        rc = main(args + ["--set", "train.steps=2"])
        err = capsys.readouterr().err
        assert rc == 2 and f"in use by another run (pid {held.pid}" in err and "Traceback" not in err, err
    held.kill()
    held.wait()
    # A launched worker inherits its launcher's lock (it is not refused by it) and holds it with it.
    probe = subprocess.Popen([sys.executable, "-c", PROBE, run], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert probe.stdout.readline().strip() == "refused"
    probe.wait()
    assert probe.returncode == 0


# A launcher (this process) holds the lock; its child, given the lock, takes it again; a stranger is refused.
PROBE = """
import os, subprocess, sys
from palm.base.errors import PalmError
from palm.store.runlock import INHERITED_FD, run_lock
child = "from palm.store.runlock import run_lock\\nimport sys\\nwith run_lock(sys.argv[1]): print('child', flush=True)"
with run_lock(sys.argv[1]) as fd:
    env = dict(os.environ, **{INHERITED_FD: str(fd)})
    out = subprocess.run([sys.executable, "-c", child, sys.argv[1]], env=env, pass_fds=(fd,), capture_output=True,
                         text=True)
    assert out.stdout.strip() == "child", out.stderr
    stranger = subprocess.run([sys.executable, "-c", child, sys.argv[1]], capture_output=True, text=True)
    assert stranger.returncode != 0 and "in use by another run" in stranger.stderr, stranger.stderr
    print("refused", flush=True)
"""


@pytest.mark.slow
def test_a_run_root_belongs_to_one_spec(prefect_server, tmp_path, capsys):
    """A second spec run into the same directory used to overwrite spec.json and report.md, and `palm eval`
    of the first run's checkpoints then took the second spec's eval settings: it is refused in one line,
    before Prefect starts and again in the flow (under the lock), and nothing of the first run changes."""
    from palm.dag.runner import record_spec
    from palm.dag.workflow import load_spec

    run = tmp_path / "run"
    assert main(["run", TINY, "--output", str(run), "--stages", "data"]) == 0
    before = {p.name: p.read_bytes() for p in (run / "spec.json", run / "report.md")}
    other = tmp_path / "other.yaml"
    other.write_text(f"extends: {TINY}\nname: other\neval: {{max_examples: 3}}\n")
    capsys.readouterr()
    rc = main(["run", str(other), "--output", str(run), "--stages", "data"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [
        f"palm: error: {run} is the run root of spec 'tiny' (its spec.json), not of 'other': a run root belongs to "
        "one spec, and nothing of that run is overwritten; give this run another --output (or infra.storage_root)"], err
    with pytest.raises(PalmError, match="is the run root of spec 'tiny'"):
        record_spec(load_spec(other), run)  # what the flow itself does first
    assert {p.name: p.read_bytes() for p in (run / "spec.json", run / "report.md")} == before
    # The same spec again (other --set values) shares the root and its cache.
    assert main(["run", TINY, "--output", str(run), "--stages", "data", "--set", "eval.max_examples=5"]) == 0
    (run / "spec.json").write_text("not json")
    assert main(["run", TINY, "--output", str(run), "--stages", "data"]) == 2
    assert "not a spec record of palm" in capsys.readouterr().err
