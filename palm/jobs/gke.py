"""The gke launcher: one JobSet (jobset.x-k8s.io/v1alpha2) with one Job per slice and one pod per TPU host
(privileged containers), followed with kubectl (its status, and the leader pod's log).

`jobset_manifest` is the JobSet, `validate_jobset` checks it against infra/schemas/jobset-v1alpha2.schema.json
and its Job template against Kubernetes' own batch/v1 schema (kubernetes-validate) before anything is
sent; `plan_gke` is what would run, `render_gke` what `palm launch --dry-run` prints of it (the kubectl
commands as comments, then the manifest), `run_gke` creates the JobSet (or re-attaches to a running one
of this very job), follows it and the leader's log, and deletes it when asked to stop.
"""

from __future__ import annotations

import json
import re
import shlex
import threading
import time
from typing import Any, Callable, Sequence

import yaml

from palm.base.errors import PalmError
from palm.jobs.launching import (
    EXIT_BAD_INPUT,
    REATTACH_TAIL_LINES,
    REPO_ROOT,
    TERMINATION_GRACE_SECONDS,
    Child,
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

#: The JobSet annotation naming the service account its pods act as (the TPU node pools').
NODE_SERVICE_ACCOUNT = "palm.dev/node-service-account"

JOBSET_SCHEMA = REPO_ROOT / "infra" / "schemas" / "jobset-v1alpha2.schema.json"
#: The Kubernetes API version whose batch/v1 Job schema the JobSet's Job template is checked against.
KUBERNETES_VERSION = "1.30"

WORKER_CONTAINER = "worker"
REPLICATED_JOB = "slice"
#: The JobSet's annotation holding the plan's fingerprint (LaunchPlan.fingerprint).
FINGERPRINT = "palm.dev/job-fingerprint"


# ------------------------------------------------------------------------------------------- the plan


def kubectl_commands(name: str, namespace: str) -> dict[str, list[str]]:
    """The kubectl commands the gke launcher runs; `logs` takes the leader pod's name appended (after
    `--since-time=T` when it follows a cut stream again: LeaderLog)."""
    ns = f"--namespace={namespace}"
    leader = (f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/job-index=0,"
              "batch.kubernetes.io/job-completion-index=0")
    return {
        "delete": ["kubectl", "delete", "jobset", name, ns, "--ignore-not-found", "--wait=true"],
        "create": ["kubectl", "create", "-f", "-"],
        "status": ["kubectl", "get", "jobset", name, ns, "--output=json"],
        "leader": ["kubectl", "get", "pods", ns, f"--selector={leader}", "--output=json"],
        "logs": ["kubectl", "logs", ns, f"--container={WORKER_CONTAINER}", "--follow", "--timestamps"],
    }


def jobset_manifest(spec: Any, name: str, namespace: str, command: Sequence[str],
                    component: str = "train") -> dict[str, Any]:
    """The JobSet: one Job per slice (replicas = num_slices), one pod per TPU host of the slice;
    `component` (train, or eval for an evaluation job) labels its objects."""
    la, hw = spec.infra.launcher, spec.infra.hardware
    shape = slice_shape(spec)
    env: list[dict[str, Any]] = [{"name": "PALM_DISTRIBUTED", "value": "auto"},
                                 {"name": "PALM_DISTRIBUTED_TIMEOUT", "value": str(startup_timeout(spec))}]
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
            # One slice per node pool, one node pool per slice. The pods use the host's network, where GKE's
            # Workload Identity does not apply: they act as the node pools' service account, named here
            # (the node pools are created with --service-account=it, infra/README.md step 6').
            "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool",
                            NODE_SERVICE_ACCOUNT: spec.infra.identities.workers},
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


def plan_gke(spec: Any, root: str, command: list[str], component: str = "train") -> LaunchPlan:
    la, hw = spec.infra.launcher, spec.infra.hardware
    shape, name = slice_shape(spec), job_name(spec)
    namespace = la.namespace or "default"
    manifest = jobset_manifest(spec, name, namespace, command, component)
    digest = fingerprint(json.dumps(manifest, sort_keys=True))
    manifest["metadata"]["annotations"][FINGERPRINT] = digest
    k = kubectl_commands(name, namespace)
    summary = (f"gke: JobSet {name} in namespace {namespace}, {hw.num_slices} slice(s) x {shape.hosts} host(s) x "
               f"{shape.generation.chips_per_host} chips of {hw.accelerator} ({shape.topology}), "
               f"mesh {mesh_text(spec)}")
    return LaunchPlan("gke", name, root, summary, setup=(Command(tuple(k["create"]), stdin=manifest_yaml(manifest)),),
                      teardown=(Command(tuple(k["delete"])),), manifest=manifest, namespace=namespace,
                      max_restarts=la.max_restarts, poll_seconds=la.poll_seconds, fingerprint=digest)


