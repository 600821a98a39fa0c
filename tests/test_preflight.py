"""Identities and permissions before anything is paid for (issue 30).

- infra/README.md's IAM commands are exactly palm.base.iam's table;
- the spec refuses, when loaded, a Dataflow temp/staging location in a bucket the submitter only reads, a
  region Dataflow lacks, and a gs:// run with no worker identity, in one line naming the key;
- every launch and submission names its identity (the dry runs);
- `palm launch --preflight` against a stand-in for Google Cloud's REST APIs on loopback: one line per
  missing permission and exit 1, exit 0 when all are granted. No connection leaves loopback.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from palm.base.iam import GRANTS, iam_commands
from palm.cli import main
from palm.jobs.preflight import ENDPOINT_ENV, TOKEN_ENV, TPU_V4_QUOTA
from tests.conftest import ROOT

README = ROOT / "infra" / "README.md"
S540 = "specs/palm-540b.yaml"
SUBMITTER = "palm-runner@my-gcp-project.iam.gserviceaccount.com"
WORKERS = "palm-tpu@my-gcp-project.iam.gserviceaccount.com"
DATAFLOW = "palm-dataflow@my-gcp-project.iam.gserviceaccount.com"


def readme_iam_commands() -> list[str]:
    lines = [line.strip() for line in README.read_text().splitlines()]
    return [line for line in lines if "add-iam-policy-binding" in line and "--member=serviceAccount:" in line]


def test_the_readme_iam_commands_are_the_principal_table():
    assert readme_iam_commands() == iam_commands()
    text = README.read_text()
    for g in GRANTS:  # and each says why, as the table does
        assert f"# {g.role} on {g.resource}: {g.why}." in text, g
    assert {g.principal for g in GRANTS} == {"submitter", "workers", "dataflow_workers"}
    assert all(g.why and g.permissions for g in GRANTS)


# ----------------------------------------------------------------------------------- refused at load


@pytest.mark.parametrize("sets, key", [
    (["infra.dataflow.temp_location=gs://palm-corpus/tmp"], "infra.dataflow.temp_location"),
    (["infra.dataflow.staging_location=gs://palm-corpus/staging"], "infra.dataflow.staging_location"),
    (["infra.dataflow.temp_location=gs://someone-elses/tmp"], "infra.dataflow.temp_location"),
    (["infra.dataflow.temp_location=null"], "data.beam.temp_location"),  # data.beam's: the corpus bucket
    (["infra.dataflow.region=us-central9"], "infra.dataflow.region"),  # no such Dataflow region
    (["infra.identities.dataflow_workers=null"], "infra.identities.dataflow_workers"),
    (["infra.identities.workers=null"], "infra.identities.workers"),
    (["infra.identities.workers=null", "infra.launcher.kind=gke"], "infra.identities.workers"),
])
def test_refused_before_any_work_in_one_line_naming_the_key(capsys, monkeypatch, sets, key):
    monkeypatch.chdir(ROOT)
    for command in (["plan", S540], ["launch", S540, "--dry-run"], ["data", "options", S540]):
        rc = main([*command, *(a for s in sets for a in ("--set", s))])
        out, err = capsys.readouterr()
        assert rc == 2 and not out, (command, out)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f": {key}: " in lines[0], (command, err)
    if "gs://palm-corpus" in sets[0]:
        assert "only reads" in err


def test_every_launch_and_submission_names_its_identity(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["launch", S540, "--dry-run"]) == 0
    assert f"--service-account={WORKERS}" in capsys.readouterr().out
    gke = ["--set", "infra.launcher.kind=gke", "--set", "infra.hardware.num_slices=8", "--set",
           "infra.hardware.topology=8x8x12", "--set", "infra.mesh.data=8", "--set", "infra.mesh.fsdp=64"]
    assert main(["launch", S540, *gke, "--dry-run"]) == 0
    assert f"palm.dev/node-service-account: {WORKERS}" in capsys.readouterr().out
    assert main(["data", "options", S540]) == 0
    out = capsys.readouterr().out
    assert out.count(f"--service_account_email={DATAFLOW}") == 2  # the data and the pack jobs
    assert out.count("--temp_location=gs://palm-runs/dataflow-tmp") == 2 and "--region=us-central1" in out


# -------------------------------------------------------------------------------------- --preflight


class StandIn:
    """Google Cloud's REST APIs as preflight calls them, answering from `granted`: (member, resource,
    permission) triples, the caller being SUBMITTER; and the TPU quota."""

    def __init__(self, granted: set[tuple[str, str, str]], quota: int):
        self.granted, self.quota, self.requests = granted, quota, []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                assert self.headers["Authorization"] == "Bearer test-token"
                url = urllib.parse.urlparse(self.path)
                stand_in.requests.append(("GET", url.path))
                m = re.fullmatch(r"/storage\.googleapis\.com/storage/v1/b/([^/]+)/iam/testPermissions", url.path)
                if m:
                    wanted = urllib.parse.parse_qs(url.query)["permissions"]
                    return self._reply({"permissions": stand_in.held(SUBMITTER, f"gs://{m[1]}", wanted)})
                if url.path.startswith("/cloudquotas.googleapis.com/v1/projects/my-gcp-project/locations/global/"
                                       "services/tpu.googleapis.com/quotaInfos/"):
                    assert url.path.endswith(TPU_V4_QUOTA[False])
                    return self._reply({"dimensionsInfos": [
                        {"dimensions": {"zone": "us-central2-b"}, "details": {"value": str(stand_in.quota)}}]})
                self.send_error(404)

            def do_POST(self):
                assert self.headers["Authorization"] == "Bearer test-token"
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append(("POST", self.path))
                if self.path == "/policytroubleshooter.googleapis.com/v3/iam:troubleshoot":
                    t = body["accessTuple"]
                    resource = t["fullResourceName"]
                    resource = ("gs://" + resource.rsplit("/", 1)[1] if "/buckets/" in resource
                                else resource.split(".googleapis.com/", 1)[1])
                    ok = (t["principal"], resource, t["permission"]) in stand_in.granted
                    return self._reply({"overallAccessState": "CAN_ACCESS" if ok else "CANNOT_ACCESS"})
                m = re.fullmatch(r"/[a-z]+\.googleapis\.com/v1/(.+):testIamPermissions", self.path)
                if m:
                    return self._reply({"permissions": stand_in.held(SUBMITTER, m[1], body["permissions"])})
                self.send_error(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def held(self, member, resource, wanted):
        return [p for p in wanted if (member, resource, p) in self.granted]


def everything(spec_launcher: str = "tpu-vm") -> set[tuple[str, str, str]]:
    """Every grant of the table on the 540B run's resources."""
    emails = {"submitter": SUBMITTER, "workers": WORKERS, "dataflow_workers": DATAFLOW}
    resources = {"project": "projects/my-gcp-project", "bucket:runs": "gs://palm-runs", "bucket:corpus": "gs://palm-corpus",
                 "repository": "projects/my-gcp-project/locations/us/repositories/palm",
                 "sa:workers": f"projects/-/serviceAccounts/{WORKERS}",
                 "sa:dataflow_workers": f"projects/-/serviceAccounts/{DATAFLOW}"}
    return {(emails[g.principal], resources[g.resource], p) for g in GRANTS for p in g.permissions}


