"""The hardware's facts, in one table for every layer, and which (data, fsdp, model) meshes lay out on
TPU slices; standard library only, no JAX needed.

The facts: each accelerator's peak FLOP/s (`PEAK_FLOPS`, and `device_peak_flops` for a JAX device kind),
the TPU generations (`TPU_GENERATIONS`: accelerator-type prefix, TensorCores and chips per host, GKE node
label, libtpu chip config), a TPU host's chips along the torus axes (`CHIPS_PER_HOST_BOUNDS`), whether this
host is a TPU VM (`tpu_host`), and what Google Cloud offers (`V4_POD_CHIPS`, `gke_v4_problem`, `DATAFLOW_REGIONS`). Chips'
memory is not here: each spec states it (`infra.hardware.memory_bytes`).

A TPU v4 slice is a 3D mesh of chips (e.g. 12x16x16), each linked to its neighbours along every axis;
some shapes (2A=B=C or 2A=2B=C, e.g. 4x4x8, 8x8x16) close each axis into a ring with wrap-around links,
a torus. A mesh axis that spans whole physical axes runs its collectives over every link of those axes;
an axis that took part of a physical axis would share links with another mesh axis and, on a torus, cut
its rings. Such meshes are refused before any work (`palm.spec.schema` checks a spec's mesh against its
topology and suggests the nearest that lays out), and `palm.core.sharding.make_mesh` builds the device mesh
from the same assignment. Several slices (pods) are joined only by the data-center network: the `data`
axis spans them.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import math
from typing import Sequence

from palm.base.errors import PalmError

MESH_AXES = ("data", "fsdp", "model")


# ------------------------------------------------------------------------------------- accelerators

#: Dense bf16 peak per chip, FLOP/s, by the spec's accelerator name (infra.hardware.accelerator).
PEAK_FLOPS = {
    "cpu": None,
    "h100": 989.4e12,
    "h200": 989.4e12,
    "a100": 312e12,
    "tpu-v4": 275e12,
    "tpu-v5p": 459e12,
}

#: Collective bandwidth per chip, bytes/s, by accelerator: what one chip moves per second in an all-gather or
#: reduce-scatter over its slice's interconnect. TPU v4: Google Cloud's TPU v4 page
#: (docs.cloud.google.com/tpu/docs/v4, read 2026-12-06) gives 1.1 PB/s of all-reduce bandwidth per pod of
#: 4,096 chips, about 269 GB/s per chip. Used for the FSDP weight gathers each microbatch repeats
#: (palm.analysis.steptime); an accelerator not listed is estimated without them.
COLLECTIVE_BYTES_PER_S = {
    "tpu-v4": 1.1e15 / 4096,
}

#: A JAX device's `device_kind` (lower case) contains the key -> the spec's accelerator name; first match wins.
DEVICE_KINDS = {"h100": "h100", "h200": "h200", "a100": "a100", "tpu v4": "tpu-v4", "tpu v5p": "tpu-v5p"}


def device_peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of a JAX device by its `device_kind`, or None where unknown (CPU)."""
    kind = device_kind.lower()
    for name, accelerator in DEVICE_KINDS.items():
        if name in kind:
            return PEAK_FLOPS[accelerator]
    return None


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    prefix: str               # the accelerator type's prefix (v4-<TensorCores>), and libtpu's topology name prefix
    cores_per_chip: int       # v2-v4 (and v5p) accelerator types count TensorCores, not chips
    chips_per_host: int
    gke_accelerator: str      # the node label cloud.google.com/gke-tpu-accelerator
    chip_config: str          # libtpu's chip config (jax.experimental.topologies' chip_config_name)


#: TPU generations by the spec's accelerator name.
TPU_GENERATIONS = {
    "tpu-v4": TpuGeneration("v4", 2, 4, "tpu-v4-podslice", "megacore"),
    "tpu-v5p": TpuGeneration("v5p", 2, 4, "tpu-v5p-slice", "megacore"),
}

#: Chips per host along each torus axis for a host of N chips (v4 and v5p hosts carry 4 chips, 2x2x1).
CHIPS_PER_HOST_BOUNDS = {1: (1, 1, 1), 2: (2, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2)}


