"""The train and evaluation steps compiled ahead of time for a spec's TPU pods, on any host.

`jax.experimental.topologies` describes a TPU topology (chips, slices, hosts) without the chips, when
libtpu is installed (`uv sync --group tpu`); the real XLA TPU compiler then compiles the project's own
sharded step for those abstract devices, on a CPU host, and reports the bytes each chip needs. This is
the check that a run fits before any chip-hour is spent (`palm plan --compile`, the pretrain flow's
pre-flight stage). A step the compiler finds too large for a chip's memory is refused at compile time;
its need is read from the compiler's message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import topologies

from palm.analysis.memory import estimate_memory, microbatch_candidates, microbatch_counts
from palm.base.errors import PalmError
from palm.base.hardware import CHIPS_PER_HOST_BOUNDS, TPU_GENERATIONS, parse_topology, tpu_host
from palm.base.units import gib
from palm.core.train import Trainer


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """One step compiled for the spec's chips."""

    kind: str  # "train" or "eval"
    global_batch: int
    #: Bytes per chip the compiled step needs (arguments + outputs - donated + temporaries + code).
    memory_per_device_bytes: int
    #: The plan's own estimate for the same step (palm.analysis.memory.estimate_memory).
    estimated_memory_per_device_bytes: int
    fits: bool
    compile_seconds: float
    #: The compiler's breakdown, where it produced one (None when it refused the step).
    breakdown: dict[str, int] | None = None
    #: Microbatches the step splits its global batch into (train.microbatches).
    microbatches: int = 1


def tpu_environment() -> None:
    """Settings libtpu reads when it starts on a host without chips: quiet its warnings about the missing
    TPU VM metadata (it still describes any topology), and let several processes compile at once (its
    lockfile guards chips, and there are none). Only fills in what is unset; changes nothing on a TPU host."""
    if tpu_host():
        return
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def tpu_devices(accelerator: str, topology: str, num_slices: int = 1, devices_per_host: int = 4) -> list[Any]:
    """The abstract devices of `num_slices` slices of a TPU topology, e.g. ("tpu-v4", "12x16x16", 2)."""
    if accelerator not in TPU_GENERATIONS:
        raise PalmError(f"ahead-of-time compilation targets TPUs ({', '.join(TPU_GENERATIONS)}); this spec's "
                        f"infra.hardware.accelerator is {accelerator}")
    dims = parse_topology(topology)
    if devices_per_host not in CHIPS_PER_HOST_BOUNDS:
        raise PalmError(f"infra.hardware.devices_per_host={devices_per_host}: TPU hosts carry "
                        f"{', '.join(map(str, CHIPS_PER_HOST_BOUNDS))} chips")
    try:
        import libtpu  # noqa: F401  (the TPU compiler)
    except ImportError:
        raise PalmError("compiling for TPUs needs libtpu on this host: uv sync --group tpu") from None
    tpu_environment()
    generation = TPU_GENERATIONS[accelerator]
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{generation.prefix}:{'x'.join(map(str, dims))}",
            chip_config_name=generation.chip_config,
            chips_per_host_bounds=CHIPS_PER_HOST_BOUNDS[devices_per_host], num_slices=num_slices)
    except Exception as e:  # libtpu's own words on an impossible topology
        raise PalmError(f"libtpu cannot describe {num_slices} slice(s) of {accelerator} {topology}: "
                        f"{str(e).splitlines()[0]}") from None
    return list(topo.devices)


#: The TPU compiler's out-of-memory messages: the temporaries alone, or everything the step holds.
_OOM_TEMPORARIES = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT]?)\) exceeds available HBM \(([0-9.]+)([KMGT]?)\)")
_OOM_TOTAL = re.compile(r"Used ([0-9.]+)([KMGT]?) of ([0-9.]+)([KMGT]?) hbm")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def refused_bytes(message: str) -> tuple[str, int, int] | None:
    """("temporaries" or "total", bytes needed, bytes available) from the TPU compiler's out-of-memory
    message, or None if it is not one."""
    for what, pattern in (("temporaries", _OOM_TEMPORARIES), ("total", _OOM_TOTAL)):
        m = pattern.search(message)
        if m:
            return what, int(float(m.group(1)) * _UNITS[m.group(2)]), int(float(m.group(3)) * _UNITS[m.group(4)])
    return None


