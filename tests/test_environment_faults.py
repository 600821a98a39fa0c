"""Faults of the machine, not of the input: a full disk, permission denied, a path of the wrong kind. Each is
one line naming the path and what to do, exit 2 (75 where a later attempt may succeed), no traceback, and
no Prefect retry when a retry would meet the same fault (palm.base.errors.EnvironmentFault).

Full disks and refused permissions are simulated by raising the OSError a real one raises, where palm's
code meets it (these tests run as root, whom permissions do not stop); a directory given as a data path is
real. docs/reliability.md lists each fault with the test that proves it.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from palm.cli import main
from palm.base.errors import EnvironmentFault, PalmError, TransientFault, environment_fault
from tests.test_cli import flow_run_and_tasks, prefect_flow_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "specs" / "tiny.yaml"


# ------------------------------------------------------------------------------- classification


@pytest.mark.parametrize("error, where, expected", [
    (OSError(errno.ENOSPC, "No space left on device"), "/runs/x",
     "/runs/x: no space left on the device (ENOSPC); free space there"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/a.jsonl"), None,
     "/data/a.jsonl: permission denied (EACCES); give this user access to it"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/dir"), None,
     "/data/dir: is a directory, where a file was expected (EISDIR)"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/runs/file/x"), None,
     "/runs/file/x: a part of this path is a file, where a directory was expected (ENOTDIR)"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), None, "/ro/x: read-only file system (EROFS)"),
    # Beam's workers re-raise a DoFn's error as text, with the original as its context in process only.
    (RuntimeError("IsADirectoryError: [Errno 21] Is a directory: '/data/dir' [while running 'Read/ReadFiles']"),
     None, "/data/dir: is a directory, where a file was expected (EISDIR)"),
    (RuntimeError("OSError: [Errno 28] No space left on device [while running 'Write/WriteShard']"), "/runs/y",
     "/runs/y: no space left on the device (ENOSPC)"),
])
def test_oserrors_of_the_machine_become_one_line_naming_the_path(error, where, expected):
    fault = environment_fault(error, where=where)
    assert isinstance(fault, EnvironmentFault) and not isinstance(fault, TransientFault)
    assert str(fault).startswith(expected), str(fault)
    assert "\n" not in str(fault) and fault.exit_code == 2 and not fault.retryable


def test_an_oserror_in_a_wrappers_chain_is_found():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("a bundle failed") from inner
    except RuntimeError as e:
        fault = environment_fault(e, where="/runs/z")
    assert fault is not None and fault.errno == errno.ENOSPC and fault.path == "/runs/z"


def test_a_connection_reset_is_transient_exit_75():
    fault = environment_fault(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    assert isinstance(fault, TransientFault) and fault.exit_code == 75 and fault.retryable


@pytest.mark.parametrize("error", [ValueError("x"), OSError("no errno"), FileNotFoundError(errno.ENOENT, "gone", "/x"),
                                   PalmError("bad input")])
def test_other_errors_are_not_environment_faults(error):
    assert environment_fault(error) is None


def test_a_fileless_enospc_names_the_full_file_system_among_the_candidates(tmp_path, monkeypatch):
    """A write() that finds the disk full names no file; the full one of the run root and the local cache
    is named (here the cache's file system reports no free blocks)."""
    import os

    cache = tmp_path / "cache"
    monkeypatch.setenv("PALM_CACHE_DIR", str(cache))
    real = os.statvfs

    def statvfs(path):
        st = real(path)
        if str(path).startswith(str(cache)) or str(path) == str(tmp_path):
            return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, *tuple(st)[5:]))
        return st

    monkeypatch.setattr(os, "statvfs", statvfs)
    fault = environment_fault(OSError(errno.ENOSPC, "No space left on device"), where="/")
    assert fault is not None and fault.path == str(cache), str(fault)


# ------------------------------------------------------------------------------- Prefect's retry condition


@pytest.mark.parametrize("error, retried", [
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (PermissionError(errno.EACCES, "Permission denied", "/x"), False),
    (RuntimeError("IsADirectoryError: [Errno 21] Is a directory: '/d'"), False),
    (EnvironmentFault("/x: full"), False),
    (TransientFault("reset"), True),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
    (RuntimeError("a crash"), True),
    (PalmError("bad input"), False),
])
def test_retry_condition(error, retried):
    from tasks.common import worth_retrying

    class State:
        def result(self):
            raise error

    assert worth_retrying(None, None, State()) is retried


# ------------------------------------------------------------------------------- through `palm` itself


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith(("prefect: ", "stage ", "data "))]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("palm: error: "), err[-3000:]
    return lines[0]


