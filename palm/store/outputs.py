"""Content-addressed stage outputs: a stage's directory is named by the hash of what determines it.

key = hash(stage name, the stage's config, its inputs' keys, the code version). `manifest.json` marks
an output complete and is always written last, so nothing half-written is ever picked up; a stage
whose output exists with a complete manifest is not run again (unless forced).

Under a local root a stage builds in a private temporary directory renamed into place at the end.
Under a gs:// root (which cannot rename) it builds in a local scratch directory that is then uploaded,
manifest last (`palm.base.storage.upload_dir`); consumers that need local files take `StageOutput.local()`,
a copy in the local cache. A resumable stage (training) and a stage whose builder writes remotely
itself build in their final directory, local or remote, and write the manifest there last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import palm
from palm.base import storage
from palm.base.errors import PalmError
from palm.store import layout
from palm.store.layout import CONTEXT, MANIFEST


@dataclasses.dataclass(frozen=True)
class StageOutput:
    stage: str  # the stage type
    key: str
    path: str  # a local directory or gs://…
    manifest: dict[str, Any]
    cached: bool
    #: The workflow node that produced it (palm.dag.workflow); "" for a node named after its stage type.
    node: str = ""

    @property
    def name(self) -> str:
        """The node's name."""
        return self.node or self.stage

    def local(self) -> Path:
        """A local directory with this output's files: the output itself, or its copy in the local cache."""
        return local_copy(self.path, self.manifest)


def code_version(stage: str, version: int = 1) -> str:
    """`version` is the stage type's, bumped when its output's format or meaning changes (palm.dag.table.STAGES)."""
    return f"palm-{palm.__version__}/{stage}-v{version}"


