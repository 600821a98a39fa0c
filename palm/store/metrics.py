"""A training node's per-step metrics (`metrics.jsonl`, one JSON object per step), read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from palm.base import storage


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Per-step metrics from the train stage's metrics.jsonl; after a resume the later line for a step wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in storage.read_text(path).splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]
