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

gs:// roots are not locked (Cloud Storage has no lock primitive that outlives a crash without a lease
service); runs on a bucket are started by one orchestrator (the Prefect deployment) per run name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from palm.base import storage
from palm.base.errors import PalmError, environment_fault
from palm.store.layout import LOCK_FILE



@contextlib.contextmanager
def run_lock(root: str | os.PathLike) -> Iterator[Path | None]:
    """Hold the run directory's lock while the block runs; PalmError (exit 2) naming the holder when
    another process holds it. A no-op (yields None) for gs:// roots."""
    if storage.is_remote(root):
        yield None
        return
    folder = Path(root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except FileExistsError:
        raise PalmError(f"{root} (the run directory) is a file, not a directory: pass another --output") from None
    except OSError as e:  # a file above it, no permission, a full disk: the one line of palm.base.errors
        fault = environment_fault(e, str(root))
        if fault is None:
            raise
        raise fault from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PalmError(f"{root} is in use by another run ({_describe(fd)}); wait for it to finish, stop it, "
                            "or give this run another --output") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield folder / LOCK_FILE
    finally:
        os.close(fd)  # releases the lock


def _describe(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: "
                f"{holder['command'][:200]}")
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
