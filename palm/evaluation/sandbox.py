"""Run untrusted, model-generated Python programs in a disposable sandbox (Linux).

`run_program(code)` runs `code` in a fresh `python -I -B` interpreter and reports whether it ran to its
end and exited with status 0 within the time limit. Nothing the program does may harm the machine or the
caller, and nothing it does can make a run that did not reach its end count as passed.

Process layout (each box is a separate process)::

    caller (any thread)      subprocess.Popen, start_new_session=True, minimal environment
      └─ runner              a bare `python -I -S` running this file's first half, still root:
         │                   enters the new namespaces and prepares the file system, then forks
         └─ init             PID 1 of the new PID namespace; mounts a fresh /proc, forks, reaps
            └─ program       rlimits, drop to a one-off uid/gid, no_new_privs, exec `python -I -B -c
                             _PROGRAM_WRAPPER`, which runs the program's parts (see "How a pass is decided")

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
repository, /etc, the evaluation data): the sandbox keeps programs from changing the machine, from
talking to the network and from outliving their run, not from looking around.

Fallbacks when something is not available (never silent: see `Result.isolation`): without root, the
runner creates a user namespace (identity-mapped, so the exec'd program holds no capabilities) and the
same network/PID/mount namespaces, but cannot switch to another uid (RLIMIT_NPROC then allows the
user's current task count plus `nproc`); without a network namespace, the wrapper replaces
`socket.socket` and friends before the program runs (a best-effort block only); without a PID
namespace, leftovers are killed by process group and, when the uid was switched, by uid. As root
without a mount namespace, an interpreter under a closed directory (/root) cannot be reached by the
one-off uid: the run reports status "error" rather than run the program as root.

**Memory of the whole process tree** (`tree_memory_mb`, default `memory_mb`; RLIMIT_AS alone is per
process, so six forks could each take their share). Where it can, the caller makes a child cgroup of its
own cgroup for each run, which the runner joins before it forks (so init, the program and all their
children are in it), and removes it afterwards: cgroup v2 (memory.max, memory.swap.max=0, pids.max) where
the caller's cgroup can delegate the memory controller, else the cgroup v1 memory hierarchy
(memory.limit_in_bytes and memsw) and, if mounted, v1 pids (pids.max). At the cap the kernel's OOM killer
ends processes of the run only; the result's detail says so and `Result.memory_peak_mb` gives the tree's
peak. Without a usable cgroup the bound is processes x RLIMIT_AS: the tree cap (at most half of
MemAvailable) divided by RLIMIT_AS gives RLIMIT_NPROC, lowered (down to 1: no fork, no thread) until it
fits. `Result.isolation["memory_cap"]` names the mechanism in effect ("cgroup-v2", "cgroup-v1", "rlimits").

How a pass is decided (the verdict never comes from the program's output)::

    caller: secret S (random, per run) -> pipe -> wrapper reads S, closes the fd, before any program code
    wrapper: compiles the parts, runs them in one fresh __main__ namespace, then `call` if given;
             only if all of that returned: write S to the verdict pipe, flush stdio, exit 0
    caller: passed  <=>  init saw exit status 0  AND  the verdict pipe holds exactly S

The caller holds the verdict pipe's only read end; the program holds a write end, so it can write junk
(which fails the run) but not S, which it never sees: S is not in argv, the environment, a file, the
program text or an open descriptor. Printing anything, sys.exit(0), raise SystemExit, os._exit(0) (in
the function, at import, in a fork or thread) all end the program before the wrapper writes S, so they
fail. HumanEval's tests are a separate part, compiled on their own (a completion cannot swallow them in a
string), and check() is built from the tests' compiled code (a thread rebinding the name `check` is not
called).

Threat model. The program runs in the same interpreter as the wrapper, so what keeps S from it is how
S is held, not a privilege boundary: S is a constant of the code object of the wrapper's `run()` function
(everything `run()` uses is a constant of its code too, so calling it again only reruns the program); no
frame's locals, no global and no argument hold it. Reaching a code object's constants takes frame.f_code
or function.__code__, gc's object walks, tracing/profiling/monitoring hooks, code construction, ctypes or
another interpreter; CPython raises audit events for all of these, and the wrapper's audit hook (which a
program cannot remove) ends the program with status 113 (result: failed, detail names the event) before
any of them touches the wrapper's frames or `run()`, or before any ctypes, gc-walk or trace call at all
(these fail a program even when harmless; HumanEval solutions do not use them). The wrapper makes its
process non-dumpable (prctl), so neither /proc/self/mem nor a child process (ptrace, process_vm_readv,
/proc/PID/mem) can read its memory as the sandbox's unprivileged uid. What this does not cover: a memory-
safety bug in CPython used to read the interpreter's memory without an audited call; Python >= 3.13, whose
write-through frame.f_locals (PEP 667) would let a program rebind the wrapper's locals (this project runs
3.11-3.12; revisit before moving on); the non-root fallback without a PID namespace, where the program
runs as the caller's uid and can read the caller; and a completion that makes the tests themselves pass
vacuously (an object equal to everything, rebinding builtins the tests call, reading the tests' expected
values): that is a property of HumanEval's tests, shared with human-eval and lm-evaluation-harness, not
of the verdict channel.

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

# The program process runs this with `python -I -B -c _PROGRAM_WRAPPER SECRET_FD VERDICT_FD NONET CALL PART...`
# (see "How a pass is decided" in the module docstring). Everything here runs before any of the program.
_PROGRAM_WRAPPER = r'''
import os, sys, types


def _seal(secret, verdict_fd, codes, fn_code, argname, path):
    # _run() runs the program and, only if every part (and the call) returned, writes the secret. Everything
    # it uses is a constant of its code object (no arguments, globals or builtins a caller could swap), so
    # calling it again only reruns the program; the secret is a constant of that code object and nowhere else.
    src = ("def _run():\n"
           "    K = ('@K',)\n"
           "    mod = K[0]('__main__')\n"
           "    g = mod.__dict__\n"
           "    g['__builtins__'] = K[1]\n"
           "    g['__file__'] = K[2]\n"
           "    K[3]['__main__'] = mod\n"
           "    for code in K[4]:\n"
           "        K[5](code, g)\n"
           "    if K[6] is not None:\n"
           "        K[7](K[6], g)(g[K[8]])\n"
           "    K[9](%d, %r)\n"
           "    try:\n"
           "        K[10].flush()\n"
           "        K[11].flush()\n"
           "    except K[13]:\n"
           "        K[12](120)\n"
           "    K[12](0)\n") % (verdict_fd, secret)
    run_code = [c for c in compile(src, "<palm-sandbox>", "exec").co_consts if isinstance(c, types.CodeType)][0]
    consts = (types.ModuleType, __builtins__, path, sys.modules, tuple(codes), exec, fn_code, types.FunctionType,
              argname, os.write, sys.stdout, sys.stderr, os._exit, BaseException)
    run_code = run_code.replace(co_consts=tuple(consts if c == ("@K",) else c for c in run_code.co_consts))
    return types.FunctionType(run_code, {})


def _guard(run, verdict_fd, write=os.write, exit=os._exit, frame_type=types.FrameType):
    # An audit hook (it cannot be removed): the ways to read code objects' constants or the interpreter's
    # memory, or to redirect running code, end the process at once with status 113 before they happen.
    run_globals = run.__globals__
    forbidden = frozenset({
        "sys.settrace", "sys.setprofile", "sys._settraceallthreads", "sys._setprofileallthreads",
        "sys.monitoring.register_callback", "code.__new__", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "cpython.PyInterpreterState_New"})

    def hook(event, args):
        if event == "object.__getattr__":
            obj = args[0]
            if not (obj is run or (type(obj) is frame_type and obj.f_globals is run_globals)):
                return
            event = f"{event} ({args[1]})"
        elif event not in forbidden and not event.startswith("ctypes."):
            return
        try:
            write(verdict_fd, b"\n!forbidden " + event.encode("ascii", "replace") + b"\n")
        finally:
            exit(113)

    sys.addaudithook(hook)


def _block_sockets():
    import _socket, socket

    def refuse(*args, **kwargs):
        raise PermissionError(1, "network access is disabled in the sandbox")

    for module in (socket, _socket):
        for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server",
                     "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(module, name):
                setattr(module, name, refuse)


def _exit_for(e, out, err):
    try:
        out.flush()
    except BaseException:
        pass
    code = e.code
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:
        try:
            print(code, file=err)
        except BaseException:
            pass
        status = 1
    try:
        err.flush()
    except BaseException:
        pass
    os._exit(status)


def _boot():
    secret_fd, verdict_fd = int(sys.argv[1]), int(sys.argv[2])
    no_network, call, paths = sys.argv[3] == "1", sys.argv[4], sys.argv[5:]
    secret = os.read(secret_fd, 256)
    os.close(secret_fd)
    import ctypes
    if ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0: no /proc/<pid>/mem, ptrace
        raise SystemExit("palm sandbox: prctl(PR_SET_DUMPABLE, 0) failed")
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.")]:
        del sys.modules[name]
    del ctypes
    out, err = sys.stdout, sys.stderr
    try:
        codes = []
        for path in paths:
            with open(path, "rb") as f:
                codes.append(compile(f.read(), path, "exec", dont_inherit=True))
    except (SyntaxError, ValueError) as e:
        import traceback
        traceback.print_exception(type(e), e, None)
        err.flush()
        os._exit(1)
    fn_code = argname = None
    if call:
        name, argname = call.split(":")
        found = [c for c in codes[-1].co_consts if isinstance(c, types.CodeType) and c.co_name == name]
        if not found:
            print(f"palm sandbox: the last part defines no function {name!r}", file=err)
            err.flush()
            os._exit(1)
        fn_code = found[-1]
    run = _seal(secret, verdict_fd, codes, fn_code, argname, paths[0])
    del secret, codes, fn_code
    if no_network:
        _block_sockets()
    sys.argv[:] = paths[:1]
    import traceback
    _guard(run, verdict_fd)
    try:
        run()
    except SystemExit as e:
        _exit_for(e, out, err)
    except BaseException as e:
        tb = e.__traceback__.tb_next  # leave out this frame and run()'s
        traceback.print_exception(type(e), e, tb.tb_next if tb is not None else None)
        _exit_for(SystemExit(1), out, err)
    os._exit(1)  # not reached: run() ends the process


_boot()
'''


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
        secret_fd, verdict_fd = cfg["program_fds"]
        argv = [python, "-I", "-B", "-c", _PROGRAM_WRAPPER, str(secret_fd), str(verdict_fd),
                "0" if iso.get("net_ns") else "1", cfg["call"], *cfg["parts"]]
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

    try:  # join the run's cgroups first, so that everything forked from here on is counted in them
        for procs in cfg["cgroup_procs"]:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
    except OSError as e:
        report(error=f"sandbox setup failed: cannot join the run's cgroup: {e}")
        return 0

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
import secrets  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Sequence  # noqa: E402


@dataclass(frozen=True)
class Result:
    """What one sandboxed run did. `passed` is True only when the program ran to its end (the wrapper's
    verdict, see the module docstring) and exited with status 0 within the time limit."""

    passed: bool
    status: str  # one of STATUSES: passed, failed (nonzero exit, killed, ended early), timeout, error
    returncode: int | None  # the program's exit status; negative: killed by that signal; None: unknown
    stdout: str  # the last `tail_bytes` of each stream
    stderr: str
    seconds: float
    uid: int | None  # the one-off uid the program ran as (None: no switch was possible)
    isolation: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    memory_peak_mb: float | None = None  # the run's whole process tree, where a cgroup measured it


def error_result(detail: str, *, seconds: float = 0.0) -> Result:
    """A run that could not happen (e.g. a malformed program): status "error", with the reason."""
    return Result(passed=False, status="error", returncode=None, stdout="", stderr="", seconds=seconds,
                  uid=None, detail=detail)


def malformed_text(text: str, what: str = "program") -> str | None:
    """Why `text` cannot be run as a program (a lone surrogate cannot be written as UTF-8), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"malformed {what}: not valid Unicode text ({e.reason} {text[e.start:e.end]!a} at character "
                f"{e.start})")
    return None


