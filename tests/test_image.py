"""The worker image: infra/Dockerfile built from the lock, and `palm image` (dry run, and for real through
a fake docker on PATH; no Docker engine runs here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from palm import version_info
from palm.cli import main
from tests.conftest import ROOT, SPECS

S540 = str(SPECS / "palm-540b.yaml")
IMAGE = "us-docker.pkg.dev/my-gcp-project/palm/palm-pipeline:latest"


def test_the_dockerfile_installs_the_locked_environment_with_the_tpu_runtime_and_every_package():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    syncs = re.findall(r"^RUN uv sync (.*)$", text, re.M)
    assert syncs and all("--frozen" in s and "--group tpu" in s and "--group dataflow" in s
                         and "--no-default-groups" in s for s in syncs)
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    copied = re.findall(r"^COPY (\S+) ", text, re.M)
    assert set(packages) <= set(copied) and "specs" in copied  # the workers read specs from the image
    assert "pyproject.toml" in text and "uv.lock" in text
    pinned = re.search(r"uv==([0-9.]+)", (ROOT / ".ci" / "run").read_text()).group(1)
    assert f"uv=={pinned}" in text  # the same uv as the README's commands
    assert "ENV PATH=/palm/.venv/bin:$PATH" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)
    config = yaml.safe_load((ROOT / "infra" / "cloudbuild.yaml").read_text())
    assert config["steps"][0]["args"][:5] == ["build", "--platform", "linux/amd64", "--file", "infra/Dockerfile"] and config["images"] == ["${_IMAGE}"]


COMMIT = version_info()["commit"]


def test_image_dry_run_prints_docker_or_cloud_build(capsys):
    assert len(COMMIT) == 40  # the tests run from a git checkout
    assert main(["image", S540, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines == ["gcloud auth configure-docker us-docker.pkg.dev --quiet",
                     f"docker build --platform=linux/amd64 --file=infra/Dockerfile --tag={IMAGE} --build-arg=PALM_COMMIT={COMMIT} .",
                     f"docker push {IMAGE}"]
    assert main(["image", S540, "--dry-run", "--cloud-build"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"gcloud builds submit --project=my-gcp-project --config=infra/cloudbuild.yaml --substitutions=_IMAGE={IMAGE},_PALM_COMMIT={COMMIT} ."]


def test_image_without_a_name_is_bad_input(capsys):
    assert main(["image", str(SPECS / "tiny.yaml"), "--dry-run"]) == 2
    assert "infra.launcher.image" in capsys.readouterr().err


def test_image_runs_the_commands_from_the_repository_root(capsys, tmp_path, monkeypatch):
    log = tmp_path / "calls.jsonl"
    for tool in ("docker", "gcloud"):
        fake = tmp_path / tool
        fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"open({str(log)!r}, 'a').write(json.dumps([os.path.basename(sys.argv[0]), sys.argv[1:], "
                        "os.getcwd()]) + '\\n')\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert main(["image", S540]) == 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["gcloud", "docker", "docker"]
    assert calls[1][1] == ["build", "--platform=linux/amd64", "--file=infra/Dockerfile", f"--tag={IMAGE}", f"--build-arg=PALM_COMMIT={COMMIT}", "."]
    assert calls[2][1] == ["push", IMAGE]
    assert {Path(c[2]) for c in calls} == {ROOT}
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert main(["image", S540]) == 2
    assert "command not found" in capsys.readouterr().err


def test_the_image_is_a_beam_sdk_container_at_the_locked_versions():
    """Dataflow runs the worker image as its SDK harness container: Beam's boot program from the Beam SDK
    image of the lock's apache-beam and the image's Python, run with the locked environment."""
    text = (ROOT / "infra" / "Dockerfile").read_text()
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    beam = next(p["version"] for p in lock["package"] if p["name"] == "apache-beam")
    python = re.search(r"^FROM python:(\d+\.\d+)-slim$", text, re.M).group(1)
    assert re.findall(r"^COPY --from=(\S+) (\S+) (\S+)$", text, re.M) == [
        (f"apache/beam_python{python}_sdk:{beam}", "/opt/apache/beam", "/opt/apache/beam")]
    dataflow = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]["dataflow"]
    assert f"apache-beam[gcp]=={beam}" in dataflow  # the launcher submits with the same Beam
    # Beam's boot would run the SDK worker in a fresh virtual environment, without the locked packages.
    assert "ENV RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1" in text.splitlines()
    assert re.findall(r"^ENTRYPOINT (.*)$", text, re.M) == ['["/palm/infra/entrypoint.sh"]']
    assert re.findall(r"^CMD (.*)$", text, re.M) == ['["palm", "--help"]']
    staged = subprocess.run(["git", "ls-files", "--stage", "infra/entrypoint.sh"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    assert staged.startswith("100755 "), staged  # executable in the build context, on every checkout


def test_the_entrypoint_hands_runner_flags_to_beam_boot_and_runs_commands(tmp_path):
    """A runner starts the container with flags only; TPU VMs (`docker run IMAGE palm worker …`) with a command."""
    calls = tmp_path / "boot.calls"
    boot = tmp_path / "boot"
    boot.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    boot.chmod(0o755)
    script = (ROOT / "infra" / "entrypoint.sh").read_text()
    assert script.count("/opt/apache/beam/boot") == 1
    entrypoint = tmp_path / "entrypoint.sh"
    entrypoint.write_text(script.replace("/opt/apache/beam/boot", str(boot)))
    flags = ["--id=1-1", "--logging_endpoint=localhost:1", "--artifact_endpoint=localhost:2",
             "--provision_endpoint=localhost:3", "--control_endpoint=localhost:4"]
    assert subprocess.run(["sh", str(entrypoint), *flags]).returncode == 0
    assert calls.read_text().splitlines() == [" ".join(flags)]
    ran = subprocess.run(["sh", str(entrypoint), sys.executable, "-c", "import sys; print(sys.argv[1:])", "a b"],
                         capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout == "['a b']\n" and calls.read_text().count("\n") == 1
    assert subprocess.run(["sh", str(entrypoint), "sh", "-c", "exit 3"]).returncode == 3  # the command's own status
