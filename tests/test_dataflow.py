"""Submitting the data stage to Dataflow, on loopback, up to and including the jobs.create call.

Beam's DataflowRunner runs exactly as on a launching machine: it builds palm's pipeline from palm's
options, stages what the workers need to Cloud Storage, and creates the job through the Dataflow API.
Two stand-ins take the place of Google Cloud: the GCS emulator (tests/gcs.py) holds what was staged, and
`DataflowStandIn`, a small HTTP server, answers the Dataflow REST API's job calls: it records the
jobs.create request, answers with a job id, and says JOB_STATE_DONE when the runner asks for the job's
state, so that the runner returns. Nothing beyond loopback is reached (the `offline` fixture fails the
test on any other connection or name lookup).

Needs the `dataflow` dependency group (Beam's gcp extra, pip), which CI installs.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import urllib.parse
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import GoogleCloudOptions, SetupOptions
from apache_beam.portability.api import beam_runner_api_pb2

from palm.data.beam import pipeline_options
from palm.data.package import build_wheel
from palm.data.pipeline import build_pipeline, run_data_stage
from palm.base.errors import PalmError
from palm.spec.schema import DataSpec

pytestmark = pytest.mark.timeout(60)

IMAGE = "us-docker.pkg.dev/proj/palm/palm-pipeline:latest"
CLOUD = {"runner": "dataflow", "project": "proj", "region": "us-central2", "temp_location": "gs://bucket/dataflow-tmp",
         "machine_type": "n2-highmem-16", "num_workers": 3, "max_num_workers": 1000}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def data_spec(**beam_fields: Any) -> DataSpec:
    return DataSpec.model_validate({
        "sources": [{"name": "planted", "format": "builtin", "paths": ["synthetic-planted"], "weight": 1.0}],
        "validation_fraction": 0.0, "num_shards": 2, "beam": {**CLOUD, **beam_fields}})


class DataflowStandIn:
    """The Dataflow API's job calls (REST, v1b3 projects.locations.jobs) on 127.0.0.1.

    jobs.create: the request is recorded and answered with the job and an id, in state JOB_STATE_QUEUED;
    jobs.get: JOB_STATE_DONE; jobs.messages.list: none. Anything else is recorded and answered 404.
    """

    JOB_ID = "2026-01-01_00_00_00-1234567890"

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                path = urllib.parse.urlsplit(self.path).path
                stand_in.requests.append(("POST", path, body))
                if path.startswith("/v1b3/projects/") and path.endswith("/jobs"):
                    return self._answer(200, {**body, "id": stand_in.JOB_ID, "currentState": "JOB_STATE_QUEUED"})
                self._answer(404, {"error": {"code": 404, "message": f"not served: {path}"}})

            def do_GET(self) -> None:  # noqa: N802
                path = urllib.parse.urlsplit(self.path).path
                stand_in.requests.append(("GET", path, None))
                if path.endswith(f"/jobs/{stand_in.JOB_ID}"):
                    return self._answer(200, {"id": stand_in.JOB_ID, "currentState": "JOB_STATE_DONE"})
                if path.endswith(f"/jobs/{stand_in.JOB_ID}/messages"):
                    return self._answer(200, {})
                self._answer(404, {"error": {"code": 404, "message": f"not served: {path}"}})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # Beam's Dataflow client speaks REST (not gRPC) to an endpoint only when it names localhost.
        self.endpoint = f"http://localhost:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def created(self) -> list[tuple[str, dict[str, Any]]]:
        return [(path, body) for method, path, body in self.requests if method == "POST"]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dataflow():
    stand_in = DataflowStandIn()
    try:
        yield stand_in
    finally:
        stand_in.stop()


@pytest.fixture
def offline(monkeypatch):
    """Fail the test on any connection or name lookup beyond loopback made in this process."""
    attempts: list[Any] = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            attempts.append(address)
            raise OSError(f"this test is offline: refused a connection to {address}")
        return connect(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name not in LOOPBACK:
            attempts.append(name)
            raise socket.gaierror(socket.EAI_NONAME, f"this test is offline: refused to look up {name}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    yield attempts
    assert not attempts, f"reached beyond loopback: {attempts}"


def submit(spec: DataSpec, dataflow: DataflowStandIn, job_name: str, package_dir: Path, **setup: Any) -> str:
    """Run palm's data pipeline with palm's options on DataflowRunner against the stand-ins; the final state."""
    options = pipeline_options(spec, job_name=job_name, package_dir=package_dir, worker_image=IMAGE)
    cloud = options.view_as(GoogleCloudOptions)
    cloud.dataflow_endpoint = dataflow.endpoint
    cloud.no_auth = True  # anonymous clients: no credentials, no metadata server
    for key, value in setup.items():
        setattr(options.view_as(SetupOptions), key, value)
    p = beam.Pipeline(options=options)
    build_pipeline(p, spec, "gs://bucket/corpus")
    return p.run().wait_until_finish()


def staged_objects(emulator, prefix: str) -> dict[str, bytes]:
    """Every object under gs://bucket/<prefix> in the emulator, by name, with its bytes."""
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{emulator.url}/storage/v1/b/bucket/o?{query}", timeout=10) as r:
        names = [item["name"] for item in json.loads(r.read()).get("items", [])]
    objects = {}
    for name in names:
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(f"{emulator.url}/storage/v1/b/bucket/o/{quoted}?alt=media", timeout=10) as r:
            objects[name] = r.read()
    return objects


