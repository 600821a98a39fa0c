"""Bounded reads of the files a user names (`--prompts-file`, `--samples`, `--data`, task files): regular
files only, opened without blocking and checked before a byte is read (so `/dev/zero`, which used to be
read for 4 GB, or a FIFO nobody writes to is one line), at most `MAX_BYTES` in all (after decompression,
for .gz) and `MAX_LINE_BYTES` a line. Every problem is one PalmError naming the file.
"""

from __future__ import annotations

import gzip
import os
import stat
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from palm.base.errors import PalmError

#: Most bytes read from one file a user names (decompressed).
MAX_BYTES = 1 << 30
#: Longest line of such a file.
MAX_LINE_BYTES = 16 << 20


def _kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def open_regular(path: str | Path, what: str = "file") -> BinaryIO:
    """A regular file opened for reading (binary); PalmError naming it when it is missing or anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PalmError(f"{what} file not found: {path}") from None
    except OSError as e:
        raise PalmError(f"{what} file {path}: cannot read it ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise PalmError(f"{what} file {path} is {_kind(mode)}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def iter_lines(path: str | Path, what: str = "file", max_bytes: int | None = None,
               max_line: int | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text without its newline) of a UTF-8 file, gzip-decompressed if it ends in .gz,
    within the bounds (default MAX_BYTES and MAX_LINE_BYTES); PalmError naming the file and line otherwise."""
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    max_line = MAX_LINE_BYTES if max_line is None else max_line
    raw = open_regular(path, what)
    lineno, total = 0, 0
    try:
        f = gzip.GzipFile(fileobj=raw, mode="rb") if str(path).endswith(".gz") else raw
        with raw, f:
            while True:
                line = f.readline(max_line + 1)
                if not line:
                    return
                lineno += 1
                total += len(line)
                if len(line) > max_line:
                    raise PalmError(f"{path}:{lineno}: a line longer than {max_line // 2**20} MiB; is this the "
                                    f"{what} file?")
                if total > max_bytes:
                    raise PalmError(f"{path}: larger than {max_bytes // 2**20} MiB, more than palm reads of a "
                                    f"{what} file")
                yield lineno, line.decode("utf-8").rstrip("\r\n")
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        where = f"{path}:{lineno + 1}" if lineno else str(path)
        raise PalmError(f"{where}: cannot read {what} ({type(e).__name__}: {e})") from None


def read_text(path: str | Path, what: str = "file", max_bytes: int = MAX_BYTES) -> str:
    """The whole UTF-8 text of a regular file of at most `max_bytes`; PalmError naming it otherwise."""
    with open_regular(path, what) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PalmError(f"{what} file {path} is larger than {max_bytes // 2**20} MiB, more than palm reads")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PalmError(f"{what} file {path}: not UTF-8 text (byte {e.start})") from None
