"""`palm bench decode` times LanguageModel's own jitted decode step (palm.core.lm: one token per row against a
KV cache, greedy sampling included) on random parameters and random prompt ids, per batch size, and
compares it with the memory-bandwidth roofline: a decode step must read every parameter (the tied
embedding too, for the logits) and the keys and values it attends to, so tokens/s is at most
batch x bandwidth / bytes read per step, the bandwidth measured on the same device."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from palm.app.bench.common import host_description
from palm.base.errors import PalmError
from palm.core.lm import LanguageModel
from palm.core.model import PaLM
from palm.spec.schema import Spec

DECODE_BANDWIDTH_BYTES = {"gpu": 2 << 30, "tpu": 2 << 30, "cpu": 256 << 20}


class _TokenIdsOnly:
    """Stands in for a Tokenizer: the decode bench feeds token ids, so only the sizes LanguageModel checks."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_id = -1  # never sampled, so nothing stops early
        self.pad_id = 0


def measure_memory_bandwidth(num_bytes: int | None = None, repeats: int = 10) -> dict[str, Any]:
    """Read bandwidth of the default device: the median time of a jitted float32 sum over num_bytes."""
    platform = jax.devices()[0].platform
    num_bytes = num_bytes or DECODE_BANDWIDTH_BYTES.get(platform, 256 << 20)
    n = num_bytes // 4
    x = jax.device_put(jnp.arange(n, dtype=jnp.float32) / n)
    total = jax.jit(lambda a: jnp.sum(a))
    jax.block_until_ready(total(x))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(total(x))
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    del x
    return {"bytes": n * 4, "seconds": seconds, "bytes_per_s": n * 4 / seconds,
            "how": "median of jit(jnp.sum) over a float32 array on the device (reads only)"}


def decode_kv_bytes(config, batch: int, length: float) -> int:
    """Bytes of keys and values read for `length` positions of every row and layer, in the compute dtype."""
    per_position = config.num_layers * config.num_kv_heads * config.head_dim * 2 * np.dtype(config.dtype).itemsize
    return int(round(per_position * batch * length))


