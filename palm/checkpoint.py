"""Checkpoints with Orbax: asynchronous, atomic, retained by policy, verified on restore.

A checkpoint at step s holds the train state after s steps (parameters, optimizer state, step), the
data iterator's state after the batches of steps < s, and `meta`: the spec's hash, the parameters'
digest, the seed, the step's metrics and the run's loss-spike events. Orbax writes each checkpoint to
a temporary directory and renames it when complete (on GCS, which cannot rename, it writes the step in
place and a `commit_success.txt` marker last), so a half-written checkpoint is never listed.
On restore the digest is recomputed: a checkpoint that fails to load or whose digest differs is moved
aside to `corrupt/` and the previous one is used.

`directory` may be local or `gs://`. `gcs_settings` is the one place that reads the environment to
point Google Cloud Storage clients at an emulator (STORAGE_EMULATOR_HOST); see there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from palm.config import CheckpointConfig
from palm.errors import PalmError

log = logging.getLogger("palm.checkpoint")


def params_digest(params: Any) -> str:
    """sha256 over every parameter's path, dtype, shape and bytes: the same on any machine and mesh."""
    h = hashlib.sha256()
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # sharded over hosts: every host
            from jax.experimental import multihost_utils  # gathers the whole array (a collective)

            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        array = np.asarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def gcs_settings() -> dict[str, str]:
    """Point every GCS client a `gs://` checkpoint goes through at STORAGE_EMULATOR_HOST, when it is set.

    STORAGE_EMULATOR_HOST (`host:port` or a URL) is the emulator convention of Google's client
    libraries and gcsfs. This is the only place in palm that reads storage settings from the environment,
    and it has to *write* some, because Orbax passes no options to the clients it uses:

    - TensorStore (the arrays, in OCDBT) opens `{"driver": "gcs", "bucket", "path"}` kvstores that Orbax
      builds itself; that driver has no endpoint field, so its endpoint is TENSORSTORE_GCS_HTTP_URL,
      read when a kvstore is opened. GOOGLE_AUTH_TOKEN_FOR_TESTING gives it a fixed bearer token, so it
      does not look for application-default credentials or a GCE metadata server (read once per process,
      on the first GCS access).
    - gcsfs (etils.epath's `gs://` backend without TensorFlow: Orbax's listings, JSON items and commit
      markers, and `quarantine`) and google-cloud-storage (Orbax's bucket lookup before listing steps)
      honour STORAGE_EMULATOR_HOST themselves; the latter only as a URL, so a bare `host:port` is
      rewritten to `http://host:port`. gcsfs also needs GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, read
      when gcsfs is imported: otherwise it asks the Storage Control API, which no emulator serves, for
      each bucket's layout.

    Without STORAGE_EMULATOR_HOST nothing changes and the clients talk to GCS with their own
    credentials. Returns the variables set.
    """
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return {}
    url = host if host.startswith(("http://", "https://")) else f"http://{host}"
    settings = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url.rstrip("/"),
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": os.environ.get("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator"),
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    os.environ.update(settings)
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is not None and gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
        log.warning("gcsfs was imported before STORAGE_EMULATOR_HOST was seen, with its experimental %s: it "
                    "will ask the Storage Control API for bucket layouts (and fall back when that fails)",
                    gcsfs.GCSFileSystem.__name__)
    return settings


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data: dict[str, Any]
    meta: dict[str, Any]


class Checkpoints:
    """The checkpoints of one training run, in `directory` (a local path or gs://)."""

    def __init__(self, directory: str | Path, config: CheckpointConfig, read_only: bool = False):
        # Orbax (TensorStore's OCDBT) needs absolute local paths; the default storage root is relative.
        self.directory = str(directory) if "://" in str(directory) else str(Path(directory).absolute())
        self.config = config
        if self.directory.startswith("gs://"):
            gcs_settings()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_last, keep_period=config.keep_every,
            enable_async_checkpointing=config.async_save and not read_only,
            cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only)
        # Explicit handlers (not just item names) so metadata can be read without restoring anything.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.corrupt: list[dict[str, Any]] = []

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Start saving (asynchronously when configured); returns once the state is off the device."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """(state, data state, meta) of one step, checked against its recorded digest."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        meta = out["meta"]
        digest = params_digest(out["state"].params if hasattr(out["state"], "params") else out["state"]["params"])
        if digest != meta.get("digest"):
            raise PalmError(f"checkpoint {self.directory}/{step}: parameter digest {digest[:12]} does not match "
                            f"the recorded {str(meta.get('digest'))[:12]}")
        return out["state"], out["data"], meta

    def quarantine(self, step: int, reason: str) -> None:
        """Move a bad checkpoint out of the manager's sight, keeping it for inspection."""
        # epath works on local paths and gs:// alike. On GCS a folder is a name prefix, so the reason is
        # written first: it makes `corrupt/` exist, which rename checks for.
        if jax.process_count() > 1:  # every host found it bad; one moves it, the others wait for that
            from jax.experimental import multihost_utils

            if jax.process_index() == 0:
                self._move_aside(step, reason)
            multihost_utils.sync_global_devices(f"palm-quarantine-{step}")
        else:
            self._move_aside(step, reason)
        self.manager.reload()

    def _move_aside(self, step: int, reason: str) -> None:
        src = epath.Path(self.directory) / str(step)
        corrupt = epath.Path(self.directory).parent / "corrupt"
        corrupt.mkdir(parents=True, exist_ok=True)
        (corrupt / f"{step}.reason.txt").write_text(reason)
        dst = corrupt / str(step)
        if dst.exists():
            dst.rmtree()
        if src.exists():
            try:
                src.rename(dst)
            except FileNotFoundError:
                # GCS has no directory rename: objects move one by one, and a stale listing entry can name
                # one already moved. What is left is removed below, so the step still leaves Orbax's view.
                pass
        if src.exists():
            src.rmtree()

    def restore_latest_valid(self, abstract_state: Any, before: int | None = None) -> Restored | None:
        """The newest checkpoint (optionally with step < `before`) that loads and verifies, or None.

        Unusable checkpoints met on the way are moved aside and recorded in `self.corrupt`.
        """
        self.wait()
        for step in reversed(self.steps()):
            if before is not None and step >= before:
                continue
            try:
                state, data, meta = self.restore(step, abstract_state)
            except Exception as e:  # a truncated file, a missing item, a digest mismatch
                reason = f"{type(e).__name__}: {str(e)[:500]}"
                log.warning("checkpoint %s/%s is unusable (%s); trying the previous one", self.directory, step, reason)
                self.quarantine(step, reason)
                self.corrupt.append({"step": step, "reason": reason})
                continue
            return Restored(step, state, data, meta)
        return None


