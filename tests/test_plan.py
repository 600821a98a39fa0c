"""`palm plan`: parameter counts, FLOPs, mesh, tokens and memory per device for the paper's models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palm.cli import main
from palm.core.model import count_params
from palm.dag.workflow import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"

# spec, parameters (paper Table 1: 540.35B, 62.50B, 8.63B), layers, heads
PAPER = [
    ("palm-540b.yaml", 540_356_474_880, 118, 48),
    ("palm-62b.yaml", 62_495_662_080, 64, 32),
    ("palm-8b.yaml", 8_632_012_800, 32, 16),
]


def plan_json(capsys, spec: Path | str, *extra: str) -> dict:
    rc = main(["plan", str(spec), "--json", *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def plan_540b():
    from palm.app.plan import plan

    # Round-trip through JSON like the CLI does, so the module-scoped result matches `--json`.
    return json.loads(json.dumps(plan(load_spec(SPECS / "palm-540b.yaml")), default=str))


@pytest.mark.parametrize("name, params, layers, heads", PAPER, ids=[p[0] for p in PAPER])
def test_paper_model_sizes(capsys, name, params, layers, heads):
    p = plan_json(capsys, SPECS / name)
    for key in ("params", "model_flops_per_token", "memory_per_device_bytes", "mesh", "stages"):
        assert key in p, key
    assert p["params"] == params
    head_dim, seq_len = 256, 2048
    assert p["model_flops_per_token"] == 6 * params + 12 * layers * heads * head_dim * seq_len
    # TPU specs check first that every step fits their pods (the pre-flight compile stage, palm.analysis.aot).
    # PaLM's filtered webpages are sampled by the quality classifier, trained first (palm.data.quality).
    assert [s["name"] for s in p["stages"]] == ["compile", "quality", "data", "tokenizer", "pack", "train", "eval"]
    assert next(s for s in p["stages"] if s["name"] == "train")["after"] == ["compile"]
    assert next(s for s in p["stages"] if s["name"] == "data")["inputs"] == {"quality": "quality"}
    mesh = p["mesh"]
    assert mesh["data"] * mesh["fsdp"] * mesh["model"] == p["hardware"]["num_devices"]


def test_540b_mesh_and_tokens(plan_540b, capsys):
    assert plan_540b["mesh"] == {"data": 2, "fsdp": 256, "model": 12}
    assert plan_540b["training_tokens"] == (50000 * 512 + 65000 * 1024 + 140000 * 2048) * 2048
    assert plan_540b["total_training_flops"] == pytest.approx(
        plan_540b["model_flops_per_token"] * plan_540b["training_tokens"])
    # Same through the CLI.
    p = plan_json(capsys, SPECS / "palm-540b.yaml")
    assert p["mesh"] == plan_540b["mesh"] and p["training_tokens"] == plan_540b["training_tokens"]


def test_540b_memory_per_device(plan_540b):
    """Parameter bytes per device come from the sharding layout, not from a params / devices formula.

    Most weights are split fsdp (256) x model (12) = 3072 ways, replicated over the 2-way `data` axis.
    The multi-query key/value projection (one head) and the LayerNorm scales have no dimension the
    model axis can split, so they are sharded 256 ways only. That puts the total about 2.3% above the
    naive 540.36e9 * 4 / 3072; the exact value is computed here from the shapes.
    """
    L, d, h, n, vocab = 118, 18432, 256, 48, 256_000
    f = 4 * d
    fsdp, model = 256, 12
    elems = (
        vocab * d // (fsdp * model)             # embedding: vocab -> fsdp, embed -> model
        + d // fsdp                             # final norm
        + L * d // fsdp                         # per-layer norm
        + L * d * 2 * 1 * h // fsdp             # key_value (multi-query): embed -> fsdp only
        + L * d * n * h // (fsdp * model)       # query
        + L * n * h * d // (fsdp * model)       # out
        + L * d * 2 * f // (fsdp * model)       # mlp_in (gate and up)
        + L * f * d // (fsdp * model)           # mlp_out
    )
    mem = plan_540b["memory_per_device_bytes"]
    assert plan_540b["params"] == 540_356_474_880
    assert mem["params"] == elems * 4  # float32 master weights
    naive = 540.36e9 * 4 / (fsdp * model)
    assert mem["params"] == pytest.approx(naive, rel=0.03)
    assert mem["params"] > naive  # the unshardable remainder only adds
    # Unfactored Adafactor: float32 second moment plus float32 momentum; float32 gradients and the
    # optimizer's temporaries (which the compiler keeps below the parameters' size).
    assert mem["optimizer_state"] == 2 * mem["params"]
    assert 0 < mem["gradients_and_optimizer"] < mem["params"]
    # The estimate is of the whole step at the ramp's largest batch: activations, gathered weights and
    # logits included (held against the TPU compiler in tests/test_aot.py).
    assert mem == max((s["bytes"] for s in plan_540b["memory_by_step"]), key=lambda b: b["total"])
    assert [(s["kind"], s["global_batch"]) for s in plan_540b["memory_by_step"]] == [
        ("train", 512), ("train", 1024), ("train", 2048), ("eval", 2048)]
    assert mem["saved_activations"] > 0 and mem["logits"] > 0 and mem["gathered_layer_weights"] > 0
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert mem["total"] > mem["params"] + mem["gradients_and_optimizer"] + mem["optimizer_state"]
    assert plan_540b["fits_device_memory"] is True


@pytest.mark.parametrize("name", ["tiny.yaml", "palm-8b.yaml"])
def test_plan_params_match_count_params(capsys, name):
    spec = load_spec(SPECS / name)
    p = plan_json(capsys, SPECS / name)
    assert p["params"] == count_params(spec.model)
    parts = p["params_by_part"]
    assert parts["embedding"] + parts["layers"] + parts["final_norm"] == p["params"]
    assert parts["per_layer"] * spec.model.num_layers == parts["layers"]


def test_tiny_plan_has_no_wall_time(capsys):
    p = plan_json(capsys, SPECS / "tiny.yaml")
    assert p["hardware"]["accelerator"] == "cpu"
    assert p["hardware"]["peak_flops_per_device"] is None
    assert p["estimated_seconds"] is None
    assert p["estimated_days"] is None


def test_plan_overrides_apply(capsys):
    p = plan_json(capsys, SPECS / "tiny.yaml", "--set", "model.num_layers=4")
    base = plan_json(capsys, SPECS / "tiny.yaml")
    assert p["params"] - base["params"] == 2 * base["params_by_part"]["per_layer"]


def test_mfu_out_of_range_is_bad_input(capsys):
    assert main(["plan", str(SPECS / "tiny.yaml"), "--mfu", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--mfu" in err and "Traceback" not in err


def test_text_mode(capsys):
    assert main(["plan", str(SPECS / "palm-8b.yaml")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    param_line = next(line for line in lines if line.startswith("parameters"))
    assert "8,632,012,800" in param_line
    assert any(line.startswith("stages") and "data -> tokenizer -> pack -> train -> eval" in line
               for line in lines)
    assert any(line.startswith("wall time") and "days" in line for line in lines)


@pytest.mark.parametrize("name", ["palm-8b.yaml", "palm-62b.yaml", "palm-540b.yaml"])
def test_cost_is_chip_hours_at_the_tpu_v4_on_demand_price(capsys, name):
    p = plan_json(capsys, SPECS / name)
    cost = p["cost"]
    assert cost["price_per_chip_hour"] == 3.22 and "2022-08-11" in cost["price_source"]
    assert cost["chip_hours"] == pytest.approx(p["hardware"]["num_devices"] * p["estimated_seconds"] / 3600)
    assert cost["usd"] == pytest.approx(cost["chip_hours"] * 3.22)


def test_540b_cost(plan_540b):
    # 2.543e24 FLOPs at 46.2% of 6144 x 275 TFLOP/s: 37.7 days, 5.56 M chip-hours, $17.9 M on demand.
    cost = plan_540b["cost"]
    seconds = plan_540b["total_training_flops"] / (6144 * 275e12 * 0.462)
    assert cost["chip_hours"] == pytest.approx(6144 * seconds / 3600)
    assert cost["chip_hours"] == pytest.approx(5.56e6, rel=1e-3)
    assert cost["usd"] == pytest.approx(17.91e6, rel=1e-3)


def test_price_per_chip_hour_option(capsys):
    p = plan_json(capsys, SPECS / "palm-540b.yaml", "--price-per-chip-hour", "1.45")
    assert p["cost"]["price_per_chip_hour"] == 1.45 and p["cost"]["price_source"] == "--price-per-chip-hour"
    assert p["cost"]["usd"] == pytest.approx(p["cost"]["chip_hours"] * 1.45)
    assert main(["plan", str(SPECS / "palm-540b.yaml")]) == 0
    cost_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cost"))
    assert "$17.91 M" in cost_line and "5.56 M chip-hours" in cost_line and "$3.22/chip-hour" in cost_line


def test_no_default_price_outside_tpu_v4(capsys):
    p = plan_json(capsys, SPECS / "palm-1b-gpu.yaml")
    assert p["estimated_seconds"] is not None and p["cost"] is None
    assert main(["plan", str(SPECS / "palm-1b-gpu.yaml")]) == 0
    assert "pass --price-per-chip-hour" in capsys.readouterr().out
    p = plan_json(capsys, SPECS / "palm-1b-gpu.yaml", "--price-per-chip-hour", "2.5")
    assert p["cost"]["usd"] == pytest.approx(p["estimated_seconds"] / 3600 * 2.5)
    assert plan_json(capsys, SPECS / "tiny.yaml", "--price-per-chip-hour", "2.5")["cost"] is None  # no wall time


def test_price_must_be_positive(capsys):
    assert main(["plan", str(SPECS / "palm-8b.yaml"), "--price-per-chip-hour", "0"]) == 2
    err = capsys.readouterr().err
    assert "--price-per-chip-hour" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_memory_estimate_counts_microbatches_and_auto_picks_the_fewest_that_fit(capsys):
    """62B on one 4x4x8 slice (fsdp 32 x model 4): batch 1024 does not fit a v4 chip's 32 GiB whole;
    in 2 microbatches it does (one microbatch's activations and logits, plus a float32 gradient sum)."""
    from palm.analysis.memory import auto_microbatches, estimate_memory, microbatch_candidates

    small = ["infra.hardware.topology=4x4x8", "infra.hardware.num_devices=128",
             "infra.mesh={data: 1, fsdp: 32, model: 4}"]
    spec = load_spec(SPECS / "palm-62b.yaml", [*small, "train.microbatches=auto"])
    mesh, hbm = spec.resolved_mesh(), spec.infra.hardware.memory_bytes
    whole = estimate_memory(spec.model, spec.train, mesh, 1024)
    halves = estimate_memory(spec.model, spec.train, mesh, 1024, "train", 2)
    assert whole["total"] > hbm >= halves["total"]
    assert halves["saved_activations"] * 2 == whole["saved_activations"]
    assert halves["gradient_accumulator"] > 0 and "gradient_accumulator" not in whole
    assert auto_microbatches(spec.model, spec.train, mesh, hbm) == (1, 2)
    assert auto_microbatches(spec.model, spec.train, mesh, None) == (1, 1)  # memory unknown: whole batches
    assert microbatch_candidates(1024, 32)[:6] == [1, 2, 4, 8, 16, 32]
    assert main(["plan", str(SPECS / "palm-62b.yaml"), "--json", *[a for s in small for a in ("--set", s)],
                 "--set", "train.microbatches=auto"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["microbatches"] == {"setting": "auto", "by_stage": [1, 2], "chosen_by": "estimate"}
    assert [(s["global_batch"], s["microbatches"]) for s in plan["memory_by_step"] if s["kind"] == "train"] == \
        [(512, 1), (1024, 2)]
    assert plan["fits_device_memory"] is True


def test_wall_time_counts_the_fsdp_gathers_each_microbatch_repeats(capsys):
    """The plan's wall time is, per batch_ramp stage, steps x max(compute, microbatches x FSDP traffic):
    the same as compute alone while the gathers hide behind the matmuls, longer once they cannot."""
    from palm.analysis.steptime import fsdp_traffic_bytes
    from palm.base.hardware import COLLECTIVE_BYTES_PER_S

    small = ["--set", "infra.hardware.topology=4x4x8", "--set", "infra.hardware.num_devices=128",
             "--set", "infra.mesh={data: 1, fsdp: 32, model: 4}"]
    base = plan_json(capsys, SPECS / "palm-62b.yaml", *small)
    stages = base["step_seconds_by_stage"]
    assert [(s["global_batch"], s["microbatches"]) for s in stages] == [(512, 1), (1024, 1)]
    assert sum(s["steps"] for s in stages) == base["training_steps"]
    # Without microbatches the gathers hide: the estimate is compute at the assumed MFU, as before.
    compute = base["total_training_flops"] / (128 * base["hardware"]["peak_flops_per_device"] * base["assumed_mfu"])
    assert base["estimated_seconds"] == pytest.approx(compute, rel=1e-9)
    assert base["microbatch_overhead"] == 0.0

    spec = load_spec(SPECS / "palm-62b.yaml", small[1::2])
    traffic = fsdp_traffic_bytes(spec.model, base["params"], spec.resolved_mesh()) / COLLECTIVE_BYTES_PER_S["tpu-v4"]
    assert stages[0]["fsdp_traffic_seconds"] == pytest.approx(traffic)
    # Enough microbatches that their gathers outlast the step's compute: the step takes the gathers' time.
    many = next(m for m in (2, 4, 8, 16, 32, 64, 128, 256, 512) if m * traffic > stages[1]["compute_seconds"])
    split = plan_json(capsys, SPECS / "palm-62b.yaml", *small, "--set", f"train.microbatches=[1, {many}]")
    late = split["step_seconds_by_stage"][1]
    assert late["step_seconds"] == pytest.approx(many * traffic)
    assert split["estimated_seconds"] > base["estimated_seconds"]
    assert split["microbatch_overhead"] == pytest.approx(1 - base["estimated_seconds"] / split["estimated_seconds"])
    assert main(["plan", str(SPECS / "palm-62b.yaml"), *small, "--set", f"train.microbatches=[1, {many}]"]) == 0
    assert f"of which microbatching's repeated FSDP gathers {split['microbatch_overhead']:.1%}" in capsys.readouterr().out
