"""Run untrusted, model-generated Python programs in a disposable sandbox (Linux).

`run_program(code)` runs `code` in a fresh `python -I -B` interpreter and reports whether it exited
with status 0 within the time limit. Nothing the program does may harm the machine or the caller.

Process layout (each box is a separate process)::

    caller (any thread)      subprocess.Popen, start_new_session=True, minimal environment
      └─ runner              a bare `python -I -S` running this file's first half, still root:
         │                   enters the new namespaces and prepares the file system, then forks
         └─ init             PID 1 of the new PID namespace; mounts a fresh /proc, forks, reaps
            └─ program       rlimits, drop to a one-off uid/gid, no_new_privs, exec `python -I -B`

Isolation in effect when the caller is root (this is the case on the project's VMs; `isolation()`
reports what was in effect on the current machine, and every `Result` carries the same report):

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
* **Resource limits** set in the program process before exec: RLIMIT_CPU, RLIMIT_AS (memory),
  RLIMIT_FSIZE (also bounds stdout/stderr, which go to files), RLIMIT_NPROC, RLIMIT_NOFILE,
  RLIMIT_CORE=0; plus PR_SET_NO_NEW_PRIVS (set-uid binaries cannot raise privileges) and
  PR_SET_PDEATHSIG=SIGKILL.
* **Wall-clock timeout and group kill**: the caller waits at most `timeout_s`, then SIGKILLs the
  runner's whole process group (killpg), which takes init, and with it the PID namespace, down.
* **A throwaway directory** (tempfile.mkdtemp) holding the program and its output, removed afterwards.

The program cannot kill the caller: it is not its parent (the runner and init sit between them),
the caller is in another PID namespace, and it runs under another uid. Even `os.kill(-1, SIGKILL)`
only reaches the program's own processes. What it can still do is read world-readable files (the
repository, /etc, the evaluation data): the sandbox keeps programs from changing the machine, from
talking to the network and from outliving their run, not from looking around.

Fallbacks when something is not available (never silent: see `Result.isolation`): without root, the
runner creates a user namespace (identity-mapped, so the exec'd program holds no capabilities) and the
same network/PID/mount namespaces, but cannot switch to another uid (RLIMIT_NPROC then allows the
user's current task count plus `nproc`); without a network namespace, a prelude replaces
`socket.socket` and friends before the program runs (a best-effort block only); without a PID
namespace, leftovers are killed by process group and, when the uid was switched, by uid. As root
without a mount namespace, an interpreter under a closed directory (/root) cannot be reached by the
one-off uid: the run reports status "error" rather than run the program as root.

Aggregate memory across a run's processes is bounded by RLIMIT_AS x RLIMIT_NPROC, not by a cgroup:
the caller's cgroup belongs to whatever runs it, and this module does not reorganize it.

The runner is this same file, loaded by a bare interpreter that executes only its first half (up to
the `_RUNNER_MODULE` check), so that half imports light standard-library modules only.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import stat
import sys

STATUSES = ("passed", "failed", "timeout", "error")

_RUNNER_MODULE = "_palm_sandbox_runner"
# The runner: this file, loaded under _RUNNER_MODULE's name by a bare interpreter (no site), so that its
# cached bytecode is used and only the light imports at the top run.
_RUNNER_STUB = f"""\
import importlib.util, sys
spec = importlib.util.spec_from_file_location({_RUNNER_MODULE!r}, sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
"""
_UID_BASE = 1_600_000_000
_UID_SPAN = 2**28
_PATH = "/usr/local/bin:/usr/bin:/bin"

# Linux constants (sched.h, mount.h, prctl.h).
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND, _MS_REC = 32, 1024, 2048, 4096, 16384
_MS_PRIVATE, _MS_RELATIME, _MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38

# Used only when no network namespace could be made: refuse sockets from Python. Code that reaches
# the kernel another way (ctypes, a subprocess) is not stopped by this; the namespace is the real fence.
_NO_NETWORK_PRELUDE = """\
import _socket, runpy, socket, sys
def _refuse(*args, **kwargs):
    raise PermissionError(1, "network access is disabled in the sandbox")
for _module in (socket, _socket):
    for _name in ("socket", "socketpair", "fromfd", "create_connection", "create_server",
                  "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(_module, _name):
            setattr(_module, _name, _refuse)
del _module, _name, _refuse
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# ---------------------------------------------------------------------------------------- runner side

def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def _unescape(path: str) -> str:
    """Undo mountinfo's octal escapes (a space is \\040)."""
    parts = path.split("\\")
    return parts[0] + "".join(chr(int(p[:3], 8)) + p[3:] for p in parts[1:])


def _mounts() -> list[tuple[str, set[str]]]:
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            mounts.append((_unescape(fields[4]), set(fields[5].split(","))))
    return mounts


def _closed_ancestor(path: str) -> str | None:
    """The first ancestor of `path` (below /) that others cannot traverse, if any."""
    current = "/"
    for part in [p for p in path.split("/") if p][:-1]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def _enter_namespaces(libc: ctypes.CDLL, iso: dict[str, Any]) -> None:
    wanted = {"mount_ns": _CLONE_NEWNS, "net_ns": _CLONE_NEWNET, "pid_ns": _CLONE_NEWPID,
              "ipc_ns": _CLONE_NEWIPC, "uts_ns": _CLONE_NEWUTS}
    if os.geteuid() != 0:
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(_CLONE_NEWUSER) != 0:
            return
        iso["user_ns"] = True
        # Identity map: inside, we keep our own (non-zero) uid, so the program exec'd later loses the
        # capabilities this process holds in the new user namespace.
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    if libc.unshare(sum(wanted.values())) == 0:
        for key in wanted:
            iso[key] = True
        return
    for key, flag in wanted.items():
        iso[key] = libc.unshare(flag) == 0


def _prepare_filesystem(libc: ctypes.CDLL, cfg: dict[str, Any], iso: dict[str, Any]) -> None:
    _mount(libc, "none", "/", None, _MS_REC | _MS_PRIVATE)  # nothing we do here propagates to the host
    workdir = cfg["workdir"]
    if cfg["uid"] is not None:
        # Directories the program's uid must traverse (the interpreter, the venv, the run's directory):
        # where an ancestor is closed to others, cover it with an empty tmpfs and bind just them back.
        needed = sorted({os.path.realpath(p) for p in cfg["reach"]}, key=len)
        plan = [(d, a) for d in needed if (a := _closed_ancestor(d)) is not None]
        handles = {d: os.open(d, os.O_PATH | os.O_DIRECTORY) for d, _ in plan}
        covered: list[str] = []
        for _, ancestor in sorted(plan, key=lambda x: len(x[1])):
            if not any(ancestor == c or ancestor.startswith(c + "/") for c in covered):
                _mount(libc, "tmpfs", ancestor, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=64k")
                covered.append(ancestor)
        bound: list[str] = []
        for d, _ in plan:
            if any(d == b or d.startswith(b + "/") for b in bound):
                continue
            os.makedirs(d, mode=0o755, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{handles[d]}", d, None, _MS_BIND | _MS_REC)
            bound.append(d)
        for fd in handles.values():
            os.close(fd)
        iso["exposed"] = bound
    owner = cfg["uid"] if cfg["uid"] is not None else os.getuid()
    try:
        _mount(libc, "tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV,
               f"size={cfg['disk_kib']}k,nr_inodes=16384,mode=0700,uid={owner},gid={owner}")
        iso["workdir_tmpfs_kib"] = cfg["disk_kib"]
    except OSError:  # keep the on-disk directory writable: its own mount escapes the read-only pass below
        iso["workdir_tmpfs_kib"] = None
        _mount(libc, workdir, workdir, None, _MS_BIND)
    failed = []
    for target, opts in _mounts():
        if target == workdir:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        flags |= (_MS_NOSUID if "nosuid" in opts else 0) | (_MS_NODEV if "nodev" in opts else 0)
        flags |= _MS_NOEXEC if "noexec" in opts else 0
        if "noatime" in opts:
            flags |= _MS_NOATIME
        elif "relatime" in opts:
            flags |= _MS_RELATIME
        else:
            flags |= _MS_STRICTATIME
        flags |= _MS_NODIRATIME if "nodiratime" in opts else 0
        try:
            _mount(libc, None, target, None, flags)
        except OSError:
            failed.append(target)
    iso["readonly_root"] = "/" not in failed
    iso["readonly_failed"] = sorted(set(failed))


def _exec_program(cfg: dict[str, Any], iso: dict[str, Any], report) -> None:
    """In the program process: limits, identity, then exec. Never returns."""
    try:
        limits = cfg["limits"]
        for res, soft, hard in ((resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_CPU, limits["cpu"], limits["cpu"] + 1),
                                (resource.RLIMIT_AS, limits["as"], limits["as"]),
                                (resource.RLIMIT_FSIZE, limits["fsize"], limits["fsize"]),
                                (resource.RLIMIT_NOFILE, limits["nofile"], limits["nofile"]),
                                (resource.RLIMIT_NPROC, limits["nproc"], limits["nproc"])):
            resource.setrlimit(res, (soft, hard))
        uid = cfg["uid"]
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        libc = _libc()
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        os.chdir(cfg["workdir"])
        os.umask(0o077)
        python = cfg["python"]
        if iso.get("net_ns"):
            argv = [python, "-I", "-B", cfg["program"]]
        else:
            argv = [python, "-I", "-B", "-c", _NO_NETWORK_PRELUDE, cfg["program"]]
        os.execve(python, argv, cfg["env"])
    except BaseException as e:  # noqa: BLE001 - anything here is a sandbox failure, reported as such
        report(error=f"could not start the program: {type(e).__name__}: {e}")
    os._exit(127)


def _bootstrap(cfg: dict[str, Any]) -> int:
    """The runner: namespaces and file system, then init and the program (see the module docstring)."""
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)
    os.umask(0o022)

    def report(**record: Any) -> None:
        os.write(status_fd, (json.dumps(record) + "\n").encode())

    iso: dict[str, Any] = {"uid_switch": cfg["uid"] is not None, "user_ns": False, "mount_ns": False,
                           "net_ns": False, "pid_ns": False, "ipc_ns": False, "uts_ns": False,
                           "readonly_root": False, "workdir_tmpfs_kib": None, "proc_remounted": False,
                           "rlimits": dict(cfg["limits"], core=0)}
    libc = _libc()
    try:
        _enter_namespaces(libc, iso)
        if iso["mount_ns"]:
            _prepare_filesystem(libc, cfg, iso)
    except Exception as e:  # noqa: BLE001
        report(error=f"sandbox setup failed: {type(e).__name__}: {e}", isolation=iso)
        return 0
    iso["socket_block_prelude"] = not iso["net_ns"]
    iso["proc_remounted"] = bool(iso["pid_ns"] and iso["mount_ns"])
    report(isolation=iso)

    init = os.fork()
    if init == 0:
        try:
            if iso["proc_remounted"]:
                _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
            program = os.fork()
            if program == 0:
                _exec_program(cfg, iso, report)
            while True:  # reap everything; leave as soon as the program itself is done
                pid, wstatus = os.wait()
                if pid == program:
                    report(exit=os.waitstatus_to_exitcode(wstatus))
                    os._exit(0)
        except BaseException as e:  # noqa: BLE001
            try:
                report(error=f"sandbox init failed: {type(e).__name__}: {e}")
            finally:
                os._exit(1)
    os.waitpid(init, 0)
    return 0


if __name__ == _RUNNER_MODULE:
    sys.exit(_bootstrap(json.loads(sys.argv[2])))

# ------------------------------------------------------------------------------------------ caller side
# The runner process stops above; what follows is only for the caller, and imports what it needs here
# so that the runner starts quickly (it runs once per sample).

import random  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402


@dataclass(frozen=True)
class Result:
    """What one sandboxed run did. `passed` is True only for exit status 0 within the time limit."""

    passed: bool
    status: str  # one of STATUSES: passed, failed (nonzero exit or killed), timeout, error (sandbox failure)
    returncode: int | None  # the program's exit status; negative: killed by that signal; None: unknown
    stdout: str  # the last `tail_bytes` of each stream
    stderr: str
    seconds: float
    uid: int | None  # the one-off uid the program ran as (None: no switch was possible)
    isolation: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


def run_program(code: str, *, timeout_s: float = 10.0, memory_mb: int = 1024, cpu_s: float | None = None,
                fsize_mb: int = 16, disk_mb: int = 64, nproc: int = 16, nofile: int = 128,
                tail_bytes: int = 8192) -> Result:
    """Run `code` as `__main__` of a fresh interpreter in the sandbox; see the module docstring.

    timeout_s: wall clock for the whole run; memory_mb: RLIMIT_AS per process; cpu_s: RLIMIT_CPU per
    process (default: the timeout, rounded up, plus one); fsize_mb: the largest file the program may
    write (also its stdout and stderr); disk_mb: size of the tmpfs working directory; nproc: processes
    and threads of the run's uid; nofile: open files per process.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    for name, value in (("memory_mb", memory_mb), ("fsize_mb", fsize_mb), ("disk_mb", disk_mb),
                        ("nproc", nproc), ("nofile", nofile)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    cpu = int(cpu_s if cpu_s is not None else timeout_s + 0.999) + 1
    start = time.monotonic()
    root = tempfile.mkdtemp(prefix="palm-sandbox-")
    uid = None
    try:
        os.chmod(root, 0o711)  # traversable for the program's uid, not listable
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        program = os.path.join(root, "main.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        os.chmod(program, 0o644)
        is_root = os.geteuid() == 0
        if is_root:
            uid = _allocate_uid()
            os.chown(work, uid, uid)
            nproc_limit = nproc
        else:  # RLIMIT_NPROC counts all of this user's tasks: allow what is already running, plus nproc
            nproc_limit = _tasks_of_uid(os.getuid()) + nproc
        env = {"PATH": _PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        python = sys.executable
        reach = sorted({sys.prefix, sys.base_prefix, os.path.dirname(os.path.abspath(python)),
                        os.path.dirname(os.path.realpath(python)), root})
        fds = [os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
               for name in ("stdout", "stderr", "status")]
        cfg = {"python": python, "program": program, "workdir": work, "uid": uid, "env": env,
               "status_fd": fds[2], "reach": reach, "disk_kib": int(disk_mb) * 1024,
               "limits": {"cpu": cpu, "as": int(memory_mb) * 2**20, "fsize": int(fsize_mb) * 2**20,
                          "nproc": int(nproc_limit), "nofile": int(nofile)}}
        timed_out = False
        try:
            runner = [python, "-I", "-S", "-B", "-c", _RUNNER_STUB, os.path.abspath(__file__), json.dumps(cfg)]
            proc = subprocess.Popen(runner,
                                    stdin=subprocess.DEVNULL, stdout=fds[0], stderr=fds[1], pass_fds=(fds[2],),
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
        records = _read_status(os.path.join(root, "status"))
        out = _tail(os.path.join(root, "stdout"), tail_bytes)
        err = _tail(os.path.join(root, "stderr"), tail_bytes)
    finally:
        _remove_tree(root)
        if uid is not None:
            _release_uid(uid)
    isolation = next((r["isolation"] for r in records if "isolation" in r), {})
    errors = [r["error"] for r in records if "error" in r]
    exits = [r["exit"] for r in records if "exit" in r]
    returncode = exits[0] if exits else None
    if timed_out:
        status, detail = "timeout", f"killed after {timeout_s:g} s of wall-clock time"
    elif errors:
        status, detail = "error", "; ".join(errors)
    elif returncode is None:
        status, detail = "error", f"the sandbox runner ended without a result (exit status {proc.returncode})"
    elif returncode == 0:
        status, detail = "passed", ""
    else:
        status = "failed"
        detail = (f"killed by {_signal_name(-returncode)}" if returncode < 0 else f"exit status {returncode}")
    return Result(passed=status == "passed", status=status, returncode=returncode, stdout=out, stderr=err,
                  seconds=seconds, uid=uid, isolation=isolation, detail=detail)


_ISOLATION: dict[str, Any] | None = None


def isolation() -> dict[str, Any]:
    """Which isolation mechanisms the sandbox achieves on this machine (runs one trivial program, once)."""
    global _ISOLATION
    if _ISOLATION is None:
        result = run_program("pass\n", timeout_s=30)
        if result.status != "passed":
            raise RuntimeError(f"the sandbox cannot run a trivial program here: {result.status}: "
                               f"{result.detail} {result.stderr[-2000:]}")
        _ISOLATION = dict(result.isolation)
    return dict(_ISOLATION)


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


# ---------------------------------------------------------------------------------------- caller side

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


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