def render_gke(plan: LaunchPlan) -> str:
    """The dry run: the summary and the kubectl commands as comments, then the JobSet manifest as YAML."""
    k = kubectl_commands(plan.name, plan.namespace)
    lines = [f"# {plan.summary}",
             f"# first: {shlex.join(k['status'])}: a running JobSet of this job (annotation {FINGERPRINT}="
             f"{plan.fingerprint}) is followed, not created again; one that failed is deleted first "
             f"({shlex.join(k['delete'])})",
             f"# {shlex.join(k['create'])}   (stdin: the manifest below)",
             f"# then every {plan.poll_seconds:g} s: {shlex.join(k['status'])}",
             f"# and the leader's log: {shlex.join(k['leader'])}; {shlex.join(k['logs'])} POD "
             "(a stream cut while the pod runs: again, with --since-time=<its last line's time>)",
             f"# the pods (hostNetwork) act as the TPU node pools' service account "
             f"{plan.manifest['metadata']['annotations'][NODE_SERVICE_ACCOUNT]}: create the node pools with "
             "--service-account=it (Workload Identity does not apply to hostNetwork pods)"]
    return "\n".join(lines) + "\n" + manifest_yaml(plan.manifest)


# --------------------------------------------------------------------------------------- validation


def manifest_yaml(manifest: dict[str, Any]) -> str:
    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, width=1 << 16)


def _where(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def validate_jobset(manifest: dict[str, Any]) -> None:
    """Check a JobSet against our JobSet v1alpha2 schema and each Job template against Kubernetes'
    batch/v1 Job schema (kubernetes-validate's bundled, strict schemas)."""
    # Heavy imports (about 0.3 s each), needed only here: not paid by every importer of the launchers.
    import jsonschema
    import kubernetes_validate

    schema = json.loads(JOBSET_SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(manifest), key=lambda e: list(e.path))
    if errors:
        raise PalmError(f"the JobSet manifest is invalid at {_where(errors[0].absolute_path)}: {errors[0].message}")
    for i, rjob in enumerate(manifest["spec"]["replicatedJobs"]):
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{manifest['metadata']['name']}-{rjob['name']}-0"},
               **{k: v for k, v in rjob["template"].items() if k != "metadata"}}
        try:
            kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise PalmError(f"the JobSet's Job template (spec.replicatedJobs.{i}.template) is not a valid batch/v1 "
                            f"Job at {_where(e.absolute_path)}: {e.message}") from None


# ---------------------------------------------------------------------------------------- running


def _conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}


def _attach_or_create_jobset(plan: LaunchPlan, log: Log, replace: bool) -> bool:
    """Create the JobSet, unless one of this very job (the same fingerprint) exists and has not failed:
    then it is followed (True), so that a retried or re-run task never restarts a running job. A failed one,
    one of another job that has finished, or any with `replace` (a forced stage), is deleted first; a
    running one of another job is refused."""
    k = kubectl_commands(plan.name, plan.namespace)
    got = run(k["status"], check=False)
    if got.returncode == 0:
        existing = json.loads(got.stdout)
        ours = ((existing.get("metadata") or {}).get("annotations") or {}).get(FINGERPRINT) == plan.fingerprint
        done = _conditions(existing.get("status") or {})
        if ours and "Failed" not in done and not replace:
            log(f"{plan.name}: re-attaching to this job's JobSet ({'completed' if 'Completed' in done else 'running'})")
            return True
        if not ours and not done and not replace:
            raise PalmError(f"JobSet {plan.name} of another job is running in namespace {plan.namespace}; delete it "
                            f"({shlex.join(k['delete'])}) or re-run with --force")
        log(f"$ {shlex.join(k['delete'])}")
        run(k["delete"])
    elif "NotFound" not in got.stderr and "not found" not in got.stderr:
        raise JobFailed(f"`{shlex.join(k['status'])}` failed with exit code {got.returncode}: {got.stderr.strip()[-1000:]}")
    for command in plan.setup:
        log(f"$ {command.shell()}")
        run(command.argv, stdin=command.stdin)
    return False


def run_gke(plan: LaunchPlan, stop: threading.Event, log: Log, replace: bool = False) -> None:
    k = kubectl_commands(plan.name, plan.namespace)
    attached = _attach_or_create_jobset(plan, log, replace)
    # A re-attached job's leader may have logged for weeks, all of it in an earlier task run's log already.
    leader_log = LeaderLog(k["logs"], log, plan.poll_seconds, tail=REATTACH_TAIL_LINES if attached else None)
    restarts, misses = 0, 0
    try:
        while True:
            got = run(k["status"], check=False)
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
            if not leader_log.following():
                leader_log.update(_leader_pod(k))
            done = _conditions(status)
            if "Completed" in done:
                leader_log.drain()
                return
            if "Failed" in done:
                leader_log.drain()
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
                run(k["delete"], check=False)  # the pods get SIGTERM: the workers checkpoint and exit
                raise JobStopped(f"JobSet {plan.name}")
    finally:
        leader_log.stop()


