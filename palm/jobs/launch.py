"""Launching the train stage's workers where the spec's `infra.launcher` says, and following them.

`plan_launch(spec, spec_path, root, overrides)` turns a validated spec into exactly what would run, and
`render` prints it (`palm launch --dry-run`); `launch(plan)` runs it and follows the job to its end.
Every host runs the same worker command (`worker_command`: `palm worker SPEC --output ROOT --set …`):

- local: `infra.launcher.processes` worker processes on this machine, joined by jax.distributed over
  loopback (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID);
- tpu-vm: a queued resource of `num_slices` TPU slices (gcloud, by type and topology), whose startup
  script runs the worker in the launcher's image on every VM of every slice and leaves each host's exit
  code and log in the run root, where the launcher follows them (no ssh session has to last the weeks of
  a run); the TPUs deleted at the end whatever happened;
- gke: one JobSet (jobset.x-k8s.io/v1alpha2) with one Job per slice and one pod per TPU host (privileged
  containers), followed with kubectl (its status, and the leader pod's log).

A job of the same plan found still running (a retry after the launcher's own machine restarted) is
followed, never deleted and started again; only a forced stage (`replace`) replaces it.

How a job ends: `launch` returns when every worker succeeded; otherwise it raises
- `JobPreempted`: the machines were taken away (a worker exited 75 after checkpointing, the TPUs were
  suspended, the JobSet used up its restarts); a retry resumes from the checkpoints;
- `WorkerRejected` (a PalmError): a worker exited 2, bad input; a retry would fail the same way;
- `JobFailed`: anything else (a crash, a cluster problem); a retry may help;
- `JobStopped` (a `Preempted`): this process was asked to stop (the `stop` event), and stopped the job.

The JobSet is checked against infra/schemas/jobset-v1alpha2.schema.json and its Job template against
Kubernetes' own batch/v1 schema (kubernetes-validate, when installed) before anything is sent.

`train_on_workers` is the train stage run this way (the Prefect train task calls it): launch, follow,
then read the manifest the workers wrote; their spec is the resolved one recorded at `<root>/spec.json`.

The same launchers run evaluation jobs: `plan_launch(..., eval_checkpoint=STEP_DIR)` is a job named
`<spec>-eval-<step>` whose every host runs `palm worker SPEC --output ROOT --eval-checkpoint STEP_DIR`,
on the same mesh as training (palm/jobs/evaljob.py, which the eval-new-checkpoints flow uses for checkpoints
too large for its own process; `palm launch --eval-checkpoint` by hand).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from palm.base.errors import PalmError, Preempted, SpecError
from palm.base.hardware import TPU_GENERATIONS, TpuGeneration

REPO_ROOT = Path(__file__).resolve().parents[2]  # palm/jobs/launch.py: the repository is two levels up
JOBSET_SCHEMA = REPO_ROOT / "infra" / "schemas" / "jobset-v1alpha2.schema.json"
#: The Kubernetes API version whose batch/v1 Job schema the JobSet's Job template is checked against.
KUBERNETES_VERSION = "1.30"

#: Worker exit codes (palm/app/worker.py): bad input, and checkpointed-after-SIGTERM.
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75

#: Seconds a pod gets between SIGTERM and SIGKILL: enough for the workers to write a checkpoint.
TERMINATION_GRACE_SECONDS = 600
#: Seconds the other local workers or ssh sessions get to exit after one failed or a stop was asked.
LOCAL_GRACE_SECONDS = 120

WORKER_CONTAINER = "worker"
REPLICATED_JOB = "slice"

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
    #: gke: the JobSet; its kubectl commands are `kubectl_commands(name, namespace)`.
    manifest: dict[str, Any] | None = None
    namespace: str | None = None
    max_restarts: int = 0
    #: tpu-vm: the command whose output is the queued resource's state.
    status: Command | None = None
    poll_seconds: float = 15.0
    #: tpu-vm: the startup script every TPU VM runs at boot (the worker), written to `script_name` in the
    #: directory `setup` runs in; where the hosts leave their exit codes and logs; how many hosts there are.
    startup_script: str | None = None
    script_name: str | None = None
    status_dir: str | None = None
    hosts: int = 0
    #: What identifies this job (its command, image and shape): a job found running with the same
    #: fingerprint is this one, re-attached to instead of started again.
    fingerprint: str = ""


def worker_command(spec_path: str, root: str, overrides: Sequence[str] = (), node: str = "train",
                   eval_checkpoint: str | None = None) -> list[str]:
    """The command every host of the job runs: the training node on that host, or with `eval_checkpoint`
    the evaluation of that checkpoint (a step directory) sharded over the job (palm/app/worker.py)."""
    argv = ["palm", "worker", str(spec_path), "--output", str(root)] + (["--node", node] if node != "train" else [])
    if eval_checkpoint is not None:
        argv += ["--eval-checkpoint", str(eval_checkpoint)]
    for assignment in overrides:
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
    launchers), and for GKE also its table of v4 node-pool topologies (`palm.base.hardware.GKE_V4_TOPOLOGIES`),
    with the nearest shape GKE offers for the same chips (and the mesh that lays out on it) when it lacks
    the spec's. {"launcher", "topology", "problem" (None when fine), "alternatives"}."""
    from palm.base.hardware import (GKE_V4_TOPOLOGIES, cloud_tpu_v4_problem, describe_alternative, gke_v4_alternatives,
                               parse_topology)

    hw, kind = spec.infra.hardware, spec.infra.launcher.kind
    out: dict[str, Any] = {"launcher": kind, "topology": hw.topology, "problem": None, "alternatives": []}
    gen = TPU_GENERATIONS.get(hw.accelerator)
    if gen is None or kind == "local" or not hw.topology:
        return out
    dims = parse_topology(hw.topology)
    out["problem"] = cloud_tpu_v4_problem(dims)
    if out["problem"] is not None or kind != "gke" or gen.prefix != "v4" or hw.topology in GKE_V4_TOPOLOGIES:
        return out
    batches = sorted({stage.global_batch for stage in spec.train.batch_ramp})
    alternatives = gke_v4_alternatives(hw.num_devices, spec.resolved_mesh(), spec.model.num_heads, batches)
    out["alternatives"] = alternatives
    problem = (f"{hw.topology} is not a TPU v4 node-pool topology on GKE (it offers {', '.join(GKE_V4_TOPOLOGIES)}); "
               "the tpu-vm launcher's queued resources take it")
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


