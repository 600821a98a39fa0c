"""Digests of the train state: made from each device's own shards (no all-gather), equal on any mesh and
number of processes, and sensitive to any changed or moved element."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from palm.core.checkpoint import tree_digest
from tests.conftest import ROOT, cpu_devices
from palm.base.net import free_port

SCRIPT = str(ROOT / "tests" / "digest_state.py")
ONE = {"data": 1, "fsdp": 1, "model": 1}
MESHES = [{"data": 1, "fsdp": 8, "model": 1}, {"data": 2, "fsdp": 2, "model": 2}, {"data": 1, "fsdp": 2, "model": 4}]


def child_env(devices: int, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    return {**base, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
            "XLA_FLAGS": cpu_devices(devices), **extra}


@pytest.fixture(scope="module")
def one_and_eight() -> list[dict]:
    out = subprocess.run([sys.executable, SCRIPT, json.dumps([ONE, *MESHES])], capture_output=True, text=True,
                         env=child_env(8), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_the_digest_is_the_same_on_one_device_and_three_meshes_of_eight(one_and_eight):
    # Cost: the module fixture, a subprocess with 8 host devices (fixed when JAX starts) building a small train
    # state on one device and three meshes; shared with the two tests below.
    single, *sharded = one_and_eight
    assert single["devices"] == 1 and [r["mesh"] for r in sharded] == MESHES
    for row in sharded:
        assert row["devices"] == 8
        assert any("model" in s or "fsdp" in s for s in row["specs"]), row["specs"]  # really sharded
        assert row["state_digest"] == single["state_digest"], row["mesh"]
        assert row["params_digest"] == single["params_digest"], row["mesh"]
    assert single["state_digest"] != single["params_digest"]  # the whole state, not only the parameters


@pytest.mark.slow
def test_the_digest_gathers_nothing(one_and_eight):
    for row in one_and_eight:
        assert row["all_gather"] is False, row["mesh"]


@pytest.mark.slow
def test_the_digest_is_the_same_on_two_processes(one_and_eight):
    # Cost: two JAX processes joined by jax.distributed; arrays that span hosts are the point.
    mesh = {"data": 1, "fsdp": 2, "model": 2}  # 2 processes x 2 devices: every array spans both hosts
    port = free_port()
    procs = [subprocess.Popen([sys.executable, SCRIPT, json.dumps([mesh])], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=child_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                            JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    single = one_and_eight[0]
    assert [r["processes"] for r in rows] == [2, 2] and [r["devices"] for r in rows] == [4, 4]
    assert {r["state_digest"] for r in rows} == {single["state_digest"]}
    assert {r["params_digest"] for r in rows} == {single["params_digest"]}
    assert not any(r["all_gather"] for r in rows)


def test_any_changed_or_moved_element_changes_the_digest():
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(6, 5)).astype(np.float32), "b": jnp.asarray(rng.normal(size=7), jnp.bfloat16),
            "n": np.arange(4, dtype=np.int32), "ok": np.array([True, False]), "step": np.int32(3)}
    base = tree_digest(tree)
    assert tree_digest({k: (jnp.asarray(v) if k == "w" else v) for k, v in tree.items()}) == base  # host or device
    flipped = tree["w"].copy()
    flipped.view(np.uint32)[2, 3] ^= 1  # one bit of one element
    swapped = tree["w"].copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same values, moved
    for name, value in [("w", flipped), ("w", swapped), ("w", tree["w"].reshape(5, 6)), ("n", np.arange(4) * 2),
                        ("ok", np.array([False, True])), ("step", np.int32(4)),
                        ("b", tree["b"].at[0].set(tree["b"][0] + 1))]:
        assert tree_digest({**tree, name: value.astype(tree[name].dtype) if hasattr(value, "astype") else value}) \
            != base, name
    assert tree_digest({**tree, "extra": np.zeros(1, np.float32)}) != base