@pytest.fixture
def cloud(monkeypatch):
    def start(granted, quota=6144):
        stand_in = StandIn(granted, quota)
        monkeypatch.setenv(ENDPOINT_ENV, stand_in.endpoint)
        monkeypatch.setenv(TOKEN_ENV, "test-token")
        monkeypatch.chdir(ROOT)
        return stand_in
    return start


def test_preflight_exits_0_when_every_principal_holds_what_it_needs(capsys, cloud):
    stand_in = cloud(everything())
    assert main(["launch", S540, "--preflight"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "every principal holds what it needs" in err
    hosts = {path.split("/")[1] for _, path in stand_in.requests}
    # The submitter's own (testIamPermissions) and the workers' (the Policy Troubleshooter, which also answers
    # for the Artifact Registry repository) and the quota.
    assert hosts == {"storage.googleapis.com", "cloudresourcemanager.googleapis.com", "iam.googleapis.com",
                     "policytroubleshooter.googleapis.com", "cloudquotas.googleapis.com"}


def test_preflight_reports_each_gap_in_one_line_and_exits_1(capsys, cloud):
    missing = {
        (SUBMITTER, "gs://palm-runs", "storage.objects.create"),  # no objectAdmin on the run bucket
        (SUBMITTER, f"projects/-/serviceAccounts/{DATAFLOW}", "iam.serviceAccounts.actAs"),
        (WORKERS, "projects/my-gcp-project/locations/us/repositories/palm",
         "artifactregistry.repositories.downloadArtifacts"),
        (DATAFLOW, "projects/my-gcp-project", "dataflow.workItems.lease"),
    }
    cloud(everything() - missing, quota=4096)
    assert main(["launch", S540, "--preflight"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(missing) + 1, lines
    for member, resource, permission in missing:
        assert sum(member in line and f"lacks {permission} on {resource} " in line for line in lines) == 1, lines
    assert any(line.startswith("quota: ") and "4096" in line and "6144" in line for line in lines)
    assert "roles/storage.objectAdmin" in lines[0] or any("roles/storage.objectAdmin" in x for x in lines)


# ------------------------------------------------------------------------------------- start-up at scale


def test_the_start_up_timeout_is_sized_for_the_hosts_and_the_image_is_pulled_first(capsys, monkeypatch):
    from palm.app.worker import _timeout
    from palm.dag.workflow import load_spec
    from palm.jobs.launching import startup_timeout

    monkeypatch.chdir(ROOT)
    assert startup_timeout(load_spec(S540)) == 300 + 1536
    assert startup_timeout(load_spec(S540, ["infra.launcher.startup_timeout_s=900"])) == 900
    assert main(["launch", S540, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--env=PALM_DISTRIBUTED_TIMEOUT=1836" in out
    assert out.index("docker pull ") < out.index("docker run ")  # the pull is not on jax.distributed's clock
    monkeypatch.setenv("PALM_DISTRIBUTED_TIMEOUT", "1836")
    assert _timeout() == {"initialization_timeout": 1836}
    monkeypatch.delenv("PALM_DISTRIBUTED_TIMEOUT")
    assert _timeout() == {}


def test_the_worker_command_sets_each_key_once():
    from palm.jobs.launching import worker_command

    argv = worker_command("s.yaml", "gs://r", ["infra.mesh.data=8", "a=1", "infra.mesh.data=8", "infra.mesh.model=12"])
    assert argv[argv.index("--output") + 2:] == ["--set", "a=1", "--set", "infra.mesh.data=8", "--set", "infra.mesh.model=12"]