def _leader_pod(k: dict[str, list[str]]) -> tuple[str, str] | None:
    """The newest leader pod (slice 0, host 0) that has started, and its phase."""
    got = run(k["leader"], check=False)
    if got.returncode:
        return None
    pods = [p for p in json.loads(got.stdout).get("items", [])
            if (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")]
    if not pods:
        return None
    newest = max(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))
    return newest["metadata"]["name"], newest["status"]["phase"]


#: `kubectl logs --timestamps` starts each line with its RFC 3339 time (nanoseconds, trailing zeros cut).
_STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z ")
#: The longest wait between two follows of a running pod whose log stream ends and gives nothing.
MAX_FOLLOW_BACKOFF_SECONDS = 600.0


class LeaderLog:
    """The leader pod's log, followed with `command` (`kubectl logs --follow --timestamps`) and logged
    without the times.

    A new leader pod (the JobSet restarted) is followed from its start; with `tail`, the first pod from
    its last `tail` lines (a re-attached launcher's: the rest was logged before). A stream that ends while
    its pod still runs (the API server or the kubelet dropped the connection: over a run of weeks they do)
    is followed again from the time of its last line, and the lines the new stream repeats (kubectl sends
    that time to the second) are skipped. A follow that gave no line makes the next one wait twice as long as
    the one before (from one poll interval to at most MAX_FOLLOW_BACKOFF_SECONDS), so a log that cannot be
    read does not start kubectl at every poll. When the job ends, a stream that had been cut is followed
    again while that gives new lines, so the log's tail is not lost.
    """

    def __init__(self, command: Sequence[str], log: Log, poll_seconds: float, tail: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._command, self._log, self._poll, self._clock = list(command), log, poll_seconds, clock
        self._tail = tail  # for the first pod only
        self._child: Child | None = None
        self._pod: str | None = None
        self._since: str | None = None  # the last line's time, as kubectl printed it
        self._last: tuple[str, str] | None = None  # ... as a key that sorts by time
        self._at_last: set[str] = set()  # the lines logged at exactly that time
        self._got_lines = False  # in the current follow
        self._empty_follows = 0  # in a row
        self._retry_at = 0.0
        self._cut = False  # the last follow ended with an error, or while its pod ran

    def following(self) -> bool:
        return self._child is not None and self._child.poll() is None

    def update(self, leader: tuple[str, str] | None) -> None:
        """After a poll that found no follow running: follow `leader` (its name and phase)."""
        self._reap()
        if leader is None:
            return
        pod, phase = leader
        if pod != self._pod:
            if self._pod is not None:  # a later pod: its whole log is new
                self._tail = None
            self._pod, self._since, self._last, self._at_last, self._empty_follows = pod, None, None, set(), 0
            self._follow()
        elif phase == "Running":
            self._cut = True
            if self._clock() >= self._retry_at:
                self._log(f"{pod}: its log stream ended while it runs; following it again from "
                          f"{self._since or (f'its last {self._tail} lines' if self._tail else 'its start')}")
                self._follow()

    def drain(self) -> None:
        """The job has ended: let the log reach its end (the container has exited), within a minute a follow;
        a stream cut short is followed again for as long as that gives new lines."""
        if self._child is not None:
            self._child.wait(60)
            self._reap()
        while self._cut and self._pod is not None:
            self._follow()
            self._child.wait(60)
            self._reap()
            if not self._got_lines:
                break

    def stop(self) -> None:
        if self._child is not None:
            self._child.terminate()

    def _reap(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        code = child.wait(5)  # it has exited: its last lines reach the log
        self._cut = self._cut or code != 0
        self._empty_follows = 0 if self._got_lines else self._empty_follows + 1
        backoff = self._poll * 2.0 ** min(self._empty_follows - 1, 30) if self._empty_follows else 0.0
        self._retry_at = self._clock() + min(backoff, MAX_FOLLOW_BACKOFF_SECONDS)

    def _follow(self) -> None:
        start = ([f"--since-time={self._since}"] if self._since
                 else [f"--tail={self._tail}"] if self._tail is not None else [])
        self._got_lines, self._cut = False, False
        self._child = Child([*self._command, *start, self._pod], self._line)

    def _line(self, line: str) -> None:
        stamp = _STAMP.match(line)
        if stamp is None:  # kubectl's own message (its stderr)
            self._log(line)
            return
        key, text = (stamp[1], (stamp[2] or "").ljust(9, "0")), line[stamp.end():]
        if self._last is not None and (key < self._last or (key == self._last and text in self._at_last)):
            return  # the stream before this one gave it already
        if key != self._last:
            self._since, self._last, self._at_last = line[:stamp.end() - 1], key, set()
        self._at_last.add(text)
        self._got_lines = True
        self._log(text)