def argument_bytes(args: Any) -> int:
    """Bytes per device of a step's abstract arguments (each one's shard on a device)."""
    return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(args))


def compiled_bytes(compiled: Any) -> tuple[int, dict[str, int]]:
    """Bytes per device of a compiled step and the compiler's breakdown."""
    m = compiled.memory_analysis()
    parts = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
             "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
             "code": int(m.generated_code_size_in_bytes)}
    total = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"] + parts["code"]
    return total, parts


@contextlib.contextmanager
def not_persisted():
    """Compile without writing to JAX's persistent compilation cache (palm's local runs keep one): an
    executable compiled for abstract TPU devices cannot be loaded back on this host (there is no TPU client
    to load it into), and JAX would warn on every later compile of the same step. The setting is the
    process's: a compile on another thread meanwhile is not cached either, which costs only time."""
    option = "jax_persistent_cache_min_compile_time_secs"
    previous = getattr(jax.config, option)
    jax.config.update(option, float("inf"))
    try:
        yield
    finally:
        jax.config.update(option, previous)


#: What compiling a step for TPUs measured in this process, by program and target: (seconds, (bytes per device,
#: breakdown) or None, (what, bytes) the compiler refused it for or None). A step compiled again, the same
#: program for the same chips (the flow's compile stage after `palm plan --compile`, each spec of a graph with
#: the same model and mesh), is measured once. Each process compiles its own: the executables are not kept.
_MEASURED: dict[tuple[str, str, int], tuple[float, tuple[int, dict[str, int]] | None, tuple[str, int] | None]] = {}


def compile_step(trainer: Any, kind: str, global_batch: int, hbm_bytes: int | None,
                 estimate: int, microbatches: int = 1) -> CompiledStep:
    """Lower and compile one step of `trainer` (built over abstract TPU devices) and measure it (the first
    time this process compiles that program for those chips: `_MEASURED`)."""
    t0 = time.perf_counter()
    lowered = trainer.lower(kind, global_batch, microbatches)
    devices = trainer.sharding.mesh.devices
    key = (hashlib.sha256(lowered.as_text().encode()).hexdigest(), devices.flat[0].device_kind, devices.size)
    if key not in _MEASURED:
        try:
            with not_persisted():
                compiled = lowered.compile()
        except Exception as e:  # the compiler refuses a step that cannot fit the chip
            refused = refused_bytes(str(e))
            if refused is None:
                raise
            _MEASURED[key] = (time.perf_counter() - t0, None, refused[:2])
        else:
            _MEASURED[key] = (time.perf_counter() - t0, compiled_bytes(compiled), None)
    seconds, measured, refused = _MEASURED[key]
    if measured is None:
        what, needed = refused
        if what == "temporaries":  # the state and batch come on top (donated outputs reuse the state)
            needed += argument_bytes(trainer.step_arguments(kind, global_batch))
        return CompiledStep(kind, global_batch, needed, estimate, False, seconds, microbatches=microbatches)
    total, parts = measured
    fits = hbm_bytes is None or total <= hbm_bytes
    return CompiledStep(kind, global_batch, total, estimate, fits, seconds, parts, microbatches)


def compile_fitting(trainer: Any, model: Any, train: Any, mesh: dict[str, int], global_batch: int,
                    hbm_bytes: int | None, first: int, on_step: Callable[[CompiledStep], None] | None = None
                    ) -> CompiledStep:
    """train.microbatches: auto by the compiler: the train step with the fewest microbatches that fits.
    Starts at the estimate's choice `first`; fewer while they fit, more while they do not."""
    candidates = microbatch_candidates(global_batch, trainer.sharding.data_parallel_size)
    i = candidates.index(first) if first in candidates else 0

    def attempt(m: int) -> CompiledStep:
        step = compile_step(trainer, "train", global_batch, hbm_bytes,
                            estimate_memory(model, train, mesh, global_batch, "train", m)["total"], m)
        if on_step is not None:
            on_step(step)
        return step

    best = step = attempt(candidates[i])
    if step.fits:
        while i > 0:
            i -= 1
            step = attempt(candidates[i])
            if not step.fits:
                break
            best = step
        return best
    while not step.fits and i + 1 < len(candidates):
        i += 1
        step = attempt(candidates[i])
    return step


