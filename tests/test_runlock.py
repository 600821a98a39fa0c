"""One run per run directory (palm/store/runlock.py), and leftovers of killed builds removed at stage start."""

from __future__ import annotations

import subprocess
import sys
import time
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
    with run_lock(tmp_path / "run") as path:
        assert path == tmp_path / "run" / LOCK_FILE
    # gs:// roots are not locked (documented in palm/store/runlock.py).
    with run_lock("gs://bucket/run") as path:
        assert path is None


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
