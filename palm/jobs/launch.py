"""Launching the train stage's workers where the spec's `infra.launcher` says, and following them.

`plan_launch(spec, spec_path, root, overrides)` turns a validated spec into exactly what would run, and
`render` prints it (`palm launch --dry-run`); `launch(plan)` runs it and follows the job to its end.
Every host runs the same worker command (`worker_command`: `palm worker SPEC --output ROOT --set …`).
Each launcher kind has its own module, which this one picks by `infra.launcher.kind`; what they share
(the plan, the outcomes, the checks, running commands) is palm/jobs/launching.py:

- local (palm/jobs/local.py): `infra.launcher.processes` worker processes on this machine, joined by
  jax.distributed over loopback (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID);
- tpu-vm (palm/jobs/tpu_vm.py): a queued resource of `num_slices` TPU slices (gcloud, by type and
  topology), whose startup script runs the worker in the launcher's image on every VM of every slice and
  leaves each host's exit code and log in the run root, where the launcher follows them (no ssh session
  has to last the weeks of a run); the TPUs deleted at the end whatever happened;
- gke (palm/jobs/gke.py): one JobSet (jobset.x-k8s.io/v1alpha2) with one Job per slice and one pod per
  TPU host (privileged containers), followed with kubectl (its status, and the leader pod's log).

A job of the same plan found still running (a retry after the launcher's own machine restarted) is
followed, never deleted and started again; only a forced stage (`replace`) replaces it.

How a job ends: `launch` returns when every worker succeeded; otherwise it raises (palm.jobs.launching's)
- `JobPreempted`: the machines were taken away (a worker exited 75 after checkpointing, the TPUs were
  suspended, the JobSet used up its restarts); a retry resumes from the checkpoints;
- `WorkerRejected` (a PalmError): a worker exited 2, bad input; a retry would fail the same way;
- `JobFailed`: anything else (a crash, a cluster problem); a retry may help;
- `JobStopped` (a `Preempted`): this process was asked to stop (the `stop` event), and stopped the job.

The JobSet is checked against infra/schemas/jobset-v1alpha2.schema.json and its Job template against
Kubernetes' own batch/v1 schema (kubernetes-validate) before anything is sent (palm.jobs.gke.validate_jobset).

`train_on_workers` is the train stage run this way (the Prefect train task calls it): launch, follow,
then read the manifest the workers wrote; their spec is the resolved one recorded at `<root>/spec.json`.

The same launchers run evaluation jobs: `plan_launch(..., eval_checkpoint=STEP_DIR)` is a job named
`<spec>-eval-<step>` whose every host runs `palm worker SPEC --output ROOT --eval-checkpoint STEP_DIR`,
on the same mesh as training (palm/jobs/evaljob.py, which the eval-new-checkpoints flow uses for checkpoints
too large for its own process; `palm launch --eval-checkpoint` by hand).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

from palm.base import storage
from palm.base.errors import SpecError
from palm.store.layout import SPEC_RECORD
from palm.dag.runner import record_spec, stage_key_of
from palm.jobs.gke import plan_gke, render_gke, run_gke, validate_jobset
from palm.jobs.launching import (
    JobFailed,
    LaunchPlan,
    Log,
    check_launcher,
    checkpoint_step,
    eval_job_name,
    mesh_overrides,
    stderr_log,
    worker_command,
    worker_spec_path,
)
from palm.jobs.local import plan_local, render_local, run_local
from palm.jobs.tpu_vm import plan_tpu_vm, render_tpu_vm, run_tpu_vm
from palm.store.outputs import StageOutput, output_path, read_manifest

#: Each launcher kind's plan (spec, root, worker command, component -> LaunchPlan) and dry-run text.
PLANNERS = {"local": plan_local, "tpu-vm": plan_tpu_vm, "gke": plan_gke}
RENDERERS = {"local": render_local, "tpu-vm": render_tpu_vm, "gke": render_gke}


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
    plan = PLANNERS[kind](spec, root, command, component)
    if plan.manifest is not None:
        validate_jobset(plan.manifest)
    return plan


def render(plan: LaunchPlan) -> str:
    """What `palm launch --dry-run` prints: comment lines (#), then one shell line per command, or for
    gke the JobSet manifest as YAML after the kubectl commands (as comments)."""
    return RENDERERS[plan.kind](plan)


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
    log = log or stderr_log
    log(f"launch: {plan.summary}")
    if plan.kind == "local":
        run_local(plan, stop, log)
    else:
        {"tpu-vm": run_tpu_vm, "gke": run_gke}[plan.kind](plan, stop, log, replace)
    log(f"launch: {plan.name} finished")


# ------------------------------------------------------------------------------ the train stage's output


def train_output(node: Any, root: str, inputs: dict[str, Any]) -> tuple[str, str]:
    """(key, directory) of a training node's output with these inputs, as the workers name it."""
    key = stage_key_of(node, inputs)
    return key, output_path(root, node.name, key)


def train_on_workers(node: Any, root: str, inputs: dict[str, Any], force: bool = False,
                     stop: threading.Event | None = None, log: Log | None = None) -> Any:
    """A training node on the launcher's workers: launch them, follow the job to its end, return the
    StageOutput from the manifest they wrote. A complete output is returned without launching anything
    (unless `force`, which deletes it first, as a forced stage in process does)."""
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