def plan_launch(spec: Any, spec_path: str | os.PathLike, root: str, overrides: Sequence[str] = (),
                node: str = "train", eval_checkpoint: str | None = None) -> LaunchPlan:
    """What would run for this spec's launcher (for a workflow's training node other than "train", `spec`
    is that node's own, and the job is named after both); SpecError/PalmError on a launcher that cannot work.

    With `eval_checkpoint` (a step directory) it is the job that evaluates that checkpoint instead, on the
    same hosts and mesh, named after its step (`eval_job_name`): a re-run finds a running job of the same
    checkpoint by that name and its fingerprint, and follows it."""
    try:
        check_launcher(spec, root)
    except SpecError as e:
        raise SpecError(e.detail, file=e.file or str(spec_path), key=e.key) from None
    kind = spec.infra.launcher.kind
    command = worker_command(worker_spec_path(spec_path, kind), root, [*overrides, *mesh_overrides(spec)], node,
                             eval_checkpoint)
    if eval_checkpoint is not None:
        spec = spec.model_copy(update={"name": eval_job_name(spec, checkpoint_step(eval_checkpoint))})
    elif node != "train":
        spec = spec.model_copy(update={"name": f"{spec.name}-{node}"})
    component = "train" if eval_checkpoint is None else "eval"
    plan = {"local": _plan_local, "tpu-vm": _plan_tpu_vm, "gke": _plan_gke}[kind](spec, root, command, component)
    if plan.manifest is not None:
        validate_jobset(plan.manifest)
    return plan


def _mesh_text(spec: Any) -> str:
    return " x ".join(f"{axis}={size}" for axis, size in spec.resolved_mesh().items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plan_local(spec: Any, root: str, command: list[str], component: str = "train") -> LaunchPlan:
    la, hw = spec.infra.launcher, spec.infra.hardware
    n = la.processes
    port = la.coordinator_port or _free_port()
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
               f"coordinator 127.0.0.1:{port}; mesh {_mesh_text(spec)}")
    return LaunchPlan("local", job_name(spec), root, summary, workers=tuple(workers), poll_seconds=la.poll_seconds)


def gcloud_location(spec: Any) -> list[str]:
    la = spec.infra.launcher
    return [f"--project={la.project}", f"--zone={la.zone}"]


#: States of a queued resource that is (or will be) running a job, and of one that ended.
QR_LIVE = ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING", "ACTIVE")
QR_ENDED = ("FAILED", "SUSPENDING", "SUSPENDED")


