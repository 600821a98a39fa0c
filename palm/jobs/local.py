"""The local launcher: `infra.launcher.processes` worker processes on this machine, joined by
jax.distributed over loopback (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).

`plan_local` is what would run, `render_local` what `palm launch --dry-run` prints of it, and `run_local`
starts every worker, streams their output and waits; once one fails (or a stop is asked) the others get
SIGTERM and `LOCAL_GRACE_SECONDS` to checkpoint and exit.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from palm.jobs.launching import (
    EXIT_BAD_INPUT,
    EXIT_PREEMPTED,
    Child,
    Command,
    JobFailed,
    JobPreempted,
    JobStopped,
    LaunchPlan,
    Log,
    WorkerRejected,
    job_name,
    mesh_text,
)
from palm.store.runlock import INHERITED_FD, run_lock
from palm.base.net import free_port

#: Seconds the other local workers get to exit after one failed or a stop was asked.
LOCAL_GRACE_SECONDS = 120


def plan_local(spec: Any, root: str, command: list[str], component: str = "train") -> LaunchPlan:
    la, hw = spec.infra.launcher, spec.infra.hardware
    n = la.processes
    port = la.coordinator_port or free_port()
    per_process = hw.num_devices // n
    workers = []
    for i in range(n):
        env = [("JAX_COORDINATOR_ADDRESS", f"127.0.0.1:{port}"), ("JAX_NUM_PROCESSES", str(n)),
               ("JAX_PROCESS_ID", str(i))]
        if hw.accelerator == "cpu":
            env += [("JAX_PLATFORMS", "cpu")]
            if per_process > 1:  # CPU "devices" per process; merged into any XLA_FLAGS already set
                env += [("XLA_FLAGS", f"--xla_force_host_platform_device_count={per_process}")]
        else:  # GPUs: each process takes its own devices
            env += [("JAX_LOCAL_DEVICE_IDS", ",".join(str(d) for d in range(i * per_process, (i + 1) * per_process)))]
        workers.append(Command(tuple(command), tuple(env)))
    summary = (f"local: {n} worker process(es) on this machine, {per_process} {hw.accelerator} device(s) each, "
               f"coordinator 127.0.0.1:{port}; mesh {mesh_text(spec)}")
    return LaunchPlan("local", job_name(spec), root, summary, workers=tuple(workers), poll_seconds=la.poll_seconds,
                      locks_root=component == "train")


def render_local(plan: LaunchPlan) -> str:
    """The dry run: the summary, then one shell line per worker."""
    return "\n".join([f"# {plan.summary}", *(w.shell() for w in plan.workers)]) + "\n"


def _wait_all(children: list[Child], stop: threading.Event, poll: float) -> tuple[dict[int, int], int | None]:
    """Wait for every child; once one fails (or `stop` is set) the others get SIGTERM and a grace period.
    Returns each child's exit code and the index of the first one that failed (None if none did)."""
    first: int | None = None
    while True:
        codes = {i: c.poll() for i, c in enumerate(children)}
        if first is None:
            failed = [i for i, code in codes.items() if code not in (None, 0)]
            if failed:
                first = failed[0]
        if all(code is not None for code in codes.values()):
            return {i: c.wait() for i, c in enumerate(children)}, first
        if first is not None or stop.is_set():
            for c in children:
                c.terminate()
            return {i: c.wait(LOCAL_GRACE_SECONDS) for i, c in enumerate(children)}, first
        stop.wait(poll)


def _outcome(what: str, codes: dict[int, int], first: int | None, label: str) -> None:
    """Raise for the exit codes of a set of workers (the first failure decides), or return if all succeeded."""
    if first is None:
        return
    code = codes[first]
    if code == EXIT_PREEMPTED:
        raise JobPreempted(f"{what}: {label} {first} was preempted (exit {code}) after checkpointing; run again to resume")
    if code == EXIT_BAD_INPUT:
        raise WorkerRejected(f"{what}: {label} {first} rejected its input (exit {code}); see its log above")
    raise JobFailed(f"{what}: {label} {first} failed with exit code {code}")


def run_local(plan: LaunchPlan, stop: threading.Event, log: Log) -> None:
    """Start the workers, follow them to their end. A training job holds the run root's lock (the flow's,
    when it runs under `palm run`) and passes it to its workers, so no other run trains into the same
    checkpoints while they live (palm.store.runlock)."""
    children = []
    lock = run_lock(plan.root) if plan.locks_root else contextlib.nullcontext(None)
    with lock as fd:
        try:
            for i, worker in enumerate(plan.workers):
                env = dict(os.environ)
                for key, value in worker.env:
                    env[key] = f"{env[key]} {value}" if key == "XLA_FLAGS" and env.get(key) else value
                if fd is not None:
                    env[INHERITED_FD] = str(fd)
                children.append(Child(worker.argv, log, f"[worker {i}] ", env, pass_fds=() if fd is None else (fd,)))
            codes, first = _wait_all(children, stop, 0.1)
        finally:
            for c in children:  # an interrupted launcher leaves no workers behind
                c.terminate()
    if stop.is_set():
        raise JobStopped(f"{len(children)} local worker(s)")
    _outcome(f"{plan.name} (local)", codes, first, "worker")
