"""Checkpoints with Orbax: asynchronous, atomic, retained by policy, verified on restore.

A checkpoint at step s holds the train state after s steps (parameters, optimizer state, step), the
data iterator's state after the batches of steps < s (and any a loss spike skipped), and `meta`: the
spec's hash, the parameters' digest, the seed, the step's metrics, the run's loss-spike events and
`data_position`, the sequences drawn from the data stream so far. Orbax writes each checkpoint to
a temporary directory and renames it when complete (on GCS, which cannot rename, it writes the step in
place and a `commit_success.txt` marker last), so a half-written checkpoint is never listed.
On restore the digest is recomputed: a checkpoint that fails to load or whose digest differs is moved
aside to `corrupt/` and the previous one is used.

Two layers of integrity, both computed where the data lives (nothing is gathered):

- `state_digest`: a digest of the whole train state (parameters, optimizer state, step) from each
  device's own shards (`tree_digest`), combined with the data iterator's state; recorded in `meta` and
  checked on every restore, so a checkpoint that loads but holds other numbers is never resumed from.
- A seal per process (`integrity.process_<i>.json` in the step directory): the size and sha256 of every
  file that process wrote (its `ocdbt.process_<i>`/`process_<i>` files; process 0 also the shared ones),
  self-checksummed, written once Orbax has committed the step. `verify` checks every seal and refuses a
  file that is missing, changed or unlisted; restore checks them first. A flipped byte anywhere in a
  sealed checkpoint (array data, Orbax's metadata, the data state, `meta`) is therefore caught, even
  where it would not change the restored numbers. A step committed but not yet sealed (a crash in
  between) is checked by its digests alone, and sealed when it is next resumed from.

Each step is bound to its identity: `meta` records the step (`step`) and the shapes of the parameters
(`model_digest`, `model_digest` below), and every reader checks them against the step directory's name
and the run (`step_problem`, `check_identity`): a step directory holding another step's files, or a step
of another model, is refused (training moves it to `corrupt/` and resumes from the newest good step;
`list`, `inspect` and `verify` report it; loading it for generation or evaluation names it and the good
steps). A step missing a file its seals list is never reported complete. Checkpoints written before
`model_digest` was recorded still load: their step is checked (the meta's and the restored state's), and
their parameter shapes are checked against the model where one is loaded.

`directory` may be local or `gs://`. `palm.base.storage.gcs_settings` is the one place that reads the environment to
point Google Cloud Storage clients at an emulator (STORAGE_EMULATOR_HOST); see there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from palm.spec.config import CheckpointConfig
from palm.base.errors import PalmError
from palm.base.storage import gcs_settings
from palm.store import layout

log = logging.getLogger("palm.core.checkpoint")


#: Seeds of the digest's four independent 32-bit lanes (any fixed distinct values).
_LANES = (0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F)


def _mix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: every input bit reaches every output bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of each element as uint32 (16- and 8-bit types widened, booleans as 0/1)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    raise PalmError(f"cannot digest an array of {x.dtype}")


def _leaf_sums(x: jax.Array) -> jax.Array:
    """[4] uint32: per lane, the wrapping sum over elements of a hash of (element index, element bits).

    A sum of per-element terms is the same however the array is split over devices and hosts (each
    device sums its own shard; only these 16 bytes cross the network), and hashing the index with the
    bits makes it sensitive to any changed or moved element. Indices are hashed coordinate by
    coordinate, so arrays of more than 2^32 elements need no 64-bit counters. The four lanes are one
    leading axis of one expression (a quarter of the program that one expression per lane makes, so a
    quarter of the tracing and compiling); XLA fuses it into the reduction, so nothing of the lanes'
    size is held in memory, and integer sums do not depend on their order."""
    bits = _as_uint32(x)[None]
    seeds = jnp.asarray(_LANES, jnp.uint32).reshape((len(_LANES),) + (1,) * x.ndim)
    shape = (len(_LANES),) + x.shape
    h = jnp.broadcast_to(seeds, shape)
    for axis in range(x.ndim):
        h = _mix32(h ^ jax.lax.broadcasted_iota(jnp.uint32, shape, axis + 1))
    return jnp.sum(_mix32(h ^ _mix32(bits + seeds)), axis=tuple(range(1, x.ndim + 1)), dtype=jnp.uint32)


_leaf_sums_jit = jax.jit(lambda leaves: [_leaf_sums(x) for x in leaves])


def _path_name(path: tuple[Any, ...]) -> str:
    """A leaf's path as names joined by "/", whatever the containers: a TrainState's `.opt_state[1].count`
    and the `['opt_state'][1]['count']` of the same state restored without a target are one name."""
    return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def tree_digest(tree: Any) -> str:
    """sha256 over every leaf's path, dtype, shape and content hash (`_leaf_sums`).

    The same on any machine, mesh and number of processes, and computed from each device's own shards:
    nothing is gathered. With several processes it is a collective (every host calls it)."""
    flat, leaves = _digest_leaves(tree)
    sums: list[Any] = [None] * len(leaves)
    for indices in _device_groups(leaves):
        for i, out in zip(indices, _leaf_sums_jit([leaves[i] for i in indices])):
            sums[i] = np.asarray(out.addressable_shards[0].data)  # a replicated scalar vector on every host
    h = hashlib.sha256()
    for (path, _), leaf, lane_sums in zip(flat, leaves, sums):
        h.update(path.encode())
        h.update(f"{jnp.dtype(leaf.dtype).str}{tuple(leaf.shape)}".encode())
        h.update(lane_sums.astype("<u4").tobytes())
    return h.hexdigest()


def precompile_digest(abstract: Any) -> None:
    """Compile `tree_digest`'s programs for a tree of ShapeDtypeStructs (with their shardings) without
    running them: with JAX's persistent compilation cache on, a later digest of such a tree loads them."""
    _, leaves = _digest_leaves(abstract)
    for indices in _device_groups(leaves):
        _leaf_sums_jit.lower([leaves[i] for i in indices]).compile()