def startup_script(name: str, image: str, command: Sequence[str], status_dir: str) -> str:
    """The TPU VMs' startup script: run the worker in the image and leave its exit code and log in the run
    root (`status_dir/<host>.json` and `.log`), where the launcher follows them. No ssh session has to
    stay open for the weeks a run takes; a VM that reboots runs it again and the worker resumes."""
    docker = shlex.join(["docker", "run", "--rm", "--net=host", "--privileged", "--env=PALM_DISTRIBUTED=auto",
                         f"--env=PALM_STOP_FILE={status_dir}/stop", image, *command])
    registry = image.split("/", 1)[0]
    login = (f"gcloud auth configure-docker {shlex.quote(registry)} --quiet\n"
             if "." in registry and "/" in image else "")  # Artifact Registry: docker needs gcloud's token
    return f"""#!/bin/bash
# The palm worker of job {name}, run by every TPU VM of the job at boot (queued resource metadata:
# startup-script). Written by `palm launch`; the launcher follows {status_dir}.
set -uo pipefail
STATUS={shlex.quote(status_dir)}
HOST=$(hostname)
LOG=/var/log/palm-worker.log
{login}(while sleep 30; do gcloud storage cp --quiet "$LOG" "$STATUS/$HOST.log"; done) &
UPLOADER=$!
{docker} > "$LOG" 2>&1
CODE=$?
kill "$UPLOADER"
gcloud storage cp --quiet "$LOG" "$STATUS/$HOST.log"
printf '{{"host": "%s", "exit_code": %d}}\\n' "$HOST" "$CODE" | gcloud storage cp - "$STATUS/$HOST.json"
"""


def _plan_tpu_vm(spec: Any, root: str, command: list[str], component: str = "train") -> LaunchPlan:
    la, hw = spec.infra.launcher, spec.infra.hardware
    shape, name = slice_shape(spec), job_name(spec)
    where = gcloud_location(spec)
    status_dir = f"{root.rstrip('/')}/launch/{name}"
    script = startup_script(name, la.image, command, status_dir)
    script_name = f"{name}-startup.sh"
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    # Slices of any shape are asked for by type and topology: accelerator types (v4-6144) are listed for
    # some shapes only.
    create = [*qr, "create", name, *where, f"--type={shape.generation.prefix}", f"--topology={shape.topology}",
              f"--runtime-version={la.runtime_version}"]
    if hw.num_slices > 1:
        create += [f"--node-count={hw.num_slices}", f"--node-prefix={name}"]  # nodes <name>-0, <name>-1, …
    else:
        create += [f"--node-id={name}"]
    if la.spot:
        create += ["--spot"]
    if la.service_account:
        create += [f"--service-account={la.service_account}"]
    # TPU VMs of a multi-slice queued resource carry the MEGASCALE_* settings in their metadata, which the
    # TPU runtime reads, so nothing is passed for them.
    create += [f"--metadata-from-file=startup-script={script_name}"]
    status = [*qr, "describe", name, *where, "--format=value(state.state)"]
    delete = [*qr, "delete", name, *where, "--force", "--quiet"]
    summary = (f"tpu-vm: queued resource {name}, {hw.num_slices} slice(s) of {shape.generation.prefix} "
               f"{shape.topology} ({shape.chips} chips, {shape.hosts} hosts of {shape.generation.chips_per_host}), "
               f"workers started by its startup script; mesh {_mesh_text(spec)}")
    return LaunchPlan("tpu-vm", name, root, summary, setup=(Command(tuple(create)),),
                      teardown=(Command(tuple(delete)),), status=Command(tuple(status)),
                      poll_seconds=la.poll_seconds, startup_script=script, script_name=script_name,
                      status_dir=status_dir, hosts=hw.num_slices * shape.hosts, fingerprint=_fingerprint(script))


def _fingerprint(*parts: str) -> str:
    import hashlib

    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def kubectl_commands(name: str, namespace: str) -> dict[str, list[str]]:
    """The kubectl commands the gke launcher runs; `logs` takes the leader pod's name appended."""
    ns = f"--namespace={namespace}"
    leader = (f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/job-index=0,"
              "batch.kubernetes.io/job-completion-index=0")
    return {
        "delete": ["kubectl", "delete", "jobset", name, ns, "--ignore-not-found", "--wait=true"],
        "create": ["kubectl", "create", "-f", "-"],
        "status": ["kubectl", "get", "jobset", name, ns, "--output=json"],
        "leader": ["kubectl", "get", "pods", ns, f"--selector={leader}", "--output=json"],
        "logs": ["kubectl", "logs", ns, f"--container={WORKER_CONTAINER}", "--follow"],
    }


