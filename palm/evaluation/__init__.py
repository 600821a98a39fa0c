"""Downstream evaluation tasks: HumanEval (pass@k, programs run in a sandbox) and GSM8K (exact match).

`palm eval-score TASK --samples FILE` scores a file of model samples. The modules here import with the
standard library and numpy only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import palm
from palm.base.errors import PalmError
from palm.base.files import iter_lines

TASKS = ("humaneval", "gsm8k")


def shared_data_dir() -> Path:
    """../shared/data next to the repository (where the project keeps the public evaluation sets)."""
    return Path(palm.__file__).resolve().parents[2] / "shared" / "data"


def default_data_file(task: str) -> Path:
    """The problems file a task reads when none is given."""
    files = {"humaneval": ("humaneval", "HumanEval.jsonl.gz"), "gsm8k": ("gsm8k", "test.jsonl")}
    if task not in files:
        raise PalmError(f"unknown evaluation task {task!r} (known: {', '.join(TASKS)})")
    return shared_data_dir().joinpath(*files[task])


def iter_jsonl(path: str | Path, *, what: str = "records") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file, gzip-compressed if it ends in .gz.

    A missing or unreadable file, anything but a regular file, one beyond palm.base.files' bounds, a line
    that is not JSON, or a line that is not a JSON object is a PalmError naming the file and line.
    """
    path = Path(path)
    for lineno, line in iter_lines(path, what):  # bounded, regular files only (palm.base.files)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise PalmError(f"{path}:{lineno}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise PalmError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def read_jsonl(path: str | Path, *, required: dict[str, type] | None = None, what: str = "records",
               validate: Callable[[dict[str, Any]], str | None] | None = None) -> list[dict[str, Any]]:
    """All objects of a JSONL file; each must hold the `required` fields with the given types, and
    `validate(record)`, if given, returns an error message for a bad record (None for a good one)."""
    records = []
    for lineno, record in iter_jsonl(path, what=what):
        for key, kind in (required or {}).items():
            if key not in record:
                raise PalmError(f"{path}:{lineno}: missing field {key!r}")
            if not isinstance(record[key], kind):
                raise PalmError(f"{path}:{lineno}: field {key!r} must be a {kind.__name__}, "
                                f"got {type(record[key]).__name__}")
        problem = validate(record) if validate is not None else None
        if problem:
            raise PalmError(f"{path}:{lineno}: {problem}")
        records.append(record)
    return records
