"""Evaluating a checkpoint that is too large for the evaluating process: a sharded job on the launcher.

The eval-new-checkpoints flow (flows/evaluate.py) runs on a small machine (the Prefect worker's VM).
A PaLM 540B checkpoint's parameters are 2.2 TB in float32: that machine cannot hold them, so it does
not try. It launches a job through the training launcher instead (`palm.jobs.launch.plan_launch(...,
eval_checkpoint=STEP_DIR)`: local processes, TPU VMs or a GKE JobSet, on the spec's `infra.hardware`
and `infra.mesh`, as training runs), whose every host runs `palm worker SPEC --output ROOT
--eval-checkpoint STEP_DIR`: each restores only its shards of the parameters (Orbax, onto training's
layout), all of them run the same evaluation together, and host 0 writes the result to
`<train dir>/evals/launched/<step>.json`. The flow follows the job as the train task does, reads that
result and records it in the run's ledger (palm.store.ledger), exactly once.

Where a checkpoint is evaluated (`placement`), by `eval.launch`:

- local: in the flow's own process (palm.evaluation.run.evaluate_checkpoint);
- workers: always as a launched job;
- auto (the default): as a launched job when twice the parameters' bytes (the run's model: parameter
  count x param_dtype's size) exceed what this process can hold: the memory of its accelerators, at
  most the host's RAM (restoring reads the parameters to the host first), or on CPU the host's RAM
  (physical memory, or the cgroup's limit where lower). Twice: beside the parameters, evaluation holds
  a host copy while placing them, activations, float32 logits and a KV cache. A model that does not fit
  while the spec's launcher is this very process (kind local, one process) is refused with what to
  change, before anything is loaded.

A re-run (a retried flow, or the next run after its machine restarted) never starts a second job for a
checkpoint: the job's name is the checkpoint's step and the launchers re-attach to a running job of the
same name and fingerprint; a result already written by a finished job (of the same checkpoint and eval
settings) is used without launching anything.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from palm.base import storage
from palm.base.errors import PalmError
from palm.base.units import gib_or_mib
from palm.dag.table import eval_config
from palm.evaluation.checkpoints import locate_run
from palm.jobs import launch as launcher  # launcher.launch, looked up at call time: tests stand in for it
from palm.jobs.launching import JobFailed, checkpoint_step
from palm.store import layout

#: Bytes of memory needed per byte of parameters to evaluate in process (see the module doc).
HEADROOM = 2

Log = Callable[[str], None]


def parameter_bytes(model_config: Any) -> int:
    """Bytes of a model's parameters as checkpointed (param_dtype)."""
    from palm.core.model import count_params  # imports jax (heavy): not paid by `palm launch --eval-checkpoint`

    return count_params(model_config) * np.dtype(model_config.param_dtype).itemsize


def host_memory() -> int:
    """This host's RAM in bytes: physical memory, or the cgroup's (container's) limit where lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def process_capacity() -> tuple[int, str]:
    """(bytes, what they are) this process can hold for evaluation (see the module doc)."""
    import jax  # heavy: not paid by `palm launch --eval-checkpoint`, which only follows the job

    ram = host_memory()
    devices = jax.local_devices()
    if devices[0].platform != "cpu":
        limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
        if all(limits):
            total = sum(limits)
            if total <= ram:
                return total, f"the memory of this process's {len(devices)} {devices[0].device_kind} device(s)"
    return ram, "this host's RAM"


def launches_workers(spec: Any) -> bool:
    """Whether the spec's launcher runs anywhere but in this process."""
    la = spec.infra.launcher
    return la.kind != "local" or la.processes > 1


