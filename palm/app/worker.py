"""One host of a multi-host training job: `palm worker SPEC --output ROOT`.

Every launcher runs this same command on every host (local processes, TPU VM workers, GKE pods).
It joins the job (`jax.distributed`), finds the run's packed data (the pack stage must be complete
under ROOT), and runs the train stage together with the other hosts: one global mesh over all of
their devices, each host reading only its rows of each global batch, Orbax checkpoints written and
restored by all hosts at once. Host 0 (the leader) writes the stage's files (context.json,
metrics.jsonl, manifest.json); a re-run after a crash or a preemption resumes from the latest
checkpoint. Exit codes: 0 done, 2 bad input, 75 preempted (SIGTERM: checkpointed; run again).

`palm worker SPEC --output ROOT --eval-checkpoint STEP_DIR` is one host of an evaluation job instead
(palm/jobs/evaljob.py): every host restores only its shards of that checkpoint's parameters onto the spec's
mesh (the layout training uses), all run the spec's eval tasks together (the same inputs on every host),
and host 0 writes the result to `<train dir>/evals/launched/<step>.json`. Nothing is saved on the way,
so a stopped evaluation simply runs again.

How a host joins, in order:
  - JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set (the local launcher, or any
    cluster that names them): `jax.distributed.initialize` with them; CPU hosts use gloo collectives;
  - PALM_DISTRIBUTED=auto, or a TPU host (/dev/accel* or /dev/vfio): `jax.distributed.initialize()`,
    which reads the TPU VM's metadata (and MEGASCALE_* for multi-slice) itself;
  - otherwise a single process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import jax

from palm.base.errors import PalmError
from palm.base import storage
from palm.base.errors import Preempted
from palm.dag.runner import Hooks, node_inputs, run_node, stage_key_of, upstream_outputs
from palm.dag.table import STAGES
from palm.dag.workflow import load_spec
from palm.dag.workflow import resolve_workflow, training_node
from palm.evaluation.checkpoints import locate_run
from palm.evaluation.run import evaluate_checkpoint
from palm.jobs.evaljob import write_result
from palm.store import layout
from palm.store.outputs import output_path, read_manifest
from palm.store.runlock import INHERITED_FD, run_lock
from palm.base.hardware import tpu_host
from palm.jobs.launching import checkpoint_step, eval_job_name

ENV_ADDRESS, ENV_COUNT, ENV_INDEX = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _timeout() -> dict[str, int]:
    """jax.distributed's start-up timeout from PALM_DISTRIBUTED_TIMEOUT (seconds; the launchers set it,
    palm.jobs.launching.startup_timeout), else jax's default."""
    value = os.environ.get("PALM_DISTRIBUTED_TIMEOUT", "")
    if not value:
        return {}
    if not value.isdigit():
        raise PalmError(f"PALM_DISTRIBUTED_TIMEOUT must be whole seconds, got {value!r}")
    return {"initialization_timeout": int(value)}


def initialize_distributed() -> dict[str, Any]:
    """Join the job as the environment describes (see the module doc); returns how."""
    address = os.environ.get(ENV_ADDRESS)
    mode = os.environ.get("PALM_DISTRIBUTED", "")
    if address:
        try:
            count, index = int(os.environ[ENV_COUNT]), int(os.environ[ENV_INDEX])
        except (KeyError, ValueError) as e:
            raise PalmError(f"{ENV_ADDRESS} is set, so {ENV_COUNT} and {ENV_INDEX} must be integers too ({e})") from None
        if not 0 <= index < count:
            raise PalmError(f"{ENV_INDEX}={index} is not in [0, {ENV_COUNT}={count})")
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not tpu_host():
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            # Each process compiles for itself, without the persistent compilation cache (palm.cli): a
            # four-process CPU run whose processes shared one cache once hung in a collective until XLA's
            # 40 s rendezvous timeout killed it (tests/test_multihost.py on a loaded 2-core VM,
            # 2026-12-06). The cause is not established; CPU multi-process runs are for testing.
            jax.config.update("jax_enable_compilation_cache", False)
        jax.distributed.initialize(address, num_processes=count, process_id=index, **_timeout())
        how = "explicit"
    elif mode == "auto" or (mode != "off" and tpu_host()):
        jax.distributed.initialize(**_timeout())
        how = "auto"
    else:
        how = "single"
    return {"mode": how, "process_index": jax.process_index(), "process_count": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count()}


