"""Package palm-pipeline for remote Beam workers (Dataflow, Flink, Spark).

The workers must import `palm` (the DoFns live there) with the dependency versions the launcher
runs. `build_worker_package(out_dir)` writes both from this source checkout:

- `palm_pipeline-<version>-py3-none-any.whl`: a pure-Python wheel of the packages `palm`, `tasks`
  and `flows`, built with the standard library only (no build backend, no network). The same source
  gives a byte-identical wheel: entries are sorted and every timestamp is fixed.
- `requirements.txt`: the committed lock (`uv.lock`) exported by `uv export --frozen` without the
  dev and bench groups but with the `dataflow` group (Beam's gcp extra, which the workers' Cloud
  Storage IO needs; not pip itself), so the workers install exactly the versions the launcher was
  tested with.

`palm.data.pipeline.pipeline_options` calls it for a cluster runner whose spec says
`data.beam.packaging: wheel` and names no extra packages; `palm data package --out DIR` runs it by hand.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import shutil
import subprocess
import tomllib
import zipfile
from pathlib import Path
from typing import Any

from palm.base.errors import PalmError

#: The source checkout this module belongs to (pyproject.toml, uv.lock, palm/, tasks/, flows/).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: The packages the wheel holds when pyproject.toml names none ([tool.hatch.build.targets.wheel]).
DEFAULT_PACKAGES = ("palm", "tasks", "flows")
#: Every zip entry gets this timestamp (the earliest a zip can hold), so builds are reproducible.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
GENERATOR = "palm.data.package"
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


def _read_project(root: Path) -> dict[str, Any]:
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or not (root / "palm").is_dir():
        raise PalmError(f"packaging palm-pipeline for the workers needs its source checkout (pyproject.toml and "
                        f"uv.lock next to palm/), not found at {root}; set data.beam.packaging: image, or "
                        f"data.beam.extra_packages")
    with open(pyproject, "rb") as f:
        data = tomllib.load(f)
    project = data.get("project", {})
    if not project.get("name") or not project.get("version"):
        raise PalmError(f"{pyproject}: [project] needs a name and a static version to build the worker wheel")
    return data


def _dist_name(name: str) -> str:
    """The wheel file and .dist-info name of a project name (PEP 427/503): palm-pipeline -> palm_pipeline."""
    return "_".join(part for part in name.replace(".", "-").replace("_", "-").lower().split("-") if part)


def _metadata(project: dict[str, Any]) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {project['name']}", f"Version: {project['version']}"]
    if project.get("description"):
        lines.append(f"Summary: {project['description']}")
    license_ = project.get("license")
    if isinstance(license_, dict) and license_.get("text"):
        lines.append(f"License: {license_['text']}")
    if project.get("requires-python"):
        lines.append(f"Requires-Python: {project['requires-python']}")
    lines += [f"Requires-Dist: {dep}" for dep in project.get("dependencies", [])]
    return "\n".join(lines) + "\n"


def _wheel_file() -> str:
    return f"Wheel-Version: 1.0\nGenerator: {GENERATOR}\nRoot-Is-Purelib: true\nTag: py3-none-any\n"


def _entry_points(project: dict[str, Any]) -> str | None:
    scripts = project.get("scripts") or {}
    if not scripts:
        return None
    return "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(scripts.items())) + "\n"


def _package_files(root: Path, packages: list[str]) -> list[tuple[str, Path]]:
    """(archive name, file) for every file of the packages, sorted; no __pycache__ or bytecode."""
    files = []
    for package in packages:
        base = root / package
        if not (base / "__init__.py").is_file():
            raise PalmError(f"package {package!r} (pyproject.toml) is not a package directory under {root}")
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            for filename in filenames:
                if filename.endswith(_SKIP_SUFFIXES):
                    continue
                path = Path(dirpath) / filename
                if path.is_file():
                    files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _zip_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.create_system = 3  # Unix, so the permission bits below are read
    info.external_attr = (0o100644 & 0xFFFF) << 16  # a regular file, rw-r--r--
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def build_wheel(out_dir: str | Path, root: str | Path = PROJECT_ROOT) -> Path:
    """Write palm-pipeline's pure-Python wheel into out_dir (stdlib only, reproducible); return its path."""
    root = Path(root)
    data = _read_project(root)
    project = data["project"]
    packages = (data.get("tool", {}).get("hatch", {}).get("build", {}).get("targets", {}).get("wheel", {})
                .get("packages")) or list(DEFAULT_PACKAGES)
    dist = _dist_name(project["name"])
    version = str(project["version"])
    dist_info = f"{dist}-{version}.dist-info"

    entries: list[tuple[str, bytes]] = [(name, path.read_bytes()) for name, path in _package_files(root, packages)]
    entries.append((f"{dist_info}/METADATA", _metadata(project).encode()))
    entries.append((f"{dist_info}/WHEEL", _wheel_file().encode()))
    entry_points = _entry_points(project)
    if entry_points:
        entries.append((f"{dist_info}/entry_points.txt", entry_points.encode()))
    record_name = f"{dist_info}/RECORD"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, content in entries:
        writer.writerow([name, _record_hash(content), len(content)])
    writer.writerow([record_name, "", ""])
    entries.append((record_name, record.getvalue().encode()))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"{dist}-{version}-py3-none-any.whl"
    partial = wheel.with_name(wheel.name + ".partial")
    with zipfile.ZipFile(partial, "w") as zf:
        for name, content in entries:
            zf.writestr(_zip_entry(name), content)
    partial.replace(wheel)
    return wheel


def _uv() -> str:
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` sets UV to its own binary
    if not uv or not Path(uv).is_file():
        raise PalmError("exporting the workers' requirements from uv.lock needs uv on PATH: install it "
                        "(https://docs.astral.sh/uv/getting-started/installation/, or `pip install uv`), or set "
                        "data.beam.requirements_file (or data.beam.packaging: image)")
    return uv


def export_requirements(out_dir: str | Path, root: str | Path = PROJECT_ROOT) -> Path:
    """Write requirements.txt for the workers from the committed uv.lock (no dev or bench groups; the
    dataflow group's Beam gcp extra, without pip)."""
    root = Path(root)
    if not (root / "uv.lock").is_file():
        raise PalmError(f"no uv.lock in {root}: the workers' requirements are exported from the committed lock")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "requirements.txt"
    # --no-default-groups, not only --no-dev: `bench` is a default group too (pyproject's [tool.uv]).
    # pip is in the dataflow group for the launcher's stager; the workers' images have their own.
    cmd = [_uv(), "export", "--project", str(root), "--frozen", "--no-default-groups", "--no-dev",
           "--group", "dataflow", "--no-emit-package", "pip", "--no-hashes", "--no-emit-project", "--no-header",
           "--no-annotate", "--output-file", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PalmError(f"`uv export` failed: {e}") from None
    if proc.returncode != 0 or not out.is_file():
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise PalmError(f"`uv export` exited {proc.returncode}: {detail[-1] if detail else 'no output'}")
    return out


def build_worker_package(out_dir: str | Path, *, requirements: bool = True,
                         root: str | Path = PROJECT_ROOT) -> dict[str, Any]:
    """The wheel and (unless requirements=False) requirements.txt for remote Beam workers, in out_dir.

    Returns {"wheel": path, "requirements": path or None}.
    """
    wheel = build_wheel(out_dir, root)
    reqs = export_requirements(out_dir, root) if requirements else None
    return {"wheel": str(wheel), "requirements": str(reqs) if reqs else None}
