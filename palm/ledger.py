"""Which checkpoints have been evaluated: atomic claims so each is evaluated exactly once.

Two evaluation runs started at the same moment both see checkpoint 40 without a result; both try to
create `40.claim` with O_CREAT|O_EXCL, which the filesystem grants to exactly one. The winner writes
`40.json` (atomically, via rename) when done. A claim whose owner died (older than `stale_after`
seconds, still without a result) is taken over by renaming it away first — a rename that, again,
only one contender can win.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any


class EvalLedger:
    def __init__(self, directory: str | Path, stale_after: float = 6 * 3600):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stale_after = stale_after

    def _claim_path(self, step: int) -> Path:
        return self.directory / f"{step}.claim"

    def _result_path(self, step: int) -> Path:
        return self.directory / f"{step}.json"

    def result(self, step: int) -> dict[str, Any] | None:
        try:
            return json.loads(self._result_path(step).read_text())
        except (OSError, ValueError):
            return None

    def results(self) -> dict[int, dict[str, Any]]:
        out = {}
        for path in self.directory.glob("*.json"):
            if path.stem.isdigit() and (r := self.result(int(path.stem))) is not None:
                out[int(path.stem)] = r
        return dict(sorted(out.items()))

    def pending(self, steps: list[int]) -> list[int]:
        return [s for s in steps if self.result(s) is None]

    def claim(self, step: int, owner: str) -> bool:
        """True for exactly one caller per step (until that caller's claim goes stale)."""
        if self.result(step) is not None:
            return False
        path = self._claim_path(step)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                return self.claim(step, owner)
            if age < self.stale_after or self.result(step) is not None:
                return False
            try:  # only one contender's rename of the stale claim succeeds
                path.rename(self.directory / f"{step}.stale-{uuid.uuid4().hex[:8]}")
            except FileNotFoundError:
                return False
            return self.claim(step, owner)
        with os.fdopen(fd, "w") as f:
            json.dump({"owner": owner, "claimed_at": time.time()}, f)
        return True

    def record(self, step: int, result: dict[str, Any]) -> None:
        tmp = self.directory / f".{step}.json.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self._result_path(step))

    def release(self, step: int) -> None:
        """Give a claim back (the evaluation failed), so another run can take the step."""
        self._claim_path(step).unlink(missing_ok=True)
