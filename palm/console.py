"""What `palm run` shows while the pipeline runs: a line per stage, and a live progress bar for training.

On a terminal the train stage gets a rich progress bar (step, loss, tokens/s, learning rate, elapsed
and remaining time) with stage and checkpoint lines printed above it. Anywhere else (a pipe, a log
file, CI) the same events become plain lines, one per logged step, which scripts and tests read:

    stage data: built in 3.1 s; manifest runs/tiny/data/<key>/manifest.json
    step 20/180 loss 5.1234 lr 1.00e-02 batch 8 41,000 tokens/s
    checkpoint 50: runs/tiny/train/<key>/checkpoints/50
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from palm.pipeline import Hooks


class RunConsole:
    """Hooks for `palm.pipeline` that render progress to `stream` (stderr by default).

    `live=None` picks the progress bar when the stream is a terminal; tests force either mode.
    """

    def __init__(self, steps: int, log_every: int, stream: TextIO | None = None, live: bool | None = None,
                 width: int | None = None):
        self.steps, self.log_every = steps, max(1, log_every)
        self.console = Console(file=stream or sys.stderr, force_terminal=live, width=width, highlight=False,
                               soft_wrap=True)
        self.live = self.console.is_terminal if live is None else live
        self.progress: Progress | None = None
        self.bar: Any = None
        self.started: dict[str, float] = {}

    # -- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> "RunConsole":
        if self.live:
            self.progress = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(compact=True),
                console=self.console, transient=False, refresh_per_second=8)
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def hooks(self, stop: Any = None) -> Hooks:
        return Hooks(on_stage_start=self.stage_started, on_stage=self.stage_finished, on_step=self.step,
                     on_checkpoint=self.checkpoint, stop=stop)

    def line(self, text: str) -> None:
        """One line above the live display (or on its own when there is none)."""
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            # Not print(): the flow's log_prints would turn it into a Prefect log record.
            self.console.file.write(text + "\n")
            self.console.file.flush()

    # -- events from the pipeline ----------------------------------------------------------------------
    def stage_started(self, stage: str) -> None:
        self.started[stage] = time.perf_counter()
        if self.progress is not None and stage == "train":
            self.bar = self.progress.add_task("train", total=self.steps, info="compiling")

    def stage_finished(self, out: Any) -> None:
        if out.cached:
            state = "cached"
        else:
            state = f"built in {out.manifest.get('seconds', time.perf_counter() - self.started.get(out.stage, 0)):.1f} s"
        if self.bar is not None and out.stage == "train":
            self.progress.update(self.bar, completed=self.steps)
            self.bar = None
        self.line(f"stage {out.stage}: {state}; manifest {out.path}/manifest.json")

    def step(self, log: Any, state: Any = None) -> None:
        last = log.step + 1 == self.steps
        if self.bar is not None:
            self.progress.update(self.bar, completed=log.step + 1,
                                 info=f"loss {log.loss:.4f}  {log.tokens_per_second:,.0f} tokens/s")
        if self.bar is None and (log.step % self.log_every == 0 or last):
            self.line(f"step {log.step + 1}/{self.steps} loss {log.loss:.4f} lr {log.learning_rate:.2e} "
                      f"batch {log.global_batch} {log.tokens_per_second:,.0f} tokens/s")

    def checkpoint(self, path: str, step: int, record: Any = None) -> None:
        self.line(f"checkpoint {step}: {path}")