def jobset_manifest(spec: Any, name: str, namespace: str, command: Sequence[str],
                    component: str = "train") -> dict[str, Any]:
    """The JobSet: one Job per slice (replicas = num_slices), one pod per TPU host of the slice;
    `component` (train, or eval for an evaluation job) labels its objects."""
    la, hw = spec.infra.launcher, spec.infra.hardware
    shape = slice_shape(spec)
    env: list[dict[str, Any]] = [{"name": "PALM_DISTRIBUTED", "value": "auto"}]
    if hw.num_slices > 1:  # the slices join over the data-center network; the first slice's first host leads
        env += [
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{name}-{REPLICATED_JOB}-0-0.{name}"},
            {"name": "MEGASCALE_NUM_SLICES", "value": str(hw.num_slices)},
            {"name": "MEGASCALE_SLICE_ID",
             "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-index']"}}},
        ]
    labels = {"app.kubernetes.io/name": "palm-pipeline", "app.kubernetes.io/component": component,
              "app.kubernetes.io/instance": name}
    pod = {
        "metadata": {"labels": dict(labels)},
        "spec": {
            "restartPolicy": "Never",
            "hostNetwork": True,  # the slices talk over the data-center network at the host's full bandwidth
            "dnsPolicy": "ClusterFirstWithHostNet",
            "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
            "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": shape.generation.gke_accelerator,
                             "cloud.google.com/gke-tpu-topology": shape.topology},
            "containers": [{
                "name": WORKER_CONTAINER,
                "image": la.image,
                "command": list(command),
                "env": env,
                "ports": [{"containerPort": 8471, "name": "tpu-runtime"},
                          {"containerPort": 8080, "name": "megascale"}],
                "resources": {"limits": {"google.com/tpu": shape.generation.chips_per_host}},
                # The TPU runtime in the container needs the host's TPU devices (/dev/accel*, vfio).
                "securityContext": {"privileged": True},
            }],
        },
    }
    job = {
        "metadata": {"labels": dict(labels)},
        "spec": {
            "parallelism": shape.hosts,
            "completions": shape.hosts,
            "completionMode": "Indexed",
            "backoffLimit": 0,  # one lost host fails the slice's Job: the JobSet restarts every slice together
            # Bad input (exit 2) fails the Job with reason PodFailurePolicy, which the JobSet turns into
            # failing at once instead of spending its restarts on it.
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                "containerName": WORKER_CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT]}}]},
            "template": pod,
        },
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(labels),
            # One slice per node pool, one node pool per slice.
            "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"},
        },
        "spec": {
            "failurePolicy": {
                "maxRestarts": la.max_restarts,
                "rules": [{"name": "BadInput", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}],
            },
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": hw.num_slices, "template": job}],
        },
    }


FINGERPRINT = "palm.dev/job-fingerprint"


def _plan_gke(spec: Any, root: str, command: list[str], component: str = "train") -> LaunchPlan:
    la, hw = spec.infra.launcher, spec.infra.hardware
    shape, name = slice_shape(spec), job_name(spec)
    namespace = la.namespace or "default"
    manifest = jobset_manifest(spec, name, namespace, command, component)
    fingerprint = _fingerprint(json.dumps(manifest, sort_keys=True))
    manifest["metadata"]["annotations"][FINGERPRINT] = fingerprint
    k = kubectl_commands(name, namespace)
    summary = (f"gke: JobSet {name} in namespace {namespace}, {hw.num_slices} slice(s) x {shape.hosts} host(s) x "
               f"{shape.generation.chips_per_host} chips of {hw.accelerator} ({shape.topology}), "
               f"mesh {_mesh_text(spec)}")
    return LaunchPlan("gke", name, root, summary, setup=(Command(tuple(k["create"]), stdin=manifest_yaml(manifest)),),
                      teardown=(Command(tuple(k["delete"])),), manifest=manifest, namespace=namespace,
                      max_restarts=la.max_restarts, poll_seconds=la.poll_seconds, fingerprint=fingerprint)


# --------------------------------------------------------------------------------------- validation


def manifest_yaml(manifest: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, width=1 << 16)