_FORBIDDEN_STATUS = 113  # the wrapper's audit hook ends the program with this status


def run_program(code: str | Sequence[str], *, call: tuple[str, str] | None = None, timeout_s: float = 10.0,
                memory_mb: int = 1024, tree_memory_mb: int | None = None, cpu_s: float | None = None,
                fsize_mb: int = 16, disk_mb: int = 64, nproc: int = 16, nofile: int = 128,
                tail_bytes: int = 8192) -> Result:
    """Run `code` as `__main__` of a fresh interpreter in the sandbox; see the module docstring.

    code: the program, or its parts (compiled separately, run in order in one `__main__` namespace);
    call: (function, global) to call after the parts ran, as function(global), where the function is
    the one the last part defines (taken from its compiled code, so the program cannot swap it);
    timeout_s: wall clock for the whole run; memory_mb: RLIMIT_AS per process; tree_memory_mb: memory of
    the run's whole process tree (default: memory_mb), a cgroup where one can be made, else a bound on
    processes x RLIMIT_AS; cpu_s: RLIMIT_CPU per process (default: the timeout, rounded up, plus one);
    fsize_mb: the largest file the program may write (also its stdout and stderr); disk_mb: size of the
    tmpfs working directory; nproc: processes and threads of the run's uid; nofile: open files per process.
    A program that is not valid Unicode text is not run: its result has status "error".
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    for name, value in (("memory_mb", memory_mb), ("fsize_mb", fsize_mb), ("disk_mb", disk_mb),
                        ("nproc", nproc), ("nofile", nofile), ("tree_memory_mb", tree_memory_mb or 1)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    parts = [code] if isinstance(code, str) else list(code)
    if not parts or not all(isinstance(p, str) for p in parts):
        raise ValueError("code must be a string or a non-empty sequence of strings")
    if call is not None and (len(call) != 2 or not all(isinstance(c, str) and c.isidentifier() for c in call)):
        raise ValueError(f"call must be (function name, global name), got {call!r}")
    for i, part in enumerate(parts):
        problem = malformed_text(part, "program" if len(parts) == 1 else f"program part {i + 1}")
        if problem:
            return error_result(problem)
    cpu = int(cpu_s if cpu_s is not None else timeout_s + 0.999) + 1
    start = time.monotonic()
    root = tempfile.mkdtemp(prefix="palm-sandbox-")
    uid = None
    cgroup: _TreeCgroup | None = None
    verdict_r = -1
    try:
        os.chmod(root, 0o711)  # traversable for the program's uid, not listable
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        paths = []
        for i, part in enumerate(parts):
            paths.append(os.path.join(root, "main.py" if i == 0 else f"part{i + 1}.py"))
            with open(paths[-1], "w", encoding="utf-8") as f:
                f.write(part)
            os.chmod(paths[-1], 0o644)
        is_root = os.geteuid() == 0
        if is_root:
            uid = _allocate_uid()
            os.chown(work, uid, uid)
            nproc_limit = nproc
        else:  # RLIMIT_NPROC counts all of this user's tasks: allow what is already running, plus nproc
            nproc_limit = _tasks_of_uid(os.getuid()) + nproc
        tree_mb = int(tree_memory_mb or memory_mb)
        as_mb = int(memory_mb)
        cgroup = _TreeCgroup.create(tree_mb * 2**20, nproc + 2)  # + the runner and init
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
                        os.path.dirname(os.path.realpath(python)), root})
        fds = [os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
               for name in ("stdout", "stderr", "status")]
        # The run's secret goes to the program's wrapper through a pipe (read, then closed, before any of the
        # program runs); the verdict comes back through another, whose read end only this process holds.
        secret = secrets.token_hex(16).encode()
        secret_r, secret_w = os.pipe()
        os.write(secret_w, secret)
        os.close(secret_w)
        verdict_r, verdict_w = os.pipe()
        fds += [secret_r, verdict_w]
        cfg = {"python": python, "parts": paths, "call": ":".join(call) if call else "", "workdir": work,
               "uid": uid, "env": env, "status_fd": fds[2], "program_fds": [secret_r, verdict_w], "reach": reach,
               "disk_kib": int(disk_mb) * 1024, "cgroup_procs": cgroup.procs if cgroup is not None else [],
               "limits": {"cpu": cpu, "as": as_mb * 2**20, "fsize": int(fsize_mb) * 2**20,
                          "nproc": int(nproc_limit), "nofile": int(nofile)}}
        timed_out = False
        try:
            runner = [python, "-I", "-S", "-B", "-c", _RUNNER_STUB, os.path.abspath(__file__), json.dumps(cfg)]
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
        verdict = _read_pipe(verdict_r, 4096)
        records = _read_status(os.path.join(root, "status"))
        out = _tail(os.path.join(root, "stdout"), tail_bytes)
        err = _tail(os.path.join(root, "stderr"), tail_bytes)
        peak_mb = oom_kills = None
        if cgroup is not None:
            peak_mb, oom_kills = cgroup.usage()
    finally:
        if verdict_r >= 0:
            os.close(verdict_r)
        if cgroup is not None:
            cgroup.remove()
        _remove_tree(root)
        if uid is not None:
            _release_uid(uid)
    isolation = dict(next((r["isolation"] for r in records if "isolation" in r), {}), memory_cap=memory_cap)
    errors = [r["error"] for r in records if "error" in r]
    exits = [r["exit"] for r in records if "exit" in r]
    returncode = exits[0] if exits else None
    ran_to_end = verdict == secret
    forbidden = [line[len(b"!forbidden "):].decode("ascii", "replace")
                 for line in verdict.split(b"\n") if line.startswith(b"!forbidden ")]
    if timed_out:
        status, detail = "timeout", f"killed after {timeout_s:g} s of wall-clock time"
    elif errors:
        status, detail = "error", "; ".join(errors)
    elif returncode is None:
        status, detail = "error", f"the sandbox runner ended without a result (exit status {proc.returncode})"
    elif returncode == 0 and ran_to_end:
        status, detail = "passed", ""
    else:
        status = "failed"
        if returncode == _FORBIDDEN_STATUS and forbidden:
            detail = (f"stopped at {forbidden[0]}, which the sandbox forbids (it could read or redirect the "
                      f"test harness)")
        elif returncode == 0:
            detail = "exited with status 0 before the program ran to its end"
        elif returncode < 0:
            detail = f"killed by {_signal_name(-returncode)}"
        else:
            detail = f"exit status {returncode}"
        if oom_kills:
            detail += f" (the run's memory cap of {tree_mb} MB was reached: {oom_kills} process(es) killed)"
    return Result(passed=status == "passed", status=status, returncode=returncode, stdout=out, stderr=err,
                  seconds=seconds, uid=uid, isolation=isolation, detail=detail,
                  memory_peak_mb=None if peak_mb is None else round(peak_mb, 1))


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


def _cgroup_mounts() -> tuple[str | None, dict[str, str]]:
    """The cgroup2 mount point, and the cgroup v1 mount point of each controller."""
    unified, v1 = None, {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, extra = left.split(), right.split()
                if len(fields) < 5 or len(extra) < 3:
                    continue
                if extra[0] == "cgroup2" and unified is None:
                    unified = _unescape(fields[4])
                elif extra[0] == "cgroup":
                    for option in extra[2].split(","):
                        v1.setdefault(option, _unescape(fields[4]))
    except OSError:
        pass
    return unified, v1


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" its cgroup2 path (/proc/self/cgroup)."""
    paths = {}
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else [""]:
                    paths[c] = path
    except (OSError, ValueError):
        pass
    return paths


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


