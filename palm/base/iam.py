"""Who runs as whom: the one table of principals, the roles each needs on which resource, and why.

The principals are the identities a real run uses, each named by a key of the spec's `infra.identities`:

- `submitter`: the account that runs `palm launch`, `palm run` and the Prefect worker (its VM's service
  account): it creates the queued resource or the JobSet, submits the Dataflow jobs and stages them;
- `workers`: the TPU VMs (`--service-account` on the queued resource) and GKE's TPU nodes (the node
  pool's `--service-account`; the pods run with hostNetwork, where Workload Identity does not apply, so
  they act as the node's account);
- `dataflow_workers`: the Dataflow worker VMs (`--service_account_email`).

`GRANTS` is the table; `iam_commands()` the gcloud commands that grant it (infra/README.md's IAM section
is checked against them by tests/test_infra_docs.py), and `REQUIRED_PERMISSIONS` what `palm launch
--preflight` asks Google Cloud about (palm.jobs.preflight). The permissions listed per role are the ones
the run uses, a subset of the role's.
"""

from __future__ import annotations

import dataclasses

#: The principals, as keys of the spec's infra.identities, and what they are.
PRINCIPALS = {
    "submitter": "launches and follows the jobs, submits and stages the Dataflow jobs (the Prefect worker's account)",
    "workers": "the TPU VMs of the queued resource and GKE's TPU node pools (training and evaluation hosts)",
    "dataflow_workers": "the Dataflow worker VMs of the data and pack stages",
}


@dataclasses.dataclass(frozen=True)
class Grant:
    principal: str        # a key of PRINCIPALS
    role: str             # roles/...
    resource: str         # "project", "bucket:runs", "bucket:corpus", "repository", "sa:<principal>"
    why: str
    #: The permissions of the role this run needs (what --preflight tests).
    permissions: tuple[str, ...] = ()
    #: Only with this launcher kind ("tpu-vm", "gke"), or for every run (None).
    launcher: str | None = None


GRANTS: tuple[Grant, ...] = (
    # --- the submitter
    Grant("submitter", "roles/storage.objectAdmin", "bucket:runs",
          "writes every stage's output, spec.json, the launch records, Dataflow's temp and staging files",
          ("storage.objects.create", "storage.objects.get", "storage.objects.list", "storage.objects.delete")),
    Grant("submitter", "roles/storage.objectViewer", "bucket:corpus",
          "reads the tokenizer's sample and lists the sources when submitting",
          ("storage.objects.get", "storage.objects.list")),
    Grant("submitter", "roles/dataflow.developer", "project", "creates and follows the Dataflow jobs",
          ("dataflow.jobs.create", "dataflow.jobs.get")),
    Grant("submitter", "roles/iam.serviceAccountUser", "sa:dataflow_workers",
          "Dataflow refuses a job whose worker account the submitter may not act as",
          ("iam.serviceAccounts.actAs",)),
    Grant("submitter", "roles/iam.serviceAccountUser", "sa:workers",
          "the queued resource's TPU VMs are created to run as the workers' account (GKE's node pools are "
          "created once by an administrator, step 6')",
          ("iam.serviceAccounts.actAs",), launcher="tpu-vm"),
    Grant("submitter", "roles/logging.logWriter", "project", "the launcher's and flows' own logs",
          ("logging.logEntries.create",)),
    Grant("submitter", "roles/tpu.admin", "project", "creates, follows and deletes the queued resource",
          ("tpu.queuedResources.create", "tpu.queuedResources.get", "tpu.queuedResources.delete"), launcher="tpu-vm"),
    Grant("submitter", "roles/container.clusterViewer", "project",
          "finds the cluster; inside it only the namespace Role of step 6'",
          ("container.clusters.get",), launcher="gke"),
    # --- the TPU VMs and GKE's TPU nodes
    Grant("workers", "roles/storage.objectAdmin", "bucket:runs",
          "read the packed rows, write checkpoints, logs and exit codes", 
          ("storage.objects.create", "storage.objects.get", "storage.objects.list", "storage.objects.delete")),
    Grant("workers", "roles/artifactregistry.reader", "repository", "pull the worker image at boot",
          ("artifactregistry.repositories.downloadArtifacts",)),
    Grant("workers", "roles/logging.logWriter", "project", "every host's logs", ("logging.logEntries.create",)),
    Grant("workers", "roles/container.defaultNodeServiceAccount", "project",
          "what a GKE node's own account needs (logging, monitoring, metadata)",
          ("logging.logEntries.create", "monitoring.timeSeries.create"), launcher="gke"),
    # --- the Dataflow workers
    Grant("dataflow_workers", "roles/dataflow.worker", "project", "run the job's work items",
          ("dataflow.workItems.lease", "dataflow.workItems.update")),
    Grant("dataflow_workers", "roles/storage.objectAdmin", "bucket:runs",
          "write the data and pack stages' shards, read the staged pipeline and temp files",
          ("storage.objects.create", "storage.objects.get", "storage.objects.list", "storage.objects.delete")),
    Grant("dataflow_workers", "roles/storage.objectViewer", "bucket:corpus", "read the sources",
          ("storage.objects.get", "storage.objects.list")),
    Grant("dataflow_workers", "roles/artifactregistry.reader", "repository", "pull the SDK container (the worker image)",
          ("artifactregistry.repositories.downloadArtifacts",)),
    Grant("dataflow_workers", "roles/logging.logWriter", "project", "the workers' logs",
          ("logging.logEntries.create",)),
)

#: The shell variable infra/README.md holds each principal's email in.
SHELL_VARIABLES = {"submitter": "SUBMITTER", "workers": "WORKERS", "dataflow_workers": "DATAFLOW"}
#: How infra/README.md names each resource.
SHELL_RESOURCES = {"bucket:runs": "gs://palm-runs", "bucket:corpus": "gs://palm-corpus", "repository": "palm"}


def grants_for(principal: str, launcher: str | None = None) -> list[Grant]:
    """The grants a principal needs for a run with this launcher kind (every kind's with None)."""
    return [g for g in GRANTS if g.principal == principal and (launcher is None or g.launcher in (None, launcher))]


def iam_command(g: Grant) -> str:
    """The gcloud command that grants `g`, as infra/README.md writes it."""
    member = f"--member=serviceAccount:${SHELL_VARIABLES[g.principal]}"
    if g.resource == "project":
        return f"gcloud projects add-iam-policy-binding $PROJECT {member} --role={g.role}"
    if g.resource.startswith("bucket:"):
        return f"gcloud storage buckets add-iam-policy-binding {SHELL_RESOURCES[g.resource]} {member} --role={g.role}"
    if g.resource == "repository":
        return (f"gcloud artifacts repositories add-iam-policy-binding {SHELL_RESOURCES[g.resource]} --location=us "
                f"{member} --role={g.role}")
    target = SHELL_VARIABLES[g.resource.split(":", 1)[1]]
    return f"gcloud iam service-accounts add-iam-policy-binding ${target} {member} --role={g.role}"


def iam_commands() -> list[str]:
    """Every grant's command, in the table's order."""
    return [iam_command(g) for g in GRANTS]
