"""The runner process of palm.evaluation.isolation: namespaces, a read-only file system, then init and the program.

palm.evaluation.isolation starts this file in a bare `python -I -S -B` interpreter (no site, so that none
of the caller's packages load), under RUNNER_MODULE's name, so that its cached bytecode is used and only
the light standard-library imports at the top run (it runs once per program). It must import nothing
else, palm included. The caller passes the run's configuration as JSON in argv; the runner:

1. joins the run's cgroups (palm.evaluation.cgroups), so that everything it forks is counted in them;
2. enters new namespaces (unshare(2) through ctypes; os.unshare needs Python 3.12): network (a down
   loopback only), PID, IPC, UTS and a private mount namespace; without root it first creates an
   identity-mapped user namespace, so that the program it execs holds no capabilities;
3. in the mount namespace, covers directories the program's uid cannot traverse (an empty tmpfs over the
   closed ancestor, the needed directories bound back), mounts a size-limited tmpfs owned by the program's
   uid over the working directory and remounts every other mount read-only (nosuid/nodev/noexec kept);
4. forks init (PID 1 of the new PID namespace, with a fresh /proc), which forks the program process and
   reaps everything until the program exits; the program process sets its rlimits, drops to the run's
   one-off uid/gid, sets PR_SET_NO_NEW_PRIVS and PR_SET_PDEATHSIG=SIGKILL, and execs the command.

What it achieved, the program's exit status and any failure go to the caller as JSON lines on the status
descriptor. An argument of the command equal to NO_NETWORK is replaced by "1" when no network namespace
could be made (the program may then block sockets itself: only a best-effort block), else by "0".
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import stat
import sys

RUNNER_MODULE = "_palm_sandbox_runner"
NO_NETWORK = "{palm-isolation:no-network}"

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


def unescape(path: str) -> str:
    """Undo mountinfo's octal escapes (a space is \\040)."""
    parts = path.split("\\")
    return parts[0] + "".join(chr(int(p[:3], 8)) + p[3:] for p in parts[1:])


def _mounts() -> list[tuple[str, set[str]]]:
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            mounts.append((unescape(fields[4]), set(fields[5].split(","))))
    return mounts


def _closed_ancestor(path: str) -> str | None:
    """The first ancestor of `path` (below /) that others cannot traverse, if any."""
    current = "/"
    for part in [p for p in path.split("/") if p][:-1]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def _enter_namespaces(libc: ctypes.CDLL, iso: dict) -> None:
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


def _prepare_filesystem(libc: ctypes.CDLL, cfg: dict, iso: dict) -> None:
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


def _exec_program(cfg: dict, iso: dict, report) -> None:
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
        no_network = "0" if iso.get("net_ns") else "1"
        argv = [no_network if arg == NO_NETWORK else arg for arg in cfg["argv"]]
        os.execve(argv[0], argv, cfg["env"])
    except BaseException as e:  # noqa: BLE001 - anything here is a sandbox failure, reported as such
        report(error=f"could not start the program: {type(e).__name__}: {e}")
    os._exit(127)


def _bootstrap(cfg: dict) -> int:
    """The runner: namespaces and file system, then init and the program (see the module docstring)."""
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)
    os.umask(0o022)

    def report(**record: object) -> None:
        os.write(status_fd, (json.dumps(record) + "\n").encode())

    try:  # join the run's cgroups first, so that everything forked from here on is counted in them
        for procs in cfg["cgroup_procs"]:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
    except OSError as e:
        report(error=f"sandbox setup failed: cannot join the run's cgroup: {e}")
        return 0

    iso: dict = {"uid_switch": cfg["uid"] is not None, "user_ns": False, "mount_ns": False,
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
    # Without a network namespace, a program told so through NO_NETWORK may block sockets itself.
    iso["socket_block_prelude"] = not iso["net_ns"] and NO_NETWORK in cfg["argv"]
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


if __name__ == RUNNER_MODULE:
    sys.exit(_bootstrap(json.loads(sys.argv[2])))
