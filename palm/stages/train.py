"""The train stage (and finetune, its continuation): resume from the checkpoints if any, train, record.

The JAX core (palm.core.train) trains from any stream of sequences; this module reads the pack stage's
rows (palm.data.loader), writes checkpoints, per-step metrics, event files and traces where the run layout
(palm.store.layout) puts them, and returns the manifest's fields.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import jax

from palm.analysis.memory import microbatch_counts
from palm.base import storage
from palm.base.errors import PalmError
from palm.core.checkpoint import Checkpoints, params_digest
from palm.core.train import StepLog, Trainer, TrainState, run_training
from palm.data.loader import HostBatches, sequence_dataset
from palm.jobs.evaljob import launches_workers
from palm.store import layout
from palm.store.tensorboard import TRAIN_SCALARS, EventWriter


def build(spec: Any, inputs: dict[str, Any], hooks: Any) -> Callable[[Any], dict[str, Any]]:
    """Train in the stage directory. Under a gs:// root the checkpoints go straight to the bucket (Orbax),
    and the per-step metrics are kept in a local scratch directory, uploaded with each checkpoint (so a
    resume on another machine keeps them) and at the end. On several hosts only host 0 writes metrics.

    With a "train" input (a finetune node) training starts from that run's final parameters."""
    pack = inputs["pack"]
    base = inputs.get("train")
    init_from = base.manifest["checkpoint"] if base is not None else None

    def build(out: Any) -> dict[str, Any]:
        pack_dir = pack.path  # each host reads its own rows in place (local or gs://), nothing is copied
        if not storage.is_remote(out):
            return run_train_stage(spec, pack_dir, pack.manifest, out, on_step=hooks.on_step,
                                   on_checkpoint=hooks.on_checkpoint, stop=hooks.stop, init_from=init_from)
        leader = jax.process_index() == 0
        metrics = layout.metrics_file(out)
        work = storage.scratch_dir("train-")
        local_metrics = Path(layout.metrics_file(work))

        def upload_metrics() -> None:
            if leader and local_metrics.exists():
                storage.upload_file(local_metrics, metrics)
            # Event files and traces, beside the metrics: added, never replacing the folder (each writer's
            # files have their own names), so those of attempts before a resume stay.
            for folder in (layout.tensorboard_dir, layout.profile_dir):
                if leader and Path(folder(work)).is_dir():
                    storage.add_files(folder(work), folder(out))

        def on_checkpoint(path: str, step: int, record: dict[str, Any]) -> None:
            upload_metrics()
            if hooks.on_checkpoint is not None:
                hooks.on_checkpoint(path, step, record)

        try:
            # The bucket holds the metrics up to the last checkpoint, which is where a resume starts.
            if leader and storage.exists(metrics):
                local_metrics.write_bytes(storage.read_bytes(metrics))
            fields = run_train_stage(spec, pack_dir, pack.manifest, work,
                                     checkpoint_dir=layout.checkpoints_dir(out), on_step=hooks.on_step,
                                     on_checkpoint=on_checkpoint, stop=hooks.stop, init_from=init_from)
            upload_metrics()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {**fields, "metrics": metrics, "tensorboard": layout.tensorboard_dir(out),
                "profile": layout.profile_dir(out) if fields.get("profile") else None}

    return build


def prepare(spec: Any) -> None:
    """Compile the stage's programs into JAX's persistent compilation cache, so that the stage loads them
    (palm.dag.runner.prepare: `palm run` calls this while Prefect's server starts). Only for a stage that
    trains in this process on the devices it has, with the cache on; otherwise nothing."""
    if (not jax.config.jax_compilation_cache_dir or launches_workers(spec)
            or jax.device_count() != spec.infra.hardware.num_devices):
        return
    stage_trainer(spec).precompile()


def stage_trainer(spec: Any) -> Trainer:
    """The stage's trainer: the spec's model, training and mesh, with the microbatch counts it resolves."""
    microbatches = microbatch_counts(spec.model, spec.train, spec.resolved_mesh(), spec.infra.hardware.memory_bytes)
    return Trainer(spec.model, spec.train, spec.resolved_mesh(), microbatches=microbatches)


