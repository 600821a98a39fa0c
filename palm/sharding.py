"""From logical axis names to the device mesh: the rules live here and nowhere else.

Every parameter and activation in `palm.model` names its axes ("embed", "heads", "mlp", "batch", ...).
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

from palm.errors import PalmError

MESH_AXES = ("data", "fsdp", "model")

#: Logical name -> candidate mesh axes, tried in order. Unlisted names are never sharded.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", ("fsdp",)),
    ("embed", ("fsdp",)),
    ("embed", ("model",)),
    ("heads", ("model",)),
    ("mlp", ("model",)),
    ("heads_act", ("model",)),
    ("mlp_act", ("model",)),
)


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over (data, fsdp, model) with automatic (GSPMD) sharding propagation."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = tuple(shape.get(a, 1) for a in MESH_AXES)
    need = math.prod(sizes)
    if need != len(devices):
        raise PalmError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {need} devices but {len(devices)} are "
                        "available; set infra.hardware.num_devices and infra.mesh to match")
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


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
        """NamedShardings for a tree of nn.Partitioned boxes (e.g. `palm.model.abstract_params`)."""
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
