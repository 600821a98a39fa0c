"""From logical axis names to the device mesh: the rules live here and nowhere else.

Every parameter and activation in `palm.core.model` names its axes ("embed", "heads", "mlp", "batch", ...).
`RULES` maps each name to mesh axes (`data`, `fsdp`, `model`). A dimension takes the first rule whose
mesh axes are still unused by that array and divide the dimension, so the tied embedding table
("vocab", "embed") becomes vocab→fsdp, embed→model while a kernel ("embed", "mlp") becomes
embed→fsdp, mlp→model. This is PaLM's 2D layout: model parallelism over heads and the MLP's hidden
dimension, fully sharded data parallelism over the rest, and pure data parallelism (across pods) on `data`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from palm.base.errors import PalmError
from palm.base.hardware import MESH_AXES, slice_mesh_shape, torus_assignment

#: Logical name -> candidate mesh axes, tried in order. Unlisted names are never sharded: among them
#: "layers" (the scanned layer axis) and "fused" (the key/value and gate/up slots of fused kernels).
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", ("fsdp",)),
    ("embed", ("fsdp",)),
    ("embed", ("model",)),
    ("heads", ("model",)),
    ("mlp", ("model",)),
    ("heads_act", ("model",)),
    ("mlp_act", ("model",)),
    # The residual stream between layers (what full remat keeps per layer) is split over `model` too:
    # compiled for palm-62b on one 8x8x8 slice (64-way FSDP x 8-way model, batch 1024), 13.9 GiB per chip,
    # against 14.7 GiB unsplit and 28.5 GiB with the sequence split over `model` instead (docs/benchmarks.md).
    ("embed_act", ("model",)),
    ("vocab_act", ("model",)),
)


def _tpu_device_mesh(sizes: tuple[int, ...], devices: Sequence[jax.Device]) -> np.ndarray:
    """TPU devices arranged as the mesh: each slice's chips laid out by `torus_assignment`, the slices
    stacked along `data`."""
    by_slice: dict[int, list[jax.Device]] = {}
    for d in devices:
        by_slice.setdefault(int(getattr(d, "slice_index", 0) or 0), []).append(d)
    num_slices = len(by_slice)
    per_slice = slice_mesh_shape(dict(zip(MESH_AXES, sizes)), num_slices)
    per_sizes = tuple(per_slice[a] for a in MESH_AXES)
    blocks = []
    for index in sorted(by_slice):
        slice_devices = by_slice[index]
        coords = np.array([list(d.coords) + [getattr(d, "core_on_chip", 0)] for d in slice_devices])
        physical = tuple(int(c) for c in coords.max(0) + 1)
        if math.prod(physical) != len(slice_devices):
            raise PalmError(f"the devices of slice {index} do not fill a slice (coordinates up to {physical})")
        grid = np.empty(physical, dtype=object)
        for d, c in zip(slice_devices, coords):
            grid[tuple(c)] = d
        assignment = torus_assignment(physical, per_sizes)
        if assignment is None:
            raise PalmError(f"mesh {dict(zip(MESH_AXES, sizes))} does not lay out on {num_slices} slice(s) of "
                            f"{'x'.join(map(str, physical[:-1] if physical[-1] == 1 else physical))} TPU chips: "
                            "each axis of a slice must be a product of whole physical axes")
        order = [i for axes in assignment for i in axes]
        order += [i for i in range(len(physical)) if i not in order]  # axes of size 1
        blocks.append(grid.transpose(order).reshape(per_sizes))
    return np.concatenate(blocks, axis=0)


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over (data, fsdp, model) with automatic (GSPMD) sharding propagation.

    On TPUs the mesh follows the physical axes of each slice, with `data` across slices (the hybrid
    ICI x DCN mesh of a multi-slice job); `devices` may be the abstract devices of a topology that this
    host does not have (`palm.analysis.aot`). Elsewhere the devices are taken in JAX's order.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = tuple(shape.get(a, 1) for a in MESH_AXES)
    need = math.prod(sizes)
    if need != len(devices):
        raise PalmError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {need} devices but {len(devices)} are "
                        "available; set infra.hardware.num_devices and infra.mesh to match")
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if devices[0].platform == "tpu" and len(devices) > 1:
        return Mesh(_tpu_device_mesh(sizes, devices), MESH_AXES, axis_types=auto)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)


@dataclasses.dataclass(frozen=True)
class Sharding:
    """Mesh axis sizes plus the rules; with a live `mesh` it also places arrays on devices.

    Without a mesh (planning a 6144-chip job on a laptop) it still answers `spec` and `describe`.
    """

    sizes: tuple[tuple[str, int], ...]
    mesh: Mesh | None = None
    rules: tuple[tuple[str, tuple[str, ...]], ...] = RULES

    @classmethod
    def on(cls, mesh: Mesh) -> "Sharding":
        return cls(tuple((a, int(mesh.shape[a])) for a in MESH_AXES), mesh)

    @classmethod
    def planned(cls, shape: dict[str, int]) -> "Sharding":
        return cls(tuple((a, int(shape.get(a, 1))) for a in MESH_AXES))

    @property
    def axis_sizes(self) -> dict[str, int]:
        return dict(self.sizes)

    def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec:
        """PartitionSpec for an array with these logical axis names (and, if given, this shape)."""
        used: set[str] = set()
        out: list[Any] = []
        for i, name in enumerate(names):
            chosen = None
            for logical, axes in self.rules:
                if logical != name or used.intersection(axes):
                    continue
                size = math.prod(self.axis_sizes[a] for a in axes)
                if shape is not None and shape[i] % size:
                    continue
                chosen = axes
                break
            if chosen is not None:
                used.update(chosen)
                chosen = tuple(a for a in chosen if self.axis_sizes[a] > 1) or None
                if chosen is not None and len(chosen) == 1:
                    chosen = chosen[0]
            out.append(chosen)
        return PartitionSpec(*out)

    def named(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def constrain(self, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
        """Pin an activation's layout inside jit."""
        return jax.lax.with_sharding_constraint(x, self.named(names, x.shape))

    def for_params(self, boxed: Any) -> Any:
        """NamedShardings for a tree of nn.Partitioned boxes (e.g. `palm.core.model.abstract_params`)."""
        return jax.tree.map(lambda p: self.named(p.names, p.value.shape), boxed,
                            is_leaf=lambda x: isinstance(x, nn.Partitioned))

    @property
    def data_parallel_size(self) -> int:
        return self.axis_sizes["data"] * self.axis_sizes["fsdp"]

    def param_bytes_per_device(self, boxed: Any, itemsize: int) -> int:
        """Bytes of these parameters one device holds (uneven shards padded up), at `itemsize` each."""
        total = 0
        for p in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
            spec = self.spec(p.names, p.value.shape)
            per = itemsize
            for i, dim in enumerate(p.value.shape):
                axes = spec[i] if i < len(spec) else None
                axes = (axes,) if isinstance(axes, str) else (axes or ())
                per *= -(-dim // math.prod(self.axis_sizes[a] for a in axes))
            total += per
        return total

    def describe(self, boxed: Any) -> list[tuple[str, tuple[int, ...], str]]:
        """(path, shape, PartitionSpec) for every parameter: the layout, human-readable."""
        rows = []
        flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
        for path, p in flat:
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            rows.append((name, tuple(p.value.shape), str(self.spec(p.names, p.value.shape))))
        return rows
