"""Training nodes (train, finetune) inside the generic stage task: progress in the logs, an event per
checkpoint, launched workers where the spec says.

A retry (after a crash, a preemption or a bad host) runs the same content-addressed node again, which
resumes from its latest valid checkpoint: it never starts again from step 0.

With `infra.launcher.kind` tpu-vm or gke (or local with several processes) the node trains on launched
workers (palm.jobs.launch): the task launches them, follows the job and returns the manifest they wrote.

SIGTERM while training (a preempted VM, a stopped container, a cancelled flow run) saves a checkpoint at
the current step first: the pretrain flow owns SIGTERM (`sigterm_sets`, in the main thread) and hands its
stop event to the tasks, which may run in other threads. Then, under `palm run`, `Preempted` reaches the
CLI (exit 75); under a worker, Prefect's own SIGTERM handling runs after it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any, Callable, Iterator

from palm.base.errors import Preempted
from palm.dag.runner import Hooks, attached, run_node
from palm.store.outputs import StageOutput
from tasks.common import artifact_key
from palm.base import storage
from palm.core.checkpoint import Checkpoints
from palm.jobs.launch import train_on_workers, train_output
from palm.jobs.evaljob import launches_workers
from palm.spec.config import CheckpointConfig
from palm.store import layout

CHECKPOINT_SAVED = "palm.core.checkpoint.saved"


def emit_checkpoint_saved(spec: Any, path: str, step: int, record: dict[str, Any]) -> None:
    """Tell Prefect a checkpoint is on disk; evaluation deployments trigger on this event."""
    from prefect.events import emit_event

    loss = (record.get("metrics") or {}).get("loss")
    emit_event(event=CHECKPOINT_SAVED,
               resource={"prefect.resource.id": f"palm.core.checkpoint.{path}", "palm.core.checkpoint.path": path,
                         "palm.run": spec.name},
               payload={"run": spec.name, "step": step, "loss": loss, "path": path})


class TrainingProgress:
    """A training node's live progress artifact (`<run key>-<node>-progress`, tasks.common.run_key): the
    percentage of `train.steps` done, with the step and loss in its description.

    Created at 0 when training starts (a resumed run's first update jumps to where it is); updated at
    most once every `every_seconds` and always at the last step, so a fast run does not call the API
    each step. The Prefect API failing never fails training: the error is logged once and updates stop.
    """

    def __init__(self, key: str, total_steps: int, logger: Any, every_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.key, self.total, self.logger, self.every, self.clock = key, total_steps, logger, every_seconds, clock
        self.id, self.last, self.sent = None, float("-inf"), None
        self._call(lambda: setattr(self, "id", _create_progress(0.0, key, f"0/{total_steps} steps")))

    def update(self, steps_done: int, loss: float | None = None, force: bool = False) -> bool:
        """Report `steps_done` of the total (if due); whether the artifact was updated."""
        if self.id is None or steps_done == self.sent:
            return False
        now = self.clock()
        if not force and steps_done < self.total and now - self.last < self.every:
            return False
        self.last, self.sent = now, steps_done
        text = f"{steps_done}/{self.total} steps" + (f", loss {loss:.4f}" if loss is not None else "")
        return self._call(lambda: _update_progress(self.id, min(100.0, 100.0 * steps_done / self.total), text))

    def _call(self, fn: Callable[[], Any]) -> bool:
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - the UI's progress bar must never stop training
            self.logger.warning("could not publish training progress (%s): %s; no more progress updates",
                                self.key, e)
            self.id = None
            return False


def _create_progress(progress: float, key: str, description: str) -> Any:
    from prefect.artifacts import create_progress_artifact

    return create_progress_artifact(progress, key=key, description=description)


def _update_progress(artifact_id: Any, progress: float, description: str) -> None:
    from prefect.artifacts import update_progress_artifact

    update_progress_artifact(artifact_id, progress, description=description)


@contextlib.contextmanager
def sigterm_sets(stop: threading.Event) -> Iterator[Any]:
    """While training, SIGTERM sets `stop` (checkpoint now, then stop); yields the handler it replaced.

    Prefect's flow engine installs a SIGTERM handler that raises at once, which would lose the steps
    since the last checkpoint. Signals belong to the main thread; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield previous
    finally:
        signal.signal(signal.SIGTERM, previous)


def launched(spec: Any) -> bool:
    """Whether the train stage runs on launched workers (palm.jobs.launch) instead of in this process."""
    return launches_workers(spec)


class CheckpointWatcher:
    """Finds the checkpoints launched workers commit (local or gs://), each once, so the task that follows
    the job can announce them (`palm.core.checkpoint.saved`) as an in-process train stage does."""

    def __init__(self, directory: str):
        self.directory, self.seen = directory, set()

    def new(self) -> list[tuple[int, dict[str, Any]]]:
        """(step, metadata) of each committed checkpoint not returned before, oldest first."""
        if not storage.exists(self.directory):
            return []
        ckpts = Checkpoints(self.directory, CheckpointConfig(), read_only=True)  # Orbax lists committed steps only
        found = []
        for step in ckpts.steps():
            if step not in self.seen:
                self.seen.add(step)
                found.append((step, ckpts.meta(step)))
        return found


@contextlib.contextmanager
def announcing_checkpoints(spec: Any, directory: str, every: float, logger: Any,
                           progress: TrainingProgress | None = None) -> Iterator[CheckpointWatcher]:
    """While the block runs (and once after it), emit an event for each new checkpoint under `directory`
    (and move `progress` to its step: what this process knows of launched workers' progress)."""
    watcher, done = CheckpointWatcher(directory), threading.Event()

    def announce() -> None:
        try:
            for step, meta in watcher.new():
                logger.info("checkpoint %d saved by the workers: %s/%d", step, directory, step)
                emit_checkpoint_saved(spec, f"{directory}/{step}", step, meta)
                if progress is not None:
                    progress.update(step, (meta.get("metrics") or {}).get("loss"), force=True)
        except Exception as e:  # noqa: BLE001 - a failed look must never fail the training job it watches
            logger.warning("could not list checkpoints in %s: %s", directory, e)

    def loop() -> None:
        while not done.wait(every):
            announce()

    thread = threading.Thread(target=loop, name="palm-checkpoint-watch", daemon=True)
    thread.start()
    try:
        yield watcher
    finally:
        done.set()
        thread.join()
        announce()


def train_launched(node: Any, root: str, inputs: dict[str, StageOutput], force: bool, logger: Any) -> StageOutput:
    """The node on the launcher's workers (palm.jobs.launch.train_on_workers). The stop event stops the job,
    whose workers checkpoint first. A preempted job raises `JobPreempted`, which the retry policy
    retries; the retry's workers resume from the checkpoints."""
    stop = attached().stop or threading.Event()
    checkpoints = layout.checkpoints_dir(train_output(node, root, inputs)[1])
    progress = TrainingProgress(artifact_key(node, root, "progress"), node.spec.train.steps, logger)
    with announcing_checkpoints(node.spec, checkpoints, node.spec.infra.launcher.poll_seconds, logger, progress):
        try:
            return train_on_workers(node, root, inputs, force, stop=stop, log=lambda line: logger.info("%s", line))
        except Preempted as e:  # JobStopped: this process was asked to stop, and stopped the job
            logger.warning("%s", e)
            raise


def run_training_node(node: Any, root: str, inputs: dict[str, StageOutput], force: bool, logger: Any) -> StageOutput:
    """Train (or resume training) a train or finetune node; checkpoints as its spec says."""
    spec = node.spec
    if launched(spec):
        return train_launched(node, root, inputs, force, logger)
    progress = TrainingProgress(artifact_key(node, root, "progress"), spec.train.steps, logger)

    def on_step(log, state) -> None:
        progress.update(log.step + 1, log.loss)
        if log.step % spec.train.log_every == 0 or log.step + 1 == spec.train.steps:
            logger.info("step %d/%d loss %.4f lr %.2e batch %d %.0f tokens/s", log.step + 1, spec.train.steps,
                        log.loss, log.learning_rate, log.global_batch, log.tokens_per_second)

    def on_checkpoint(path: str, step: int, record: dict[str, Any]) -> None:
        logger.info("checkpoint %d saved: %s", step, path)
        emit_checkpoint_saved(spec, path, step, record)

    caller = attached()  # `palm run`'s display; the flow's stop event
    hooks = Hooks(on_step=on_step, on_checkpoint=on_checkpoint,
                  stop=caller.stop if caller.stop is not None else threading.Event()) + caller
    try:
        return run_node(node, root, inputs, force=force, hooks=hooks)
    except Preempted as e:
        logger.warning("%s", e)
        raise
