"""The tpu-vm launcher: a queued resource of `num_slices` TPU slices (gcloud, by type and topology), whose
startup script runs the worker in the launcher's image on every VM of every slice and leaves each host's
exit code and log in the run root, where the launcher follows them (no ssh session has to last the weeks
of a run); the TPUs are deleted at the end whatever happened.

`plan_tpu_vm` is what would run, `render_tpu_vm` what `palm launch --dry-run` prints of it, `run_tpu_vm`
creates the queued resource (or re-attaches to a live one of this very job), waits until it is ACTIVE,
follows the hosts' status objects and the first host's log, and deletes it. A stop is asked through a
`stop` object in the run root: the workers watch for it, checkpoint and exit 75.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from palm.base import storage
from palm.base.errors import PalmError
from palm.jobs.launching import (
    EXIT_BAD_INPUT,
    EXIT_PREEMPTED,
    REATTACH_TAIL_LINES,
    TERMINATION_GRACE_SECONDS,
    Command,
    JobFailed,
    JobPreempted,
    JobStopped,
    LaunchPlan,
    Log,
    WorkerRejected,
    fingerprint,
    job_name,
    mesh_text,
    run,
    slice_shape,
    startup_timeout,
)

#: States of a queued resource that is (or will be) running a job, and of one that ended.
QR_LIVE = ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING", "ACTIVE")
QR_ENDED = ("FAILED", "SUSPENDING", "SUSPENDED")


# ------------------------------------------------------------------------------------------- the plan


def gcloud_location(spec: Any) -> list[str]:
    la = spec.infra.launcher
    return [f"--project={la.project}", f"--zone={la.zone}"]


def startup_script(name: str, image: str, command: Sequence[str], status_dir: str, timeout: int = 300) -> str:
    """The TPU VMs' startup script: run the worker in the image and leave its exit code and log in the run
    root (`status_dir/<host>.json` and `.log`), where the launcher follows them. No ssh session has to
    stay open for the weeks a run takes; a VM that reboots runs it again and the worker resumes."""
    docker = shlex.join(["docker", "run", "--rm", "--net=host", "--privileged", "--env=PALM_DISTRIBUTED=auto",
                         f"--env=PALM_DISTRIBUTED_TIMEOUT={timeout}", f"--env=PALM_STOP_FILE={status_dir}/stop",
                         image, *command])
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
{login}# Pull the image before the worker starts: jax.distributed's start-up clock (PALM_DISTRIBUTED_TIMEOUT)
# starts when the worker does, so the pull of every host is not counted against it; retried while the
# registry throttles 1,000 hosts at once.
for TRY in 1 2 3 4 5; do docker pull {shlex.quote(image)} && break; sleep $((TRY * 30)); done
(while sleep 30; do gcloud storage cp --quiet "$LOG" "$STATUS/$HOST.log"; done) &
UPLOADER=$!
{docker} > "$LOG" 2>&1
CODE=$?
kill "$UPLOADER"
gcloud storage cp --quiet "$LOG" "$STATUS/$HOST.log"
printf '{{"host": "%s", "exit_code": %d}}\\n' "$HOST" "$CODE" | gcloud storage cp - "$STATUS/$HOST.json"
"""


def plan_tpu_vm(spec: Any, root: str, command: list[str], component: str = "train") -> LaunchPlan:
    la, hw = spec.infra.launcher, spec.infra.hardware
    shape, name = slice_shape(spec), job_name(spec)
    where = gcloud_location(spec)
    status_dir = f"{root.rstrip('/')}/launch/{name}"
    script = startup_script(name, la.image, command, status_dir, startup_timeout(spec))
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
    # The identity every TPU VM runs as (infra.identities.workers; check_launcher requires it), never the
    # project's Compute Engine default account.
    create += [f"--service-account={spec.infra.identities.workers}"]
    # TPU VMs of a multi-slice queued resource carry the MEGASCALE_* settings in their metadata, which the
    # TPU runtime reads, so nothing is passed for them.
    create += [f"--metadata-from-file=startup-script={script_name}"]
    status = [*qr, "describe", name, *where, "--format=value(state.state)"]
    delete = [*qr, "delete", name, *where, "--force", "--quiet"]
    summary = (f"tpu-vm: queued resource {name}, {hw.num_slices} slice(s) of {shape.generation.prefix} "
               f"{shape.topology} ({shape.chips} chips, {shape.hosts} hosts of {shape.generation.chips_per_host}), "
               f"workers started by its startup script; mesh {mesh_text(spec)}")
    return LaunchPlan("tpu-vm", name, root, summary, setup=(Command(tuple(create)),),
                      teardown=(Command(tuple(delete)),), status=Command(tuple(status)),
                      poll_seconds=la.poll_seconds, startup_script=script, script_name=script_name,
                      status_dir=status_dir, hosts=hw.num_slices * shape.hosts, fingerprint=fingerprint(script))


