"""Benchmarks: `palm bench train` times the real jitted train step of a spec."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from palm.errors import PalmError
from palm.model import attention_implementation
from palm.spec import Spec
from palm.train import Trainer


def bench_train(spec: Spec, steps: int = 10, warmup: int = 2, reference: str | None = None) -> dict[str, Any]:
    """Compile, warm up, then time `steps` train steps on random tokens at the spec's first batch size."""
    m = spec.model
    devices = jax.devices()
    mesh = spec.resolved_mesh()
    if len(devices) != spec.infra.hardware.num_devices:
        raise PalmError(f"the spec asks for {spec.infra.hardware.num_devices} devices "
                        f"(infra.hardware.num_devices) but this machine has {len(devices)}")
    trainer = Trainer(m, spec.train, mesh, devices)
    batch = spec.train.global_batch_at(0)
    rng = np.random.default_rng(spec.train.seed)
    data = [rng.integers(0, m.vocab_size, (batch, m.seq_len), dtype=np.int32) for _ in range(3)]

    state = trainer.init()
    t0 = time.perf_counter()
    state, metrics = trainer.step(state, data[0])
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - t0
    losses = [float(metrics["loss"])]
    for i in range(warmup):
        state, metrics = trainer.step(state, data[(i + 1) % 3])
        losses.append(float(metrics["loss"]))
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, metrics = trainer.step(state, data[i % 3])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
        losses.append(float(metrics["loss"]))

    step_seconds = statistics.median(times)
    tokens_per_second = batch * m.seq_len / step_seconds
    peak = trainer.peak_flops
    mfu = tokens_per_second * trainer.flops_per_token / (peak * len(devices)) if peak else None
    result: dict[str, Any] = {
        "spec": spec.name,
        "device": devices[0].device_kind,
        "num_devices": len(devices),
        "jax": jax.__version__,
        "params": trainer.num_params,
        "batch": batch,
        "seq_len": m.seq_len,
        "remat": m.remat,
        "attention": attention_implementation(m.attention, devices[0].platform),
        "compile_seconds": compile_seconds,
        "step_seconds": step_seconds,
        "step_seconds_all": times,
        "tokens_per_second": tokens_per_second,
        "model_flops_per_token": trainer.flops_per_token,
        "peak_flops_per_device": peak,
        "mfu": mfu,
        "losses": losses,
    }
    if reference:
        result["reference"] = run_reference(reference, spec)
        ref_tps = result["reference"].get("tok_s")
        result["speedup_vs_reference"] = tokens_per_second / ref_tps if ref_tps else None
    return result


def run_reference(path: str, spec: Spec) -> dict[str, Any]:
    """Run the plain-JAX reference step at the spec's shapes in a child process; its JSON result."""
    if not Path(path).is_file():
        raise PalmError(f"--reference {path}: no such file")
    m = spec.model
    remat = {"save_dots": "dots", "full": "full", "none": "none"}.get(m.remat, "dots")
    impl = "cudnn" if jax.devices()[0].platform == "gpu" else "xla"
    cmd = [sys.executable, path, "--layers", str(m.num_layers), "--d", str(m.d_model), "--head", str(m.head_dim),
           "--vocab", str(m.vocab_size), "--batch", str(spec.train.global_batch_at(0)), "--seq", str(m.seq_len),
           "--variants", f"{impl}:{remat}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not rows:
        raise PalmError(f"reference run failed ({out.returncode}): {out.stderr[-500:]}")
    return rows[-1] | {"command": " ".join(cmd)}


def render_train(r: dict[str, Any]) -> str:
    lines = [
        f"{r['spec']} on {r['num_devices']} x {r['device']} (jax {r['jax']}), {r['params']:,} params, "
        f"batch {r['batch']} x {r['seq_len']}, remat={r['remat']}",
        f"compile {r['compile_seconds']:.1f} s; step {r['step_seconds'] * 1e3:.1f} ms (median); "
        f"{r['tokens_per_second']:,.0f} tokens/s" + (f"; MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""),
        f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}",
    ]
    if "reference" in r:
        ref = r["reference"]
        lines.append(f"reference: {ref.get('tok_s', 0):,.0f} tokens/s, MFU {ref.get('mfu', 0):.1%}; "
                     f"speedup {r['speedup_vs_reference']:.2f}x")
    return "\n".join(lines)
