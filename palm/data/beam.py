"""Running Beam pipelines (the data and pack stages) on the spec's runner.

`run_beam` runs a pipeline on `data.beam.runner` (a local one pinned to the in-process FnApiRunner) with
`pipeline_options`, which for a cluster runner also say how its workers get palm (a container image, or a
wheel built by palm/data/package.py). Errors raised in a worker come back as the user's PalmError (a
`FAIL`-marked message) or as one EnvironmentFault. `stable_unit` is the stages' deterministic hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from palm.base.errors import PalmError, environment_fault
from palm.data.package import build_worker_package
from palm.spec.schema import LOCAL_RUNNERS, DataSpec

#: A worker's error message that starts with this is the user's error: run_beam raises it as a PalmError.
FAIL = "palm-data-error: "
#: The tag of a transform's output of dropped documents, (source, drop reason): the data stage counts them.
DROPPED = "dropped"


def stable_unit(*parts: str) -> float:
    """A deterministic number in [0, 1) from strings (same on every machine and process)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


#: The runners on this machine (no remote workers, local paths allowed).


def pipeline_options(spec: DataSpec, job_name: str = "palm-data", package_dir: str | Path | None = None,
                     worker_image: str | None = None, placement: dict[str, str] | None = None) -> PipelineOptions:
    """Beam options for the spec's runner.

    Locally the in-process FnApiRunner is pinned (plain DirectRunner may try Prism, which downloads a
    binary). On Dataflow, Flink or Spark the workers need palm-pipeline itself, as `data.beam.packaging`
    says:

    - "image" (the default): the workers run an SDK container image with palm and its locked environment
      installed: `data.beam.sdk_container_image`, or else `worker_image` (the spec's `infra.launcher.image`,
      which `palm image` builds from infra/Dockerfile). Nothing is staged for the workers or installed when
      one starts; the Beam SDK comes from the image too (`sdk_location=container`).
    - "wheel": wheels in `data.beam.extra_packages` plus a requirements file, staged with the job and
      pip-installed on every worker at start-up. Without extra packages palm packages itself here
      (palm/data/package.py): the project's wheel and requirements.txt exported from uv.lock, written to
      `package_dir` (default: a fresh temporary directory, which Beam stages when the job is submitted);
      a `data.beam.requirements_file` in the spec is used instead of the exported one.

    `placement` (Dataflow: the spec's `infra.dataflow_options(data.beam)`) sets the region, temp and
    staging locations and the workers' service account (`service_account_email`) over data.beam's.

    See infra/dataflow.md.
    """
    b = spec.beam
    if b.runner == "in_process":
        return PipelineOptions(flags=[], direct_running_mode="in_memory", direct_num_workers=1)
    if b.runner == "multi_process":
        return PipelineOptions(flags=[], direct_running_mode="multi_processing", direct_num_workers=b.num_workers)
    packaging: dict[str, Any] = {"save_main_session": False}
    if b.packaging == "image":
        image = b.sdk_container_image or worker_image
        if not image:
            raise PalmError(f"data.beam.sdk_container_image: the {b.runner} workers run palm from a container image; "
                            "set infra.launcher.image (the image `palm image` builds) or data.beam.sdk_container_image, "
                            "or set data.beam.packaging: wheel")
        if b.extra_packages or b.requirements_file:
            raise PalmError("data.beam.extra_packages and data.beam.requirements_file are staged only with "
                            "data.beam.packaging: wheel; remove them or set data.beam.packaging: wheel")
        packaging.update(sdk_container_image=image, sdk_location="container")
    else:
        extra_packages, requirements_file = list(b.extra_packages), b.requirements_file
        if not extra_packages:
            out = package_dir if package_dir is not None else tempfile.mkdtemp(prefix="palm-worker-package-")
            built = build_worker_package(out, requirements=requirements_file is None)
            extra_packages = [built["wheel"]]
            requirements_file = requirements_file or built["requirements"]
        packaging["extra_packages"] = extra_packages
        if requirements_file:
            packaging["requirements_file"] = requirements_file
        if b.sdk_container_image:  # a base image of the user's own, palm installed on it at start-up
            packaging["sdk_container_image"] = b.sdk_container_image
    if b.runner == "dataflow":
        cloud = {"runner": "DataflowRunner", "project": b.project, "region": b.region,
                 "temp_location": b.temp_location, "job_name": job_name, "num_workers": b.num_workers}
        if b.machine_type:
            cloud["machine_type"] = b.machine_type
        if b.max_num_workers:
            cloud["max_num_workers"] = b.max_num_workers
            cloud["autoscaling_algorithm"] = "THROUGHPUT_BASED"
        cloud.update(placement or {})
        return PipelineOptions(flags=[], **cloud, **packaging)
    environment = "DOCKER" if "sdk_container_image" in packaging else "LOOPBACK"
    if b.runner == "flink":
        return PipelineOptions(flags=[], runner="FlinkRunner", flink_master=b.master_url, environment_type=environment,
                               **packaging)
    return PipelineOptions(flags=[], runner="SparkRunner", spark_master_url=b.master_url,
                           environment_type=environment, **packaging)


