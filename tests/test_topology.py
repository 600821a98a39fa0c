"""Meshes laid onto TPU tori: which meshes a slice can take, the hybrid mesh of several slices, and the
spec check that refuses a mesh its slices cannot take (naming the nearest that they can)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from palm.cli import main
from palm.base.errors import PalmError
from palm.dag.workflow import load_spec
from palm.base.hardware import mesh_fits_topology, nearest_mesh, parse_topology, torus_assignment, valid_meshes
from tests.conftest import SPECS


def test_each_mesh_axis_spans_whole_torus_axes():
    # 540B's slice: model over the 12-chip axis, FSDP over the 16x16 plane.
    assert torus_assignment((12, 16, 16), (1, 256, 12)) == [(), (1, 2), (0,)]
    assert torus_assignment((8, 8, 8), (1, 64, 8)) == [(), (1, 2), (0,)]
    assert torus_assignment((8, 8, 16), (2, 64, 8)) is None  # 2 would cut a ring of 8 or 16
    assert torus_assignment((8, 8, 8), (1, 256, 2)) is None
    assert torus_assignment((2, 2, 1), (1, 4, 1)) == [(), (0, 1), ()]  # axes of one chip are free
    # Exhaustive: a layout is found wherever one exists (model takes 4x4, leaving 16 for fsdp).
    assert torus_assignment((4, 4, 16), (1, 16, 16)) == [(), (2,), (0, 1)]
    assert torus_assignment((8, 8, 8), (1, 8, 8)) is None  # 512 chips are not 64


def test_valid_meshes_are_exactly_the_products_of_torus_axes():
    meshes = valid_meshes(512, (8, 8, 8))
    assert {m["model"] for m in meshes} == {1, 8, 64, 512}
    for m in meshes:
        assert math.prod(m.values()) == 512
        assert all(v in (1, 8, 64, 512) for v in m.values())
    # Two slices: data spans them, so it is a multiple of 2 and the rest lays out on each slice.
    assert mesh_fits_topology({"data": 2, "fsdp": 256, "model": 12}, (12, 16, 16), 2)
    assert not mesh_fits_topology({"data": 1, "fsdp": 512, "model": 12}, (12, 16, 16), 2)
    assert not mesh_fits_topology({"data": 2, "fsdp": 128, "model": 24}, (12, 16, 16), 2)


def test_the_nearest_mesh_keeps_heads_and_batches_whole():
    near = nearest_mesh({"data": 1, "fsdp": 256, "model": 2}, (8, 8, 8), heads=16, batches=[256, 512])
    assert near == {"data": 1, "fsdp": 64, "model": 8}
    near = nearest_mesh({"data": 1, "fsdp": 256, "model": 4}, (8, 8, 16), heads=32, batches=[512, 1024])
    assert near == {"data": 1, "fsdp": 128, "model": 8}


@pytest.mark.parametrize("name", ["palm-8b.yaml", "palm-62b.yaml", "palm-540b.yaml"])
def test_the_paper_specs_lay_out_on_their_own_slices(name):
    spec = load_spec(SPECS / name)
    hw = spec.infra.hardware
    assert mesh_fits_topology(spec.resolved_mesh(), parse_topology(hw.topology), hw.num_slices)


def test_a_mesh_the_slice_cannot_take_is_refused_with_the_nearest_one(capsys):
    rc = main(["plan", str(SPECS / "palm-8b.yaml"), "--set", "infra.mesh.fsdp=256", "--set", "infra.mesh.model=2"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "infra.mesh" in err and "8x8x8" in err and "{data: 1, fsdp: 64, model: 8}" in err
    rc = main(["plan", str(SPECS / "palm-540b.yaml"), "--set", "infra.hardware.topology=12x16x8"])
    err = capsys.readouterr().err
    assert rc == 2 and "infra.hardware.topology" in err and "3072 chips" in err and "6144" in err
    rc = main(["plan", str(SPECS / "palm-540b.yaml"), "--set", "infra.hardware.topology=12by16"])
    err = capsys.readouterr().err
    assert rc == 2 and "infra.hardware.topology" in err and "AxBxC" in err


def _coords(devices) -> np.ndarray:
    return np.array([list(d.coords) for d in np.ravel(devices)]).reshape(*np.shape(devices), 3)


def test_the_540b_mesh_is_two_slices_of_torus_laid_axes():
    from palm.analysis.aot import tpu_devices
    from palm.core.sharding import make_mesh

    devices = tpu_devices("tpu-v4", "12x16x16", num_slices=2)
    assert len(devices) == 6144
    mesh = make_mesh({"data": 2, "fsdp": 256, "model": 12}, devices)
    grid = mesh.devices
    assert grid.shape == (2, 256, 12)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()  # only `data` crosses the data-center network
    coords = _coords(grid)
    # A model group is one line of the 12-chip axis; an FSDP group is the 16x16 plane at one x.
    group = coords[0, 37]
    assert sorted(group[:, 0]) == list(range(12)) and len({tuple(c[1:]) for c in group}) == 1
    plane = coords[1, :, 5]
    assert set(plane[:, 0]) == {5} and len({tuple(c[1:]) for c in plane}) == 256
    assert len({d.id for d in grid.ravel()}) == 6144


def test_make_mesh_refuses_what_the_torus_cannot_take():
    from palm.analysis.aot import tpu_devices
    from palm.core.sharding import make_mesh

    devices = tpu_devices("tpu-v4", "2x2x2", num_slices=2)
    mesh = make_mesh({"data": 2, "fsdp": 4, "model": 2}, devices)
    assert mesh.devices.shape == (2, 4, 2) and mesh.axis_names == ("data", "fsdp", "model")
    with pytest.raises(PalmError, match="does not lay out"):  # 2 would take part of an axis of 4x4x4
        make_mesh({"data": 1, "fsdp": 32, "model": 2}, tpu_devices("tpu-v4", "4x4x4"))
    with pytest.raises(PalmError, match="multiple of the 2 slices"):
        make_mesh({"data": 1, "fsdp": 8, "model": 2}, devices)


def test_gke_v4_node_pools_follow_xpks_rule():
    """GKE's v4 node pools as XPK has them since its PR #834: the four sub-cube shapes, and every AxBxC with
    all sides multiples of 4 up to a pod (palm.base.hardware.gke_v4_problem, sources in its comment)."""
    from palm.base.hardware import GKE_V4_TOPOLOGIES, gke_v4_problem

    for shape in ("2x2x1", "2x4x4", "4x4x12", "12x16x16", "16x16x16", "4x4x256"):
        assert gke_v4_problem(parse_topology(shape)) is None and shape in GKE_V4_TOPOLOGIES, shape
    for shape in ("2x4x8", "2x32x48", "1x1x1", "16x16x20"):
        assert gke_v4_problem(parse_topology(shape)) is not None and shape not in GKE_V4_TOPOLOGIES, shape
    eleven = {"2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x12", "8x8x16", "8x16x16"}
    assert eleven <= set(GKE_V4_TOPOLOGIES) and len(set(GKE_V4_TOPOLOGIES)) == len(GKE_V4_TOPOLOGIES)


def test_dataflow_regions_are_its_regional_endpoints():
    """A region with a Dataflow regional endpoint is taken (us-central2 has one), another refused; the machine
    type is not checked (no per-region list of families was found)."""
    from palm.base.hardware import dataflow_machine_problem

    assert dataflow_machine_problem("us-central2", "n2-highmem-16") is None
    assert dataflow_machine_problem("africa-south1", "a3-highgpu-8g") is None
    assert "us-central1" in dataflow_machine_problem("us-central9", None)
