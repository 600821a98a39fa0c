"""What several benchmarks use: the shared data directory, the host's description, CPU time, and the data
stage's spec for the benchmark corpus (`palm bench data` and `palm bench input`)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import palm
from palm.data.filters import quality_drop_reason
from palm.spec.schema import DataSpec

MB = 1e6  # throughput is reported in MB (10^6 bytes) of UTF-8 text per second


def default_data_dir() -> Path:
    """../shared/data next to the repository root."""
    return Path(palm.__file__).resolve().parents[2] / "shared" / "data"


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (datatrove's multiprocess manager)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def palm_data_spec(sources: dict[str, dict[str, Any]]):
    """Default quality filters, exact + near dedup with their defaults, the in-process runner (one core).

    The mixture's weights are the sources' shares of the bytes that pass the rules, so that the mixture
    drops (almost) nothing and every loss after filtering is deduplication's, which the planted pairs
    measure."""

    def spec(weights):
        return DataSpec.model_validate({
            "sources": [{"name": name, "kind": name, "format": "jsonl", "weight": weights[name],
                         "paths": [info["file"]]} for name, info in sources.items()],
            "beam": {"runner": "in_process"}})

    names = list(sources)
    first = spec({n: 1 / len(names) for n in names})
    passing = {}
    for src in first.sources:
        with open(sources[src.name]["file"], encoding="utf-8") as f:
            texts = (json.loads(line)["text"] for line in f)
            passing[src.name] = sum(len(t.encode()) for t in texts if quality_drop_reason(t, src.filters) is None)
    total = sum(passing.values()) or 1
    weights = {n: round(passing[n] / total, 6) for n in names[:-1]}
    weights[names[-1]] = round(1 - sum(weights.values()), 6)
    return spec(weights)


def host_description() -> dict[str, Any]:
    """The CPU this process runs on (the loader and the pack stage run on the host, never the accelerator)."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": usable, "platform": platform.platform(), "python": platform.python_version()}