def check_submission_environment(spec: DataSpec) -> None:
    """PalmError naming what to install when this environment cannot submit the spec's Dataflow job.

    DataflowRunner needs Beam's gcp extra (the Dataflow API client, Cloud Storage staging); with
    packaging: wheel and a requirements file, Beam's stager also runs `python -m pip download` for every
    requirement, and a uv environment has no pip of its own. The `dataflow` dependency group holds both.
    """
    b = spec.beam
    if b.runner != "dataflow":
        return
    needed = {"apache_beam.runners.dataflow.internal.apiclient": "Beam's gcp extra (apache-beam[gcp])"}
    if b.packaging == "wheel" and (b.requirements_file or not b.extra_packages):
        needed["pip"] = "pip (Beam's stager downloads the requirements with it)"
    missing = []
    for module, what in needed.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(what)
    if missing:
        raise PalmError(f"submitting a Beam stage (data, pack) to Dataflow needs {' and '.join(missing)} in this environment: "
                        "run `uv sync --frozen --group dataflow` (with the other groups you use)")


def run_beam(spec: DataSpec, build: Any, job_name: str = "palm-data", worker_image: str | None = None,
             placement: dict[str, str] | None = None) -> None:
    """Run `build(pipeline)` on the spec's runner (a local one is pinned to the in-process FnApiRunner);
    a `palm-data-error:` raised in a worker comes back as the user's PalmError.

    `worker_image` is the spec's infra.launcher.image: remote workers run it unless
    data.beam.sdk_container_image names another (see `pipeline_options`). A fault of the machine in a
    worker that names its file (a forbidden path, a directory read as a file) is one EnvironmentFault; one
    that names none (a full disk) is raised as it is, for the stage task to name the run's root."""
    check_submission_environment(spec)
    options = pipeline_options(spec, job_name=job_name, worker_image=worker_image, placement=placement)
    runner = None
    if spec.beam.runner in LOCAL_RUNNERS:
        runner = FnApiRunner()
    try:
        with _quiet_environment_faults(), beam.Pipeline(runner=runner, options=options) as p:
            build(p)
    except Exception as e:  # Beam wraps worker errors; surface ours as the user's error
        message = str(e)
        if FAIL in message:
            raise PalmError(message.split(FAIL, 1)[1].split("\n")[0].rstrip(" '\"[]")) from None
        fault = environment_fault(e)
        if fault is not None and fault.path is not None:
            raise fault from None
        raise


class _DropEnvironmentFaults(logging.Filter):
    """Beam's workers log every failed bundle with its traceback (one per thread or retry of the bundle);
    for a fault of the machine, which run_beam turns into one line, those are noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return environment_fault(error if error is not None else Exception(record.getMessage())) is None


@contextlib.contextmanager
def _quiet_environment_faults() -> Iterator[None]:
    drop = _DropEnvironmentFaults()
    loggers = [logging.getLogger(name) for name in _BEAM_ERROR_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


#: The Beam loggers that report a failed DoFn (in process and in the SDK harness).
_BEAM_ERROR_LOGGERS = ("apache_beam.runners.common", "apache_beam.runners.worker.sdk_worker",
                       "apache_beam.runners.worker.bundle_processor",
                       "apache_beam.runners.portability.fn_api_runner.fn_runner")
