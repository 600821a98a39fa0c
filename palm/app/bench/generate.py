"""`palm bench generate`: lm-eval generate_until requests/s through the palm backend
(palm.evaluation.lmeval.PalmLM), batched against one request at a time, on a checkpoint's parameters.

This module imports lm_eval (heavy) at its top, as palm.evaluation.lmeval does: the CLI imports it only
for `palm bench generate`."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from lm_eval.api.instance import Instance

from palm.app.bench.common import host_description
from palm.base.errors import PalmError
from palm.core.lm import LanguageModel
from palm.evaluation.lmeval import PalmLM, load_checkpoint
from palm.evaluation.checkpoints import locate_run
from palm.evaluation.run import validation_texts


def bench_generate(checkpoint: str | Path, requests: int = 32, max_gen_toks: int = 32, batch_size: int = 8,
                   prompt_chars: int = 400, until: Sequence[str] = ("\n\n",), log=None) -> dict[str, Any]:
    """lm-eval generate_until requests/s through the palm backend (palm.evaluation.lmeval.PalmLM), batched (one
    LanguageModel with `batch_size` rows, requests grouped and decoded together) against one request at a
    time (a batch_size-1 LanguageModel, one generate call per request), on the same parameters. Prompts:
    the first `prompt_chars` characters of the run's first validation documents; greedy decoding. Each
    mode runs the whole workload once untimed (compiling every shape), then once timed."""
    say = log or (lambda msg: print(msg, file=sys.stderr))
    if requests < 1 or max_gen_toks < 1 or batch_size < 1 or prompt_chars < 1:
        raise PalmError(f"need --requests, --max-gen-toks, --batch-size and --prompt-chars >= 1, got {requests}, "
                        f"{max_gen_toks}, {batch_size}, {prompt_chars}")
    run = locate_run(checkpoint)
    texts = [t for t in validation_texts(run["data_dir"], None) if t.strip()][:requests]
    if not texts:
        raise PalmError(f"no validation documents in {run['data_dir']} to draw prompts from")
    prompts = [texts[i % len(texts)][:prompt_chars] for i in range(requests)]
    batched_lm = load_checkpoint(checkpoint, batch_size=batch_size)
    single_lm = LanguageModel(batched_lm.params, batched_lm.config, batched_lm.tokenizer, batch_size=1)
    gen_kwargs = {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False}
    instances = [Instance("generate_until", {}, (p, gen_kwargs), i) for i, p in enumerate(prompts)]
    device = jax.devices()[0]
    say(f"bench generate: {requests} requests, max_gen_toks {max_gen_toks}, on {device.device_kind}")

    def timed(name: str, fn) -> tuple[float, list[str]]:
        fn()  # compiles every prompt bucket and the decode step
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        say(f"  {name}: {seconds:.3f} s, {requests / seconds:,.2f} requests/s")
        return seconds, out

    backend, single = PalmLM(batched_lm), PalmLM(single_lm)
    batched_s, batched_out = timed(f"batched (batch_size {batch_size})",
                                   lambda: backend.generate_until(instances))
    single_s, single_out = timed("one at a time", lambda: [single.generate_until([r])[0] for r in instances])
    new_tokens = sum(len(batched_lm.tokenizer.encode(t)) for t in batched_out)
    return {
        "checkpoint": str(checkpoint), "device": device.device_kind, "platform": device.platform,
        "host": host_description(), "jax": jax.__version__, "model": dataclasses.asdict(batched_lm.config),
        "requests": requests, "max_gen_toks": max_gen_toks, "until": list(until), "prompt_chars": prompt_chars,
        "prompt_tokens_mean": float(np.mean([len(batched_lm.tokenizer.encode(p)) for p in prompts])),
        "generated_tokens": new_tokens, "batch_size": batch_size,
        "batched": {"seconds": batched_s, "requests_per_s": requests / batched_s},
        "one_at_a_time": {"seconds": single_s, "requests_per_s": requests / single_s},
        "speedup": single_s / batched_s, "identical": batched_out == single_out,
    }


def render_generate(r: dict[str, Any]) -> str:
    return "\n".join([
        f"{r['requests']} generate_until requests (greedy, max_gen_toks {r['max_gen_toks']}, until {r['until']!r}, "
        f"prompts {r['prompt_tokens_mean']:.0f} tokens on average; {r['generated_tokens']} tokens generated) "
        f"on {r['device']} (jax {r['jax']})",
        "| mode | seconds | requests/s |", "| --- | --- | --- |",
        f"| batched, batch_size {r['batch_size']} | {r['batched']['seconds']:.3f} | "
        f"{r['batched']['requests_per_s']:,.2f} |",
        f"| one at a time | {r['one_at_a_time']['seconds']:.3f} | {r['one_at_a_time']['requests_per_s']:,.2f} |",
        f"speedup {r['speedup']:.2f}x; outputs identical: {r['identical']}"])