def run_worker(spec: Any, root: str, log: Any = None, node_name: str = "train") -> dict[str, Any]:
    """Run (or resume, or find complete) a training node of `spec`'s workflow under `root` on this host;
    every node it reads from must be complete there."""
    workflow = resolve_workflow(spec)
    node = training_node(spec, node_name)
    inputs = node_inputs(node, upstream_outputs(workflow, root, node.name))
    spec = node.spec
    leader = jax.process_index() == 0
    stop = threading.Event()

    def on_step(entry: Any, state: Any) -> None:
        if log is not None and leader and (entry.step % spec.train.log_every == 0 or entry.step + 1 == spec.train.steps):
            log(f"step {entry.step + 1}/{spec.train.steps} loss {entry.loss:.4f} lr {entry.learning_rate:.2e} "
                f"batch {entry.global_batch} {entry.tokens_per_second:,.0f} tokens/s")

    hooks = Hooks(on_step=on_step, stop=stop)
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    watching = _watch_stop_file(os.environ.get("PALM_STOP_FILE"), stop)
    try:
        if leader:
            out = run_node(node, root, inputs, hooks=hooks)
            return {"output": out.path, "cached": out.cached, **{k: out.manifest.get(k) for k in
                                                                  ("final_step", "final_loss", "digest", "checkpoint")}}
        # Followers train in the same directory (local or gs://) and leave the stage's files to the leader.
        final = output_path(root, node.name, stage_key_of(node, inputs))
        manifest = read_manifest(final)
        if manifest is not None:
            return {"output": final, "cached": True, "final_step": manifest["final_step"]}
        if not storage.is_remote(final):
            Path(final).mkdir(parents=True, exist_ok=True)
        fields = STAGES[node.stage].build(spec, inputs, hooks)(final if storage.is_remote(final) else Path(final))
        return {"output": final, "cached": False, "final_step": fields["final_step"], "digest": fields["digest"]}
    finally:
        watching.set()
        signal.signal(signal.SIGTERM, previous)


def run_eval_worker(spec: Any, checkpoint: str, log: Any = None) -> dict[str, Any]:
    """Evaluate one checkpoint (a step directory) as one host of an evaluation job: sharded over the
    spec's mesh of every host's devices; host 0 writes the result (palm.jobs.evaljob.write_result)."""

    mesh = spec.resolved_mesh()
    leader = jax.process_index() == 0
    if log is not None and leader:
        log(f"eval: {checkpoint} on mesh " + " x ".join(f"{a}={n}" for a, n in mesh.items()))
    result = evaluate_checkpoint(checkpoint, spec.eval, mesh_shape=mesh)
    out = None
    if leader:
        train_dir = layout.train_dir_of(result["checkpoint"])
        out = write_result(train_dir, result, spec, {"name": eval_job_name(spec, result["step"]),
                                                     "processes": jax.process_count(), "devices": jax.device_count(),
                                                     "mesh": mesh})
        if log is not None:
            log(f"eval: step {result['step']}: {json.dumps(result['results'], default=str)}")
    return {"output": out, **result}


def _watch_stop_file(path: str | None, stop: threading.Event) -> threading.Event:
    """Set `stop` once `path` (local or gs://) exists, looking every PALM_STOP_POLL_SECONDS (30): how a
    launcher without a session on the hosts (TPU VMs started by a startup script) asks them to checkpoint
    and stop. Returns the event that ends the watching."""
    done = threading.Event()
    if not path:
        return done

    every = float(os.environ.get("PALM_STOP_POLL_SECONDS", "30"))

    def watch() -> None:
        while not done.wait(every):
            try:
                if storage.exists(path):
                    stop.set()
                    return
            except Exception:  # noqa: BLE001 - a failed look must never stop training; look again later
                continue

    threading.Thread(target=watch, name="palm-stop-file", daemon=True).start()
    return done


def main(spec_path: str, overrides: list[str], output: str | None, as_json: bool, node: str = "train",
         eval_checkpoint: str | None = None) -> int:
    spec = load_spec(spec_path, overrides)  # bad input fails before joining the job
    root = output or f"{spec.infra.storage_root.rstrip('/')}/{spec.name}"
    if eval_checkpoint is not None:

        checkpoint_step(eval_checkpoint)
        locate_run(eval_checkpoint)
    # stdout is for the one JSON result: what libraries print there (gloo's C++ connection lines)
    # goes to stderr until then.
    sys.stdout.flush()
    stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        # A training job holds the run root's lock: the lock its launcher passed down, or else process 0's
        # own (the other processes of a job started by hand run under it), as `palm run` does.
        locks = eval_checkpoint is None and (INHERITED_FD in os.environ
                                             or os.environ.get("JAX_PROCESS_ID", "0") in ("", "0"))
        with run_lock(root) if locks else contextlib.nullcontext():
            code, result = _run(spec, root, node, eval_checkpoint)
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
    if code == 0:
        if as_json:
            print(json.dumps(result, indent=2, default=str))
        elif eval_checkpoint is not None:
            print(f"eval: {result['checkpoint']} (step {result['step']})"
                  + (f" -> {result['output']}" if result["output"] else ""), file=sys.stderr)
        else:
            print(f"train: {result['output']} (step {result['final_step']}{', cached' if result['cached'] else ''})",
                  file=sys.stderr)
    return code


def _run(spec: Any, root: str, node: str = "train", eval_checkpoint: str | None = None) -> tuple[int, dict[str, Any]]:
    joined = initialize_distributed()
    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if joined["process_index"] == 0:
        log(f"worker: {joined['process_count']} process(es), {joined['devices']} devices "
            f"({joined['local_devices']} here), joined {joined['mode']}")
    try:
        result = run_eval_worker(spec, eval_checkpoint, log) if eval_checkpoint else run_worker(spec, root, log, node)
    except Preempted as e:
        log(f"palm: {e}")
        return Preempted.exit_code, {}
    if jax.process_count() > 1:
        jax.distributed.shutdown()  # a barrier: after an error it is skipped, the others see this host gone
    result.update(process_index=joined["process_index"], process_count=joined["process_count"])
    return 0, result
