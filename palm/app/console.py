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
import threading
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from palm.dag.runner import Hooks


class RunConsole:
    """Hooks for `palm.dag.runner` that render progress to `stream` (stderr by default).

    `steps` is each training node's number of steps ({"train": N} for the default graph, or just N).
    Several training nodes may run at once, each in its own thread: a step is the node's whose training
    runs in the calling thread, and each gets its own bar (lines are prefixed with the node's name when
    there is more than one). `live=None` picks the progress bars when the stream is a terminal; tests
    force either mode.
    """

    def __init__(self, steps: int | dict[str, int], log_every: int, stream: TextIO | None = None,
                 live: bool | None = None, width: int | None = None):
        self.steps = {"train": steps} if isinstance(steps, int) else dict(steps)
        self.log_every = max(1, log_every)
        self.console = Console(file=stream or sys.stderr, force_terminal=live, width=width, highlight=False,
                               soft_wrap=True)
        self.live = self.console.is_terminal if live is None else live
        self.progress: Progress | None = None
        self.bars: dict[str, Any] = {}
        self.started: dict[str, float] = {}
        self.training: dict[int, str] = {}  # thread -> the training node it runs
        self.lock = threading.Lock()

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
        with self.lock:
            if self.progress is not None:
                self.progress.console.print(text, markup=False, highlight=False)
            else:
                # Not print(): the flow's log_prints would turn it into a Prefect log record.
                self.console.file.write(text + "\n")
                self.console.file.flush()

    # -- events from the pipeline ----------------------------------------------------------------------
    def stage_started(self, name: str) -> None:
        self.started[name] = time.perf_counter()
        if name in self.steps:
            self.training[threading.get_ident()] = name
            if self.progress is not None:
                self.bars[name] = self.progress.add_task(name, total=self.steps[name], info="compiling")

    def stage_finished(self, out: Any) -> None:
        name = out.name
        if out.cached:
            state = "cached"
        else:
            state = f"built in {out.manifest.get('seconds', time.perf_counter() - self.started.get(name, 0)):.1f} s"
        bar = self.bars.pop(name, None)
        if bar is not None and self.progress is not None:
            self.progress.update(bar, completed=self.steps[name])
        self.line(f"stage {name}: {state}; manifest {out.path}/manifest.json")

    def _node(self) -> str:
        return self.training.get(threading.get_ident()) or next(iter(self.steps))

    def step(self, log: Any, state: Any = None) -> None:
        name = self._node()
        total = self.steps.get(name, 0)
        bar = self.bars.get(name)
        if bar is not None and self.progress is not None:
            self.progress.update(bar, completed=log.step + 1,
                                 info=f"loss {log.loss:.4f}  {log.tokens_per_second:,.0f} tokens/s")
        elif log.step % self.log_every == 0 or log.step + 1 == total:
            prefix = f"{name}: " if len(self.steps) > 1 else ""
            self.line(f"{prefix}step {log.step + 1}/{total} loss {log.loss:.4f} lr {log.learning_rate:.2e} "
                      f"batch {log.global_batch} {log.tokens_per_second:,.0f} tokens/s")

    def checkpoint(self, path: str, step: int, record: Any = None) -> None:
        self.line(f"checkpoint {step}: {path}")