def render_tpu_vm(plan: LaunchPlan) -> str:
    """The dry run: the summary, the gcloud commands in order with what happens between them as comments,
    then the startup script."""
    lines = [f"# {plan.summary}",
             f"# first: {plan.status.shell()}: a live queued resource of this job (the same startup script "
             "in the run root's launch record) is followed, not created again; one that ended is deleted first",
             *(c.shell() for c in plan.setup),
             f"# wait until ACTIVE, every {plan.poll_seconds:g} s: {plan.status.shell()}",
             f"# then every {plan.poll_seconds:g} s: read {plan.status_dir}/<host>.json (exit codes) and the "
             f"first host's log, until all {plan.hosts} hosts have finished",
             "# at the end, whatever happened:",
             *(c.shell() for c in plan.teardown),
             f"# {plan.script_name}:",
             plan.startup_script.rstrip("\n")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- running


def _queued_resource_state(plan: LaunchPlan) -> str | None:
    """The queued resource's state, or None when there is none."""
    got = run(plan.status.argv, check=False)
    if got.returncode:
        if "NOT_FOUND" in got.stderr or "not found" in got.stderr.lower():
            return None
        raise JobFailed(f"`{plan.status.shell()}` failed with exit code {got.returncode}: {got.stderr.strip()[-1000:]}")
    return got.stdout.strip()


def _read_json(path: str) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(path))
    except (FileNotFoundError, ValueError):
        return {}


def _host_statuses(plan: LaunchPlan) -> dict[str, dict[str, Any]]:
    """Each finished host's status object (<host>.json in the status directory), by host."""
    out = {}
    for path in storage.glob(f"{plan.status_dir}/*.json"):
        host = storage.name(path)[: -len(".json")]
        if host not in ("job", "stop"):
            out[host] = _read_json(path)
    return out


class _LogFollower:
    """Prints the new lines of one host's log object (the first host's, by name) on each call; with `tail`
    (a re-attached launcher), only the last `tail` lines it finds first. A log shorter than the lines seen
    started again (the VM rebooted and ran its startup script again): it is followed from its start."""

    def __init__(self, plan: LaunchPlan, log: Log, tail: int | None = None):
        self.plan, self.log, self.path, self.seen, self.tail = plan, log, None, 0, tail

    def __call__(self) -> None:
        if self.path is None:
            logs = storage.glob(f"{self.plan.status_dir}/*.log")
            if not logs:
                return
            self.path = logs[0]
        try:
            lines = storage.read_text(self.path).splitlines()
        except FileNotFoundError:
            return
        host = storage.name(self.path)[:-len(".log")]
        if self.tail is not None:
            self.seen, self.tail = max(0, len(lines) - self.tail), None
        elif len(lines) < self.seen:
            self.log(f"[{host}] (its log started again: the host restarted its worker)")
            self.seen = 0
        for line in lines[self.seen:]:
            self.log(f"[{host}] {line}")
        self.seen = len(lines)


def _attach_or_create_tpu_vm(plan: LaunchPlan, log: Log, replace: bool) -> bool:
    """Create the queued resource, unless a live one of this very job exists (then it is followed, True:
    a retried or re-run task must not restart a running job); one that ended, or `replace`, is deleted
    first. A live one of another job is refused."""
    record = f"{plan.status_dir}/job.json"
    state = _queued_resource_state(plan)
    if state is not None:
        ours = _read_json(record).get("fingerprint") == plan.fingerprint
        if state in QR_LIVE and ours and not replace:
            log(f"{plan.name}: re-attaching to this job's queued resource ({state})")
            return True
        if state in QR_LIVE and not replace:
            raise PalmError(f"queued resource {plan.name} exists ({state}) for another job; delete it "
                            f"({plan.teardown[0].shell()}) or re-run with --force")
        log(f"$ {plan.teardown[0].shell()}")
        run(plan.teardown[0].argv)
    storage.remove_tree(plan.status_dir)  # no exit code of an earlier job is read as this one's
    storage.write_text_atomic(record, json.dumps({"name": plan.name, "fingerprint": plan.fingerprint}))
    with tempfile.TemporaryDirectory() as work:
        Path(work, plan.script_name).write_text(plan.startup_script)
        for command in plan.setup:
            log(f"$ {command.shell()}")
            run(command.argv, cwd=work)
    return False


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


def run_tpu_vm(plan: LaunchPlan, stop: threading.Event, log: Log, replace: bool = False) -> None:
    # Outside the try: another job's TPUs are never deleted.
    attached = _attach_or_create_tpu_vm(plan, log, replace)
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
        follow = _LogFollower(plan, log, tail=REATTACH_TAIL_LINES if attached else None)
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
            result = run(command.argv, check=False)
            if result.returncode:
                log(f"{plan.name}: deleting the TPUs failed (exit {result.returncode}): {result.stderr.strip()[-500:]}; "
                    f"delete them yourself: {command.shell()}")
