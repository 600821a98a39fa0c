"""`palm image`: build and push the worker image (infra/Dockerfile) under the name the spec's launcher uses.

With a Docker engine: `docker build` then `docker push` (after `gcloud auth configure-docker` for an
Artifact Registry host). Without one (`--cloud-build`): `gcloud builds submit`, which builds remotely from
the repository's files. `--dry-run` prints the commands. The image is what `infra.launcher.image` names:
the train stage's workers run it, and so do remote Beam workers (Dataflow's SDK containers) unless
`data.beam.sdk_container_image` names another image; rebuild it whenever the code or the lock changes.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

from palm.base.errors import PalmError, SpecError
from palm import version_info

REPO_ROOT = Path(__file__).resolve().parents[2]  # palm/app/image.py: the repository is two levels up
DOCKERFILE = "infra/Dockerfile"
CLOUD_BUILD = "infra/cloudbuild.yaml"


#: The image's platform: the TPU VMs' and Dataflow workers' (libtpu ships x86-64 wheels only).
PLATFORM = "linux/amd64"


def image_commands(spec: Any, cloud_build: bool = False) -> list[list[str]]:
    """The commands that build and push the spec's worker image, run from the repository's root."""
    image = spec.infra.launcher.image
    if not image:
        raise SpecError("the worker image to build: the container image the launcher runs (e.g. "
                        "us-docker.pkg.dev/PROJECT/palm/palm-pipeline:latest)", key="infra.launcher.image")
    registry = image.split("/", 1)[0]

    commit = version_info()["commit"]  # `palm --version` in the image reports it
    if cloud_build:
        project = [f"--project={spec.infra.launcher.project}"] if spec.infra.launcher.project else []
        return [["gcloud", "builds", "submit", *project, f"--config={CLOUD_BUILD}",
                 f"--substitutions=_IMAGE={image},_PALM_COMMIT={commit}", "."]]
    login = [["gcloud", "auth", "configure-docker", registry, "--quiet"]] if "." in registry and "/" in image else []
    # libtpu has x86-64 wheels only and the TPU VMs and Dataflow workers are x86-64: build for that
    # platform whatever machine builds it (an arm64 laptop included).
    return [*login, ["docker", "build", f"--platform={PLATFORM}", f"--file={DOCKERFILE}", f"--tag={image}", f"--build-arg=PALM_COMMIT={commit}",
                     "."], ["docker", "push", image]]


def render(spec: Any, cloud_build: bool = False) -> str:
    """What `palm image --dry-run` prints: the commands, run from the repository's root."""
    lines = [f"# the worker image {spec.infra.launcher.image}, from {DOCKERFILE}; run from the repository's root"]
    return "\n".join(lines + [shlex.join(c) for c in image_commands(spec, cloud_build)]) + "\n"


def build_image(spec: Any, cloud_build: bool = False, log: Any = print) -> None:
    """Run the commands; PalmError naming what is missing when a tool is not installed, JobFailed-like
    PalmError with the command when one fails."""
    for argv in image_commands(spec, cloud_build):
        log(f"$ {shlex.join(argv)}")
        try:
            done = subprocess.run(argv, cwd=REPO_ROOT)
        except FileNotFoundError:
            hint = "install Docker, or pass --cloud-build" if argv[0] == "docker" else "install the Google Cloud CLI"
            raise PalmError(f"{argv[0]}: command not found on PATH; {hint}") from None
        if done.returncode:
            raise PalmError(f"`{shlex.join(argv)}` failed with exit code {done.returncode}")
