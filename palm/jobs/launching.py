"""What every launcher shares: the plan (`LaunchPlan`, `Command`), how a job ends, what its hosts run, the
checks on a spec's launcher, and running commands.

The launchers themselves are palm/jobs/local.py, palm/jobs/tpu_vm.py and palm/jobs/gke.py; palm/jobs/launch.py
picks one by `infra.launcher.kind` (see its doc for the whole story).

- The plan: `LaunchPlan` is exactly what `launch` runs (setup, workers, teardown), `plan_json` its JSON.
- How a job ends, besides success: `JobPreempted`, `WorkerRejected` (a PalmError: bad input), `JobFailed`,
  `JobStopped` (a `Preempted`); the worker exit codes behind them (`EXIT_BAD_INPUT`, `EXIT_PREEMPTED`).
- What every host runs: `worker_command` (`palm worker SPEC --output ROOT --set …`), the spec's path as the
  workers see it (`worker_spec_path`), the job's name (`job_name`, `eval_job_name`), the resolved mesh
  (`mesh_overrides`).
- Checks: `check_launcher` (every field the launcher needs), `slice_shape` and `topology_check` (a TPU
  slice as Cloud TPU and GKE offer it; the facts are palm.base.hardware's).
- Running commands: `run` (to its end, output captured), `Child` (output to the log line by line).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from palm.base.errors import PalmError, Preempted, SpecError
from palm.base.hardware import (
    TPU_GENERATIONS,
    TpuGeneration,
    cloud_tpu_v4_problem,
    describe_alternative,
    gke_v4_alternatives,
    gke_v4_problem,
    parse_topology,
)

#: This repository (palm/jobs/launching.py is two levels down): the remote workers' image holds it.
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Worker exit codes (palm/app/worker.py): bad input, and checkpointed-after-SIGTERM.
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75

#: Seconds a pod gets between SIGTERM and SIGKILL: enough for the workers to write a checkpoint.
TERMINATION_GRACE_SECONDS = 600

#: The last lines of the leader's (or first host's) log that a launcher logs when it re-attaches to a job
#: that is running: the rest of it, perhaps weeks, an earlier launcher logged already. Then it follows.
REATTACH_TAIL_LINES = 100

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------ outcomes


class JobPreempted(Exception):
    """The job lost its machines (preemption, maintenance) or used up its restarts: run it again; the
    workers resume from their latest checkpoint."""

    exit_code = EXIT_PREEMPTED


class JobFailed(Exception):
    """The job failed for a reason that is not bad input; running it again may help."""

    exit_code = 1


class WorkerRejected(PalmError):
    """A worker exited with code 2: its spec or data is bad, and it would fail the same way again."""


class JobStopped(Preempted):
    """This process was asked to stop (SIGTERM) and stopped the job; the workers checkpoint on SIGTERM."""

    def __init__(self, what: str):
        Exception.__init__(self, f"{what}: stopped on request (the workers checkpoint on SIGTERM); re-run to resume")
        self.step = None


# ------------------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Command:
    """One command line: its arguments, the environment it adds, and what it reads on stdin."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    stdin: str | None = None

    def shell(self) -> str:
        """The command as one shell line, every word quoted as needed."""
        line = shlex.join(self.argv)
        if self.env:
            line = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env) + " " + line
        return line + (" < manifest" if self.stdin is not None else "")


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Exactly what `launch` runs, in order: setup (each must succeed), then the workers (all at once,
    followed to their end), teardown (always, whatever happened)."""

    kind: str
    name: str
    root: str
    summary: str
    setup: tuple[Command, ...] = ()
    workers: tuple[Command, ...] = ()
    teardown: tuple[Command, ...] = ()
    #: gke: the JobSet; its kubectl commands are `palm.jobs.gke.kubectl_commands(name, namespace)`.
    manifest: dict[str, Any] | None = None
    namespace: str | None = None
    max_restarts: int = 0
    #: tpu-vm: the command whose output is the queued resource's state.
    status: Command | None = None
    poll_seconds: float = 15.0
    #: local: the launcher holds the run root's lock while its workers run, and passes it to them (training).
    locks_root: bool = False
    #: tpu-vm: the startup script every TPU VM runs at boot (the worker), written to `script_name` in the
    #: directory `setup` runs in; where the hosts leave their exit codes and logs; how many hosts there are.
    startup_script: str | None = None
    script_name: str | None = None
    status_dir: str | None = None
    hosts: int = 0
    #: What identifies this job (its command, image and shape): a job found running with the same
    #: fingerprint is this one, re-attached to instead of started again.
    fingerprint: str = ""


def plan_json(plan: LaunchPlan) -> dict[str, Any]:
    """The plan as one JSON object (`palm launch --dry-run --json`)."""
    def cmd(c: Command) -> dict[str, Any]:
        return {"argv": list(c.argv), "env": dict(c.env), "stdin": "manifest" if c.stdin is not None else None}

    return {"kind": plan.kind, "name": plan.name, "root": plan.root, "summary": plan.summary,
            "setup": [cmd(c) for c in plan.setup], "workers": [cmd(c) for c in plan.workers],
            "status": cmd(plan.status) if plan.status else None, "teardown": [cmd(c) for c in plan.teardown],
            "manifests": [plan.manifest] if plan.manifest is not None else [],
            "startup_script": plan.startup_script, "status_dir": plan.status_dir, "hosts": plan.hosts,
            "fingerprint": plan.fingerprint}


def fingerprint(*parts: str) -> str:
    """A short digest of what identifies a job (LaunchPlan.fingerprint)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------- what the hosts run