class _TreeCgroup:
    """A per-run child cgroup that caps the memory (and process count) of the run's whole process tree:
    cgroup v2 (memory.max, pids.max) where this process's cgroup can delegate the memory controller,
    else the v1 memory (and pids) hierarchies where they are mounted writable. Removed after the run."""

    def __init__(self, kind: str, dirs: list[str], pids_max: int | None):
        self.kind, self.dirs, self.pids_max = kind, dirs, pids_max
        self.procs = [os.path.join(d, "cgroup.procs") for d in dirs]

    @classmethod
    def create(cls, memory_bytes: int, pids: int) -> _TreeCgroup | None:
        name = f"palm-sandbox-{os.getpid()}-{secrets.token_hex(6)}"
        unified, v1 = _cgroup_mounts()
        own = _own_cgroups()
        if unified is not None and "" in own:
            made = cls._try_v2(os.path.join(unified, own[""].lstrip("/")), name, memory_bytes, pids)
            if made is not None:
                return made
        if "memory" in v1 and "memory" in own:
            return cls._try_v1(v1, own, name, memory_bytes, pids)
        return None

    @classmethod
    def _try_v2(cls, parent: str, name: str, memory_bytes: int, pids: int) -> _TreeCgroup | None:
        try:
            with open(os.path.join(parent, "cgroup.controllers"), encoding="ascii") as f:
                if "memory" not in f.read().split():
                    return None
            with open(os.path.join(parent, "cgroup.subtree_control"), encoding="ascii") as f:
                enabled = f.read().split()
            if "memory" not in enabled:
                _write(os.path.join(parent, "cgroup.subtree_control"), "+memory")
        except OSError:
            return None
        path = os.path.join(parent, name)
        try:
            os.mkdir(path, 0o755)
        except OSError:
            return None
        made = cls("cgroup-v2", [path], None)
        try:
            _write(os.path.join(path, "memory.max"), str(memory_bytes))
            if os.path.exists(os.path.join(path, "memory.swap.max")):
                _write(os.path.join(path, "memory.swap.max"), "0")
            if os.path.exists(os.path.join(path, "pids.max")):
                _write(os.path.join(path, "pids.max"), str(pids))
                made.pids_max = pids
        except OSError:
            made.remove()
            return None
        return made

    @classmethod
    def _try_v1(cls, mounts: dict[str, str], own: dict[str, str], name: str, memory_bytes: int,
                pids: int) -> _TreeCgroup | None:
        memory = os.path.join(mounts["memory"], own["memory"].lstrip("/"), name)
        try:
            os.mkdir(memory, 0o755)
        except OSError:
            return None
        made = cls("cgroup-v1", [memory], None)
        try:
            _write(os.path.join(memory, "memory.limit_in_bytes"), str(memory_bytes))
            if os.path.exists(os.path.join(memory, "memory.memsw.limit_in_bytes")):  # no swapping past the cap
                try:
                    _write(os.path.join(memory, "memory.memsw.limit_in_bytes"), str(memory_bytes))
                except OSError:
                    pass
            with open(os.path.join(memory, "memory.limit_in_bytes"), encoding="ascii") as f:
                if int(f.read()) > memory_bytes:
                    raise OSError("the memory limit did not take")
        except (OSError, ValueError):
            made.remove()
            return None
        if "pids" in mounts and "pids" in own:  # optional: RLIMIT_NPROC already bounds the uid's processes
            path = os.path.join(mounts["pids"], own["pids"].lstrip("/"), name)
            try:
                os.mkdir(path, 0o755)
                made.dirs.append(path)
                made.procs.append(os.path.join(path, "cgroup.procs"))
                _write(os.path.join(path, "pids.max"), str(pids))
                made.pids_max = pids
            except OSError:
                pass
        return made

    def usage(self) -> tuple[float | None, int | None]:
        """(peak memory in MB, processes the kernel's OOM killer ended in the cgroup), None where unknown."""
        memory = self.dirs[0]
        peak = kills = None
        try:
            name = "memory.peak" if self.kind == "cgroup-v2" else "memory.max_usage_in_bytes"
            with open(os.path.join(memory, name), encoding="ascii") as f:
                peak = int(f.read()) / 2**20
        except (OSError, ValueError):
            pass
        try:
            name = "memory.events" if self.kind == "cgroup-v2" else "memory.oom_control"
            with open(os.path.join(memory, name), encoding="ascii") as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        kills = int(value)
        except (OSError, ValueError):
            pass
        return peak, kills

    def remove(self) -> None:
        """Remove the cgroups (retrying while the kernel finishes with the run's last processes)."""
        deadline = time.monotonic() + 5
        for path in self.dirs:
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    _kill_procs_in(path)
                    time.sleep(0.01)


def _kill_procs_in(cgroup: str) -> None:
    try:
        with open(os.path.join(cgroup, "cgroup.procs"), encoding="ascii") as f:
            pids = [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


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