def _digest_leaves(tree: Any) -> tuple[list[tuple[str, Any]], list[Any]]:
    """The leaves by path name, and each as an array (or the ShapeDtypeStruct it is)."""
    flat = sorted(((_path_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]),
                  key=lambda kv: kv[0])
    leaves = [leaf if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) else jnp.asarray(leaf) for _, leaf in flat]
    return flat, leaves


def _device_groups(leaves: list[Any]) -> list[list[int]]:
    """The leaves' indices grouped by the devices they live on: one computation per group (a sharded state
    and host-side scalars)."""
    groups: dict[Any, list[int]] = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault(frozenset(leaf.sharding.device_set), []).append(i)
    return list(groups.values())


def model_digest(params: Any) -> str:
    """A digest of the parameters' paths, shapes and dtypes (not their values): which model a checkpoint
    is of. The same for real arrays, ShapeDtypeStructs and Orbax's array metadata of one model."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: hasattr(x, "shape"))[0]
    rows = sorted((_path_name(path), tuple(int(n) for n in leaf.shape), np.dtype(leaf.dtype).name)
                  for path, leaf in flat)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def check_identity(step: int, meta: dict[str, Any], expected_model: str | None = None) -> str:
    """The problem with a step's identity ("" when none): its meta records another step (the directory
    holds another step's files), or another model's parameter shapes than `expected_model`."""
    recorded = meta.get("step")
    if recorded is not None and recorded != step:
        return (f"its meta records step {recorded}: the directory holds step {recorded}'s files, not step "
                f"{step}'s")
    if expected_model is not None and meta.get("model_digest") not in (None, expected_model):
        return (f"its parameters are another model's (shapes digest {str(meta['model_digest'])[:12]}, this "
                f"run's {expected_model[:12]}): a step of another run")
    return ""


def params_digest(params: Any) -> str:
    """The parameters' digest (`tree_digest`), recorded with every checkpoint as `digest`."""
    return tree_digest(params)


