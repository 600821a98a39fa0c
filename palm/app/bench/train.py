"""`palm bench train`: times the real jitted train step of a spec (optionally beside the plain-JAX reference
step, and profiled, with a summary of the trace's busiest operations)."""

from __future__ import annotations

import gzip
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from palm.base.errors import PalmError
from palm.core.model import attention_implementation
from palm.core.train import Trainer
from palm.spec.schema import Spec


def bench_train(spec: Spec, steps: int = 10, warmup: int = 2, reference: str | None = None,
                profile: str | None = None, profile_steps: int = 3) -> dict[str, Any]:
    """Compile, warm up, then time `steps` train steps on random tokens at the spec's first batch size.

    With `profile` (a directory), `profile_steps` more steps run under jax.profiler after the timed ones
    (TensorBoard/XProf and Perfetto traces there), and the device's busiest operations are summarized."""
    m = spec.model
    # The reference runs first, in its own process, before this one touches the device: JAX takes most
    # of a GPU's memory when it starts, and at the spec's shapes the two steps need not fit together
    # (palm-1b-gpu on an H100: the reference alone needs 58 GiB).
    ref = run_reference(reference, spec) if reference else None
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

    profiled = None
    if profile:
        Path(profile).mkdir(parents=True, exist_ok=True)
        with jax.profiler.trace(profile, create_perfetto_trace=True):
            for i in range(profile_steps):
                with jax.profiler.StepTraceAnnotation("train", step_num=i):
                    state, metrics = trainer.step(state, data[i % 3])
                    jax.block_until_ready(metrics)
        profiled = summarize_trace(profile, steps=profile_steps)

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
    if ref is not None:
        result["reference"] = ref
        result["speedup_vs_reference"] = tokens_per_second / ref["tok_s"]
    if profiled is not None:
        result["profile"] = profiled
    return result


def summarize_trace(directory: str | Path, steps: int = 1, top: int = 40) -> dict[str, Any]:
    """The operations that took the most time in the newest Perfetto trace under `directory`.

    Device processes ("/device:GPU:0" and the like) are summed where the trace has them: each kernel or
    XLA operation by name, its total time per profiled step and its share of the device's busy time.
    A CPU-only trace has no device process; then the XLA runtime's host threads are summed instead."""
    traces = sorted(Path(directory).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise PalmError(f"no perfetto_trace.json.gz under {directory}: the profiler wrote no trace")
    with gzip.open(traces[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e.get("args", {}).get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device_pids = {pid for pid, name in processes.items() if name.startswith("/device:")}

    def counted(e: dict[str, Any], on_device: bool) -> bool:
        if e.get("ph") != "X":
            return False
        if on_device:
            return e["pid"] in device_pids
        return "python" not in threads.get((e["pid"], e.get("tid")), "python")

    def sums(on_device: bool) -> dict[tuple[str, str], list[float]]:
        # Keyed by (line, name): a device's trace has several lines (streams, and derived lines such as
        # "XLA Ops" that repeat the kernels' time), which must not be added together.
        totals: dict[tuple[str, str], list[float]] = {}
        for e in events:
            if counted(e, on_device):
                line = f"{processes.get(e['pid'], '?')} {threads.get((e['pid'], e.get('tid')), '?')}"
                entry = totals.setdefault((line, e.get("name", "?")), [0.0, 0])
                entry[0] += float(e.get("dur", 0.0))  # microseconds
                entry[1] += 1
        return totals

    # A CPU trace may name a "/device:CPU" process yet put no operation on it: the host threads then.
    totals = sums(True) if device_pids else {}
    scope = "device"
    if not totals:
        totals = sums(False)
        scope = "host (no device in the trace)" if not device_pids else "host (the device line is empty)"
    busy: dict[str, float] = {}
    for (line, _), (t, _) in totals.items():
        busy[line] = busy.get(line, 0.0) + t
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "trace": str(traces[-1]),
        "scope": scope,
        "steps": steps,
        "busy_seconds_per_step": {line: t / 1e6 / steps for line, t in sorted(busy.items(), key=lambda kv: -kv[1])},
        "top": [{"line": line, "name": name, "seconds_per_step": t / 1e6 / steps, "calls_per_step": n / steps,
                 "share": t / busy[line] if busy[line] else 0.0} for (line, name), (t, n) in rows],
    }


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
    if not rows[-1].get("tok_s"):
        raise PalmError(f"reference run reported no tokens/s: {json.dumps(rows[-1])[:300]}")
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