def _where(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def validate_jobset(manifest: dict[str, Any]) -> None:
    """Check a JobSet against our JobSet v1alpha2 schema and each Job template against Kubernetes'
    batch/v1 Job schema (kubernetes-validate's bundled, strict schemas; skipped when not installed)."""
    import jsonschema

    schema = json.loads(JOBSET_SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(manifest), key=lambda e: list(e.path))
    if errors:
        raise PalmError(f"the JobSet manifest is invalid at {_where(errors[0].absolute_path)}: {errors[0].message}")
    import kubernetes_validate

    for i, rjob in enumerate(manifest["spec"]["replicatedJobs"]):
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{manifest['metadata']['name']}-{rjob['name']}-0"},
               **{k: v for k, v in rjob["template"].items() if k != "metadata"}}
        try:
            kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise PalmError(f"the JobSet's Job template (spec.replicatedJobs.{i}.template) is not a valid batch/v1 "
                            f"Job at {_where(e.absolute_path)}: {e.message}") from None


# ------------------------------------------------------------------------------------------ output


def render(plan: LaunchPlan) -> str:
    """What `palm launch --dry-run` prints: comment lines (#), then one shell line per command, or for
    gke the JobSet manifest as YAML after the kubectl commands (as comments)."""
    lines = [f"# {plan.summary}"]
    if plan.kind == "local":
        lines += [w.shell() for w in plan.workers]
    elif plan.kind == "tpu-vm":
        lines += [f"# first: {plan.status.shell()}: a live queued resource of this job (the same startup script "
                  "in the run root's launch record) is followed, not created again; one that ended is deleted first",
                  *(c.shell() for c in plan.setup),
                  f"# wait until ACTIVE, every {plan.poll_seconds:g} s: {plan.status.shell()}",
                  f"# then every {plan.poll_seconds:g} s: read {plan.status_dir}/<host>.json (exit codes) and the "
                  f"first host's log, until all {plan.hosts} hosts have finished",
                  "# at the end, whatever happened:",
                  *(c.shell() for c in plan.teardown),
                  f"# {plan.script_name}:",
                  plan.startup_script.rstrip("\n")]
    else:
        k = kubectl_commands(plan.name, plan.namespace)
        lines += [f"# first: {shlex.join(k['status'])}: a running JobSet of this job (annotation {FINGERPRINT}="
                  f"{plan.fingerprint}) is followed, not created again; one that failed is deleted first "
                  f"({shlex.join(k['delete'])})",
                  f"# {shlex.join(k['create'])}   (stdin: the manifest below)",
                  f"# then every {plan.poll_seconds:g} s: {shlex.join(k['status'])}",
                  f"# and the leader's log: {shlex.join(k['leader'])}; {shlex.join(k['logs'])} POD"]
        return "\n".join(lines) + "\n" + manifest_yaml(plan.manifest)
    return "\n".join(lines) + "\n"


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


# ---------------------------------------------------------------------------------------- running