def state_digest(state: Any, data_state: dict[str, Any] | None = None) -> str:
    """The whole train state's digest (step, parameters, optimizer state; with `data_state`, the data
    iterator's position too), recorded as `state_digest`."""
    digest = tree_digest(state)
    if data_state is None:
        return digest
    data = json.dumps(data_state, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{digest}\n{data}".encode()).hexdigest()


def check_digests(state: Any, meta: dict[str, Any], where: str, data_state: dict[str, Any] | None = None) -> None:
    """Raise PalmError unless a restored train state matches the digests recorded with it: the whole
    state's (`state_digest`, with the data state where `meta["state_digest_data"]` says it was
    included) where recorded, and the parameters' (`digest`)."""
    params = state.params if hasattr(state, "params") else state["params"]
    if "state_digest" in meta:
        digest = state_digest(state, data_state if meta.get("state_digest_data") else None)
        if digest != meta["state_digest"]:
            raise PalmError(f"{where}: train state digest {digest[:12]} does not match the recorded "
                            f"{str(meta['state_digest'])[:12]}")
    check_params_digest(params, meta.get("digest"), where)


def check_params_digest(params: Any, recorded: str | None, where: str) -> None:
    """Raise PalmError unless `params` have the parameter digest recorded with their checkpoint."""
    digest = params_digest(params)
    if digest != recorded:
        raise PalmError(f"{where}: parameter digest {digest[:12]} does not match the recorded {str(recorded)[:12]}")


SEAL_PREFIX = "integrity.process_"
_PROCESS_PART = re.compile(r"^(?:ocdbt\.)?process_(\d+)$")


def _owner(relpath: str) -> int:
    """The process that wrote a file of a step: the one named in its path (`ocdbt.process_3/…`,
    `array_metadatas/process_3`), else the primary (0)."""
    for part in relpath.split("/"):
        m = _PROCESS_PART.match(part)
        if m:
            return int(m.group(1))
    return 0


def _step_files(step_dir: epath.Path) -> dict[str, epath.Path]:
    """Every file under a step directory (but the seals) by relative path; local or gs://."""
    out: dict[str, epath.Path] = {}
    pending = [(step_dir, "")]
    while pending:
        folder, prefix = pending.pop()
        for path in folder.iterdir():
            rel = f"{prefix}{path.name}"
            if path.is_dir():
                pending.append((path, rel + "/"))
            elif not (path.name.startswith(SEAL_PREFIX) or path.name.startswith(f".{SEAL_PREFIX}")):
                out[rel] = path
    return out


def _sha256(path: epath.Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _seal_body(record: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in record.items() if k != "self"}, sort_keys=True, separators=(",", ":"))


def seal_step(step_dir: str | Path, process: int | None = None) -> dict[str, Any]:
    """Write this process's seal of a committed step: size and sha256 of each file it wrote."""
    step_dir = epath.Path(str(step_dir))
    process = jax.process_index() if process is None else process
    files = {rel: list(_sha256(path)) for rel, path in sorted(_step_files(step_dir).items()) if _owner(rel) == process}
    record: dict[str, Any] = {"version": 1, "process": process, "files": files}
    record["self"] = hashlib.sha256(_seal_body(record).encode()).hexdigest()
    target = step_dir / f"{SEAL_PREFIX}{process}.json"
    tmp = step_dir / f".{SEAL_PREFIX}{process}.json.tmp"
    tmp.write_text(json.dumps(record))
    tmp.rename(target)  # local: atomic; GCS: a rewrite then delete, the reader checks the self-checksum
    return record


def check_seals(step_dir: str | Path, mine: Any = None, hashes: bool = True) -> tuple[bool, str]:
    """(sealed, problem) for a step: `problem` names the first file that is missing, changed or
    unlisted, or a damaged seal; "" when every seal checks (or when there is none: `sealed` False).
    `mine(process)`: hash only the files of the seals it accepts (each host of a restore checks its
    share); every seal's own checksum and the set of files are checked regardless. `hashes=False`:
    only that every listed file is there, of its size (what listing a step needs, without reading it)."""
    step_dir = epath.Path(str(step_dir))
    seals = sorted(p for p in step_dir.iterdir() if p.name.startswith(SEAL_PREFIX) and p.name.endswith(".json"))
    if not seals:
        return False, ""
    files = _step_files(step_dir)
    listed: set[str] = set()
    owners = set()
    for seal in seals:
        try:
            record = json.loads(seal.read_text())
            ok = isinstance(record, dict) and record.get("self") == hashlib.sha256(_seal_body(record).encode()).hexdigest()
        except (ValueError, UnicodeDecodeError):
            ok = False
        if not ok:
            return True, f"{seal.name} is damaged (its self-checksum does not match)"
        owners.add(record["process"])
        listed.update(record["files"])
        if mine is not None and not mine(record["process"]):
            continue
        for rel, (size, digest) in record["files"].items():
            path = files.get(rel)
            if path is None:
                return True, f"{rel} is missing (listed in {seal.name})"
            if not hashes:
                length = path.stat().length
                if length != size:
                    return True, f"{rel} is {length:,} bytes, sealed as {size:,}"
                continue
            if (size, digest) != _sha256(path):
                return True, f"{rel} differs from its sealed sha256 (listed in {seal.name})"
    unlisted = sorted(rel for rel in files if rel not in listed and _owner(rel) in owners)
    if unlisted:
        return True, f"{unlisted[0]} is not listed in any seal (added after the step was sealed)"
    return True, ""


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
        self.read_only = read_only
        self.selected_step: int | None = None
        # Seals are written off the training thread, once Orbax has committed a step (see the module doc).
        self._sealer = None if read_only else ThreadPoolExecutor(1, thread_name_prefix="palm-seal")
        self._unsealed: list[int] = []
        self._seal_jobs: list[Future] = []

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step)

    def save(self, step: int, state: Any, data_state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Start saving (asynchronously when configured); returns once the state is off the device."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        # Orbax's save waits for the previous one first: every earlier step is committed now.
        self._seal_pending(keep=step)
        self._unsealed.append(step)
        if not self.config.async_save:
            self._seal_pending()

    def _seal_pending(self, keep: int | None = None) -> None:
        if self._sealer is None:
            return
        for step in self._unsealed:
            if step != keep:
                self._seal_jobs.append(self._sealer.submit(self._seal, step))
        self._unsealed = [s for s in self._unsealed if s == keep]

    def _seal(self, step: int) -> None:
        step_dir = self.step_dir(step)
        try:
            seal_step(step_dir)
        except OSError as e:
            if step_dir.exists():  # else removed by the retention policy meanwhile: nothing to seal
                log.warning("could not seal checkpoint %s: %s", step_dir, e)

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._seal_pending()
        jobs, self._seal_jobs = self._seal_jobs, []
        for job in jobs:
            job.result()

    def discard_from(self, step: int) -> list[int]:
        """Delete the checkpoints at `step` and after (a loss spike rolled training back to `step`: they hold
        the abandoned trajectory, and the steps will be saved again). Returns the steps deleted."""
        self.wait()
        gone = [s for s in self.steps() if s >= step]
        for s in gone:
            self.manager.delete(s)
        self.manager.reload()
        return gone

    def close(self) -> None:
        self.wait()
        if self._sealer is not None:
            self._sealer.shutdown()
        self.manager.close()

    def meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """(state, data state, meta) of one step: its seals checked first (each host its share of the
        files), then the restored state against its recorded digests. An unsealed step that passes is
        sealed (it was committed, then the process died before sealing it)."""
        where = f"checkpoint {self.directory}/{step}"
        count, index = jax.process_count(), jax.process_index()
        sealed, problem = check_seals(self.step_dir(step), mine=lambda p: p % count == index)
        if problem:
            raise PalmError(f"{where}: {problem}")
        params = abstract_state.params if hasattr(abstract_state, "params") else abstract_state["params"]
        problem = check_identity(step, self.meta(step), model_digest(params))
        if problem:
            raise PalmError(f"{where}: {problem}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        meta = out["meta"]
        check_digests(out["state"], meta, where, out["data"])
        _check_state_step(out["state"], step, where)
        if not sealed and not self.read_only:
            self._seal(step)
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


def _check_state_step(state: Any, step: int, where: str) -> None:
    """The restored state's own step counter must be the directory's (checkpoints without a recorded
    identity too)."""
    counter = state.step if hasattr(state, "step") else state.get("step") if isinstance(state, dict) else None
    if counter is not None and int(np.asarray(jax.device_get(counter))) != step:
        raise PalmError(f"{where}: its train state is the one after step {int(np.asarray(jax.device_get(counter)))}"
                        f", not {step}: the directory holds another step's files")


def step_problem(ckpts: "Checkpoints", step: int, expected_model: str | None = None) -> str:
    """What makes one step unusable without restoring it ("" when nothing): unreadable meta, another
    step's or another model's identity (`check_identity`), a file its seals list missing or resized."""
    try:
        meta = ckpts.meta(step)
    except Exception as e:  # an emptied or missing meta: the step is incomplete
        return f"its meta is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    if not isinstance(meta, dict):
        return "its meta is not a JSON object"
    problem = check_identity(step, meta, expected_model)
    if problem:
        return problem
    try:
        _, problem = check_seals(ckpts.step_dir(step), hashes=False)
    except (OSError, KeyError, TypeError) as e:
        problem = f"its files cannot be listed ({type(e).__name__}: {e})"
    return problem


def usable_step(ckpts: "Checkpoints", step: int, expected_model: str | None = None, what: str = "") -> None:
    """PalmError, one line, unless `step` passes `step_problem`: it names the damaged step, what is wrong,
    and the steps that pass (for generation and evaluation, which never use a damaged step)."""
    problem = step_problem(ckpts, step, expected_model)
    if not problem:
        return
    good = [s for s in ckpts.steps() if s != step and not step_problem(ckpts, s, expected_model)]
    raise PalmError(f"{what}checkpoint {ckpts.directory}/{step} is unusable: {problem}; "
                    + (f"good steps: {', '.join(map(str, good))} (pass one, e.g. {ckpts.directory}/{good[-1]})"
                       if good else "no other step of this run is usable")
                    + "; `palm checkpoint verify` checks every step")


def restore_params_onto(step_dir: str | Path, abstract_params: Any) -> Any:
    """The parameters of one checkpoint (a step directory, e.g. a train stage's final `checkpoint`),
    restored straight onto the shardings of `abstract_params` (ShapeDtypeStructs with shardings): each
    host reads only its shards. Their recorded digest is checked; PalmError if they do not fit."""
    step_dir = str(step_dir).rstrip("/")
    directory, _, step = step_dir.rpartition("/")
    if not step.isdigit():
        raise PalmError(f"{step_dir} is not a checkpoint step directory (<checkpoints>/<step>)")
    ckpts = Checkpoints(directory, CheckpointConfig(), read_only=True)
    try:
        if int(step) not in ckpts.steps():
            raise PalmError(f"no checkpoint at step {step} in {directory}")
        usable_step(ckpts, int(step))  # another model's parameters: "do not fit this model" below
        meta = ckpts.meta(int(step))
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                                   dtype=a.dtype), abstract_params)
        try:
            with ocp.PyTreeCheckpointer() as reader:
                params = reader.restore(f"{step_dir}/state", args=ocp.args.PyTreeRestore(
                    item={"params": abstract_params}, restore_args={"params": restore_args},
                    partial_restore=True))["params"]
        except (ValueError, KeyError, TypeError) as e:
            raise PalmError(f"the parameters of {step_dir} do not fit this model (another architecture?): "
                            f"{str(e).splitlines()[0][:300]}") from None
    finally:
        ckpts.close()
    check_params_digest(params, meta.get("digest"), step_dir)
    return params