def checkpoint_size(directory: str | Path, step: int) -> int:
    """Bytes of one checkpoint, local or gs://."""
    root = f"{str(directory).rstrip('/')}/{step}"
    if root.startswith("gs://"):
        import gcsfs

        return int(sum(gcsfs.GCSFileSystem().du(root, total=False).values()))
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def open_checkpoints(path: str | Path) -> Checkpoints:
    """Read-only access to the checkpoints under `path` (the checkpoints dir or the train stage dir)."""
    path = str(path).rstrip("/")
    if path.startswith("gs://"):
        gcs_settings()  # before anything imports gcsfs
    candidates = [path, f"{path}/checkpoints"]
    for candidate in candidates:
        ckpts = Checkpoints(candidate, CheckpointConfig(), read_only=True) if _exists(candidate) else None
        if ckpts is not None and ckpts.steps():
            return ckpts
    raise PalmError(f"no checkpoints under {path} (looked in {' and '.join(candidates)})")


def _exists(path: str) -> bool:
    from etils import epath

    return epath.Path(path).exists()


def describe_checkpoints(ckpts: Checkpoints) -> list[dict[str, Any]]:
    """One row per checkpoint: step, bytes on disk, loss and parameter digest from its metadata."""
    rows = []
    for step in ckpts.steps():
        meta = ckpts.meta(step)
        rows.append({"step": step, "bytes": checkpoint_size(ckpts.directory, step),
                     "loss": (meta.get("metrics") or {}).get("loss"), "digest": meta.get("digest"),
                     "spec_digest": meta.get("spec_digest")})
    return rows


def inspect_checkpoint(ckpts: Checkpoints, step: int | None = None) -> dict[str, Any]:
    """Metadata, metrics and parameter shapes of one checkpoint (the latest by default), without loading it."""
    steps = ckpts.steps()
    step = steps[-1] if step is None else step
    if step not in steps:
        raise PalmError(f"no checkpoint at step {step} in {ckpts.directory}; steps: {steps}")
    meta = ckpts.meta(step)
    params = ckpts.manager.item_metadata(step)["state"].tree["params"]
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: hasattr(x, "shape"))[0]
    shapes = [{"path": jax.tree_util.keystr(p), "shape": list(leaf.shape), "dtype": str(leaf.dtype)} for p, leaf in flat]
    return {"step": step, "path": f"{ckpts.directory}/{step}", "bytes": checkpoint_size(ckpts.directory, step),
            "digest": meta.get("digest"), "spec_digest": meta.get("spec_digest"), "seed": meta.get("seed"),
            "metrics": meta.get("metrics"), "spikes": meta.get("spikes", []),
            "num_params": int(sum(np.prod(p["shape"]) for p in shapes)), "params": shapes}


def verify_checkpoints(ckpts: Checkpoints, step: int | None = None) -> list[dict[str, Any]]:
    """Restore each checkpoint's parameters on the host and compare their digest with the recorded one."""
    results = []
    for s in ckpts.steps() if step is None else [step]:
        try:
            meta = ckpts.meta(s)
            out = ckpts.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
            state = out["state"]
            digest = params_digest(state["params"] if isinstance(state, dict) else state.params)
            ok = digest == meta.get("digest")
            results.append({"step": s, "ok": ok, "digest": digest,
                            "error": "" if ok else f"digest {digest[:12]} != recorded {str(meta.get('digest'))[:12]}"})
        except Exception as e:  # report every failure, keep checking the others
            results.append({"step": s, "ok": False, "digest": None, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return results
