"""The TPU compiler, ahead of time on this CPU host (libtpu, no chips): the project's own train and
evaluation steps compiled for the paper's pods, their memory held against the plan's estimate, and the
pre-flight compile stage of the pretrain flow."""

from __future__ import annotations

import json
import os

import pytest

from palm.analysis.aot import compile_spec, refused_bytes
from palm.cli import main
from palm.analysis.memory import estimate_memory
from palm.dag.workflow import load_spec
from tests.conftest import SPECS
from tests.test_cli import flow_run_and_tasks, prefect_flow_runs

TINY = str(SPECS / "tiny.yaml")
#: The tiny model on one TPU v4 slice of 2x2x2 chips (4-way FSDP x 2-way model): compiles in seconds.
TINY_ON_TPU = ["infra.hardware.accelerator=tpu-v4", "infra.hardware.num_devices=8", "infra.hardware.topology=2x2x2",
               "infra.hardware.devices_per_host=4", "infra.hardware.memory_bytes=34359738368", "infra.mesh.fsdp=4",
               "infra.mesh.model=2"]
GiB = 2**30


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.slow
def test_the_540b_step_compiles_for_two_slices_and_matches_the_plan():
    """The whole spec: 118 layers, its width and vocabulary, two 12x16x16 slices, data 2 x fsdp 256 x
    model 12. The layers are scanned, so the full depth compiles about as fast as two layers; the first
    batch of the ramp only (the others are in docs/benchmarks.md, from `palm plan --compile`)."""
    # Cost: XLA compiling the 540B train and eval steps for 6144 TPU devices (no chips needed, but a large program);
    # the point is that the real spec fits, so it cannot be shrunk.
    from palm.analysis.aot import tpu_devices
    from palm.core.train import Trainer

    spec = load_spec(SPECS / "palm-540b.yaml")
    compiled = compile_spec(spec, batches=[512])
    assert (compiled["devices"], compiled["slices"], compiled["topology"]) == (6144, 2, "12x16x16")
    assert compiled["mesh"] == {"data": 2, "fsdp": 256, "model": 12} and compiled["num_layers"] == 118
    assert [(s["kind"], s["global_batch"]) for s in compiled["steps"]] == [("train", 512), ("eval", 512)]
    model = spec.model
    for step in compiled["steps"]:
        assert step["fits"] and step["memory_per_device_bytes"] <= 32 * GiB, step
        assert step["breakdown"]["temporaries"] > 0 and step["compile_seconds"] > 0
        estimate = estimate_memory(model, spec.train, compiled["mesh"], step["global_batch"], step["kind"])["total"]
        assert step["estimated_memory_per_device_bytes"] == estimate
        assert abs(estimate / step["memory_per_device_bytes"] - 1) <= 0.3, step
    # TPU specs attend with the Pallas splash kernel (a Mosaic custom call), lowered without any chip.
    trainer = Trainer(spec.model.__class__(**{**spec.model.__dict__, "num_layers": 1}), spec.train,
                      compiled["mesh"], tpu_devices("tpu-v4", "12x16x16", 2))
    assert "tpu_custom_call" in trainer.lower("train", 512).as_text()