def placement(spec: Any, model_config: Any, capacity: tuple[int, str] | None = None) -> tuple[str, str]:
    """("local" or "workers", why): where checkpoints of a run of `model_config` are evaluated under
    `spec` (its eval.launch and launcher). `capacity`: (bytes, what), default `process_capacity()`.
    PalmError when the model does not fit and there is nowhere else to run it."""
    mode = spec.eval.launch
    if mode != "auto":
        return mode, f"eval.launch is {mode}"
    need = parameter_bytes(model_config)
    have, what = capacity if capacity is not None else process_capacity()
    if HEADROOM * need <= have:
        return "local", f"{gib_or_mib(need)} of parameters fit {what} ({gib_or_mib(have)})"
    if not launches_workers(spec):
        raise PalmError(f"a checkpoint of this run holds {gib_or_mib(need)} of parameters (evaluating needs about "
                        f"{HEADROOM}x that), more than {what} ({gib_or_mib(have)}), and infra.launcher runs in this "
                        "process: set infra.launcher (tpu-vm, gke, or local with processes > 1) to evaluate on "
                        "workers, or eval.launch=local to try in process anyway")
    return "workers", (f"{gib_or_mib(need)} of parameters, x{HEADROOM} to evaluate, exceed {what} ({gib_or_mib(have)}): "
                       f"a sharded job on the {spec.infra.launcher.kind} launcher")


# ------------------------------------------------------------------------------------------ the result


def result_path(train_dir: str, step: int) -> str:
    """Where host 0 of the job evaluating checkpoint `step` writes its result (beside the ledger, which
    only the flow writes)."""
    return layout.launched_eval_result(train_dir, step)


def write_result(train_dir: str, result: dict[str, Any], spec: Any, job: dict[str, Any]) -> str:
    """Host 0's last act: the result, with the eval settings it was computed with, in one atomic write."""
    path = result_path(train_dir, result["step"])
    storage.write_text_atomic(path, json.dumps({**result, "eval": eval_config(spec), "job": job}, indent=2,
                                               sort_keys=True, default=str))
    return path


def read_result(train_dir: str, step: int, spec: Any) -> dict[str, Any] | None:
    """A launched job's result for checkpoint `step` computed with `spec`'s eval settings, or None."""
    try:
        result = json.loads(storage.read_text(result_path(train_dir, step)))
    except (FileNotFoundError, ValueError):
        return None
    if result.get("step") != int(step) or result.get("eval") != eval_config(spec):
        return None  # another evaluation's (other settings): this one is computed again
    return result


# ---------------------------------------------------------------------------------------- the job


def plan_eval_job(spec: Any, spec_path: str, root: str, checkpoint: str, overrides: Sequence[str] = ()) -> Any:
    """The launch plan of the job evaluating `checkpoint` (a step directory) under `spec`'s launcher."""
    return launcher.plan_launch(spec, spec_path, root, overrides, eval_checkpoint=checkpoint)


def evaluate_on_workers(spec: Any, spec_path: str, root: str, checkpoint: str, overrides: Sequence[str] = (),
                        stop: threading.Event | None = None, log: Log | None = None) -> dict[str, Any]:
    """Evaluate one checkpoint (a step directory of a run under `root`) as a sharded job on `spec`'s
    launcher, follow it to its end and return its result ({checkpoint, step, results, eval, job}).

    The workers load the spec at `spec_path` (with `overrides`); a result already there for this
    checkpoint and these eval settings is returned without launching. Raises as `palm.jobs.launch.launch`
    does (JobFailed, JobPreempted, WorkerRejected, JobStopped), or JobFailed when the job ended without
    writing its result."""
    log = log or (lambda line: None)
    run = locate_run(checkpoint)
    step = checkpoint_step(checkpoint)
    done = read_result(run["train_dir"], step, spec)
    if done is not None:
        log(f"eval: {checkpoint} was evaluated by job {done.get('job', {}).get('name')}; using its result "
            f"({result_path(run['train_dir'], step)})")
        return done
    plan = plan_eval_job(spec, spec_path, root, checkpoint, overrides)
    launcher.launch(plan, stop=stop, log=log)
    result = read_result(run["train_dir"], step, spec)
    if result is None:
        raise JobFailed(f"{plan.name}: the workers finished but wrote no result for step {step} at "
                        f"{result_path(run['train_dir'], step)}")
    return result
