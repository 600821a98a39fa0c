"""Nothing a command starts outlives it, SIGKILL included: a watchdog process on its parent.

`palm run` starts Prefect's ephemeral API server (a uvicorn subprocess of about 200 MB that it stops in
an `atexit` hook, which SIGKILL skips) and the stages may start subprocesses of their own. A process
cannot act after SIGKILL, and PR_SET_PDEATHSIG only covers children whose start we control (not those of
Prefect or Beam), so `watch_descendants()` starts a small watchdog (`python -m palm.base.orphans PID TOKEN`, in a
session of its own, so a terminal's Ctrl-C reaches it only through its parent's end). Until the parent
ends it records the parent's descendants every `POLL_SECONDS` (pid and start time, so a reused pid is
never hit); once the parent is gone (its parent pid changes), however it ended, it sends SIGTERM to every
recorded descendant still alive, their own descendants, and any process carrying the run's token in its
environment (`PALM_RUN_TOKEN`, inherited by whatever the command starts, so one started in the last poll
interval is found too), waits `GRACE_SECONDS`, then SIGKILLs what is left, and exits.

Linux only (/proc); elsewhere `watch_descendants` does nothing. Standard library only: the watchdog
imports nothing else of palm.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

#: The environment variable every process a watched command starts inherits.
TOKEN_ENV = "PALM_RUN_TOKEN"
#: How often the watchdog records the parent's descendants, in seconds.
POLL_SECONDS = 0.5
#: Seconds between SIGTERM and SIGKILL for the descendants left behind.
GRACE_SECONDS = 5.0


def watch_descendants() -> subprocess.Popen | None:
    """Start the watchdog of this process (once); returns it, or None where /proc is missing."""
    if not os.path.isdir("/proc/self") or TOKEN_ENV in os.environ and _watched_here():
        return None
    token = f"{os.getpid()}-{secrets.token_hex(8)}"
    os.environ[TOKEN_ENV] = token  # before anything is started: every descendant carries it
    return subprocess.Popen([sys.executable, "-m", "palm.base.orphans", str(os.getpid()), token],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def _watched_here() -> bool:
    return os.environ.get(TOKEN_ENV, "").split("-")[0] == str(os.getpid())


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _processes() -> dict[int, tuple[int, int]]:
    """Every process: pid -> (parent pid, start time)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                out[int(name)] = st
    return out


def descendants(roots: set[int], table: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """The descendants of the `roots` processes (roots excluded): pid -> start time."""
    table = _processes() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out and child not in roots:
                out[child] = table[child][1]
                todo.append(child)
    return out


def _carrying(token: str) -> dict[int, int]:
    """Processes whose environment holds the run's token: pid -> start time."""
    needle = f"{TOKEN_ENV}={token}".encode()
    out = {}
    for pid, (_, start) in _processes().items():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out[pid] = start
        except OSError:
            continue
    return out


def _alive(known: dict[int, int]) -> dict[int, int]:
    """Those of `known` (pid -> start time) that are still the same processes, and not zombies."""
    out = {}
    for pid, start in known.items():
        st = _stat(pid)
        if st is not None and st[1] == start and not _zombie(pid):
            out[pid] = start
    return out


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except OSError:
        return True


def _signal(pids: dict[int, int], sig: int) -> None:
    for pid in _alive(pids):
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _left_behind(known: dict[int, int], token: str) -> dict[int, int]:
    me = os.getpid()
    found = {**_alive(known), **_carrying(token)}
    found.update(descendants(set(found)))
    found.pop(me, None)
    return found


def watch(parent: int, token: str) -> None:
    """The watchdog's loop: record `parent`'s descendants until it is gone, then end what is left."""
    me = os.getpid()
    known: dict[int, int] = {}
    while os.getppid() == parent:
        known.update(descendants({parent}))
        known.pop(me, None)
        time.sleep(POLL_SECONDS)
    for _ in range(3):  # what the dying ones start meanwhile is found by the next round
        left = _left_behind(known, token)
        if not left:
            return
        _signal(left, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        while _alive(left) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal(left, signal.SIGKILL)
        known = {**known, **left}


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]), sys.argv[2])