def checkpoint_size(directory: str | Path, step: int) -> int:
    """Bytes of one checkpoint, local or gs://."""
    root = f"{str(directory).rstrip('/')}/{step}"
    if root.startswith("gs://"):
        import gcsfs

        return int(sum(gcsfs.GCSFileSystem().du(root, total=False).values()))
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def open_checkpoints(path: str | Path) -> Checkpoints:
    """Read-only access to the checkpoints under `path`: the checkpoints directory, the train stage's
    directory, or one step's directory (`…/checkpoints/180`, what `palm run` prints), which also sets
    `selected_step` on the result."""
    path = str(path).rstrip("/")
    if path.startswith("gs://"):
        gcs_settings()  # before anything imports gcsfs
    quiet_orbax()
    step = None
    parent, _, name = path.rpartition("/")
    if name.isdigit() and parent and any(_exists(f"{path}/{item}") for item in ("state", "meta", "data")):
        path, step = parent, int(name)
    candidates = [path, layout.checkpoints_dir(path)]
    for candidate in candidates:
        ckpts = Checkpoints(candidate, CheckpointConfig(), read_only=True) if _exists(candidate) else None
        if ckpts is not None and ckpts.steps():
            if step is not None and step not in ckpts.steps():
                raise PalmError(f"{path}/{step} is not a complete checkpoint (steps: {ckpts.steps()})")
            ckpts.selected_step = step
            return ckpts
    raise PalmError(f"no checkpoints under {path} (looked in {' and '.join(candidates)})")


