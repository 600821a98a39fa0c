"""Errors a user can cause (the CLI prints them as one line and exits 2), faults of the machine it runs on
(one line too: exit 2, or 75 where a later attempt may succeed), and a requested stop (exit 75)."""

import errno
import os
import re


class PalmError(Exception):
    """Bad input: a spec, a data file, a checkpoint or a sample that the user must fix."""


class SpecError(PalmError):
    """A spec that cannot be run, with the file and key path that need changing."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.detail = file, key, message
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class Preempted(Exception):
    """Training stopped on request (SIGTERM) after saving a checkpoint at the current step."""

    exit_code = 75  # EX_TEMPFAIL: the orchestrator retries, and the retry resumes from that checkpoint

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}; a checkpoint was saved, re-run to resume")
        self.step = step


class EnvironmentFault(PalmError):
    """The machine, not the input: a full disk, a path this user may not use, a file where a directory
    should be. One line naming the path and what to do; exit 2, and a retry (Prefect's, or the user's
    before fixing it) fails the same way, so none is spent."""

    exit_code = 2
    retryable = False

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None):
        super().__init__(message)
        self.path, self.errno = path, errno


class TransientFault(EnvironmentFault):
    """A fault that a later attempt may not meet (a connection reset or timed out): Prefect retries it, and
    when the retries are spent the CLI exits 75 (EX_TEMPFAIL) so that whatever runs it tries again later."""

    exit_code = 75
    retryable = True


_NO_SPACE = "free space there, or write elsewhere (--output or infra.storage_root; PALM_CACHE_DIR for local copies " \
            "of remote outputs); complete stages are kept, re-run to continue"
_ACCESS = "give this user access to it, or use another path"

#: errno -> (what it is, what to do): the OSErrors that mean the environment needs fixing.
FAULTS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", _NO_SPACE),
    errno.EDQUOT: ("disk quota exceeded", _NO_SPACE),
    errno.EFBIG: ("file too large for this file system", _NO_SPACE),
    errno.EACCES: ("permission denied", _ACCESS),
    errno.EPERM: ("operation not permitted", _ACCESS),
    errno.EROFS: ("read-only file system", "write elsewhere (--output or infra.storage_root)"),
    errno.EISDIR: ("is a directory, where a file was expected",
                   "name a file (data paths: a glob of files, such as DIR/*.jsonl)"),
    errno.ENOTDIR: ("a part of this path is a file, where a directory was expected",
                    "remove or rename that file, or use another path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and re-run"),
    errno.ENFILE: ("too many open files in the system", "raise the limit and re-run"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter path"),
}
#: Network errors a later attempt may not meet.
TRANSIENT = frozenset({errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                       errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN})


def _full_device(candidates: list[str]) -> str | None:
    """The first of `candidates` (existing local directories, or their nearest existing parent) whose file
    system has under 1 MiB free: where a write that failed for space without saying where was going."""
    for path in candidates:
        probe = os.path.abspath(path)
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe) if os.path.dirname(probe) != probe else ""
        try:
            st = os.statvfs(probe or "/")
        except OSError:
            continue
        if st.f_bavail * st.f_frsize < 2**20:
            return path
    return None


def _oserrors(error: BaseException) -> list[tuple[int, str | None, str]]:
    """(errno, filename, strerror) of every OSError in `error`'s chain (causes and contexts), then of
    any "[Errno N] text: 'path'" in its message: Beam's workers re-raise a DoFn's error as text."""
    found, seen, e = [], set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and isinstance(e.errno, int):
            found.append((e.errno, None if e.filename is None else str(e.filename), e.strerror or str(e)))
        e = e.__cause__ or e.__context__
    for m in re.finditer(r"\[Errno (\d+)\] ([^:\]\n']+)(?:: '([^'\n]*)')?", str(error)[:20_000]):
        found.append((int(m.group(1)), m.group(3), m.group(2).strip()))
    return found


def environment_fault(error: BaseException, where: str | None = None) -> EnvironmentFault | None:
    """The EnvironmentFault that `error` is (itself, or an OSError of a kind in the table above, or one a
    wrapper's chain or message carries), or None for any other error.

    `where`: the directory being written (a run's root), named when the OSError names no file (a write()
    that found the disk full names none); a full file system among `where` and the local cache is named."""
    if isinstance(error, EnvironmentFault):
        return error
    if isinstance(error, PalmError):
        return None
    for number, filename, text in _oserrors(error):
        if number in FAULTS:
            what, todo = FAULTS[number]
            path = filename
            if path is None and number in (errno.ENOSPC, errno.EDQUOT):
                cache = os.environ.get("PALM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "palm")
                path = _full_device([p for p in (where, cache) if p and "://" not in p]) or where
            elif path is None:
                path = where
            place = f"{path}: " if path else ""
            return EnvironmentFault(f"{place}{what} ({_errno_name(number)}); {todo}", path=path, errno=number)
        if number in TRANSIENT:
            place = f"{filename}: " if filename else ""
            return TransientFault(f"{place}{text} ({_errno_name(number)}); a later attempt may succeed: re-run "
                                  "(complete stages are kept)", path=filename, errno=number)
    return None


def _errno_name(number: int) -> str:
    return errno.errorcode.get(number, f"errno {number}")