def the_job(dataflow: DataflowStandIn, job_name: str, gcs_emulator) -> tuple[dict, dict, dict[str, bytes]]:
    """The one jobs.create request (its path checked), its worker pool, and the objects staged for it by name."""
    created = dataflow.created()
    assert len(created) == 1, dataflow.requests
    path, job = created[0]
    assert path == "/v1b3/projects/proj/locations/us-central2/jobs"
    assert job["name"] == job_name and job["type"] in (1, "JOB_TYPE_BATCH")
    assert ("GET", f"/v1b3/projects/proj/locations/us-central2/jobs/{DataflowStandIn.JOB_ID}", None) in dataflow.requests
    (pool,) = job["environment"]["workerPools"]
    options = job["environment"]["sdkPipelineOptions"]["options"]
    assert (options["project"], options["region"], options["job_name"]) == ("proj", "us-central2", job_name)
    assert (pool["machineType"], pool["numWorkers"], pool["autoscalingSettings"]["maxNumWorkers"]) == (
        "n2-highmem-16", 3, 1000)

    # Staging: one directory per submission under temp_location, holding the pipeline and the packages.
    staging = options["staging_location"]
    assert staging.startswith(f"gs://bucket/dataflow-tmp/{job_name}.")
    prefix = staging.removeprefix("gs://bucket/") + "/"
    objects = {name.removeprefix(prefix): data for name, data in staged_objects(gcs_emulator, prefix).items()}
    packages = {p["name"]: p["location"] for p in pool.get("packages", [])}
    assert all(loc == f"storage.googleapis.com/bucket/{prefix}{name}" for name, loc in packages.items())
    assert set(objects) == {"pipeline.pb", *packages}

    # The staged pipeline is palm's data stage, exactly the one the job names.
    assert options["pipelineUrl"] == f"{staging}/pipeline.pb"
    assert options["pipelineProtoHash"] == hashlib.sha256(objects["pipeline.pb"]).hexdigest()
    proto = beam_runner_api_pb2.Pipeline.FromString(objects["pipeline.pb"])
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {"Decode", "ExactDedup", "Mixture", "WriteShards", "WriteAccounting"} <= names
    return job, pool, objects


def containers(pool: dict) -> set[str]:
    return {image["containerImage"] for image in pool["sdkHarnessContainerImages"]} | {
        pool["workerHarnessContainerImage"]}


