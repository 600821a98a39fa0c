"""`palm plan`: what a spec will cost, computed from the model's own shapes without allocating it."""

from __future__ import annotations

from typing import Any

from palm.analysis.memory import estimate_memory, microbatch_counts
from palm.analysis.steptime import run_seconds, step_times
from palm.base import storage
from palm.base.errors import PalmError
from palm.base.units import gib
from palm.core.model import abstract_params, count_params, hardware_flops_per_token, model_flops_per_token
from palm.core.sharding import Sharding
from palm.dag.runner import stage_key_of
from palm.dag.table import STAGES
from palm.dag.workflow import resolve_workflow
from palm.data.quality_report import chance_keep_rate, read_report
from palm.jobs.launching import topology_check
from palm.spec.schema import Spec
from palm.store import layout
from palm.store.outputs import read_manifest

#: The paper's measured MFU for PaLM 540B (Table 3), the default for wall-time estimates.
PALM_MFU = 0.462

#: Default price per chip-hour (USD) for the cost estimate, by accelerator. TPU v4: the Cloud TPU v4
#: on-demand ("evaluation") price in us-central2-b, $3.22 per chip-hour, as listed on
#: https://cloud.google.com/tpu/pricing on 2022-08-11 (as quoted by infer-pub.com, question 1114; the
#: page itself could not be read when this was written). Committed-use prices are lower: pass
#: `--price-per-chip-hour`. Other accelerators have no default.
PRICE_PER_CHIP_HOUR = {"tpu-v4": 3.22}
PRICE_SOURCE = {"tpu-v4": "Cloud TPU v4 on-demand, us-central2-b, cloud.google.com/tpu/pricing as of 2022-08-11"}


def training_tokens(spec: Spec) -> int:
    """Tokens consumed by `train.steps` steps under the batch-size ramp."""
    t, total = spec.train, 0
    stages = list(t.batch_ramp)
    for i, stage in enumerate(stages):
        end = stages[i + 1].from_step if i + 1 < len(stages) else t.steps
        total += max(0, min(end, t.steps) - stage.from_step) * stage.global_batch
    return total * spec.model.seq_len


def training_cost(spec: Spec, seconds: float | None, price_per_chip_hour: float | None = None) -> dict[str, Any] | None:
    """Chip-hours and dollars of the training run at a price per chip-hour (default: PRICE_PER_CHIP_HOUR for
    the accelerator); None without a wall-time estimate or a price."""
    hw = spec.infra.hardware
    price = price_per_chip_hour if price_per_chip_hour is not None else PRICE_PER_CHIP_HOUR.get(hw.accelerator)
    if seconds is None or price is None:
        return None
    chip_hours = hw.num_devices * seconds / 3600
    source = "--price-per-chip-hour" if price_per_chip_hour is not None else PRICE_SOURCE[hw.accelerator]
    return {"price_per_chip_hour": price, "price_source": source, "chip_hours": chip_hours,
            "usd": chip_hours * price}


