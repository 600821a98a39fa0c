"""Packaging palm-pipeline for remote Beam workers: the wheel, requirements.txt from uv.lock, the options."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest

from palm.cli import main
from palm.data.beam import pipeline_options
from palm.data.package import build_worker_package
from palm.spec.schema import DataSpec
from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
WHEEL_NAME = f"palm_pipeline-{PYPROJECT['version']}-py3-none-any.whl"
DIST_INFO = f"palm_pipeline-{PYPROJECT['version']}.dist-info"
# The dev and bench groups' own packages: none belongs on a worker.
NOT_ON_WORKERS = {"pytest", "pytest-timeout", "pytest-xdist", "hypothesis", "gcp-storage-emulator", "tensorboard",
                  "datatrove", "spacy", "tokenizers", "palm-pipeline", "pip"}
DATAFLOW = {"runner": "dataflow", "project": "proj", "region": "us-central2", "temp_location": "gs://bucket/tmp",
            "machine_type": "n2-highmem-16", "num_workers": 10, "max_num_workers": 1000, "packaging": "wheel"}


def data_spec(**beam) -> DataSpec:
    return DataSpec.model_validate({
        "sources": [{"name": "planted", "format": "builtin", "paths": ["synthetic-planted"], "weight": 1.0}],
        "validation_fraction": 0.0, "num_shards": 2, "beam": beam})


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> dict:
    return build_worker_package(tmp_path_factory.mktemp("package"))


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_the_wheel_is_valid(package):
    wheel = Path(package["wheel"])
    assert wheel.name == WHEEL_NAME and wheel.parent == Path(package["requirements"]).parent
    with zipfile.ZipFile(wheel) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        contents = {name: zf.read(name) for name in names}
    assert len(names) == len(set(names))

    # RECORD: every file once, with its urlsafe-base64 sha256 (no padding) and size; its own line bare.
    rows = list(csv.reader(io.StringIO(contents[f"{DIST_INFO}/RECORD"].decode())))
    assert sorted(row[0] for row in rows) == sorted(names)
    for path, digest, size in rows:
        if path == f"{DIST_INFO}/RECORD":
            assert (digest, size) == ("", "")
        else:
            assert digest == record_hash(contents[path]) and int(size) == len(contents[path]), path
    assert names[-1] == f"{DIST_INFO}/RECORD"

    meta = Parser().parsestr(contents[f"{DIST_INFO}/METADATA"].decode())
    assert meta["Metadata-Version"] == "2.1"
    assert norm(meta["Name"]) == "palm-pipeline" and meta["Version"] == PYPROJECT["version"]
    assert meta["Requires-Python"] == PYPROJECT["requires-python"]
    assert meta.get_all("Requires-Dist") == PYPROJECT["dependencies"]
    wheel_meta = Parser().parsestr(contents[f"{DIST_INFO}/WHEEL"].decode())
    assert wheel_meta["Wheel-Version"] == "1.0" and wheel_meta["Root-Is-Purelib"] == "true"
    assert wheel_meta.get_all("Tag") == ["py3-none-any"] and wheel_meta["Generator"]
    assert "palm = palm.cli:run" in contents[f"{DIST_INFO}/entry_points.txt"].decode()

    # Exactly the source files of palm, tasks and flows, byte for byte; no bytecode.
    source = sorted(p.relative_to(ROOT).as_posix() for package_dir in ("palm", "tasks", "flows")
                    for p in (ROOT / package_dir).rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"))
    packaged = sorted(n for n in names if not n.startswith(DIST_INFO))
    assert packaged == source
    assert all(contents[n] == (ROOT / n).read_bytes() for n in packaged)
    assert {"palm/data/pipeline.py", "palm/data/filters.py", "tasks/__init__.py", "flows/pretrain.py"} <= set(names)


def test_the_same_source_gives_a_byte_identical_wheel(package, tmp_path):
    again = build_worker_package(tmp_path, requirements=False)
    assert again["requirements"] is None and not (tmp_path / "requirements.txt").exists()
    assert Path(again["wheel"]).read_bytes() == Path(package["wheel"]).read_bytes()
    with zipfile.ZipFile(again["wheel"]) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    files = [n for n in names if not n.startswith(DIST_INFO)]
    assert names[:len(files)] == files == sorted(files)  # sorted, the .dist-info last
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}


def test_the_wheel_installs_and_imports_outside_the_checkout(package, tmp_path):
    uv = os.environ.get("UV") or shutil.which("uv")
    target, elsewhere = tmp_path / "site", tmp_path / "cwd"
    elsewhere.mkdir()
    # A --no-deps install of a local wheel needs no index: --offline proves it.
    out = subprocess.run([uv, "pip", "install", "--offline", "--no-deps", "--python", sys.executable,
                          "--target", str(target), package["wheel"]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    code = ("import importlib.metadata as m, palm, palm.data.filters, palm.data.minhash, tasks, flows; "
            "print(palm.__file__); print(m.version('palm-pipeline'))")
    # The venv's interpreter: its site-packages supply the dependencies; PYTHONPATH comes first, so
    # `palm` is the installed wheel, not this checkout (the venv's editable install).
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    palm_file, version = out.stdout.split()
    assert Path(palm_file).resolve().is_relative_to(target.resolve())
    assert version == PYPROJECT["version"]


def test_requirements_pin_the_lock_without_dev_packages(package):
    from packaging.markers import Marker

    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked: dict[str, set[str]] = {}
    for entry in lock["package"]:
        locked.setdefault(norm(entry["name"]), set()).add(entry["version"])
    root = next(p for p in lock["package"] if norm(p["name"]) == "palm-pipeline")

    pins: dict[str, list[tuple[str, str | None]]] = {}
    for line in Path(package["requirements"]).read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        requirement, _, marker = line.partition(";")
        name, sep, version = requirement.strip().partition("==")
        assert sep and version, f"not pinned: {line!r}"
        pins.setdefault(norm(name), []).append((version.strip(), marker.strip() or None))

    for name, versions in pins.items():
        assert {v for v, _ in versions} <= locked.get(name, set()), name
    assert not NOT_ON_WORKERS & set(pins)
    assert {norm(d["name"]) for d in root["dependencies"]} <= set(pins)  # every runtime dependency, pinned
    # Beam's gcp extra (the dataflow group): the workers' Cloud Storage IO, at the launcher's versions.
    for name in ("apache-beam", "jax", "jaxlib", "grain", "flax", "numpy", "sentencepiece", "array-record",
                 "google-cloud-storage", "google-apitools", "google-cloud-dataflow-client"):
        assert name in pins, name
        # The pin that applies to this interpreter is what the launcher has installed.
        applying = [v for v, marker in pins[name] if marker is None or Marker(marker).evaluate()]
        assert applying == [metadata.version(name)], name


def test_cluster_runners_package_themselves(tmp_path):
    opts = pipeline_options(data_spec(**DATAFLOW), package_dir=tmp_path).get_all_options(drop_default=True)
    assert opts["runner"] == "DataflowRunner" and opts["save_main_session"] is False
    assert opts["extra_packages"] == [str(tmp_path / WHEEL_NAME)]
    assert opts["requirements_file"] == str(tmp_path / "requirements.txt")
    assert zipfile.is_zipfile(tmp_path / WHEEL_NAME) and "apache-beam==" in (tmp_path / "requirements.txt").read_text()
    assert "sdk_container_image" not in opts

    # Without package_dir, a fresh temporary directory each time.
    opts = pipeline_options(data_spec(runner="spark", master_url="spark://m:7077", packaging="wheel")).get_all_options(
        drop_default=True)
    staged = Path(opts["extra_packages"][0])
    try:
        assert staged.name == WHEEL_NAME and staged.is_file()
        assert Path(opts["requirements_file"]) == staged.parent / "requirements.txt"
    finally:
        shutil.rmtree(staged.parent)


def test_explicit_packaging_in_the_spec_wins(tmp_path):
    image = tmp_path / "image"
    opts = pipeline_options(data_spec(**{**DATAFLOW, "packaging": "image"}, sdk_container_image="gcr.io/p/palm:1"),
                            package_dir=image).get_all_options(drop_default=True)
    assert opts["sdk_container_image"] == "gcr.io/p/palm:1"
    assert "extra_packages" not in opts and "requirements_file" not in opts and not image.exists()

    flink = pipeline_options(data_spec(runner="flink", master_url="localhost:8081", sdk_container_image="img:1"),
                             package_dir=image).get_all_options(drop_default=True)
    assert flink["environment_type"] == "DOCKER" and "extra_packages" not in flink and not image.exists()

    # packaging: wheel on a base image of the user's own: the image, and palm installed on it at start-up.
    based = tmp_path / "based"
    opts = pipeline_options(data_spec(**DATAFLOW, sdk_container_image="gcr.io/p/base:1"),
                            package_dir=based).get_all_options(drop_default=True)
    assert opts["sdk_container_image"] == "gcr.io/p/base:1" and "sdk_location" not in opts
    assert opts["extra_packages"] == [str(based / WHEEL_NAME)] and opts["requirements_file"] == str(
        based / "requirements.txt")

    wheels = tmp_path / "wheels"
    opts = pipeline_options(data_spec(**DATAFLOW, extra_packages=["dist/x.whl"]),
                            package_dir=wheels).get_all_options(drop_default=True)
    assert opts["extra_packages"] == ["dist/x.whl"] and "requirements_file" not in opts and not wheels.exists()

    # A requirements file of the user's own: the wheel is still built, no requirements exported.
    reqs = tmp_path / "reqs"
    opts = pipeline_options(data_spec(**DATAFLOW, requirements_file="my-requirements.txt"),
                            package_dir=reqs).get_all_options(drop_default=True)
    assert opts["extra_packages"] == [str(reqs / WHEEL_NAME)] and opts["requirements_file"] == "my-requirements.txt"
    assert sorted(p.name for p in reqs.iterdir()) == [WHEEL_NAME]


def test_palm_data_package(capsys, tmp_path):
    rc = main(["data", "package", "--out", str(tmp_path / "out"), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    out_dir = tmp_path / "out"
    assert result == {"wheel": str(out_dir / WHEEL_NAME), "requirements": str(out_dir / "requirements.txt")}
    assert all(Path(p).is_file() for p in result.values())

    rc = main(["data", "package", "--out", str(tmp_path / "text")])
    assert rc == 0 and f"wheel: {tmp_path / 'text' / WHEEL_NAME}" in capsys.readouterr().out


def test_packaging_without_uv_names_what_to_install(capsys, tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.delenv("UV", raising=False)
    monkeypatch.setenv("PATH", str(empty))
    rc = main(["data", "package", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "needs uv on PATH" in err and "install" in err and "Traceback" not in err