def compile_spec(spec: Any, *, num_layers: int | None = None, batches: Sequence[int] | None = None,
                 on_step: Callable[[CompiledStep], None] | None = None) -> dict[str, Any]:
    """Compile the train step at every batch size of the spec's ramp, and the evaluation step, for the
    spec's own TPU hardware and mesh. `num_layers` compiles a shallower model of the same width (tests);
    `batches` replaces the ramp's sizes."""
    hw = spec.infra.hardware
    if hw.accelerator not in TPU_GENERATIONS:
        raise PalmError(f"ahead-of-time compilation targets TPUs ({', '.join(TPU_GENERATIONS)}); this spec's "
                        f"infra.hardware.accelerator is {hw.accelerator}")
    if not hw.topology:
        raise PalmError("infra.hardware.topology is not set: compiling ahead of time needs the TPU slice's shape, "
                        "e.g. 8x8x16")
    devices = tpu_devices(hw.accelerator, hw.topology, hw.num_slices, hw.devices_per_host)
    if len(devices) != hw.num_devices:
        raise PalmError(f"{hw.num_slices} slice(s) of {hw.topology} are {len(devices)} chips but "
                        f"infra.hardware.num_devices is {hw.num_devices}")
    model = spec.model if num_layers is None else dataclasses.replace(spec.model, num_layers=num_layers)
    mesh = spec.resolved_mesh()
    auto = spec.train.microbatch_counts() is None
    counts = microbatch_counts(model, spec.train, mesh, hw.memory_bytes)
    trainer = Trainer(model, spec.train, mesh, devices, microbatches=counts)
    by_size = {}
    for stage, count in zip(spec.train.batch_ramp, counts):
        by_size.setdefault(stage.global_batch, count)
    sizes = sorted(by_size) if batches is None else list(batches)
    steps = []
    for kind, batch in [("train", b) for b in sizes] + [("eval", max(sizes))]:
        m = by_size.get(batch, 1) if kind == "train" else 1
        if kind == "train" and auto:  # the compiler decides; every attempt is reported
            tried: list[CompiledStep] = []
            step = compile_fitting(trainer, model, spec.train, mesh, batch, hw.memory_bytes, m, tried.append)
            for attempt in tried:
                if attempt is not step and on_step is not None:
                    on_step(attempt)
        else:
            estimate = estimate_memory(model, spec.train, mesh, batch, kind, m)["total"]
            step = compile_step(trainer, kind, batch, hw.memory_bytes, estimate, m)
        steps.append(step)
        if on_step is not None:
            on_step(step)
    return {"devices": len(devices), "slices": hw.num_slices, "topology": hw.topology,
            "accelerator": hw.accelerator, "mesh": mesh, "num_layers": model.num_layers,
            "hbm_bytes_per_device": hw.memory_bytes, "microbatches_auto": auto,
            "microbatches": {str(s.global_batch): s.microbatches for s in steps if s.kind == "train"},
            "steps": [dataclasses.asdict(s) for s in steps]}


def largest_misfit(compiled: dict[str, Any]) -> dict[str, Any] | None:
    """The step that exceeds the chip's memory by the most, if any does."""
    over = [s for s in compiled["steps"] if not s["fits"]]
    return max(over, key=lambda s: s["memory_per_device_bytes"]) if over else None


def render_compiled(steps: Sequence[Any], header: bool = False) -> str:
    """Rows of the compile table (CompiledStep or its dict), with the column heads if `header`."""
    lines = [f"{'compiled':15s} {'step':5s} {'batch':>6s} {'micro':>5s} {'per chip':>10s} {'estimated':>10s} "
             f"{'compile':>8s}  fits"] if header else []
    for s in steps:
        s = dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s
        lines.append(f"{'':15s} {s['kind']:5s} {s['global_batch']:6d} {s.get('microbatches', 1):5d} "
                     f"{gib(s['memory_per_device_bytes']):>10s} "
                     f"{gib(s['estimated_memory_per_device_bytes']):>10s} {s['compile_seconds']:7.1f}s  "
                     f"{'yes' if s['fits'] else 'NO'}")
    return "\n".join(lines)


__all__ = ["CompiledStep", "compile_spec", "compile_step", "tpu_devices", "refused_bytes", "largest_misfit",
           "render_compiled"]