@pytest.mark.slow
def test_plan_compile_prints_the_compiled_steps(capsys):
    rc = main(["plan", TINY, "--compile", "--json", *sets(TINY_ON_TPU)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    plan = json.loads(out)
    compiled = plan["compiled"]
    assert {"devices", "slices", "topology", "hbm_bytes_per_device", "steps"} <= set(compiled)
    assert (compiled["devices"], compiled["slices"], compiled["hbm_bytes_per_device"]) == (8, 1, 32 * GiB)
    assert [(s["kind"], s["global_batch"]) for s in compiled["steps"]] == [("train", 8), ("train", 16), ("eval", 16)]
    for step in compiled["steps"]:
        assert set(step) >= {"kind", "global_batch", "memory_per_device_bytes", "estimated_memory_per_device_bytes",
                             "fits", "compile_seconds"}
        assert step["fits"] is True and 0 < step["memory_per_device_bytes"] < 32 * GiB
    assert [s["name"] for s in plan["stages"]][0] == "compile"


@pytest.mark.slow
def test_plan_compile_exits_1_naming_the_step_that_does_not_fit(capsys):
    rc = main(["plan", TINY, "--compile", *sets(TINY_ON_TPU), "--set", "infra.hardware.memory_bytes=1048576"])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "per chip" in lines[0] and "GiB more than" in lines[0], err
    assert "global batch 16" in lines[0]  # the largest misfit
    assert "NO" in out  # the table shows every step


@pytest.mark.slow
def test_a_step_compiled_again_in_a_process_is_measured_once(monkeypatch):
    """palm.analysis.aot._MEASURED: the same program for the same chips is compiled once per process; whether
    it fits is still decided by each spec's memory."""
    import jax

    compiles, compile = [], jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile",
                        lambda self, *a, **k: compiles.append(1) or compile(self, *a, **k))
    first = compile_spec(load_spec(TINY, TINY_ON_TPU), batches=[8])
    compiled = len(compiles)  # 0 where an earlier test of this process compiled them
    assert compiled <= 2 and [(s["kind"], s["fits"]) for s in first["steps"]] == [("train", True), ("eval", True)]
    again = compile_spec(load_spec(TINY, TINY_ON_TPU), batches=[8])
    small = compile_spec(load_spec(TINY, [*TINY_ON_TPU, "infra.hardware.memory_bytes=1048576"]),
                         batches=[8])
    assert len(compiles) == compiled
    assert again["steps"] == first["steps"]
    sizes = lambda compiled: [s["memory_per_device_bytes"] for s in compiled["steps"]]  # noqa: E731
    assert sizes(small) == sizes(first)
    assert not any(s["fits"] for s in small["steps"])


@pytest.mark.slow
def test_a_step_the_tpu_compiler_refuses_is_reported_not_raised():
    """540B's width on four chips needs far more than a v4 chip's 32 GiB: the compiler refuses it, and the
    need is read from its message."""
    spec = load_spec(SPECS / "palm-540b.yaml", ["infra.hardware.num_devices=4", "infra.hardware.num_slices=1",
                                                 "infra.hardware.topology=2x2x1", "infra.mesh.data=1",
                                                 "infra.mesh.fsdp=4", "infra.mesh.model=1"])
    compiled = compile_spec(spec, num_layers=1, batches=[4])
    train = compiled["steps"][0]
    assert train["fits"] is False and train["breakdown"] is None
    assert train["memory_per_device_bytes"] > 32 * GiB


def test_the_compilers_out_of_memory_messages_are_read():
    temps = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
             "(39.45G) exceeds available HBM (30.75G).")
    assert refused_bytes(temps) == ("temporaries", int(39.45 * GiB), int(30.75 * GiB))
    used = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 68.21G of 30.75G hbm. Exceeded by 37G"
    assert refused_bytes(used) == ("total", int(68.21 * GiB), int(30.75 * GiB))
    assert refused_bytes("INTERNAL: something else") is None


@pytest.mark.slow
def test_the_pretrain_flow_compiles_first_and_stops_a_spec_that_does_not_fit(prefect_server, capsys, tmp_path):
    # Cost: two `palm run` flows through Prefect compiling the tiny step for 8 TPU devices ahead of time (plus a
    # cached rerun); the point is the compile stage inside the flow.
    rc = main(["run", TINY, "--stages", "compile", "--output", str(tmp_path), "--json", *sets(TINY_ON_TPU)])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    result = json.loads(out)
    flow_run, tasks = flow_run_and_tasks(result["flow_run"])
    assert [t.name for t in tasks] == ["compile[tiny]"] and tasks[0].state.is_completed()
    manifest = json.loads((tmp_path / "compile" / result["stages"]["compile"]["key"] / "manifest.json").read_text())
    assert manifest["devices"] == 8 and all(s["fits"] for s in manifest["steps"])
    # Content-addressed like every stage: the same spec is not compiled again.
    assert main(["run", TINY, "--stages", "compile", "--output", str(tmp_path), "--json", *sets(TINY_ON_TPU)]) == 0
    assert json.loads(capsys.readouterr().out)["stages"]["compile"]["cached"] is True

    # A chip too small: bad input, one line, no retry spent, no output left to be taken as checked.
    small = tmp_path / "small"
    rc = main(["run", TINY, "--output", str(small), *sets(TINY_ON_TPU), "--set", "infra.hardware.memory_bytes=1048576",
               "--set", "retries.compile.retries=2", "--set", "retries.compile.delay_seconds=0"])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "palm: error:" in err and "per chip" in err and "Traceback" not in err
    assert not (small / "train").exists()  # training waited for the check, and never started
    assert not list(small.glob("compile/*/manifest.json"))
    failed = [f for f in prefect_flow_runs(parameter_output=str(small)) if f.state.is_failed()]
    assert len(failed) == 1
    task_runs = {t.name.split("[")[0]: t for t in flow_run_and_tasks(str(failed[0].id))[1]}
    compile_run = task_runs["compile"]
    assert compile_run.state.is_failed() and compile_run.run_count == 1
    assert not task_runs["train"].state.is_completed() and task_runs["train"].run_count == 0