def run_train_stage(spec: Any, pack_dir: str | Path, pack_manifest: dict[str, Any], out_dir: str | Path, *,
                    checkpoint_dir: str | None = None,
                    on_step: Callable[[StepLog, TrainState], None] | None = None,
                    on_checkpoint: Callable[[str, int, dict[str, Any]], None] | None = None,
                    stop: Any = None, init_from: str | None = None) -> dict[str, Any]:
    """The train stage: resume from the checkpoints if any, train, return the manifest fields. With
    `init_from` (a checkpoint step directory: a finetune node's base model) a fresh run starts from those
    parameters with a new optimizer state.

    Checkpoints go to `checkpoint_dir` (a local path or gs://…; default `out_dir/checkpoints`); the
    local `out_dir` holds the per-step metrics.

    `spec` is the validated Spec (read by attribute, so this module needs no pydantic). Per-step
    metrics are appended to `out_dir/metrics.jsonl` (after a resume, later lines supersede earlier
    ones for the same step).
    """
    out_dir = Path(out_dir)
    if pack_manifest["vocab_size"] > spec.model.vocab_size:
        raise PalmError(f"the tokenizer has {pack_manifest['vocab_size']} ids but model.vocab_size is "
                        f"{spec.model.vocab_size}; raise model.vocab_size")
    if pack_manifest["seq_len"] != spec.model.seq_len:
        raise PalmError(f"the packed sequences have {pack_manifest['seq_len']} tokens but model.seq_len is "
                        f"{spec.model.seq_len}; re-run the pack stage")
    if jax.device_count() != spec.infra.hardware.num_devices:
        raise PalmError(f"infra.hardware.num_devices is {spec.infra.hardware.num_devices} but JAX sees "
                        f"{jax.device_count()} devices here")
    needed = sum(spec.train.global_batch_at(s) for s in range(spec.train.steps))
    available = pack_manifest["sequences"]["train"]
    if needed > available:
        raise PalmError(f"train.steps={spec.train.steps} under the batch ramp needs {needed:,} sequences but the "
                        f"pack stage produced {available:,} (one epoch, no repeats); lower train.steps or add data")

    trainer = stage_trainer(spec)
    sequences = HostBatches(sequence_dataset(pack_dir, pack_manifest, "train", seed=spec.train.seed),
                            rows=trainer.host_rows)
    checkpoints = Checkpoints(checkpoint_dir or layout.checkpoints_dir(out_dir), spec.train.checkpoint)
    metrics_path = Path(layout.metrics_file(out_dir))
    leader = jax.process_index() == 0  # one host writes the run's files; all hosts write checkpoints
    events = None
    if leader:
        events = EventWriter(Path(layout.tensorboard_dir(out_dir)))
    profiler = _Profiler(spec.train.profile_steps, Path(layout.profile_dir(out_dir)))

    def step_hook(log: StepLog, state: TrainState) -> None:
        if leader:
            with metrics_path.open("a") as f:
                f.write(json.dumps(dataclasses.asdict(log)) + "\n")
            # At the updates done (log.step + 1), the checkpoints' numbering, so that the training curves
            # and the evaluations of checkpoint N (written at N) line up; metrics.jsonl keeps the update's index.
            events.scalars(log.step + 1, {k: getattr(log, k) for k in TRAIN_SCALARS}, "train")
        profiler.after_step(log.step)
        if on_step is not None:
            on_step(log, state)

    def checkpoint_hook(step: int, record: dict[str, Any]) -> None:
        if events is not None:
            events.flush()
        if on_checkpoint is not None:
            on_checkpoint(f"{checkpoints.directory}/{step}", step, record)

    try:
        profiler.before_training()
        result = run_training(trainer, sequences, checkpoints=checkpoints, meta={"spec_digest": spec.digest()},
                              on_step=step_hook, on_checkpoint=checkpoint_hook, stop=stop, init_from=init_from)
    finally:
        profiler.stop()
        checkpoints.close()
        sequences.close()
        if events is not None:
            events.close()
    last = result.logs[-1] if result.logs else None
    return {
        "final_step": int(result.state.step),
        "final_loss": last.loss if last else None,
        "checkpoint": f"{checkpoints.directory}/{int(result.state.step)}",
        "checkpoints": checkpoints.steps(),
        "digest": params_digest(result.state.params),
        "resumed_from": result.resumed_from,
        "loss_spikes": result.spikes,
        "corrupt_checkpoints": result.corrupt_checkpoints,
        "microbatches": list(trainer.microbatch_counts),  # per batch_ramp stage (this run's; a resume may differ)
        "params": trainer.num_params,
        "model_flops_per_token": trainer.flops_per_token,
        "training_tokens": sum(spec.train.global_batch_at(s) for s in range(spec.train.steps)) * spec.model.seq_len,
        "init_from": init_from,
        "metrics": str(metrics_path),
        "tensorboard": layout.tensorboard_dir(out_dir),
        "profile": layout.profile_dir(out_dir) if profiler.traced else None,
    }


class _Profiler:
    """A jax.profiler trace of training steps [first, last) (`train.profile_steps`), into `directory`
    (TensorBoard's profile plugin, Perfetto and `palm bench train` read it). Steps before the
    run resumed are not traced again."""

    def __init__(self, steps: Any, directory: Path):
        self.first, self.last = steps if steps else (None, None)
        self.directory, self.active, self.traced = directory, False, False

    def before_training(self) -> None:
        if self.first == 0:
            self._start()

    def after_step(self, step: int) -> None:  # `step` has just run; the next one is step + 1
        if self.first is None:
            return
        if self.active and step + 1 >= self.last:
            self.stop()
        elif not self.active and not self.traced and step + 1 == self.first:
            self._start()

    def _start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        jax.profiler.start_trace(str(self.directory))
        self.active = True

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active, self.traced = False, True
