"""Content-addressed stage outputs: a stage's directory is named by the hash of what determines it.

key = hash(stage name, the stage's config, its inputs' keys, the code version). A stage writes into a
private temporary directory; `manifest.json` is written last and the directory is then renamed into
place, so a directory with a complete manifest is a complete output and nothing half-written is ever
picked up. A stage whose output exists with a complete manifest is not run again (unless forced).
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

MANIFEST = "manifest.json"
CONTEXT = "context.json"

#: Bumped when a stage's output format or semantics change, so old outputs are not reused.
STAGE_CODE_VERSION = {"data": 1, "tokenizer": 1, "pack": 1, "train": 1, "eval": 1}


@dataclasses.dataclass(frozen=True)
class StageOutput:
    stage: str
    key: str
    path: str
    manifest: dict[str, Any]
    cached: bool


def code_version(stage: str) -> str:
    return f"palm-{palm.__version__}/{stage}-v{STAGE_CODE_VERSION[stage]}"


def stage_key(stage: str, config: Any, inputs: dict[str, StageOutput]) -> str:
    """Hash of the stage's config, its inputs' keys and the code version."""
    blob = json.dumps({"stage": stage, "config": config, "code": code_version(stage),
                       "inputs": {name: out.key for name, out in sorted(inputs.items())}},
                      sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a complete stage output, or None when absent, unreadable or incomplete."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("complete") is True else None


def _manifest(stage: str, key: str, config: Any, inputs: dict[str, StageOutput], started: float,
              fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "stage": stage,
        "key": key,
        "code_version": code_version(stage),
        "config": config,
        "inputs": {name: {"key": out.key, "path": out.path} for name, out in sorted(inputs.items())},
        "started_at": started,
        "seconds": time.time() - started,
        **fields,
        "complete": True,
    }


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_stage(stage: str, config: Any, inputs: dict[str, StageOutput], root: str | os.PathLike,
              build: Callable[[Path], dict[str, Any]], force: bool = False, resumable: bool = False) -> StageOutput:
    """Return the stage's output, building it with `build(dir) -> manifest fields` if needed.

    A resumable stage (training) builds in its final directory, so what it leaves there (checkpoints)
    survives a crash and the next attempt continues from it; its manifest, written last and atomically,
    still marks it complete. Other stages build in a private directory renamed into place at the end.
    """
    key = stage_key(stage, config, inputs)
    final = Path(root) / stage / key
    if not force:
        manifest = read_manifest(final)
        if manifest is not None:
            return StageOutput(stage, key, str(final), manifest, cached=True)
    if resumable:
        if force and final.exists():
            shutil.rmtree(final)
        final.mkdir(parents=True, exist_ok=True)
        (final / MANIFEST).unlink(missing_ok=True)
        # What produced this directory, readable while the stage is still running (e.g. by evaluation
        # of its checkpoints).
        _write_atomically(final / CONTEXT, json.dumps(
            {"stage": stage, "key": key, "config": config,
             "inputs": {name: {"key": out.key, "path": out.path} for name, out in sorted(inputs.items())}},
            indent=2, sort_keys=True, default=str))
        started = time.time()
        manifest = _manifest(stage, key, config, inputs, started, build(final))
        _write_atomically(final / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str))
        return StageOutput(stage, key, str(final), manifest, cached=False)

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    started = time.time()
    try:
        manifest = _manifest(stage, key, config, inputs, started, build(tmp))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        if final.exists():  # a forced re-run, or an incomplete leftover without a manifest
            stale = final.parent / f".stale-{key}-{uuid.uuid4().hex[:8]}"
            final.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StageOutput(stage, key, str(final), manifest, cached=False)
