"""`palm launch --preflight`: ask Google Cloud, before anything is paid for, whether each principal of the
run holds what palm.base.iam says it needs, and whether the TPU quota holds the job.

- The submitter is the caller (the credentials palm runs with): `testIamPermissions` on the project
  (Resource Manager), the buckets (Cloud Storage), the worker service accounts it must act as (IAM), and
  the image's Artifact Registry repository where the table gives it a role there (it gives none today).
- The TPU VMs' / node pools' and the Dataflow workers' accounts are not the caller, and testIamPermissions
  answers only for the caller: for them each permission is asked of the Policy Troubleshooter
  (`iam:troubleshoot`, v3), which answers for any principal.
- The queued resource's quota: Cloud Quotas' quotaInfo of TPU v4 chips in the zone (`TPU_V4_QUOTA`),
  against the job's chips.

`preflight(spec, token)` returns one line per gap (empty: all granted). Every request goes to
https://<service host>/…, or to `$PALM_GOOGLE_API_ENDPOINT/<service host>/…` when that is set (the tests'
stand-in on loopback, tests/test_preflight.py). Credentials: `$PALM_GCP_ACCESS_TOKEN`, else
`gcloud auth print-access-token`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from palm.base.errors import PalmError
from palm.base.iam import GRANTS, Grant

ENDPOINT_ENV, TOKEN_ENV = "PALM_GOOGLE_API_ENDPOINT", "PALM_GCP_ACCESS_TOKEN"
#: Cloud Quotas' id of the on-demand and the Spot TPU v4 chip quota per project and zone (its dimension:
#: zone). Names as Cloud Quotas lists them for tpu.googleapis.com; check `gcloud beta quotas info list
#: --service=tpu.googleapis.com` if they change.
TPU_V4_QUOTA = {False: "TPUV4PodPerProjectPerZoneForTPUAPI", True: "TPUV4PodPreemptiblePerProjectPerZoneForTPUAPI"}


@dataclasses.dataclass(frozen=True)
class Check:
    grant: Grant
    member: str        # the principal's email
    resource: str      # what the line names: gs://palm-runs, projects/p, …
    full_name: str     # the resource's full name for the Policy Troubleshooter


def _bucket(path: str) -> str | None:
    return path[len("gs://"):].split("/", 1)[0] if path.startswith("gs://") else None


def _repository(image: str) -> tuple[str, str, str] | None:
    """(location, project, repository) of an Artifact Registry image (LOCATION-docker.pkg.dev/PROJECT/REPO/…)."""
    host, _, rest = image.partition("/")
    parts = rest.split("/")
    if not host.endswith("-docker.pkg.dev") or len(parts) < 3:
        return None
    return host[: -len("-docker.pkg.dev")], parts[0], parts[1]


def checks(spec: Any) -> list[Check]:
    """What to ask, from the principal table and the spec: the grants that apply to its launcher and runner."""
    infra, la, beam = spec.infra, spec.infra.launcher, spec.data.beam
    ids = infra.identities
    project = la.project or beam.project
    remote = la.kind != "local"
    dataflow = beam.runner == "dataflow"
    emails = {"submitter": ids.submitter, "workers": ids.workers, "dataflow_workers": ids.dataflow_workers}
    used = {"submitter": remote or dataflow, "workers": remote, "dataflow_workers": dataflow}
    runs = _bucket(infra.storage_root)
    corpus = sorted({b for src in spec.data.sources for p in src.paths if (b := _bucket(p)) and b != runs})
    image = beam.sdk_container_image or la.image
    repo = _repository(image) if image else None
    out = []
    for g in GRANTS:
        if not used[g.principal] or (g.launcher is not None and g.launcher != la.kind):
            continue
        if g.principal == "submitter" and g.resource.startswith("sa:") and not used[g.resource[3:]]:
            continue
        member = emails[g.principal]
        if not member:
            raise PalmError(f"infra.identities.{g.principal}: --preflight checks this principal's permissions; set it")
        if g.resource == "project":
            targets = [(f"projects/{project}", f"//cloudresourcemanager.googleapis.com/projects/{project}")]
        elif g.resource == "bucket:runs":
            targets = [(f"gs://{runs}", f"//storage.googleapis.com/projects/_/buckets/{runs}")] if runs else []
        elif g.resource == "bucket:corpus":
            targets = [(f"gs://{b}", f"//storage.googleapis.com/projects/_/buckets/{b}") for b in corpus]
        elif g.resource == "repository":
            name = f"projects/{repo[1]}/locations/{repo[0]}/repositories/{repo[2]}" if repo else None
            targets = [(name, f"//artifactregistry.googleapis.com/{name}")] if name else []
        else:
            account = emails[g.resource[3:]]
            name = f"projects/-/serviceAccounts/{account}"
            targets = [(name, f"//iam.googleapis.com/{name}")] if account else []
        out += [Check(g, member, resource, full) for resource, full in targets]
    return out


class Google:
    """The few REST calls preflight makes, with a bearer token."""

    def __init__(self, token: str, endpoint: str | None = None):
        self.token, self.endpoint = token, (endpoint or "").rstrip("/")

    def url(self, host: str, path: str) -> str:
        return f"{self.endpoint}/{host}{path}" if self.endpoint else f"https://{host}{path}"

    def call(self, host: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url(host, path), data=data, method="POST" if data else "GET",
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise PalmError(f"{host}{path.split('?')[0]}: HTTP {e.code}: {e.read()[:300].decode(errors='replace')}") from None
        except urllib.error.URLError as e:
            raise PalmError(f"{host}: cannot reach Google Cloud ({e.reason})") from None

    def caller_holds(self, check: Check, permissions: list[str]) -> set[str]:
        """testIamPermissions as the caller: the permissions of `permissions` it holds on the resource."""
        r = check.resource
        if r.startswith("gs://"):
            query = urllib.parse.urlencode([("permissions", p) for p in permissions])
            got = self.call("storage.googleapis.com", f"/storage/v1/b/{r[5:]}/iam/testPermissions?{query}")
        elif r.startswith("projects/") and "/" not in r[len("projects/"):]:
            got = self.call("cloudresourcemanager.googleapis.com", f"/v1/{r}:testIamPermissions",
                            {"permissions": permissions})
        elif "/repositories/" in r:
            got = self.call("artifactregistry.googleapis.com", f"/v1/{r}:testIamPermissions", {"permissions": permissions})
        else:
            got = self.call("iam.googleapis.com", f"/v1/{r}:testIamPermissions", {"permissions": permissions})
        return set(got.get("permissions", []))

    def principal_holds(self, check: Check, permission: str) -> bool:
        """The Policy Troubleshooter's answer for another principal."""
        got = self.call("policytroubleshooter.googleapis.com", "/v3/iam:troubleshoot",
                        {"accessTuple": {"principal": check.member, "fullResourceName": check.full_name,
                                         "permission": permission}})
        return got.get("overallAccessState") == "CAN_ACCESS"

    def quota(self, project: str, quota_id: str) -> list[dict[str, Any]]:
        got = self.call("cloudquotas.googleapis.com",
                        f"/v1/projects/{project}/locations/global/services/tpu.googleapis.com/quotaInfos/{quota_id}")
        return got.get("dimensionsInfos", [])


