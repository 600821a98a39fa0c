"""Which checkpoints have been evaluated: atomic claims so each is evaluated exactly once.

Two evaluation runs started at the same moment both see checkpoint 40 without a result; both try to
create `40.claim` exclusively (O_CREAT|O_EXCL locally, an upload with `ifGenerationMatch=0` on gs://),
which exactly one of them is granted. The winner writes `40.json` (in one atomic write) when done. A
claim whose owner died (older than `stale_after` seconds, still without a result) is taken over by
deleting that very version of it first (a rename locally, a generation-matched delete on gs://) —
which, again, only one contender can do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from palm.base import storage


class EvalLedger:
    def __init__(self, directory: str | Path, stale_after: float = 6 * 3600):
        self.directory = str(directory)
        if not storage.is_remote(self.directory):
            Path(self.directory).mkdir(parents=True, exist_ok=True)
        self.stale_after = stale_after

    def _claim_path(self, step: int) -> str:
        return storage.join(self.directory, f"{step}.claim")

    def _result_path(self, step: int) -> str:
        return storage.join(self.directory, f"{step}.json")

    def result(self, step: int) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_text(self._result_path(step)))
        except (OSError, ValueError):
            return None

    def results(self) -> dict[int, dict[str, Any]]:
        out = {}
        for path in storage.glob(storage.join(self.directory, "*.json")):
            stem = storage.name(path)[: -len(".json")]
            if stem.isdigit() and (r := self.result(int(stem))) is not None:
                out[int(stem)] = r
        return dict(sorted(out.items()))

    def pending(self, steps: list[int]) -> list[int]:
        return [s for s in steps if self.result(s) is None]

    def claim(self, step: int, owner: str) -> bool:
        """True for exactly one owner per step (until that owner's claim goes stale). The owner that holds
        the claim gets True again: a flow run resumed after its process died (the same flow run) goes on
        with its step, following the evaluation job it had launched, instead of waiting for its own
        claim to go stale."""
        while self.result(step) is None:
            path = self._claim_path(step)
            if storage.create_exclusive(path, json.dumps({"owner": owner, "claimed_at": time.time()})):
                return True
            held = storage.stat(path)
            if held is None:  # released (or taken over) since: try again
                continue
            if self._owner(path) == owner:
                return True
            modified, version = held
            if time.time() - modified < self.stale_after or self.result(step) is not None:
                return False
            if not storage.remove_if_unchanged(path, version):  # another contender took it over first
                return False
        return False

    @staticmethod
    def _owner(path: str) -> str | None:
        try:
            return json.loads(storage.read_text(path)).get("owner")
        except (OSError, ValueError, AttributeError):
            return None

    def record(self, step: int, result: dict[str, Any]) -> None:
        storage.write_text_atomic(self._result_path(step), json.dumps(result, indent=2, sort_keys=True, default=str))

    def release(self, step: int) -> None:
        """Give a claim back (the evaluation failed), so another run can take the step."""
        storage.remove(self._claim_path(step))