def tpu_host() -> bool:
    """Whether this host has TPU chips (their device files), without starting any JAX backend."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


# ------------------------------------------------------------------------------ meshes on TPU slices


def torus_assignment(physical: Sequence[int], sizes: Sequence[int]) -> list[tuple[int, ...]] | None:
    """Which physical axes of one slice each mesh axis spans, or None if they cannot be laid out.

    Every mesh axis must be the product of whole physical axes (never a part of one), all physical axes
    used. Axes are placed from the last (model,
    the most communication-heavy) to the first, each preferring as many physical axes as it can take, so
    model parallelism gets the widest, fastest neighbourhoods; among equals the first physical axes win.
    This is the same preference as jax.experimental.mesh_utils, but searched exhaustively, so a layout is
    found whenever one exists.
    """
    physical, sizes = tuple(int(p) for p in physical), tuple(int(s) for s in sizes)
    if math.prod(physical) != math.prod(sizes):
        return None
    free_axes = [i for i, p in enumerate(physical) if p > 1]

    def place(k: int, free: tuple[int, ...]) -> list[tuple[int, ...]] | None:
        if k < 0:
            return [] if not free else None
        candidates = [c for n in range(len(free), -1, -1) for c in itertools.combinations(free, n)
                      if math.prod(physical[i] for i in c) == sizes[k]]
        for chosen in candidates:
            rest = place(k - 1, tuple(i for i in free if i not in chosen))
            if rest is not None:
                return rest + [chosen]
        return None

    return place(len(sizes) - 1, tuple(free_axes))


def parse_topology(topology: str) -> tuple[int, ...]:
    """'12x16x16' -> (12, 16, 16): chips along each physical axis of one slice."""
    try:
        dims = tuple(int(x) for x in topology.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise PalmError(f"TPU topology {topology!r} is not of the form AxBxC (chips along each axis of the slice), "
                        "e.g. 8x8x16")
    return dims


def slice_mesh_shape(shape: dict[str, int], num_slices: int) -> dict[str, int]:
    """One slice's share of the mesh: `data` spans the slices (over the data-center network) first."""
    data = shape.get("data", 1)
    if data % num_slices:
        raise PalmError(f"mesh data={data} must be a multiple of the {num_slices} slices: the data axis "
                        "spans the slices (their only link is the data-center network)")
    return {"data": data // num_slices, "fsdp": shape.get("fsdp", 1), "model": shape.get("model", 1)}


def mesh_fits_topology(shape: dict[str, int], topology: Sequence[int], num_slices: int = 1) -> bool:
    """Whether the (data, fsdp, model) mesh lays out on `num_slices` slices of this shape."""
    try:
        per_slice = slice_mesh_shape(shape, num_slices)
    except PalmError:
        return False
    return torus_assignment(topology, [per_slice[a] for a in MESH_AXES]) is not None


def valid_meshes(num_devices: int, topology: Sequence[int], num_slices: int = 1) -> list[dict[str, int]]:
    """Every (data, fsdp, model) mesh of `num_devices` that lays out on the slices."""
    out = []
    for data in range(1, num_devices + 1):
        if num_devices % data:
            continue
        for model in range(1, num_devices // data + 1):
            if (num_devices // data) % model:
                continue
            shape = {"data": data, "fsdp": num_devices // data // model, "model": model}
            if mesh_fits_topology(shape, topology, num_slices):
                out.append(shape)
    return out


def nearest_mesh(shape: dict[str, int], topology: Sequence[int], num_slices: int = 1,
                 heads: int | None = None, batches: Sequence[int] = ()) -> dict[str, int] | None:
    """The valid mesh closest to `shape` (model size first, then data): model dividing `heads` and
    data x fsdp dividing every global batch where such a mesh exists."""
    num_devices = math.prod(shape.get(a, 1) for a in MESH_AXES)
    candidates = valid_meshes(num_devices, topology, num_slices)

    def usable(m: dict[str, int]) -> bool:
        return (heads is None or heads % m["model"] == 0) and all(b % (m["data"] * m["fsdp"]) == 0 for b in batches)

    def distance(m: dict[str, int]) -> tuple[float, ...]:
        return tuple(abs(math.log2(m[a] / shape.get(a, 1))) for a in ("model", "data", "fsdp"))

    ranked = sorted(candidates, key=lambda m: (not usable(m), distance(m)))
    return ranked[0] if ranked else None


# ------------------------------------------------------------------------------ what Google Cloud offers

#: The largest TPU v4 slice: one pod.
V4_POD_CHIPS = 4096

#: TPU v4 node pools on GKE (node pool `--tpu-topology`, machine type ct4p-hightpu-4t, 4 chips per node).
#: Sources, read 2026-12-06:
#: - GKE's "Plan TPUs in GKE" page (https://cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus) holds
#:   GKE's own table of v4 topologies, but the documentation search returned only the page's opening, not the
#:   table: GKE's own list is NOT verified here.
#: - XPK, Google's tool that creates these node pools (github.com/AI-Hypercomputer/xpk): its PR #834 ("Add
#:   missing valid TPU topologies for v4, v5p and tpu7x", merged, opened 2025-11-14) replaced its eleven v4
#:   shapes (2x2x1 ... 8x16x16, still its defaults for a chip count) with a generated list,
#:   src/xpk/core/system_characteristics.py `generate_tpu_topologies(max_cubes=64, enforce_nondecreasing=False)`:
#:   the four shapes below a 4x4x4 cube, and every AxBxC whose sides are all multiples of 4 with at most 64
#:   cubes of 4x4x4 (4,096 chips, one pod), 12x16x16 included.
#: GKE is taken to accept what XPK accepts (`gke_v4_problem`); Cloud TPU's own rule (`cloud_tpu_v4_problem`,
#: A <= B <= C) is checked first, so the shapes are listed in that order only.
GKE_V4_SUBCUBE_TOPOLOGIES = ("2x2x1", "2x2x2", "2x2x4", "2x4x4")


def gke_v4_problem(dims: Sequence[int]) -> str | None:
    """Why GKE has no TPU v4 node pool of shape AxBxC (XPK's rule since its PR #834, see
    GKE_V4_SUBCUBE_TOPOLOGIES), or None."""
    dims = tuple(int(d) for d in dims)
    text = "x".join(map(str, dims))
    if text in GKE_V4_SUBCUBE_TOPOLOGIES:
        return None
    if len(dims) != 3 or any(d <= 0 or d % 4 for d in dims):
        return (f"{text} is not a TPU v4 node-pool topology on GKE (it offers {', '.join(GKE_V4_SUBCUBE_TOPOLOGIES)} "
                "and AxBxC with every side a multiple of 4, up to a pod)")
    if math.prod(dims) > V4_POD_CHIPS:
        return f"{text} is {math.prod(dims)} chips, more than a TPU v4 pod's {V4_POD_CHIPS}"
    return None


def gke_v4_topologies(max_chips: int = V4_POD_CHIPS) -> tuple[str, ...]:
    """Every v4 node-pool shape GKE offers (`gke_v4_problem`) written A <= B <= C, smallest first."""
    out = list(GKE_V4_SUBCUBE_TOPOLOGIES)
    side = range(4, max_chips + 1, 4)
    shapes = [(a, b, c) for a in side for b in side if a <= b and a * b <= max_chips
              for c in side if b <= c and a * b * c <= max_chips]
    out += ["x".join(map(str, d)) for d in sorted(shapes, key=lambda d: (math.prod(d), d))]
    return tuple(out)


#: GKE's v4 node-pool shapes as Cloud TPU writes them (A <= B <= C), 2x2x1 up to a pod.
GKE_V4_TOPOLOGIES = gke_v4_topologies()


def cloud_tpu_v4_problem(dims: Sequence[int]) -> str | None:
    """Why AxBxC is not a TPU v4 slice Cloud TPU can create (A <= B <= C, each at most 4 or a multiple
    of 4, at most a pod), or None."""
    dims = tuple(int(d) for d in dims)
    text = "x".join(map(str, dims))
    if len(dims) != 3 or list(dims) != sorted(dims) or any(d <= 0 or (d > 4 and d % 4) for d in dims):
        return (f"{text} is not a TPU v4 topology: write AxBxC with A <= B <= C, each at most 4 or a multiple of 4"
                + (f" (e.g. {'x'.join(map(str, sorted(dims)))} if its sizes are right)" if len(dims) == 3 else ""))
    if math.prod(dims) > V4_POD_CHIPS:
        return f"{text} is {math.prod(dims)} chips, more than a TPU v4 pod's {V4_POD_CHIPS}: use several slices"
    return None


def gke_v4_alternatives(num_devices: int, mesh: dict[str, int], heads: int | None = None,
                        batches: Sequence[int] = ()) -> list[dict]:
    """GKE node-pool shapes that hold `num_devices` chips in whole slices, each with the mesh that lays out
    on it (the given one if it does, else the nearest), best first: a mesh whose model axis divides the
    heads and whose data x fsdp divides every batch, then the model axis closest to the given one, then
    the fewest slices."""
    out = []
    for topology in GKE_V4_TOPOLOGIES:
        dims = parse_topology(topology)
        chips = math.prod(dims)
        if num_devices % chips:
            continue
        slices = num_devices // chips
        laid = mesh if mesh_fits_topology(mesh, dims, slices) else nearest_mesh(mesh, dims, slices, heads, batches)
        if laid is None:
            continue
        usable = (heads is None or heads % laid["model"] == 0) and all(
            b % (laid["data"] * laid["fsdp"]) == 0 for b in batches)
        out.append({"topology": topology, "num_slices": slices, "mesh": laid, "usable": usable})
    out.sort(key=lambda a: (not a["usable"], abs(math.log2(a["mesh"]["model"] / mesh.get("model", 1))),
                            a["num_slices"]))
    return out


def describe_alternative(alt: dict) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in alt["mesh"].items())
    return f"{alt['num_slices']} slice(s) of {alt['topology']} with mesh {mesh}"


# ------------------------------------------------------------------------------------------ Dataflow

#: The regions where Dataflow has a regional endpoint, i.e. where a job can be created and its workers run.
#: Sources, read 2026-12-06:
#: - Dataflow's "Dataflow locations" page (https://cloud.google.com/dataflow/docs/resources/locations), which
#:   "Dataflow regions" (https://cloud.google.com/dataflow/docs/concepts/regional-endpoints) points to for the
#:   list: the documentation search did not return that page's table, so it is NOT verified here.
#: - The Dataflow API's discovery document (dataflow v1b3, its "endpoints" list of regional endpoints
#:   dataflow.<region>.rep.googleapis.com), as vendored in github.com/googleapis/google-api-go-client,
#:   dataflow/v1b3/dataflow-api.json at commit 00d93fadbc28c242bf503fb57077de15b68e8842: the 46 regions below,
#:   us-central2 among them (Assured Workloads' ITAR page also lists dataflow.us-central2.rep.googleapis.com).
#:   That us-central2 has a Dataflow endpoint does not say which worker machine types its zones have.
#: Machine types: Dataflow's "Configure Dataflow worker VMs" page
#: (https://cloud.google.com/dataflow/docs/guides/configure-worker-vm) says workers may use x86 or Arm Compute
#: Engine machine types, custom ones included (of Arm, the T2A and C4A series); no per-region list of families
#: was found, so the machine type is not checked here (Compute Engine refuses a type a zone lacks at job start).
DATAFLOW_REGIONS: tuple[str, ...] = (
    "africa-south1",
    "asia-east1", "asia-east2", "asia-northeast1", "asia-northeast2", "asia-northeast3", "asia-south1",
    "asia-south2", "asia-southeast1", "asia-southeast2", "asia-southeast3",
    "australia-southeast1", "australia-southeast2",
    "europe-central2", "europe-north1", "europe-north2", "europe-southwest1", "europe-west1", "europe-west10",
    "europe-west12", "europe-west2", "europe-west3", "europe-west4", "europe-west6", "europe-west8",
    "europe-west9",
    "me-central1", "me-central2", "me-west1",
    "northamerica-northeast1", "northamerica-northeast2", "northamerica-south1",
    "southamerica-east1", "southamerica-west1",
    "us-central1", "us-central2", "us-east1", "us-east4", "us-east5", "us-east7", "us-south1", "us-west1",
    "us-west2", "us-west3", "us-west4", "us-west8",
)


def dataflow_machine_problem(region: str, machine_type: str | None = None) -> str | None:
    """Why Dataflow cannot run a job in `region` (None when it can). `machine_type` is not checked: no
    per-region list of Dataflow's machine families was found (see DATAFLOW_REGIONS)."""
    if region not in DATAFLOW_REGIONS:
        near = ", ".join(r for r in DATAFLOW_REGIONS if r.startswith(region.rsplit("-", 1)[0][:4]))
        return (f"Dataflow has no regional endpoint in {region} (regions: {near or ', '.join(DATAFLOW_REGIONS)}; "
                "palm.base.hardware.DATAFLOW_REGIONS, from the Dataflow API's discovery document: add a region "
                "Google opened since)")
    return None