def worker_command(spec_path: str, root: str, overrides: Sequence[str] = (), node: str = "train",
                   eval_checkpoint: str | None = None) -> list[str]:
    """The command every host of the job runs: the training node on that host, or with `eval_checkpoint`
    the evaluation of that checkpoint (a step directory) sharded over the job (palm/app/worker.py)."""
    argv = ["palm", "worker", str(spec_path), "--output", str(root)] + (["--node", node] if node != "train" else [])
    if eval_checkpoint is not None:
        argv += ["--eval-checkpoint", str(eval_checkpoint)]
    # Each key once, at its last assignment's value (the resolved mesh comes after the user's --sets of it).
    last = {assignment.split("=", 1)[0]: i for i, assignment in enumerate(overrides)}
    for i, assignment in enumerate(overrides):
        if last[assignment.split("=", 1)[0]] == i:
            argv += ["--set", assignment]
    return argv


def job_name(spec: Any) -> str:
    """The job's name (queued resource, TPU nodes, JobSet): an RFC 1035 label of at most 40 characters,
    so that pod hostnames (<name>-slice-<job>-<pod>) stay within 63."""
    name = spec.name if spec.name[:1].isalpha() else f"palm-{spec.name}"
    return name[:40].rstrip("-")


def eval_job_name(spec: Any, step: int) -> str:
    """The name of the job that evaluates checkpoint `step`: `<job name>-eval-<step>`, the spec's part
    shortened so that the whole stays within job_name's 40 characters and the step is never cut off."""
    suffix = f"-eval-{int(step)}"
    return job_name(spec)[:40 - len(suffix)].rstrip("-") + suffix


def checkpoint_step(checkpoint: str) -> int:
    """The step of a checkpoint step directory (<checkpoints>/<step>); PalmError for any other path."""
    step = str(checkpoint).rstrip("/").rpartition("/")[2]
    if not step.isdigit():
        raise PalmError(f"{checkpoint} is not a checkpoint step directory (<train dir>/checkpoints/<step>)")
    return int(step)


def mesh_overrides(spec: Any) -> list[str]:
    """The resolved mesh as --set assignments: every host builds the same mesh, -1 already filled in."""
    return [f"infra.mesh.{axis}={size}" for axis, size in spec.resolved_mesh().items()]


def mesh_text(spec: Any) -> str:
    """The resolved mesh for a plan's summary: data=2 x fsdp=256 x model=12."""
    return " x ".join(f"{axis}={size}" for axis, size in spec.resolved_mesh().items())


def worker_spec_path(spec_path: str | os.PathLike, kind: str) -> str:
    """The spec as the workers see it: for remote workers, its path in the image (which holds this
    repository at its working directory); locally, the path as given."""
    path = str(spec_path)
    if kind == "local" or path.startswith("gs://"):
        return path
    try:
        return Path(path).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        raise PalmError(f"{path}: the {kind} workers read the spec from the image, which holds this repository; "
                        f"put the spec under {REPO_ROOT}") from None


# ------------------------------------------------------------------------------------------ checks


@dataclasses.dataclass(frozen=True)
class SliceShape:
    chips: int            # per slice
    hosts: int            # per slice
    topology: str         # AxBxC, A <= B <= C
    accelerator_type: str  # e.g. v4-6144: TensorCores, not chips
    generation: TpuGeneration


