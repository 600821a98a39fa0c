"""One run at a time per run directory.

`palm run` and the pretrain flow (deployments included) hold an exclusive lock on `<root>/.palm-run.lock`
for the whole run. A second run on the same directory does not wait: it exits 2 at once with one line
naming the holder (pid, host, start time, command), since waiting would only redo or race the first
run's work and hide a mistaken `--output`. The lock is `flock(2)`: the kernel releases it when the
holder exits, however it exits, so a killed run never leaves a stale lock behind; the file itself stays
(removing it would race with a run taking it) and only describes the last holder.

Held, it also makes cleaning up after killed stages safe: a stage's leftover temporary directories
(`.tmp-<key>-*`, `.stale-<key>-*`) can only belong to a dead run, and `palm.store.outputs.run_stage` removes
them before it builds.

The lock file is opened without following a symbolic link (O_NOFOLLOW; a `.palm-run.lock` that was a
link used to truncate its target) and must be a regular file. The lock is re-entrant within a process (the
flow holds it, and a training node's local launch under it asks again), and passes to the workers a local
launch starts: they inherit the open lock (`PALM_RUN_LOCK_FD`), so `palm worker` under `palm launch` holds
it with its launcher, while a `palm worker` started on its own takes it like `palm run`.

gs:// roots are not locked (Cloud Storage has no lock primitive that outlives a crash without a lease
service); runs on a bucket are started by one orchestrator (the Prefect deployment) per run name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from palm.base import storage
from palm.base.errors import PalmError, environment_fault
from palm.store.layout import LOCK_FILE

#: The environment variable naming the lock's file descriptor a launcher passes to its workers.
INHERITED_FD = "PALM_RUN_LOCK_FD"

_held: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) of a lock file this process holds -> its fd
_held_lock = threading.Lock()


def _open(root: str | os.PathLike) -> int:
    folder = Path(root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise PalmError(f"{root} (the run directory) is a file, not a directory: pass another --output") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PalmError(f"{folder / LOCK_FILE} is a symbolic link; a run lock is a file of its own: remove the "
                            "link") from None
        fault = environment_fault(e, str(root))  # a file above it, no permission, a full disk
        if fault is None:
            raise
        raise fault from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PalmError(f"{folder / LOCK_FILE} is not a regular file; remove it")
    return fd


def _inherited(ident: tuple[int, int]) -> int | None:
    """The lock's fd a launcher passed down to this process, when it is this very lock file."""
    try:
        fd = int(os.environ.get(INHERITED_FD, ""))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return None
    return fd if (st.st_dev, st.st_ino) == ident else None


@contextlib.contextmanager
def run_lock(root: str | os.PathLike) -> Iterator[int | None]:
    """Hold the run directory's lock while the block runs; PalmError (exit 2) naming the holder when
    another process holds it. Yields the lock's file descriptor (for `pass_fds` of workers that share it),
    or None for gs:// roots, which are not locked."""
    if storage.is_remote(root):
        yield None
        return
    fd = _open(root)
    st = os.fstat(fd)
    ident = (st.st_dev, st.st_ino)
    with _held_lock:
        held = _held.get(ident)
    if held is not None:  # this process holds it already (the flow, then a local launch under it)
        os.close(fd)
        yield held
        return
    inherited = _inherited(ident)
    if inherited is not None:  # a launcher's worker: the launcher's open lock, shared with it
        os.close(fd)
        fd = inherited
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PalmError(f"{root} is in use by another run ({_describe(fd)}); wait for it to finish, stop it, "
                            "or give this run another --output") from None
        if inherited is None:
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:500]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        with _held_lock:
            _held[ident] = fd
        try:
            yield fd
        finally:
            with _held_lock:
                _held.pop(ident, None)
    finally:
        if inherited is None:
            os.close(fd)  # releases the lock (unless a worker still shares it)


def _describe(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: "
                f"{holder['command'][:200]}")
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
