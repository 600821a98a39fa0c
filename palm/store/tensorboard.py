"""TensorBoard event files for every run (tensorboardX's writer: no TensorFlow needed).

Where they go (point `tensorboard --logdir` at the run root to see them all):

- `<train stage dir>/tensorboard/`: `train/<metric>` per step, at the updates done (metrics.jsonl's
  step + 1, the checkpoints' numbering) (loss, z_loss, accuracy, grad_norm,
  update_norm, learning_rate, global_batch, tokens_per_second, step_seconds, and mfu where the
  accelerator's peak is known), written by the leading host;
- `<eval stage dir>/tensorboard/` (the pipeline's eval stage) and `<train stage dir>/tensorboard/evals/`
  (the eval-new-checkpoints flow: one point per checkpoint, so the curves run across steps, beside the
  training's own): `eval/<task>/<metric>` at the checkpoint's step.

Non-finite and non-numeric values are left out (TensorBoard would draw them as gaps anyway).
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any, Mapping
from palm.base import storage

TRAIN_SCALARS = ("loss", "z_loss", "accuracy", "grad_norm", "update_norm", "learning_rate", "global_batch",
                 "tokens_per_second", "step_seconds", "mfu")


class EventWriter:
    """Scalars into one TensorBoard log directory."""

    def __init__(self, logdir: str | Path, order: int = 0):
        from tensorboardX import SummaryWriter

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        # Event file names carry the second and the host; a unique suffix keeps two writers of one second
        # (two evaluations in a row) from replacing each other's file, and `order` (the step) sorts files
        # of one second by step, the order TensorBoard's reader expects.
        self._writer = SummaryWriter(logdir=str(self.logdir), flush_secs=30,
                                     filename_suffix=f".{order:012d}.{os.getpid()}.{uuid.uuid4().hex[:8]}")

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str) -> int:
        """Write each finite number of `values` as `prefix/name` at `step`; returns how many were written."""
        written = 0
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self._writer.add_scalar(f"{prefix}/{name}", float(value), global_step=int(step))
            written += 1
        return written

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_eval_results(logdir: str | Path, step: int, results: Mapping[str, Mapping[str, Any]]) -> int:
    """`eval/<task>/<metric>` at `step` for every numeric result of an evaluation, in a new event file
    of `logdir` (local, or gs://: written locally, then uploaded)."""
    import shutil

    local = Path(logdir) if not storage.is_remote(logdir) else storage.scratch_dir("tensorboard-")
    try:
        with EventWriter(local, order=step) as writer:
            written = sum(writer.scalars(step, metrics, f"eval/{task}") for task, metrics in results.items())
        if storage.is_remote(logdir):
            storage.add_files(local, str(logdir))
    finally:
        if storage.is_remote(logdir):
            shutil.rmtree(local, ignore_errors=True)
    return written