def slice_shape(spec: Any) -> SliceShape:
    """Chips, hosts, topology and accelerator type of one TPU slice; SpecError naming the key that is
    inconsistent. TPU v4 and v5p types count TensorCores (two per chip): a 3072-chip v4 slice is v4-6144."""
    hw = spec.infra.hardware
    gen = TPU_GENERATIONS.get(hw.accelerator)
    if gen is None:
        raise SpecError(f"the {spec.infra.launcher.kind} launcher runs TPU slices ({', '.join(TPU_GENERATIONS)}), "
                        f"not {hw.accelerator}", key="infra.hardware.accelerator")
    chips = hw.num_devices // hw.num_slices
    if hw.devices_per_host != gen.chips_per_host:
        raise SpecError(f"a {hw.accelerator} host (TPU VM) has {gen.chips_per_host} chips, not {hw.devices_per_host}",
                        key="infra.hardware.devices_per_host")
    if chips % gen.chips_per_host:
        raise SpecError(f"a slice of {chips} chips (num_devices / num_slices) is not a whole number of "
                        f"{gen.chips_per_host}-chip hosts", key="infra.hardware.num_devices")
    if not hw.topology:
        raise SpecError(f"required by the {spec.infra.launcher.kind} launcher: the physical shape of one slice, "
                        "AxBxC chips (e.g. 12x16x16)", key="infra.hardware.topology")
    if not re.fullmatch(r"\d+x\d+x\d+", hw.topology):
        raise SpecError(f"expected AxBxC (chips along each axis, e.g. 8x8x16), got {hw.topology!r}",
                        key="infra.hardware.topology")
    dims = [int(d) for d in hw.topology.split("x")]
    problem = topology_check(spec)["problem"]
    if problem is not None:
        raise SpecError(problem, key="infra.hardware.topology")
    if math.prod(dims) != chips:
        raise SpecError(f"{hw.topology} is {math.prod(dims)} chips ({math.prod(dims) // gen.chips_per_host} hosts) "
                        f"but a slice has {chips} (num_devices {hw.num_devices} / num_slices {hw.num_slices}, "
                        f"{chips // gen.chips_per_host} hosts)", key="infra.hardware.topology")
    return SliceShape(chips, chips // gen.chips_per_host, hw.topology,
                      f"{gen.prefix}-{chips * gen.cores_per_chip}", gen)


def topology_check(spec: Any) -> dict[str, Any]:
    """Whether the spec's launcher can get its slices: Cloud TPU's rule for a slice's shape (both
    launchers), and for GKE also which v4 node-pool topologies it offers (`palm.base.hardware.gke_v4_problem`),
    with the nearest shape GKE offers for the same chips (and the mesh that lays out on it) when it lacks
    the spec's. {"launcher", "topology", "problem" (None when fine), "alternatives"}."""
    hw, kind = spec.infra.hardware, spec.infra.launcher.kind
    out: dict[str, Any] = {"launcher": kind, "topology": hw.topology, "problem": None, "alternatives": []}
    gen = TPU_GENERATIONS.get(hw.accelerator)
    if gen is None or kind == "local" or not hw.topology:
        return out
    dims = parse_topology(hw.topology)
    out["problem"] = cloud_tpu_v4_problem(dims)
    if out["problem"] is not None or kind != "gke" or gen.prefix != "v4":
        return out
    gke_problem = gke_v4_problem(dims)
    if gke_problem is None:
        return out
    batches = sorted({stage.global_batch for stage in spec.train.batch_ramp})
    alternatives = gke_v4_alternatives(hw.num_devices, spec.resolved_mesh(), spec.model.num_heads, batches)
    out["alternatives"] = alternatives
    problem = f"{gke_problem}; the tpu-vm launcher's queued resources take it"
    if alternatives:
        best = alternatives[0]
        sets = [f"infra.hardware.num_slices={best['num_slices']}", f"infra.hardware.topology={best['topology']}",
                *(f"infra.mesh.{axis}={size}" for axis, size in best["mesh"].items())]
        problem += (f", or on GKE the same {hw.num_devices} chips as {describe_alternative(best)}: "
                    + " ".join(f"--set {x}" for x in sets))
    out["problem"] = problem
    return out


