"""Run an untrusted program in a disposable, isolated child process (Linux).

`run_isolated(command, files)` writes `files` to a throwaway directory, runs `command` (an argv) under the
isolation below within a wall-clock limit, and reports what happened (`Outcome`): the program's exit
status, whether it timed out, the tails of its output, the isolation in effect and the memory its process
tree used. It knows nothing of what the program is or of how its success is judged (palm.evaluation.sandbox
builds HumanEval's verdict on it). Nothing the program does may harm the machine or the caller.

Process layout (each box is a separate process)::

    caller (any thread)      subprocess.Popen, start_new_session=True, minimal environment
      └─ runner              a bare `python -I -S` running palm/evaluation/isolation_runner.py, still root:
         │                   enters the new namespaces and prepares the file system, then forks
         └─ init             PID 1 of the new PID namespace; mounts a fresh /proc, forks, reaps
            └─ program       rlimits, drop to a one-off uid/gid, no_new_privs, exec `command`

Isolation in effect when the caller is root (this is the case on the project's VMs; every `Outcome`
reports what was in effect, in `Outcome.isolation`):

* **A unique unprivileged uid/gid per run** (random in [1_600_000_000, 1_600_000_000 + 2**28), checked
  unused): root's permission bypass is gone, so the program cannot delete or modify the caller's
  files, cannot signal any process but its own, and RLIMIT_NPROC (which never applies to root)
  counts exactly this run's processes. Being unique per run, the uid also names everything the run
  started, which the caller sweeps afterwards (SIGSTOP, then SIGKILL, via pidfds).
* **Namespaces** (unshare(2) through ctypes; os.unshare needs Python 3.12): a new network namespace
  (only a down loopback: no connection can be made anywhere, not even to the caller's localhost), a
  new PID namespace (the caller, the runner and every other process on the machine are invisible and
  cannot be signalled; when init exits the kernel SIGKILLs everything left in the namespace, so
  daemons and forks die with the program), new IPC and UTS namespaces, and a private mount namespace.
* **A read-only file system**: in the mount namespace every mount is remounted read-only (flags
  nosuid/nodev/noexec kept), except the working directory, which is a fresh size-limited tmpfs
  owned by the run's uid (HOME and TMPDIR point there). Directories the interpreter needs but that
  the unprivileged uid cannot traverse (e.g. /root/.pyenv under a 0700 /root) are exposed read-only
  by mounting an empty tmpfs over the closed ancestor and bind-mounting just those directories back,
  which also hides everything else there (e.g. secrets under /root).
* **Resource limits** set in the program process before exec: RLIMIT_CPU, RLIMIT_AS (memory per process;
  the whole tree's memory is capped too, see below),
  RLIMIT_FSIZE (also bounds stdout/stderr, which go to files), RLIMIT_NPROC, RLIMIT_NOFILE,
  RLIMIT_CORE=0; plus PR_SET_NO_NEW_PRIVS (set-uid binaries cannot raise privileges) and
  PR_SET_PDEATHSIG=SIGKILL.
* **Wall-clock timeout and group kill**: the caller waits at most `timeout_s`, then SIGKILLs the
  runner's whole process group (killpg), which takes init, and with it the PID namespace, down.
* **A throwaway directory** (tempfile.mkdtemp) holding the program and its output, removed afterwards.

The program cannot kill the caller: it is not its parent (the runner and init sit between them),
the caller is in another PID namespace, and it runs under another uid. Even `os.kill(-1, SIGKILL)`
only reaches the program's own processes. What it can still do is read world-readable files (the
repository, /etc, the evaluation data): the isolation keeps programs from changing the machine, from
talking to the network and from outliving their run, not from looking around.

Fallbacks when something is not available (never silent: see `Outcome.isolation`): without root, the
runner creates a user namespace (identity-mapped, so the exec'd program holds no capabilities) and the
same network/PID/mount namespaces, but cannot switch to another uid (RLIMIT_NPROC then allows the
user's current task count plus `nproc`); without a network namespace, the command's NO_NETWORK argument
reads "1" and the program can only block sockets itself, a best-effort block (palm.evaluation.sandbox's
wrapper replaces `socket.socket` and friends before the program runs); without a PID namespace, leftovers
are killed by process group and, when the uid was switched, by uid. As root without a mount namespace,
an interpreter under a closed directory (/root) cannot be reached by the one-off uid: the run reports an
error (`Outcome.errors`) rather than run the program as root.

**Memory of the whole process tree** (`tree_memory_mb`, default `memory_mb`; RLIMIT_AS alone is per
process, so six forks could each take their share): a per-run child cgroup where one can be made (cgroup
v2, else v1; see palm.evaluation.cgroups), whose OOM killer ends processes of the run only at the cap;
`Outcome.oom_kills` counts them and `Outcome.memory_peak_mb` gives the tree's peak. Without a usable
cgroup the bound is processes x RLIMIT_AS: the tree cap (at most half of MemAvailable) divided by
RLIMIT_AS gives RLIMIT_NPROC, lowered (down to 1: no fork, no thread) until it fits.
`Outcome.isolation["memory_cap"]` names the mechanism in effect ("cgroup-v2", "cgroup-v1", "rlimits").
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from palm.evaluation import isolation_runner
from palm.evaluation.cgroups import TreeCgroup
from palm.evaluation.isolation_runner import NO_NETWORK

__all__ = ["NO_NETWORK", "COLLECT_BYTES", "Outcome", "check_limits", "processes_of_uid", "run_isolated"]

# The runner: isolation_runner.py, loaded under its RUNNER_MODULE name by a bare interpreter (no site), so
# that its cached bytecode is used and only the light imports at its top run.
_RUNNER_STUB = f"""\
import importlib.util, sys
spec = importlib.util.spec_from_file_location({isolation_runner.RUNNER_MODULE!r}, sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
"""
_RUNNER_FILE = os.path.abspath(isolation_runner.__file__)
_UID_BASE = 1_600_000_000
_UID_SPAN = 2**28
_PATH = "/usr/local/bin:/usr/bin:/bin"
COLLECT_BYTES = 4096  # read from each of run_isolated's collect_fds


@dataclass(frozen=True)
class Outcome:
    """What one isolated run did; judging it (passed or not) is the caller's business."""

    returncode: int | None  # the program's exit status, as init saw it; negative: killed by that signal;
    #                         None: unknown (it never started, or the run timed out before it ended)
    timed_out: bool  # killed after timeout_s of wall-clock time
    errors: tuple[str, ...]  # why the run could not be set up or the program not started
    runner_status: int  # the runner's own exit status (negative: killed by that signal)
    stdout: str  # the last `tail_bytes` of each stream
    stderr: str
    seconds: float
    uid: int | None  # the one-off uid the program ran as (None: no switch was possible)
    isolation: dict[str, Any] = field(default_factory=dict)  # what was in effect, memory_cap included
    memory_peak_mb: float | None = None  # the run's whole process tree, where a cgroup measured it
    oom_kills: int | None = None  # processes the OOM killer ended at the tree's cgroup cap (None: no cgroup)
    collected: tuple[bytes, ...] = ()  # what each of collect_fds held once the run's processes were gone


def check_limits(timeout_s: float, *, memory_mb: int, tree_memory_mb: int | None, fsize_mb: int, disk_mb: int,
                 nproc: int, nofile: int) -> None:
    """ValueError unless the limits are usable (timeout_s positive, the others at least 1)."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    for name, value in (("memory_mb", memory_mb), ("fsize_mb", fsize_mb), ("disk_mb", disk_mb),
                        ("nproc", nproc), ("nofile", nofile), ("tree_memory_mb", tree_memory_mb or 1)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def run_isolated(command: Callable[[list[str]], Sequence[str]], files: Sequence[tuple[str, str]] = (), *,
                 pass_fds: Sequence[int] = (), collect_fds: Sequence[int] = (), timeout_s: float = 10.0,
                 memory_mb: int = 1024, tree_memory_mb: int | None = None, cpu_s: float | None = None,
                 fsize_mb: int = 16, disk_mb: int = 64, nproc: int = 16, nofile: int = 128,
                 tail_bytes: int = 8192) -> Outcome:
    """Run a program in a disposable, isolated child; see the module docstring.

    files: (name, text) pairs written (UTF-8, mode 0644, readable by the program) to the run's throwaway
    directory; command: given their absolute paths, in order, returns the argv to exec (argv[0] an
    absolute path); an argument equal to NO_NETWORK becomes "1" where no network namespace could be made,
    else "0". The program starts in a fresh tmpfs working directory (also HOME and TMPDIR) with a minimal
    environment. pass_fds: descriptors the program inherits, handed over: closed here, in every case, once
    the runner has started; collect_fds: pipes whose buffered contents (up to COLLECT_BYTES each, without
    waiting for writers) are read once the run's processes are gone (Outcome.collected).
    timeout_s: wall clock for the whole run; memory_mb: RLIMIT_AS per process; tree_memory_mb: memory of
    the run's whole process tree (default: memory_mb), a cgroup where one can be made, else a bound on
    processes x RLIMIT_AS; cpu_s: RLIMIT_CPU per process (default: the timeout, rounded up, plus one);
    fsize_mb: the largest file the program may write (also its stdout and stderr); disk_mb: size of the
    tmpfs working directory; nproc: processes and threads of the run's uid; nofile: open files per process.
    """
    handed = list(pass_fds)
    try:
        check_limits(timeout_s, memory_mb=memory_mb, tree_memory_mb=tree_memory_mb, fsize_mb=fsize_mb,
                     disk_mb=disk_mb, nproc=nproc, nofile=nofile)
        cpu = int(cpu_s if cpu_s is not None else timeout_s + 0.999) + 1
        start = time.monotonic()
        root = tempfile.mkdtemp(prefix="palm-sandbox-")
    except BaseException:
        for fd in handed:
            os.close(fd)
        raise
    uid = None
    cgroup: TreeCgroup | None = None
    try:
        os.chmod(root, 0o711)  # traversable for the program's uid, not listable
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        paths = []
        for name, text in files:
            paths.append(os.path.join(root, name))
            with open(paths[-1], "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(paths[-1], 0o644)
        argv = [str(a) for a in command(list(paths))]
        if not argv:
            raise ValueError("command gave an empty argv")
        is_root = os.geteuid() == 0
        if is_root:
            uid = _allocate_uid()
            os.chown(work, uid, uid)
            nproc_limit = nproc
        else:  # RLIMIT_NPROC counts all of this user's tasks: allow what is already running, plus nproc
            nproc_limit = _tasks_of_uid(os.getuid()) + nproc
        tree_mb = int(tree_memory_mb or memory_mb)
        as_mb = int(memory_mb)
        cgroup = TreeCgroup.create(tree_mb * 2**20, nproc + 2)  # + the runner and init
        if cgroup is not None:
            memory_cap = {"mechanism": cgroup.kind, "tree_mb": tree_mb, "per_process_mb": as_mb,
                          "pids_max": cgroup.pids_max}
        else:  # no cgroup: bound processes x RLIMIT_AS by the tree cap, itself at most half of what is free
            tree_mb = min(tree_mb, max(64, _mem_available_mb() // 2))
            run_nproc = max(1, min(nproc, tree_mb // as_mb))
            as_mb = min(as_mb, tree_mb // run_nproc)
            nproc_limit -= nproc - run_nproc
            memory_cap = {"mechanism": "rlimits", "tree_mb": tree_mb, "per_process_mb": as_mb, "nproc": run_nproc}
        env = {"PATH": _PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        python = sys.executable
        reach = sorted({sys.prefix, sys.base_prefix, os.path.dirname(os.path.abspath(python)),
                        os.path.dirname(os.path.realpath(python)), os.path.dirname(os.path.abspath(argv[0])),
                        os.path.dirname(os.path.realpath(argv[0])), root})
        fds = [os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
               for name in ("stdout", "stderr", "status")]
        cfg = {"argv": argv, "workdir": work, "uid": uid, "env": env, "status_fd": fds[2], "reach": reach,
               "disk_kib": int(disk_mb) * 1024, "cgroup_procs": cgroup.procs if cgroup is not None else [],
               "limits": {"cpu": cpu, "as": as_mb * 2**20, "fsize": int(fsize_mb) * 2**20,
                          "nproc": int(nproc_limit), "nofile": int(nofile)}}
        fds += handed
        handed = []
        timed_out = False
        try:
            runner = [python, "-I", "-S", "-B", "-c", _RUNNER_STUB, _RUNNER_FILE, json.dumps(cfg)]
            proc = subprocess.Popen(runner,
                                    stdin=subprocess.DEVNULL, stdout=fds[0], stderr=fds[1], pass_fds=tuple(fds[2:]),
                                    start_new_session=True, env=env, cwd=root)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            timed_out = not _wait_for_exit(proc.pid, timeout_s - (time.monotonic() - start))
        finally:
            # The runner is not reaped yet, so its pid (the group's id) cannot have been reused. Its group
            # holds init (the PID namespace goes with it) and, without a PID namespace, the program.
            _killpg(proc.pid)
            proc.wait()
        if uid is not None:
            _sweep_uid(uid)
        seconds = time.monotonic() - start
        collected = tuple(_read_pipe(fd, COLLECT_BYTES) for fd in collect_fds)
        records = _read_status(os.path.join(root, "status"))
        out = _tail(os.path.join(root, "stdout"), tail_bytes)
        err = _tail(os.path.join(root, "stderr"), tail_bytes)
        peak_mb = oom_kills = None
        if cgroup is not None:
            peak_mb, oom_kills = cgroup.usage()
    finally:
        for fd in handed:
            os.close(fd)
        if cgroup is not None:
            cgroup.remove()
        _remove_tree(root)
        if uid is not None:
            _release_uid(uid)
    isolation = dict(next((r["isolation"] for r in records if "isolation" in r), {}), memory_cap=memory_cap)
    errors = tuple(r["error"] for r in records if "error" in r)
    exits = [r["exit"] for r in records if "exit" in r]
    return Outcome(returncode=exits[0] if exits else None, timed_out=timed_out, errors=errors,
                   runner_status=proc.returncode, stdout=out, stderr=err, seconds=seconds, uid=uid,
                   isolation=isolation, memory_peak_mb=peak_mb, oom_kills=oom_kills, collected=collected)


def processes_of_uid(uid: int, *, include_zombies: bool = False) -> list[int]:
    """PIDs (in the caller's PID namespace) of processes whose real or effective uid is `uid`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        info = _proc_status(int(name))
        if info is None or uid not in info["uids"]:
            continue
        if include_zombies or info["state"] not in ("Z", "X"):
            found.append(int(name))
    return found


# ------------------------------------------------------------------------------------------- helpers

_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()
_rng = random.SystemRandom()


def _allocate_uid() -> int:
    with _uid_lock:
        for _ in range(100):
            uid = _UID_BASE + _rng.randrange(_UID_SPAN)
            if uid not in _uids_in_use and not processes_of_uid(uid, include_zombies=True):
                _uids_in_use.add(uid)
                return uid
    raise RuntimeError("no free sandbox uid found")


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _proc_status(pid: int) -> dict[str, Any] | None:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    info: dict[str, Any] = {"uids": set(), "state": "?", "threads": 1}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Uid":
            info["uids"] = {int(v) for v in value.split()[:2]}  # real, effective
        elif key == "State":
            info["state"] = value.strip()[:1]
        elif key == "Threads":
            info["threads"] = int(value.strip() or 1)
    return info


def _tasks_of_uid(uid: int) -> int:
    total = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _proc_status(int(name))
            if info is not None and uid in info["uids"]:
                total += info["threads"]
    return total


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Wait until child `pid` exits, without reaping it; False on timeout."""
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout_s * 1000))))
    finally:
        os.close(pidfd)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, uid: int, sig: int) -> None:
    """Signal `pid` only if it still belongs to `uid` (a pidfd pins the process against PID reuse)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        info = _proc_status(pid)
        if info is not None and uid in info["uids"]:
            signal.pidfd_send_signal(pidfd, sig)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _sweep_uid(uid: int) -> None:
    """Stop, then kill, every process of the run's one-off uid until none is left (a no-op in a PID
    namespace, where the kernel already killed them; needed without one, e.g. for setsid daemons)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = processes_of_uid(uid)
        if not pids:
            return
        for pid in pids:  # stopped processes cannot fork any more
            _signal_pid(pid, uid, signal.SIGSTOP)
        for pid in pids:
            _signal_pid(pid, uid, signal.SIGKILL)
        time.sleep(0.005)


def _mem_available_mb() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1024


def _read_pipe(fd: int, limit: int) -> bytes:
    """What is buffered in a pipe, up to `limit` bytes, without waiting for writers."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < limit:
        try:
            chunk = os.read(fd, limit - size)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _read_status(path: str) -> list[dict[str, Any]]:
    records = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except OSError:
        pass
    return records


def _tail(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _remove_tree(path: str) -> None:
    def retry(func, p, _exc):  # a program may have taken permissions away from its own files
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)
    shutil.rmtree(path, ignore_errors=True)