def quiet_orbax() -> None:
    """Keep Orbax's informational absl warnings ("Given directory is read only", …) off the console."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


def _exists(path: str) -> bool:
    from etils import epath

    return epath.Path(path).exists()


def describe_checkpoints(ckpts: Checkpoints, expected_model: str | None = None) -> list[dict[str, Any]]:
    """One row per checkpoint: step, bytes on disk, loss and parameter digest from its metadata, and
    whether it is sealed; a step that fails `step_problem` (unreadable metadata, another step's or model's
    identity, a sealed file missing) is a row with its `error`, never complete."""
    rows = []
    for step in ckpts.steps():
        row: dict[str, Any] = {"step": step, "bytes": checkpoint_size(ckpts.directory, step), "loss": None,
                               "digest": None, "spec_digest": None, "complete": True, "error": ""}
        problem = step_problem(ckpts, step, expected_model)
        if problem:
            row.update(complete=False, error=f"incomplete or unusable: {problem}")
            rows.append(row)
            continue
        try:
            meta = ckpts.meta(step)
            row.update(loss=(meta.get("metrics") or {}).get("loss"), digest=meta.get("digest"),
                       spec_digest=meta.get("spec_digest"))
            row["sealed"] = any(p.name.startswith(SEAL_PREFIX) for p in ckpts.step_dir(step).iterdir())
        except Exception as e:  # a step missing a file: say so, list the others
            row.update(complete=False, error=f"incomplete: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        rows.append(row)
    return rows


def inspect_checkpoint(ckpts: Checkpoints, step: int | None = None, expected_model: str | None = None) -> dict[str, Any]:
    """Metadata, metrics and parameter shapes of one checkpoint (the latest by default), without loading it;
    PalmError naming the good steps if it fails `step_problem`."""
    steps = ckpts.steps()
    step = steps[-1] if step is None else step
    if step not in steps:
        raise PalmError(f"no checkpoint at step {step} in {ckpts.directory}; steps: {steps}")
    usable_step(ckpts, step, expected_model, what="inspect: ")
    try:
        meta = ckpts.meta(step)
        params = ckpts.manager.item_metadata(step)["state"].tree["params"]
    except Exception as e:
        raise PalmError(f"{ckpts.directory}/{step} is incomplete or damaged ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); `palm checkpoint verify` checks "
                        "every step") from None
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: hasattr(x, "shape"))[0]
    shapes = [{"path": jax.tree_util.keystr(p), "shape": list(leaf.shape), "dtype": str(leaf.dtype)} for p, leaf in flat]
    return {"step": step, "path": f"{ckpts.directory}/{step}", "bytes": checkpoint_size(ckpts.directory, step),
            "digest": meta.get("digest"), "spec_digest": meta.get("spec_digest"), "seed": meta.get("seed"),
            "metrics": meta.get("metrics"), "spikes": meta.get("spikes", []),
            "num_params": int(sum(np.prod(p["shape"]) for p in shapes)), "params": shapes}


def verify_checkpoints(ckpts: Checkpoints, step: int | None = None, expected_model: str | None = None) -> list[dict[str, Any]]:
    """Check each checkpoint: its identity (the step its meta records, and the model where
    `expected_model` is the run's), every file against its step's seals, then the train state restored on
    the host against the recorded digests (whole state with the data iterator's position, and parameters)
    and its step counter against the directory's step."""
    results = []
    for s in ckpts.steps() if step is None else [step]:
        row: dict[str, Any] = {"step": s, "ok": False, "sealed": False, "digest": None, "error": ""}
        try:
            row["sealed"], problem = check_seals(ckpts.step_dir(s))
            problem = problem or check_identity(s, ckpts.meta(s), expected_model)
            if problem:
                row["error"] = problem
                results.append(row)
                continue
            out = ckpts.manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
            state = out["state"]
            params = state["params"] if isinstance(state, dict) else state.params
            row["digest"] = params_digest(params)
            try:
                problem = check_identity(s, out["meta"], expected_model) or (
                    f"its parameters are another model's (shapes digest {model_digest(params)[:12]}, this run's "
                    f"{expected_model[:12]})" if expected_model not in (None, model_digest(params)) else "")
                if problem:
                    raise PalmError(problem)
                check_digests(state, out["meta"], f"step {s}", out["data"])
                _check_state_step(state, s, f"step {s}")
                row["ok"] = True
            except PalmError as e:
                row["error"] = str(e)
        except Exception as e:  # report every failure, keep checking the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        results.append(row)
    return results