@pytest.mark.slow
def test_a_dataflow_job_runs_the_worker_image_and_stages_no_packages(gcs_emulator, dataflow, offline, tmp_path):
    spec = data_spec()
    assert submit(spec, dataflow, "palm-data-image", tmp_path / "package") == "DONE"
    assert not (tmp_path / "package").exists()  # palm packaged nothing
    job, pool, objects = the_job(dataflow, "palm-data-image", gcs_emulator)

    assert containers(pool) == {IMAGE}  # every SDK harness runs the worker image
    options = job["environment"]["sdkPipelineOptions"]["options"]
    assert (options["sdk_container_image"], options["sdk_location"]) == (IMAGE, "container")
    proto = beam_runner_api_pb2.Pipeline.FromString(objects["pipeline.pb"])
    images = {beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
              for env in proto.components.environments.values() if env.urn == "beam:env:docker:v1"}
    assert images == {IMAGE}
    # Nothing to install on a worker: no wheel, no requirements, no Beam SDK; only Beam's record of the
    # launcher's own packages (`pip freeze`), which workers compare against and never install.
    assert set(objects) - {"pipeline.pb"} <= {"submission_environment_dependencies.txt"}
    assert not [name for name in objects if name.endswith((".whl", ".tar.gz", ".tar", ".zip", "requirements.txt"))]


def tiny_wheel(directory: Path, name: str, version: str) -> Path:
    """A valid pure-Python wheel with one module, for pip to find in a local wheelhouse."""
    dist = name.replace("-", "_")
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    files = {f"{dist}/__init__.py": f"VERSION = {version!r}\n",
             f"{dist}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n"}
    record = "".join(f"{n},,\n" for n in files) + f"{dist}-{version}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for n, text in {**files, f"{dist}-{version}.dist-info/RECORD": record}.items():
            zf.writestr(n, text)
    return path


@pytest.mark.slow
def test_packaging_wheel_stages_palms_wheel_and_the_requirements_pip_downloaded(
        gcs_emulator, dataflow, offline, tmp_path, monkeypatch):
    """The explicit wheel option from a uv environment: Beam's stager runs `python -m pip download` for
    each requirement (pip comes with the dataflow group), here from a local wheelhouse instead of PyPI."""
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    wanted = {tiny_wheel(wheelhouse, "palm-test-alpha", "1.0").name, tiny_wheel(wheelhouse, "palm-test-beta", "2.1").name}
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("palm-test-alpha==1.0\npalm-test-beta==2.1\n")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds them in the wheelhouse (--find-links), never on an index
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")

    spec = data_spec(packaging="wheel", requirements_file=str(requirements))
    assert submit(spec, dataflow, "palm-data-wheel", tmp_path / "package", requirements_cache=str(wheelhouse)) == "DONE"
    job, pool, objects = the_job(dataflow, "palm-data-wheel", gcs_emulator)

    # Dataflow's own Beam image for this Python and Beam, palm installed on it at start-up.
    (image,) = containers(pool)
    assert image != IMAGE and image.endswith(f"/beam_python{sys.version_info.major}.{sys.version_info.minor}_sdk:"
                                             f"{beam.__version__}")
    assert "sdk_container_image" not in job["environment"]["sdkPipelineOptions"]["options"]
    own = build_wheel(tmp_path / "wheel")
    assert objects[own.name] == own.read_bytes() == (tmp_path / "package" / own.name).read_bytes()  # this checkout's
    assert objects["requirements.txt"] == requirements.read_bytes()
    assert wanted <= set(objects)  # what pip downloaded, for the workers to install without an index
    for name in wanted:
        assert objects[name] == (wheelhouse / name).read_bytes()
    assert objects["extra_packages.txt"].decode().split() == [own.name]


def test_submitting_without_the_dataflow_group_says_what_to_install(monkeypatch, offline):
    spec = data_spec(packaging="wheel")
    monkeypatch.setitem(sys.modules, "pip", None)  # as in a uv environment without the dataflow group
    with pytest.raises(PalmError, match=r"needs pip .* run `uv sync --frozen --group dataflow`"):
        run_data_stage(spec, "gs://bucket/corpus", worker_image=IMAGE)
    monkeypatch.setitem(sys.modules, "apache_beam.runners.dataflow.internal.apiclient", None)
    with pytest.raises(PalmError, match=r"needs Beam's gcp extra \(apache-beam\[gcp\]\) and pip"):
        run_data_stage(spec, "gs://bucket/corpus", worker_image=IMAGE)
    # With the image nothing is pip-installed, so only the gcp extra is needed.
    with pytest.raises(PalmError, match=r"needs Beam's gcp extra \(apache-beam\[gcp\]\) in this environment"):
        run_data_stage(data_spec(), "gs://bucket/corpus", worker_image=IMAGE)