def bench_decode(spec: Spec, batches: Sequence[int] = (1, 64), steps: int = 64, prompt_len: int = 128,
                 warmup: int = 2, seed: int = 0, log=None) -> dict[str, Any]:
    """Prefill a random prompt, then time `steps` decode steps of LanguageModel per batch size."""
    say = log or (lambda msg: print(msg, file=sys.stderr))
    if steps < 1 or prompt_len < 1 or warmup < 0 or not batches or min(batches) < 1:
        raise PalmError(f"need --steps >= 1, --prompt-len >= 1 and batch sizes >= 1, got steps {steps}, "
                        f"prompt_len {prompt_len}, batches {list(batches)}")
    m = spec.model
    device = jax.devices()[0]
    # Cache slots: exactly the positions used (prompt, warm-up and timed steps), so what the step reads
    # is what the roofline counts (generate() keeps seq_len slots and reads them all).
    cache_len = prompt_len + warmup + steps
    config = dataclasses.replace(m, remat="none", seq_len=cache_len)
    say(f"bench decode: {spec.name} on {device.device_kind}; measuring memory bandwidth")
    bandwidth = measure_memory_bandwidth()
    say(f"  bandwidth {bandwidth['bytes_per_s'] / 1e9:,.1f} GB/s")

    init_tokens = np.zeros((1, min(8, cache_len)), np.int32)
    params = jax.jit(lambda key: nn.unbox(PaLM(config).init(key, init_tokens)["params"]))(jax.random.key(seed))
    lm = LanguageModel(params, config, _TokenIdsOnly(m.vocab_size), batch_size=max(batches),
                       platform=device.platform)
    del params  # LanguageModel holds the matrices cast to the compute dtype (palm.core.lm.compute_params)
    leaves = jax.tree.leaves(lm.params)  # what each step reads
    num_params = sum(int(x.size) for x in leaves)
    param_bytes = sum(int(x.size) * np.dtype(x.dtype).itemsize for x in leaves)
    param_dtypes = sorted({np.dtype(x.dtype).name for x in leaves})

    rng = np.random.default_rng(seed)
    temperature, top_p = np.float32(0.0), np.float32(1.0)
    # Timed step i writes position p = prompt_len + warmup + i and attends to positions 0..p.
    kv_len_mean = prompt_len + warmup + (steps + 1) / 2
    rows = []
    for batch in batches:
        tokens = rng.integers(0, m.vocab_size, (batch, prompt_len), dtype=np.int32)
        lengths = np.full(batch, prompt_len, np.int32)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), np.arange(batch, dtype=np.int32))
        t0 = time.perf_counter()
        token, cache = lm._prefill(lm.params, tokens, lengths, keys, temperature, top_p)
        jax.block_until_ready(token)
        prefill_seconds = time.perf_counter() - t0
        positions = lengths.copy()
        times = []
        t0 = time.perf_counter()
        for k in range(warmup + steps):
            t = time.perf_counter()
            token, cache = lm._decode(lm.params, cache, token, positions, keys, np.int32(k + 1), temperature, top_p)
            jax.block_until_ready(token)
            if k == 0:
                first_step_seconds = time.perf_counter() - t0
            if k >= warmup:
                times.append(time.perf_counter() - t)
            positions = positions + 1
        del cache
        step_seconds = statistics.median(times)
        tokens_per_s = batch / step_seconds
        kv_bytes = decode_kv_bytes(m, batch, kv_len_mean)
        bytes_per_step = param_bytes + kv_bytes
        roofline_step = bytes_per_step / bandwidth["bytes_per_s"]
        roofline_tps = batch / roofline_step
        row = {"batch": batch, "prefill_seconds_with_compile": prefill_seconds,
               "first_step_seconds_with_compile": first_step_seconds, "step_seconds": step_seconds,
               "step_seconds_min": min(times), "step_seconds_max": max(times), "tokens_per_s": tokens_per_s,
               "param_bytes": param_bytes, "kv_cache_bytes": kv_bytes, "bytes_per_step": bytes_per_step,
               "achieved_bytes_per_s": bytes_per_step / step_seconds,
               "roofline_step_seconds": roofline_step, "roofline_tokens_per_s": roofline_tps,
               "fraction_of_roofline": tokens_per_s / roofline_tps}
        rows.append(row)
        say(f"  batch {batch}: step {step_seconds * 1e3:.3f} ms, {tokens_per_s:,.1f} tokens/s, "
            f"{row['fraction_of_roofline']:.1%} of the bandwidth roofline ({roofline_tps:,.1f} tokens/s)")
    return {
        "spec": spec.name,
        "device": device.device_kind,
        "platform": device.platform,
        "host": host_description(),
        "jax": jax.__version__,
        "params": num_params,
        "param_dtype": m.param_dtype,
        "param_dtypes_read": param_dtypes,
        "compute_dtype": m.dtype,
        "kv_cache": {"layers": m.num_layers, "kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                     "dtype": m.dtype, "slots": cache_len, "kv_len_mean": kv_len_mean},
        "prompt_len": prompt_len,
        "warmup_steps": warmup,
        "steps": steps,
        "sampling": "greedy (temperature 0), LanguageModel's jitted _decode_fn, block_until_ready every step",
        "bandwidth": bandwidth,
        "batches": rows,
        "roofline": ("bytes_per_step = every parameter in the dtype the step reads it (LanguageModel casts the "
                     "matrices to the compute dtype once, the LayerNorm scales stay float32) + keys and values "
                     "(layers x batch x kv_len_mean x kv_heads x head_dim x 2 x compute itemsize); roofline "
                     "tokens/s = batch x measured bandwidth / bytes_per_step"),
    }


def render_decode(r: dict[str, Any]) -> str:
    bw = r["bandwidth"]
    lines = [f"{r['spec']} on {r['device']} (jax {r['jax']}), {r['params']:,} params read as "
             f"{'/'.join(r['param_dtypes_read'])}, compute {r['compute_dtype']}; prompt {r['prompt_len']}, "
             f"{r['steps']} timed steps after {r['warmup_steps']} warm-up",
             f"measured bandwidth: {bw['bytes_per_s'] / 1e9:,.1f} GB/s ({bw['bytes'] / 2**20:,.0f} MiB sum)",
             "| batch | step (median) | tokens/s | bytes/step | roofline tokens/s | of roofline |",
             "| --- | --- | --- | --- | --- | --- |"]
    for b in r["batches"]:
        lines.append(f"| {b['batch']} | {b['step_seconds'] * 1e3:.3f} ms | {b['tokens_per_s']:,.1f} | "
                     f"{b['bytes_per_step'] / 1e6:,.2f} MB | {b['roofline_tokens_per_s']:,.1f} | "
                     f"{b['fraction_of_roofline']:.1%} |")
    return "\n".join(lines)