def plan(spec: Spec, mfu: float = PALM_MFU, price_per_chip_hour: float | None = None) -> dict[str, Any]:
    """Parameters, FLOPs, memory per device, mesh, stage DAG, estimated wall time and cost for a spec."""
    m, hw = spec.model, spec.infra.hardware
    mesh = spec.resolved_mesh()
    boxed = abstract_params(m)
    n = count_params(m)
    embedding = m.vocab_size * m.d_model
    flops_tok = model_flops_per_token(m, n)
    hw_flops_tok = hardware_flops_per_token(m, n)
    tokens = training_tokens(spec)
    total_flops = flops_tok * tokens

    layout = Sharding.planned(mesh)
    batches = sorted({stage.global_batch for stage in spec.train.batch_ramp})
    counts = microbatch_counts(m, spec.train, mesh, hw.memory_bytes)
    micro = {}
    for stage, count in zip(spec.train.batch_ramp, counts):
        micro.setdefault(stage.global_batch, count)
    by_step = [{"kind": "train", "global_batch": b, "microbatches": micro[b],
                "bytes": estimate_memory(m, spec.train, mesh, b, "train", micro[b])} for b in batches]
    by_step.append({"kind": "eval", "global_batch": batches[-1],
                    "bytes": estimate_memory(m, spec.train, mesh, batches[-1], "eval")})
    memory = max(by_step, key=lambda s: s["bytes"]["total"])["bytes"]

    peak = hw.peak_flops
    steps = step_times(m, spec.train, mesh, num_params=n, flops_per_token=flops_tok, accelerator=hw.accelerator,
                       num_devices=hw.num_devices, peak_flops=peak, mfu=mfu, microbatches=counts) if peak else []
    seconds, overhead = run_seconds(steps) if peak else (None, None)
    return {
        "spec": spec.name,
        "params": n,
        "params_by_part": {"embedding": embedding, "layers": n - embedding - m.d_model,
                           "per_layer": (n - embedding - m.d_model) // m.num_layers, "final_norm": m.d_model},
        "model_flops_per_token": flops_tok,
        "hardware_flops_per_token": hw_flops_tok,
        "remat": m.remat,
        "training_tokens": tokens,
        "training_steps": spec.train.steps,
        "total_training_flops": total_flops,
        "mesh": mesh,
        "hardware": {"accelerator": hw.accelerator, "num_devices": hw.num_devices, "num_slices": hw.num_slices,
                     "topology": hw.topology, "memory_bytes": hw.memory_bytes, "peak_flops_per_device": peak},
        "microbatches": {"setting": spec.train.microbatches, "by_stage": list(counts),
                         "chosen_by": "estimate" if spec.train.microbatch_counts() is None else "spec"},
        "memory_per_device_bytes": memory,
        "memory_by_step": by_step,
        "fits_device_memory": (memory["total"] <= hw.memory_bytes) if hw.memory_bytes else None,
        "layout": [{"param": p, "shape": list(s), "partition": part} for p, s, part in layout.describe(boxed)],
        "stages": workflow_plan(spec),
        "quality_sampling": quality_plan(spec),
        "launch": _launch_check(spec),
        "assumed_mfu": mfu,
        "estimated_seconds": seconds,
        "estimated_days": seconds / 86400 if seconds is not None else None,
        "step_seconds_by_stage": steps,
        "microbatch_overhead": overhead,
        "cost": training_cost(spec, seconds, price_per_chip_hour),
    }


def _launch_check(spec: Spec) -> dict[str, Any]:
    """Whether the launcher can get the spec's TPU slices (palm.jobs.launching.topology_check)."""
    return topology_check(spec)


def workflow_plan(spec: Spec) -> list[dict[str, Any]]:
    """The spec's workflow graph, node by node (palm.dag.workflow), with each training node's parameters, model
    FLOPs per token, training tokens and training FLOPs."""
    rows = []
    workflow = resolve_workflow(spec)
    for node, row in zip(workflow.nodes.values(), workflow.describe()):
        row["declared"] = workflow.declared
        if STAGES[node.stage].trains:
            n = count_params(node.spec.model)
            tokens = training_tokens(node.spec)
            row.update(params=n, model_flops_per_token=model_flops_per_token(node.spec.model, n),
                       training_tokens=tokens, training_flops=model_flops_per_token(node.spec.model, n) * tokens)
        rows.append(row)
    return rows


def quality_plan(spec: Spec, root: str | None = None) -> list[dict[str, Any]]:
    """Each quality-sampled source's expected keep rate (the share of its documents the Pareto rule keeps):
    the held-out estimate of the quality classifier already built for this spec under `root` (default
    <infra.storage_root>/<spec name>, local roots only), else None, with the rate a classifier that
    cannot tell the classes apart (score 0.5) would give, and the AUC floor it must pass."""
    q = spec.data.quality
    sampled = spec.data.negative_sources()
    if not sampled:
        return []
    report, where = None, None
    root = root or f"{spec.infra.storage_root.rstrip('/')}/{spec.name}"
    if q.scorer == "classifier" and not storage.is_remote(root):  # plan makes no network calls
        for node in resolve_workflow(spec).nodes.values():
            if node.stage == "quality":
                path = layout.output_dir(root, node.name, stage_key_of(node, {}))
                if read_manifest(path) is not None:
                    try:
                        report, where = read_report(path), path
                    except PalmError:  # an unreadable classifier: the quality stage says so when it runs
                        report = None
                break
    rows = []
    for src in sampled:
        built = (report or {}).get("sources", {}).get(src.name, {})
        rows.append({"source": src.name, "scorer": q.scorer, "alpha": q.alpha, "min_auc": q.min_auc,
                     "expected_keep_rate": built.get("expected_keep_rate"),
                     "held_out_auc": (report or {}).get("held_out_auc"), "classifier": where,
                     "keep_rate_at_chance": chance_keep_rate(q.alpha)})
    return rows


def _render_quality(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        head = f"  {r['source']}: "
        if r["expected_keep_rate"] is not None:
            lines.append(head + f"expected keep rate {r['expected_keep_rate']:.1%} (held out; classifier AUC "
                         f"{r['held_out_auc']:.3f}, floor {r['min_auc']:g}, at {r['classifier']})")
        elif r["scorer"] == "classifier":
            lines.append(head + f"expected keep rate known after the quality stage (a classifier that cannot "
                         f"tell keeps {r['keep_rate_at_chance']:.1%}; one with AUC < {r['min_auc']:g} is refused)")
        else:
            lines.append(head + "keep rate by the heuristic score (data.quality.scorer: heuristic); "
                         f"a score of 0.5 keeps {r['keep_rate_at_chance']:.1%}")
    return ["quality sampling (the share of each sampled source's documents the Pareto rule keeps)", *lines] \
        if lines else []


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _render_stages(stages: list[dict[str, Any]]) -> list[str]:
    """The chain on one line; a declared graph one node per line, with what it reads and, for training
    nodes, their size and compute."""
    if not any(s["declared"] for s in stages):
        return ["stages          " + " -> ".join(s["name"] for s in stages)]
    lines = ["workflow"]
    for s in stages:
        reads = sorted({*s["inputs"].values(), *s["collects"]})
        extra = (f"; {_human(s['params'])} params, {s['training_flops']:.3e} training FLOPs" if "params" in s else "")
        extra += ("; set " + ", ".join(f"{k}={v}" if len(str(v)) <= 24 else k for k, v in s["set"].items())
                  if s["set"] else "")
        lines.append(f"  {s['name']:14s}{s['stage']:10s}" + (f" <- {', '.join(reads)}" if reads else "") + extra)
    return lines


def render(p: dict[str, Any]) -> str:
    """The plan as text for a terminal."""
    mem = p["memory_per_device_bytes"]
    hw = p["hardware"]
    lines = [
        f"spec            {p['spec']}",
        f"parameters      {p['params']:,} ({_human(p['params'])}); embedding {p['params_by_part']['embedding']:,},"
        f" {p['params_by_part']['per_layer']:,} per layer",
        f"model FLOPs     {_human(p['model_flops_per_token'], 'FLOP')}/token (6N + 12·L·H·Q·T)",
        f"with remat      {_human(p['hardware_flops_per_token'], 'FLOP')}/token (remat={p['remat']})",
        f"training        {p['training_steps']:,} steps, {_human(p['training_tokens'])} tokens, "
        f"{p['total_training_flops']:.3e} FLOPs",
        f"hardware        {hw['num_devices']} x {hw['accelerator']} in {hw['num_slices']} slice(s)",
        "mesh            " + " x ".join(f"{k}={v}" for k, v in p["mesh"].items()),
        f"memory/device   {gib(mem['total'])}"
        + (f" of {gib(hw['memory_bytes'])} ({'fits' if p['fits_device_memory'] else 'DOES NOT FIT'})"
           if hw.get("memory_bytes") else "")
        + f": state {mem['params'] / 2**30 + mem['optimizer_state'] / 2**30:.2f} + gradients and optimizer "
        f"{(mem['gradients_and_optimizer'] + mem.get('gradient_accumulator', 0)) / 2**30:.2f} + saved activations "
        f"{mem['saved_activations'] / 2**30:.2f} + gathered weights "
        f"{(mem['gathered_embedding'] + mem['gathered_layer_weights']) / 2**30:.2f} + loss "
        f"{(mem['final_hidden'] + mem['logits']) / 2**30:.2f} GiB",
        "  by step       " + ", ".join(f"{s['kind']} {s['global_batch']}"
                                      + (f" in {s['microbatches']} microbatches" if s.get("microbatches", 1) > 1 else "")
                                      + f": {gib(s['bytes']['total'])}" for s in p["memory_by_step"])
        + (" (estimated; --compile checks)" if str(hw["accelerator"]).startswith("tpu") else " (estimated)"),
        f"microbatches    {', '.join(map(str, p['microbatches']['by_stage']))} per batch_ramp stage"
        + (" (auto, by the estimate; --compile asks the compiler)" if p["microbatches"]["chosen_by"] == "estimate"
           else ""),
        *_render_stages(p["stages"]),
        *_render_quality(p.get("quality_sampling", [])),
    ]
    launch = p.get("launch") or {}
    if launch.get("problem"):
        lines.append(f"launch          UNSUPPORTED on {launch['launcher']}: {launch['problem']}")
    elif launch.get("topology") and launch.get("launcher") != "local":
        lines.append(f"launch          {launch['launcher']}: {hw['num_slices']} slice(s) of {launch['topology']}, "
                     "a shape it offers")
    if p["estimated_seconds"] is not None:
        lines.append(f"wall time       {p['estimated_days']:.1f} days at {p['assumed_mfu']:.1%} MFU"
                     + (f", of which microbatching's repeated FSDP gathers {p['microbatch_overhead']:.1%}"
                        if any(s["microbatches"] > 1 for s in p["step_seconds_by_stage"]) else ""))
    else:
        lines.append("wall time       n/a (no peak FLOP/s for this accelerator)")
    cost = p.get("cost")
    if cost is not None:
        lines.append(f"cost            ${cost['usd'] / 1e6:,.2f} M: {cost['chip_hours'] / 1e6:,.2f} M chip-hours at "
                     f"${cost['price_per_chip_hour']:g}/chip-hour ({cost['price_source']})")
    elif p["estimated_seconds"] is not None:
        lines.append(f"cost            n/a (no default price for {hw['accelerator']}; pass --price-per-chip-hour)")
    return "\n".join(lines)