_INSTALL = {"gcloud": "install the Google Cloud CLI (https://cloud.google.com/sdk)",
            "kubectl": "install kubectl (gcloud components install kubectl) and point it at the cluster",
            "palm": "install this package (uv sync) and run from its environment"}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _popen(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    try:
        return subprocess.Popen(list(argv), **kwargs)
    except FileNotFoundError:
        raise PalmError(f"{argv[0]}: command not found on PATH; {_INSTALL.get(argv[0], 'install it')}") from None


def _run(argv: Sequence[str], stdin: str | None = None, check: bool = True,
         cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run a command to its end, its output captured; JobFailed (with its stderr) when it fails."""
    proc = _popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", cwd=cwd)
    out, err = proc.communicate(stdin)
    result = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise JobFailed(f"`{shlex.join(argv)}` failed with exit code {proc.returncode}: {err.strip()[-2000:]}")
    return result


class _Child:
    """A process whose output goes to `log` line by line (with a prefix), read by a thread."""

    def __init__(self, argv: Sequence[str], log: Log, prefix: str = "", env: dict[str, str] | None = None):
        self.argv = list(argv)
        self.proc = _popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, errors="replace", bufsize=1, env=env)
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


def _wait_all(children: list[_Child], stop: threading.Event, poll: float) -> tuple[dict[int, int], int | None]:
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


def _run_local(plan: LaunchPlan, stop: threading.Event, log: Log) -> None:
    children = []
    try:
        for i, worker in enumerate(plan.workers):
            env = dict(os.environ)
            for key, value in worker.env:
                env[key] = f"{env[key]} {value}" if key == "XLA_FLAGS" and env.get(key) else value
            children.append(_Child(worker.argv, log, f"[worker {i}] ", env))
        codes, first = _wait_all(children, stop, 0.1)
    finally:
        for c in children:  # an interrupted launcher leaves no workers behind
            c.terminate()
    if stop.is_set():
        raise JobStopped(f"{len(children)} local worker(s)")
    _outcome(f"{plan.name} (local)", codes, first, "worker")


def _queued_resource_state(plan: LaunchPlan) -> str | None:
    """The queued resource's state, or None when there is none."""
    got = _run(plan.status.argv, check=False)
    if got.returncode:
        if "NOT_FOUND" in got.stderr or "not found" in got.stderr.lower():
            return None
        raise JobFailed(f"`{plan.status.shell()}` failed with exit code {got.returncode}: {got.stderr.strip()[-1000:]}")
    return got.stdout.strip()


def _read_json(path: str) -> dict[str, Any]:
    from palm.base import storage

    try:
        return json.loads(storage.read_text(path))
    except (FileNotFoundError, ValueError):
        return {}


def _host_statuses(plan: LaunchPlan) -> dict[str, dict[str, Any]]:
    """Each finished host's status object (<host>.json in the status directory), by host."""
    from palm.base import storage

    out = {}
    for path in storage.glob(f"{plan.status_dir}/*.json"):
        host = storage.name(path)[: -len(".json")]
        if host not in ("job", "stop"):
            out[host] = _read_json(path)
    return out


class _LogFollower:
    """Prints the new lines of one host's log object (the first host's, by name) on each call."""

    def __init__(self, plan: LaunchPlan, log: Log):
        self.plan, self.log, self.path, self.seen = plan, log, None, 0

    def __call__(self) -> None:
        from palm.base import storage

        if self.path is None:
            logs = storage.glob(f"{self.plan.status_dir}/*.log")
            if not logs:
                return
            self.path = logs[0]
        try:
            lines = storage.read_text(self.path).splitlines()
        except FileNotFoundError:
            return
        for line in lines[self.seen:]:
            self.log(f"[{storage.name(self.path)[:-len('.log')]}] {line}")
        self.seen = max(self.seen, len(lines))


def _attach_or_create_tpu_vm(plan: LaunchPlan, log: Log, replace: bool) -> None:
    """Create the queued resource, unless a live one of this very job exists (then it is followed:
    a retried or re-run task must not restart a running job); one that ended, or `replace`, is deleted
    first. A live one of another job is refused."""
    from palm.base import storage

    record = f"{plan.status_dir}/job.json"
    state = _queued_resource_state(plan)
    if state is not None:
        ours = _read_json(record).get("fingerprint") == plan.fingerprint
        if state in QR_LIVE and ours and not replace:
            log(f"{plan.name}: re-attaching to this job's queued resource ({state})")
            return
        if state in QR_LIVE and not replace:
            raise PalmError(f"queued resource {plan.name} exists ({state}) for another job; delete it "
                            f"({plan.teardown[0].shell()}) or re-run with --force")
        log(f"$ {plan.teardown[0].shell()}")
        _run(plan.teardown[0].argv)
    storage.remove_tree(plan.status_dir)  # no exit code of an earlier job is read as this one's
    storage.write_text_atomic(record, json.dumps({"name": plan.name, "fingerprint": plan.fingerprint}))
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        Path(work, plan.script_name).write_text(plan.startup_script)
        for command in plan.setup:
            log(f"$ {command.shell()}")
            _run(command.argv, cwd=work)


def _host_outcome(plan: LaunchPlan, statuses: dict[str, dict[str, Any]]) -> bool:
    """True when every host succeeded; raises for the first host that did not; False while running."""
    for host, status in sorted(statuses.items()):
        code = status.get("exit_code")
        if code == EXIT_PREEMPTED:
            raise JobPreempted(f"{plan.name}: host {host} was preempted (exit {code}) after checkpointing; "
                               "run again to resume")
        if code == EXIT_BAD_INPUT:
            raise WorkerRejected(f"{plan.name}: host {host} rejected its input (exit {code}); see its log "
                                 f"({plan.status_dir}/{host}.log)")
        if code != 0:
            raise JobFailed(f"{plan.name}: host {host} failed with exit code {code} (log: {plan.status_dir}/{host}.log)")
    return len(statuses) >= plan.hosts


def _run_tpu_vm(plan: LaunchPlan, stop: threading.Event, log: Log, replace: bool = False) -> None:
    from palm.base import storage

    _attach_or_create_tpu_vm(plan, log, replace)  # outside the try: another job's TPUs are never deleted
    try:
        state: str | None = ""
        while state != "ACTIVE":
            seen, state = state, _queued_resource_state(plan)
            if state != seen:
                log(f"{plan.name}: {state}")
            if state in (None, "FAILED"):
                raise JobFailed(f"{plan.name}: the queued resource {'FAILED' if state else 'is gone'} (no capacity in "
                                f"time, or a bad request): `{plan.status.shell().replace('value(state.state)', 'yaml')}` "
                                "says why")
            if state in ("SUSPENDING", "SUSPENDED"):
                raise JobPreempted(f"{plan.name}: the TPUs were {state.lower()} before the workers finished")
            if state != "ACTIVE" and stop.wait(plan.poll_seconds):
                raise JobStopped(plan.name)
        follow = _LogFollower(plan, log)
        stopping_since = None
        while True:
            follow()
            statuses = _host_statuses(plan)
            if _host_outcome(plan, statuses):
                follow()
                return
            state = _queued_resource_state(plan)
            if state in ("SUSPENDING", "SUSPENDED", None):
                raise JobPreempted(f"{plan.name}: preempted (queued resource {state or 'gone'}, {len(statuses)} of "
                                   f"{plan.hosts} hosts finished); run again to resume from the checkpoints")
            if stopping_since is None and stop.is_set():
                # The workers watch for this object: they checkpoint and exit 75, which ends the job.
                storage.write_text_atomic(f"{plan.status_dir}/stop", "stop")
                stopping_since = time.monotonic()
            if stopping_since is not None and time.monotonic() - stopping_since > TERMINATION_GRACE_SECONDS:
                raise JobStopped(plan.name)
            stop.wait(plan.poll_seconds) if stopping_since is None else time.sleep(plan.poll_seconds)
    except JobPreempted:
        if stop.is_set():
            raise JobStopped(plan.name) from None
        raise
    finally:
        for command in plan.teardown:
            log(f"$ {command.shell()}")
            result = _run(command.argv, check=False)
            if result.returncode:
                log(f"{plan.name}: deleting the TPUs failed (exit {result.returncode}): {result.stderr.strip()[-500:]}; "
                    f"delete them yourself: {command.shell()}")


def _conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}


def _attach_or_create_jobset(plan: LaunchPlan, log: Log, replace: bool) -> None:
    """Create the JobSet, unless one of this very job (the same fingerprint) exists and has not failed:
    then it is followed, so that a retried or re-run task never restarts a running job. A failed one,
    one of another job that has finished, or any with `replace` (a forced stage), is deleted first; a
    running one of another job is refused."""
    k = kubectl_commands(plan.name, plan.namespace)
    got = _run(k["status"], check=False)
    if got.returncode == 0:
        existing = json.loads(got.stdout)
        ours = ((existing.get("metadata") or {}).get("annotations") or {}).get(FINGERPRINT) == plan.fingerprint
        done = _conditions(existing.get("status") or {})
        if ours and "Failed" not in done and not replace:
            log(f"{plan.name}: re-attaching to this job's JobSet ({'completed' if 'Completed' in done else 'running'})")
            return
        if not ours and not done and not replace:
            raise PalmError(f"JobSet {plan.name} of another job is running in namespace {plan.namespace}; delete it "
                            f"({shlex.join(k['delete'])}) or re-run with --force")
        log(f"$ {shlex.join(k['delete'])}")
        _run(k["delete"])
    elif "NotFound" not in got.stderr and "not found" not in got.stderr:
        raise JobFailed(f"`{shlex.join(k['status'])}` failed with exit code {got.returncode}: {got.stderr.strip()[-1000:]}")
    for command in plan.setup:
        log(f"$ {command.shell()}")
        _run(command.argv, stdin=command.stdin)


def _run_gke(plan: LaunchPlan, stop: threading.Event, log: Log, replace: bool = False) -> None:
    k = kubectl_commands(plan.name, plan.namespace)
    _attach_or_create_jobset(plan, log, replace)
    followed: set[str] = set()
    logs: _Child | None = None
    restarts, misses = 0, 0
    try:
        while True:
            got = _run(k["status"], check=False)
            if got.returncode:
                misses += 1
                if misses >= 5:
                    raise JobFailed(f"{plan.name}: cannot read the JobSet: {got.stderr.strip()[-1000:]}")
                status: dict[str, Any] = {}
            else:
                misses = 0
                status = json.loads(got.stdout).get("status") or {}
            if status.get("restarts", 0) > restarts:
                restarts = status["restarts"]
                log(f"{plan.name}: restarted every slice ({restarts} of at most {plan.max_restarts} restarts)")
            if logs is None or logs.poll() is not None:
                pod = _leader_pod(k, followed)
                if pod is not None:
                    followed.add(pod)
                    logs = _Child([*k["logs"], pod], log)
            done = _conditions(status)
            if "Completed" in done:
                _drain(logs)
                return
            if "Failed" in done:
                _drain(logs)
                reason, message = done["Failed"].get("reason", ""), done["Failed"].get("message", "")
                if reason == "ReachedMaxRestarts":
                    raise JobPreempted(f"{plan.name}: {message or reason} ({plan.max_restarts}); run again to "
                                       "resume from the checkpoints")
                if reason.startswith("FailJobSet"):  # our BadInput rule: a worker exited 2
                    raise WorkerRejected(f"{plan.name}: a worker rejected its input (exit {EXIT_BAD_INPUT}); "
                                         f"see its log: {message}")
                raise JobFailed(f"{plan.name} failed: {reason}: {message}")
            if stop.wait(plan.poll_seconds):
                log(f"$ {shlex.join(k['delete'])}")
                _run(k["delete"], check=False)  # the pods get SIGTERM: the workers checkpoint and exit
                raise JobStopped(f"JobSet {plan.name}")
    finally:
        if logs is not None:
            logs.terminate()


def _leader_pod(k: dict[str, list[str]], followed: set[str]) -> str | None:
    """The newest leader pod (slice 0, host 0) that has started and whose log is not followed yet."""
    got = _run(k["leader"], check=False)
    if got.returncode:
        return None
    pods = [p for p in json.loads(got.stdout).get("items", [])
            if (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")
            and p["metadata"]["name"] not in followed]
    if not pods:
        return None
    return max(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))["metadata"]["name"]


def _drain(logs: _Child | None) -> None:
    """Let the leader's log reach its end (its container has exited), within a minute."""
    if logs is not None:
        logs.wait(60)


def launch(plan: LaunchPlan, stop: threading.Event | None = None, log: Log | None = None,
           replace: bool = False) -> None:
    """Run the plan and follow the job to its end, its logs to `log` (default: stderr), line by line.

    Returns when every worker succeeded; raises JobPreempted, WorkerRejected, JobFailed or JobStopped
    (see the module doc). A TPU VM or GKE job of this very plan that is still running is followed
    instead of started again (a retry after the launcher's machine restarted), unless `replace`.
    Setting `stop` stops the job: local workers and pods get SIGTERM, TPU VM workers find a stop
    object in the run root; they checkpoint first.
    """
    stop = stop if stop is not None else threading.Event()
    log = log or _stderr
    log(f"launch: {plan.summary}")
    if plan.kind == "local":
        _run_local(plan, stop, log)
    else:
        {"tpu-vm": _run_tpu_vm, "gke": _run_gke}[plan.kind](plan, stop, log, replace)
    log(f"launch: {plan.name} finished")


# ------------------------------------------------------------------------------ the train stage's output


def train_output(node: Any, root: str, inputs: dict[str, Any]) -> tuple[str, str]:
    """(key, directory) of a training node's output with these inputs, as the workers name it."""
    from palm.dag.runner import stage_key_of
    from palm.store.outputs import output_path

    key = stage_key_of(node, inputs)
    return key, output_path(root, node.name, key)


def train_on_workers(node: Any, root: str, inputs: dict[str, Any], force: bool = False,
                     stop: threading.Event | None = None, log: Log | None = None) -> Any:
    """A training node on the launcher's workers: launch them, follow the job to its end, return the
    StageOutput from the manifest they wrote. A complete output is returned without launching anything
    (unless `force`, which deletes it first, as a forced stage in process does)."""
    from palm.base import storage
    from palm.dag.runner import SPEC_RECORD, record_spec
    from palm.store.outputs import StageOutput, read_manifest

    key, path = train_output(node, root, inputs)
    label = "" if node.name == node.stage else node.name
    if force:
        storage.remove_tree(path)
    else:
        manifest = read_manifest(path)
        if manifest is not None:
            return StageOutput(node.stage, key, path, manifest, cached=True, node=label)
    # The workers load the resolved spec the flow validated (<root>/spec.json, which the flow records
    # too), not a spec file that may have changed since; the node's own overrides they apply themselves.
    plan = plan_launch(node.spec, storage.join(root, SPEC_RECORD), root, node=node.name)
    if not node.overrides:  # the workflow's own spec (a node with overrides has its own, without the graph)
        record_spec(node.spec, root)
    launch(plan, stop=stop, log=log, replace=force)
    manifest = read_manifest(path)
    if manifest is None:
        raise JobFailed(f"{plan.name}: the workers finished but {path} has no complete manifest.json")
    return StageOutput(node.stage, key, path, manifest, cached=False, node=label)