@pytest.mark.slow
def test_plan_compile_picks_the_fewest_microbatches_the_compiler_fits(capsys):
    """train.microbatches: auto under --compile: per ramp batch, the TPU compiler's measure decides, starting
    from the estimate's choice (which overestimates tiny: 4 at batch 16, 2 at batch 8) and going down while
    the step fits. With 11 MiB per chip the tiny model's batch 8 fits whole (10.4 MiB compiled on
    2026-12-06) and batch 16 in 2 parts (10.4 MiB; 11.4 MiB whole, 6.3 MiB in 4)."""
    # Cost: `palm plan --compile` compiling the tiny step for TPU several times (each ramp batch, then fewer
    # microbatches while it fits); the compiler's measure is the point.
    rc = main(["plan", TINY, "--compile", "--json", *sets(TINY_ON_TPU), "--set", "train.microbatches=auto",
               "--set", f"infra.hardware.memory_bytes={11 * 2**20}"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    compiled = json.loads(out)["compiled"]
    assert compiled["microbatches_auto"] is True and compiled["microbatches"] == {"8": 1, "16": 2}
    assert [(s["kind"], s["global_batch"], s["microbatches"]) for s in compiled["steps"]] == \
        [("train", 8, 1), ("train", 16, 2), ("eval", 16, 1)]
    assert all(s["fits"] for s in compiled["steps"])


@pytest.mark.slow
def test_steps_compiled_for_tpus_stay_out_of_the_persistent_compilation_cache(tmp_path):
    """`palm` keeps a JAX compilation cache on disk; an executable compiled for abstract TPU chips cannot
    be loaded back on a CPU host, so JAX warned on every later `palm plan --compile` of the same step. Two
    runs with one fresh cache (every program cached, however quick to compile): the second is quiet."""
    import subprocess
    import sys

    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONWARNINGS="error::UserWarning")
    one_batch = "train.batch_ramp=[{from_step: 0, global_batch: 8}]"  # two programs: the step and evaluation
    cmd = [sys.executable, "-m", "palm.cli", "plan", TINY, "--compile", "--json", *sets([*TINY_ON_TPU, one_batch])]
    for _ in range(2):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "compilation cache" not in done.stderr, done.stderr[-3000:]
        assert all(s["fits"] for s in json.loads(done.stdout)["compiled"]["steps"])
    assert list((tmp_path / "cache").iterdir())  # the cache is in use: the CPU's programs are in it


def test_palm_keeps_its_compilation_cache_in_the_users_cache_directory(monkeypatch, tmp_path):
    from palm.base.jaxenv import keep_compilation_cache

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("PALM_COMPILATION_CACHE", raising=False)
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    keep_compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "palm" / "jax")
    assert os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0.2"  # an evaluation's programs too
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "5")  # the user's choice stands
    keep_compilation_cache()
    assert os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "5"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("PALM_COMPILATION_CACHE", str(tmp_path / "mine"))
    keep_compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "mine")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")  # the user's choice stands
    keep_compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("PALM_COMPILATION_CACHE", "off")
    keep_compilation_cache()
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
