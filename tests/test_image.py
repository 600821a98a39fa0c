"""The worker image: infra/Dockerfile built from the lock, and `palm image` (dry run, and for real through
a fake docker on PATH; no Docker engine runs here)."""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib
from pathlib import Path

import yaml

from palm.cli import main
from tests.conftest import ROOT, SPECS

S540 = str(SPECS / "palm-540b.yaml")
IMAGE = "us-docker.pkg.dev/my-gcp-project/palm/palm-pipeline:latest"


def test_the_dockerfile_installs_the_locked_environment_with_the_tpu_runtime_and_every_package():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    syncs = re.findall(r"^RUN uv sync (.*)$", text, re.M)
    assert syncs and all("--frozen" in s and "--group tpu" in s and "--no-default-groups" in s for s in syncs)
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
    assert config["steps"][0]["args"][:3] == ["build", "--file", "infra/Dockerfile"] and config["images"] == ["${_IMAGE}"]


def test_image_dry_run_prints_docker_or_cloud_build(capsys):
    assert main(["image", S540, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines == ["gcloud auth configure-docker us-docker.pkg.dev --quiet",
                     f"docker build --file=infra/Dockerfile --tag={IMAGE} .", f"docker push {IMAGE}"]
    assert main(["image", S540, "--dry-run", "--cloud-build"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"gcloud builds submit --project=my-gcp-project --config=infra/cloudbuild.yaml --substitutions=_IMAGE={IMAGE} ."]


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
    assert calls[1][1] == ["build", "--file=infra/Dockerfile", f"--tag={IMAGE}", "."] and calls[2][1] == ["push", IMAGE]
    assert {Path(c[2]) for c in calls} == {ROOT}
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert main(["image", S540]) == 2
    assert "command not found" in capsys.readouterr().err