def check_launcher(spec: Any, root: str) -> None:
    """Everything the spec's launcher needs, checked across fields; SpecError naming the key to change."""
    la, hw = spec.infra.launcher, spec.infra.hardware
    if la.kind == "local":
        if la.processes > 1 and hw.accelerator in TPU_GENERATIONS:
            raise SpecError("one process drives all of a TPU host's chips; for several TPU hosts use the tpu-vm "
                            "or gke launcher", key="infra.launcher.processes")
        if hw.num_devices % la.processes:
            raise SpecError(f"{la.processes} processes cannot split {hw.num_devices} devices "
                            "(infra.hardware.num_devices) evenly", key="infra.launcher.processes")
        return
    if la.processes != 1:
        raise SpecError(f"the {la.kind} launcher runs one worker per TPU host; processes applies to kind local",
                        key="infra.launcher.processes")
    required = ("project", "zone", "runtime_version", "image") if la.kind == "tpu-vm" else ("image",)
    for key in required:
        if not getattr(la, key):
            what = {"image": "the container image holding this repository, with `palm` on PATH",
                    "project": "the GCP project of the TPUs", "zone": "the zone of the TPUs (e.g. us-central2-b)",
                    "runtime_version": "the TPU VM software version (e.g. tpu-ubuntu2204-base)"}[key]
            raise SpecError(f"required by the {la.kind} launcher: {what}", key=f"infra.launcher.{key}")
    slice_shape(spec)
    if not str(root).startswith("gs://"):
        raise SpecError(f"the {la.kind} workers run on other machines and cannot write to the local path {root}: "
                        "use a gs:// bucket (or --output gs://…)", key="infra.storage_root")
    if not spec.infra.identities.workers:
        what = "the TPU VMs' --service-account" if la.kind == "tpu-vm" else "the TPU node pools' --service-account"
        raise SpecError(f"the service account the {la.kind} workers run as ({what}; without it they run as the "
                        "project's Compute Engine default account): see palm.base.iam", key="infra.identities.workers")


#: jax.distributed's own default start-up timeout (seconds), and what each host adds to it.
BASE_STARTUP_SECONDS, STARTUP_SECONDS_PER_HOST = 300, 1


def startup_timeout(spec: Any) -> int:
    """Seconds every host waits in jax.distributed's start-up for all the others: `infra.launcher.startup_timeout_s`,
    or sized for the job: jax's 300 s plus 1 s per host (1,536 hosts of palm-540b: 1,836 s), for the spread of
    the VMs' boot times; the image is pulled before the worker starts, so its pull is not counted."""
    la, hw = spec.infra.launcher, spec.infra.hardware
    if la.startup_timeout_s is not None:
        return la.startup_timeout_s
    gen = TPU_GENERATIONS.get(hw.accelerator)
    hosts = hw.num_devices // (gen.chips_per_host if gen else max(la.processes, 1))
    return BASE_STARTUP_SECONDS + STARTUP_SECONDS_PER_HOST * hosts


# ---------------------------------------------------------------------------------------- running

_INSTALL = {"gcloud": "install the Google Cloud CLI (https://cloud.google.com/sdk)",
            "kubectl": "install kubectl (gcloud components install kubectl) and point it at the cluster",
            "palm": "install this package (uv sync) and run from its environment"}


def stderr_log(line: str) -> None:
    """The default log: stderr, line by line."""
    print(line, file=sys.stderr, flush=True)


def popen(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen; PalmError (how to install it) when the command is not on PATH."""
    try:
        return subprocess.Popen(list(argv), **kwargs)
    except FileNotFoundError:
        raise PalmError(f"{argv[0]}: command not found on PATH; {_INSTALL.get(argv[0], 'install it')}") from None


def run(argv: Sequence[str], stdin: str | None = None, check: bool = True,
        cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run a command to its end, its output captured; JobFailed (with its stderr) when it fails."""
    proc = popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", cwd=cwd)
    out, err = proc.communicate(stdin)
    result = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise JobFailed(f"`{shlex.join(argv)}` failed with exit code {proc.returncode}: {err.strip()[-2000:]}")
    return result


class Child:
    """A process whose output goes to `log` line by line (with a prefix), read by a thread."""

    def __init__(self, argv: Sequence[str], log: Log, prefix: str = "", env: dict[str, str] | None = None,
                 pass_fds: Sequence[int] = ()):
        self.argv = list(argv)
        self.proc = popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", bufsize=1, env=env, pass_fds=tuple(pass_fds))
        self.terminated = False
        self._thread = threading.Thread(target=self._pump, args=(log, prefix), daemon=True)
        self._thread.start()

    def _pump(self, log: Log, prefix: str) -> None:
        for line in self.proc.stdout:
            log(prefix + line.rstrip("\n"))

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.terminated = True
            self.proc.terminate()

    def wait(self, timeout: float | None = None) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._thread.join(5)
        return code