def stage_key(stage: str, config: Any, inputs: dict[str, StageOutput], version: int = 1) -> str:
    """Hash of the stage's config, its inputs' keys and the code version."""
    blob = json.dumps({"stage": stage, "config": config, "code": code_version(stage, version),
                       "inputs": {name: out.key for name, out in sorted(inputs.items())}},
                      sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a complete stage output (local or gs://), or None when absent, unreadable or incomplete."""
    try:
        manifest = json.loads(storage.read_text(storage.join(path, MANIFEST)))
    except FileNotFoundError:
        return None
    except OSError:
        if storage.is_remote(path):  # the network, not the output: never mistake it for a missing output
            raise
        return None
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("complete") is True else None


def _same_build(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two manifests describe the same build of an output (a forced re-run is a new build)."""
    if a is None or b is None:
        return False
    return (a.get("key"), a.get("started_at")) == (b.get("key"), b.get("started_at"))


def local_copy(path: str | os.PathLike, manifest: dict[str, Any] | None = None) -> Path:
    """A complete stage output as a local directory: a local output itself; a gs:// one downloaded once.

    The copy lives at `palm.base.storage.cache_path(path)` and is reused while its manifest is the remote
    one's (`manifest`, when the caller has it already); it is replaced when the remote output was
    rebuilt, and appears complete or not at all.
    """
    if not storage.is_remote(path):
        return Path(path)
    path = str(path).rstrip("/")
    remote = manifest if manifest is not None else read_manifest(path)
    if remote is None:
        raise PalmError(f"{path} is not a complete stage output (no complete {MANIFEST}); run its stage first")
    dest = storage.cache_path(path)
    if _same_build(_read_local_manifest(dest), remote):
        return dest
    storage.download_dir(path, dest, first=MANIFEST)
    if not _same_build(_read_local_manifest(dest), remote):
        raise PalmError(f"{path} changed while it was being copied to {dest} (a forced re-run?); try again")
    return dest


def _read_local_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class _Build:
    """What names one build: the stage type and its version, the node, the key, the config, the inputs."""

    stage: str
    version: int
    node: str
    key: str
    config: Any
    inputs: dict[str, StageOutput]

    def output(self, path: str, manifest: dict[str, Any], cached: bool) -> StageOutput:
        return StageOutput(self.stage, self.key, path, manifest, cached, "" if self.node == self.stage else self.node)


def _manifest(b: _Build, started: float, fields: dict[str, Any]) -> dict[str, Any]:
    stage, key, config, inputs = b.stage, b.key, b.config, b.inputs
    return {
        "stage": stage,
        "node": b.node,
        "key": key,
        "code_version": code_version(stage, b.version),
        "config": config,
        "inputs": {name: {"key": out.key, "path": out.path} for name, out in sorted(inputs.items())},
        "started_at": started,
        "seconds": time.time() - started,
        **fields,
        "complete": True,
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _relocated(value: Any, old: str, new: str) -> Any:
    """`value` with every string path under the build directory `old` moved to the final directory `new`."""
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new + value[len(old):]
    if isinstance(value, dict):
        return {k: _relocated(v, old, new) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relocated(v, old, new) for v in value]
    return value


def _write_context(final: str, b: _Build) -> None:
    # What produced this directory, readable while the stage is still running (e.g. by evaluation of
    # its checkpoints).
    storage.write_text_atomic(storage.join(final, CONTEXT), _dumps(
        {"stage": b.stage, "node": b.node, "key": b.key, "config": b.config,
         "inputs": {name: {"key": out.key, "path": out.path} for name, out in sorted(b.inputs.items())}}))


def output_path(root: str | os.PathLike, node: str, key: str) -> str:
    """Where a node's output with this key lives: <root>/<node>/<key>."""
    return layout.output_dir(root, node, key)


def run_stage(stage: str, config: Any, inputs: dict[str, StageOutput], root: str | os.PathLike,
              build: Callable[[Any], dict[str, Any]], force: bool = False, resumable: bool = False,
              in_place: bool = False, node: str | None = None, version: int = 1) -> StageOutput:
    """Return the output of a stage (of type `stage`, as workflow node `node`, by default the type's own
    name), building it with `build(dir) -> manifest fields` if needed.

    `dir` is a local `Path`, except for a resumable or `in_place` stage under a gs:// root, whose
    builder gets the final gs:// directory as a string and writes there itself.

    A resumable stage (training) builds in its final directory, so what it leaves there (checkpoints)
    survives a crash and the next attempt continues from it; its manifest, written last and atomically,
    still marks it complete. Other stages build in a private directory renamed into place (local root)
    or uploaded, manifest last (gs:// root), at the end.
    """
    b = _Build(stage, version, node or stage, stage_key(stage, config, inputs, version), config, inputs)
    final = output_path(root, b.node, b.key)
    if not force:
        manifest = read_manifest(final)
        if manifest is not None:
            return b.output(final, manifest, cached=True)
    if storage.is_remote(final):
        if resumable or in_place:
            return _build_in_place(b, final, build, force, resumable)
        return _build_and_upload(b, final, build)
    if resumable:
        return _build_in_place(b, final, build, force, resumable)

    final_dir = Path(final)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final_dir.parent, b.key)
    tmp = final_dir.parent / f".tmp-{b.key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    started = time.time()
    try:
        fields = _relocated(build(tmp), str(tmp), final)
        manifest = _manifest(b, started, fields)
        (tmp / MANIFEST).write_text(_dumps(manifest))
        if final_dir.exists():  # a forced re-run, or an incomplete leftover without a manifest
            stale = final_dir.parent / f".stale-{b.key}-{uuid.uuid4().hex[:8]}"
            final_dir.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return b.output(final, manifest, cached=False)


def remove_leftovers(parent: Path, key: str) -> list[str]:
    """Remove what killed builds of this output left behind (`.tmp-<key>-*`, `.stale-<key>-*`). Safe
    because the run directory's lock (palm/store/runlock.py) admits one run: no live build owns them."""
    removed = []
    for leftover in [*parent.glob(f".tmp-{key}-*"), *parent.glob(f".stale-{key}-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover.name)
    return removed


def _build_in_place(b: _Build, final: str, build: Callable[[Any], dict[str, Any]], force: bool,
                    resumable: bool) -> StageOutput:
    """Build in the final directory (local or gs://); the manifest, written last, marks it complete."""
    if force:
        storage.remove_tree(final)
    if not storage.is_remote(final):
        Path(final).mkdir(parents=True, exist_ok=True)
    storage.remove(storage.join(final, MANIFEST))
    if resumable:
        _write_context(final, b)
    started = time.time()
    out = final if storage.is_remote(final) else Path(final)
    manifest = _manifest(b, started, build(out))
    storage.write_text_atomic(storage.join(final, MANIFEST), _dumps(manifest))
    return b.output(final, manifest, cached=False)


def _build_and_upload(b: _Build, final: str, build: Callable[[Any], dict[str, Any]]) -> StageOutput:
    """Build in a local scratch directory, then upload it to the gs:// `final`, manifest last."""
    tmp = storage.scratch_dir(f"{b.node}-{b.key}-")
    try:
        started = time.time()
        fields = _relocated(build(tmp), str(tmp), final)
        manifest = _manifest(b, started, fields)
        (tmp / MANIFEST).write_text(_dumps(manifest))
        storage.upload_dir(tmp, final, last=MANIFEST)
        _keep_as_local_copy(tmp, final)  # the next stage reads it from there instead of downloading it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return b.output(final, manifest, cached=False)


def _keep_as_local_copy(built: Path, final: str) -> None:
    storage.install_dir(built, storage.cache_path(final))