def _quota_gap(spec: Any, api: Google) -> str | None:
    la, hw = spec.infra.launcher, spec.infra.hardware
    if la.kind != "tpu-vm" or not hw.accelerator.startswith("tpu-v4"):
        return None
    quota_id = TPU_V4_QUOTA[la.spot]
    limit = 0
    for info in api.quota(la.project, quota_id):
        dims = info.get("dimensions", {})
        if dims.get("zone") in (la.zone, None) or la.zone in info.get("applicableLocations", []):
            limit = max(limit, int(info.get("details", {}).get("value", 0)))
    if limit < hw.num_devices:
        return (f"quota: {quota_id} in {la.zone} is {limit} TPU v4 chips; the queued resource needs "
                f"{hw.num_devices} (ask for it under IAM & Admin > Quotas, infra/README.md step 4)")
    return None


def preflight(spec: Any, token: str, endpoint: str | None = None) -> list[str]:
    """One line per missing permission or quota; empty when the run's principals hold all they need."""
    api = Google(token, endpoint if endpoint is not None else os.environ.get(ENDPOINT_ENV))
    gaps = []
    for check in checks(spec):
        wanted = list(check.grant.permissions)
        if check.grant.principal == "submitter":
            held = api.caller_holds(check, wanted)
            missing = [p for p in wanted if p not in held]
        else:
            missing = [p for p in wanted if not api.principal_holds(check, p)]
        for permission in missing:
            gaps.append(f"{check.grant.principal} {check.member} lacks {permission} on {check.resource} "
                        f"(grant {check.grant.role}: {check.grant.why})")
    quota = _quota_gap(spec, api)
    if quota:
        gaps.append(quota)
    return gaps


def access_token() -> str:
    """$PALM_GCP_ACCESS_TOKEN, else gcloud's for the active account; PalmError when there is neither."""
    token = os.environ.get(TOKEN_ENV)
    if token:
        return token
    try:
        got = subprocess.run(["gcloud", "auth", "print-access-token"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PalmError(f"--preflight needs credentials: set {TOKEN_ENV} or install and log in to gcloud ({e})") from None
    if got.returncode or not got.stdout.strip():
        raise PalmError(f"--preflight needs credentials: `gcloud auth print-access-token` failed: {got.stderr.strip()[-300:]}")
    return got.stdout.strip()