def test_a_file_where_a_directory_should_be_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc = main(["data", "package", "--out", str(tmp_path / "file" / "out")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2
    assert f"{tmp_path / 'file' / 'out'}: a part of this path is a file, where a directory was expected (ENOTDIR)" \
        in line


def test_a_full_disk_outside_palm_run_is_one_line(tmp_path, capsys, monkeypatch):
    """Writing the wheel finds the disk full (zipfile's write() names no file): one line, exit 2."""
    import zipfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", full)
    rc = main(["data", "package", "--out", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "no space left on the device (ENOSPC); free space there" in line


def test_permission_denied_outside_palm_run_is_one_line(tmp_path, capsys, monkeypatch):
    import zipfile

    def refused(self, file, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(file))

    monkeypatch.setattr(zipfile.ZipFile, "__init__", refused)
    rc = main(["data", "package", "--out", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and f"{tmp_path / 'out'}/palm_pipeline" in line and "permission denied (EACCES)" in line


def _source_spec(tmp_path: Path, paths: list[str]) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"extends: {TINY}\n"
                    "data:\n  sources:\n"
                    f"    - {{name: docs, weight: 1.0, format: jsonl, paths: {json.dumps(paths)}, "
                    "filters: {min_words: 1, min_stop_words: null}}\n"
                    "retries: {data: {retries: 2, delay_seconds: 0}}\n")
    return spec


def _docs(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    words = "the weather report said that rivers would overflow their banks before morning arrived"
    path.write_text("".join(json.dumps({"text": f"{words} {i}"}) + "\n" for i in range(20)))
    return path


def _data_task_runs(output: Path) -> int:
    """How many times the data task ran (1: no retry) in the one failed flow run for this output."""
    flows = [f for f in prefect_flow_runs(parameter_output=str(output)) if f.state.is_failed()]
    assert len(flows) == 1
    data = [t for t in flow_run_and_tasks(str(flows[0].id))[1] if t.name.startswith("data[")]
    assert len(data) == 1 and data[0].state.is_failed()
    return data[0].run_count


def test_run_with_a_directory_as_data_path_is_one_line_and_not_retried(prefect_server, tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    spec = _source_spec(tmp_path, [str(tmp_path / "corpus")])
    out = tmp_path / "run"
    rc = main(["run", str(spec), "--stages", "data", "--output", str(out)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2
    assert f"data.sources.0.paths: {tmp_path / 'corpus'} is a directory" in line and "/*.jsonl" in line
    assert _data_task_runs(out) == 1


def test_run_on_a_full_disk_is_one_line_and_not_retried(prefect_server, tmp_path, capsys, monkeypatch):
    """Writing the data stage's shards (in Beam's workers) finds the disk full, as write() does: no file
    named. The run root is named, exit 2, the task runs once."""
    from apache_beam.io.filesystems import FileSystems

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystems, "create", full)
    out = tmp_path / "run"
    rc = main(["run", str(_source_spec(tmp_path, [str(_docs(tmp_path))])), "--stages", "data", "--output", str(out)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2
    assert f"{out}: no space left on the device (ENOSPC); free space there" in line
    assert "complete stages are kept" in line
    assert _data_task_runs(out) == 1


def test_run_that_may_not_read_a_data_file_is_one_line_and_not_retried(prefect_server, tmp_path, capsys,
                                                                       monkeypatch):
    from palm.data import sources

    docs = _docs(tmp_path)

    def refused(src, path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(sources, "_file_records", refused)
    out = tmp_path / "run"
    rc = main(["run", str(_source_spec(tmp_path, [str(docs)])), "--stages", "data", "--output", str(out)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2
    assert f"{docs}: permission denied (EACCES); give this user access to it" in line
    assert _data_task_runs(out) == 1


def test_run_whose_output_root_cannot_be_written_is_one_line(prefect_server, tmp_path, capsys):
    """The root is under a file (ENOTDIR), met by the flow itself when it records the spec."""
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"
    rc = main(["run", str(_source_spec(tmp_path, [str(_docs(tmp_path))])), "--stages", "data", "--output", str(out)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2
    assert "a part of this path is a file, where a directory was expected (ENOTDIR)" in line
    assert str(tmp_path / "file") in line


def test_beam_workers_do_not_log_a_traceback_for_an_environment_fault(caplog):
    """Beam logs each failed bundle with its traceback; for a fault that becomes one line, none is logged."""
    import logging

    import apache_beam as beam

    from palm.data.beam import run_beam
    from palm.dag.workflow import load_spec

    def refused(x):
        raise PermissionError(errno.EACCES, "Permission denied", f"/data/{x}.jsonl")

    caplog.set_level(logging.INFO)
    with pytest.raises(EnvironmentFault) as e:
        run_beam(load_spec(TINY).data, lambda p: p | beam.Create(["a", "b", "c"]) | beam.Map(refused))
    assert str(e.value).startswith("/data/") and "permission denied (EACCES)" in str(e.value)
    beam_errors = [r for r in caplog.records if r.name.startswith("apache_beam") and r.levelno >= logging.ERROR]
    assert beam_errors == [], [r.getMessage()[:200] for r in beam_errors]


def test_run_with_a_truncated_compressed_source_is_one_line_and_not_retried(prefect_server, tmp_path, capsys):
    """Issue 27.1: a jsonl.gz cut short used to give the lines before the damage, exit 0."""
    import gzip

    docs = tmp_path / "docs.jsonl.gz"
    packed = gzip.compress(_docs(tmp_path).read_bytes())
    docs.write_bytes(packed[: len(packed) - 40])
    spec = tmp_path / "spec.yaml"
    spec.write_text(_source_spec(tmp_path, [str(docs)]).read_text().replace("format: jsonl,", "format: jsonl.gz,"))
    out = tmp_path / "run"
    rc = main(["run", str(spec), "--stages", "data", "--output", str(out)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2
    assert f"{docs}: truncated: its gzip stream ends before the end-of-stream marker" in line
    assert _data_task_runs(out) == 1
    assert not list(out.glob("data/*/manifest.json"))  # nothing a later run could take for complete
