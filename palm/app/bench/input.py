"""`palm bench input` measures the training input: tokenize-and-pack throughput per core (the pack stage on
Beam's in-process runner, and plain Tokenizer.encode beside it so the Beam overhead shows), and the Grain
loader's batches/s, against the tokens/s one H100 consumes for specs/palm-1b-gpu.yaml."""

from __future__ import annotations

import gzip
import json
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import palm
from palm.app.bench.common import MB, cpu_seconds, default_data_dir, host_description, palm_data_spec
from palm.app.bench.corpus import build
from palm.base.errors import PalmError
from palm.core.model import count_params, model_flops_per_token
from palm.data.loader import HostBatches, sequence_dataset
from palm.data.pack import run_pack_stage
from palm.base.hardware import PEAK_FLOPS
from palm.spec.schema import Spec
from palm.dag.workflow import load_spec
from palm.tokenizer import TRAIN_THREADS, Tokenizer, train_tokenizer

#: The spec whose consumption the loader is compared with (its batch and seq_len are the defaults).
INPUT_BENCH_SPEC = "palm-1b-gpu.yaml"
#: The plain-JAX reference step on one H100 at palm-1b-gpu's shapes (../shared/bench/README.md).
REFERENCE_H100_TOKENS_PER_S = 49_200.0
REFERENCE_H100_SOURCE = ("../shared/bench/README.md: reference_step.py on one NVIDIA H100 80GB HBM3, cuDNN flash "
                         "attention, save-dots remat, batch 8 x 2048, 48.2% MFU (measured there, not here)")
#: The training step's MFU goal for palm-1b-gpu on one H100.
MFU_GOAL = 0.55
#: The default vocabulary: SentencePiece's unigram trainer finds at most ~17,600 pieces in the ~3.5 MB of
#: shared text, so PaLM's 256k (or 32k) cannot be trained on it; loader throughput does not depend on it.
INPUT_BENCH_VOCAB = 16_000
#: Untimed batches before the loader is timed (Grain starts its prefetch threads on the first one).
LOADER_WARMUP_BATCHES = 10


def default_spec_dir() -> Path:
    """specs/ in the repository."""
    return Path(palm.__file__).resolve().parents[1] / "specs"


def write_data_stage_shard(sources: dict[str, dict[str, Any]], out_dir: Path) -> tuple[Path, list[tuple[str, str]]]:
    """The materialized corpora as one data-stage train shard (gzip JSONL of {"id", "source", "text"}).

    Returns the shard and the (source, text) of every document, in the shard's order.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    shard = out_dir / "train-00000-of-00001.jsonl.gz"
    docs: list[tuple[str, str]] = []
    with gzip.open(shard, "wt", encoding="utf-8") as f:
        for name, info in sources.items():
            with open(info["file"], encoding="utf-8") as src:
                for line in src:
                    doc = json.loads(line)
                    f.write(json.dumps({"id": doc["id"], "source": name, "text": doc["text"]},
                                       ensure_ascii=False) + "\n")
                    docs.append((name, doc["text"]))
    return shard, docs


def h100_consumption(spec: Spec) -> dict[str, Any]:
    """Tokens/s one H100 trains on for `spec`: the measured reference step, and the MFU goal's rate."""
    m = spec.model
    peak = PEAK_FLOPS["h100"]
    num_params = count_params(m)
    flops_per_token = model_flops_per_token(m, num_params)
    return {
        "spec": spec.name,
        "params": num_params,
        "batch": spec.train.global_batch_at(0),
        "seq_len": m.seq_len,
        "reference_step": {"tokens_per_s": REFERENCE_H100_TOKENS_PER_S, "source": REFERENCE_H100_SOURCE},
        "mfu_goal": {"mfu": MFU_GOAL, "peak_flops": peak, "model_flops_per_token": flops_per_token,
                     "tokens_per_s": MFU_GOAL * peak / flops_per_token,
                     "source": "computed: 0.55 x 989.4e12 / palm.core.model.model_flops_per_token(palm-1b-gpu)"},
    }


def time_loader(pack_dir: Path, manifest: dict[str, Any], batch: int, batches: int,
                warmup: int = LOADER_WARMUP_BATCHES) -> dict[str, Any]:
    """Global batches from the loader as the train stage takes them (palm.data.loader.HostBatches, one host)."""
    dataset = sequence_dataset(pack_dir, manifest, "train", seed=0)
    sequences = len(dataset)
    needed = (warmup + batches) * batch
    epochs = max(1, math.ceil(needed / sequences))
    if epochs > 1:
        dataset = dataset.repeat(epochs)
    stream = HostBatches(dataset, rows=lambda n: (0, n))
    t0 = time.perf_counter()
    first = stream.take(batch, 0)
    first_batch_seconds = time.perf_counter() - t0
    for i in range(1, warmup):
        stream.take(batch, i)
    times = []
    c0 = time.process_time()
    t0 = time.perf_counter()
    for i in range(batches):
        t = time.perf_counter()
        tokens = stream.take(batch, warmup + i)
        times.append(time.perf_counter() - t)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    stream.close()
    seq_len = manifest["seq_len"]
    if first.shape != (batch, seq_len) or tokens.shape != (batch, seq_len) or tokens.dtype != np.int32:
        raise RuntimeError(f"the loader gave a {tokens.dtype} batch of shape {tokens.shape}, expected int32 "
                           f"{(batch, seq_len)}")
    return {
        "batch": batch, "seq_len": seq_len, "batches": batches, "warmup_batches": warmup,
        "sequences_in_dataset": sequences, "epochs": epochs,
        "iterator": "HostBatches(sequence_dataset(...)): Grain random access, 4 read threads, one batch ahead",
        "first_batch_seconds": first_batch_seconds,
        "seconds": seconds, "cpu_seconds": cpu,
        "batch_seconds_median": statistics.median(times), "batch_seconds_max": max(times),
        "batches_per_s": batches / seconds,
        "tokens_per_s": batches * batch * seq_len / seconds,
    }


def bench_input(data_dir: str | Path | None = None, vocab_size: int = INPUT_BENCH_VOCAB,
                seq_len: int | None = None, batch: int | None = None, batches: int = 200,
                spec_path: str | Path | None = None, log=None) -> dict[str, Any]:
    """Time tokenizer training, tokenize-and-pack (per core) and the loader against an H100's consumption."""
    say = log or (lambda msg: print(msg, file=sys.stderr))
    spec = load_spec(spec_path or default_spec_dir() / INPUT_BENCH_SPEC)
    seq_len = spec.model.seq_len if seq_len is None else seq_len
    batch = spec.train.global_batch_at(0) if batch is None else batch
    for flag, value in (("--vocab-size", vocab_size), ("--seq-len", seq_len), ("--batch", batch),
                        ("--batches", batches)):
        if value < 1:
            raise PalmError(f"{flag} must be at least 1, got {value}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    consumption = h100_consumption(spec)

    with tempfile.TemporaryDirectory(prefix="palm-bench-input-") as tmp:
        work = Path(tmp)
        # The shared corpora as they are (no growth, nothing planted): real text for the tokenizer.
        sources = build(data_dir, work / "corpora", target_mb=0, pairs_per_band=0)["sources"]
        shard, docs = write_data_stage_shard(sources, work / "data")
        texts = [text for _, text in docs]
        total_bytes = sum(s["bytes"] for s in sources.values())
        say(f"bench input: {len(docs):,} documents, {total_bytes / MB:.2f} MB of text")

        t0, c0 = time.perf_counter(), cpu_seconds()
        try:
            train_tokenizer(texts, work / "tokenizer" / "tokenizer.model", vocab_size=vocab_size)
        except PalmError as e:
            most = re.search(r"at most (\d+)", str(e))
            if most is None:
                raise
            raise PalmError(f"--vocab-size {vocab_size} is more pieces than the benchmark's {total_bytes / MB:.1f} MB "
                            f"of text supports (at most {int(most.group(1)):,}); lower --vocab-size") from None
        train_seconds, train_cpu = time.perf_counter() - t0, cpu_seconds() - c0
        say(f"  tokenizer: vocab {vocab_size:,} trained in {train_seconds:.1f} s")

        tokenizer = Tokenizer(work / "tokenizer" / "tokenizer.model")
        t0, c0 = time.perf_counter(), time.process_time()
        doc_tokens = [len(tokenizer.encode(text)) for text in texts]
        encode_seconds, encode_cpu = time.perf_counter() - t0, time.process_time() - c0
        encoded = sum(doc_tokens)
        say(f"  encode: {encoded:,} tokens in {encode_seconds:.2f} s")

        pack_dir = work / "pack"
        t0, c0 = time.perf_counter(), cpu_seconds()
        manifest = run_pack_stage(palm_data_spec(sources), 1, seq_len, shard.parent, work / "tokenizer", pack_dir)
        pack_seconds, pack_cpu = time.perf_counter() - t0, cpu_seconds() - c0
        train_counts = manifest["splits"]["train"].values()
        pack_tokens = manifest["tokens"]["train"]
        dropped = sum(c["tokens_dropped"] for c in train_counts)
        say(f"  tokenize-and-pack: {pack_tokens:,} tokens in {pack_seconds:.2f} s")

        loader = time_loader(pack_dir, manifest, batch, batches)
        say(f"  loader: {batches} batches of {batch} x {seq_len} in {loader['seconds']:.3f} s")

    pack_tps = pack_tokens / pack_seconds
    encode_tps = encoded / encode_seconds
    needed = {"reference_step": consumption["reference_step"]["tokens_per_s"],
              "mfu_goal": consumption["mfu_goal"]["tokens_per_s"]}
    return {
        "data_dir": str(data_dir),
        "host": host_description(),
        "input": {"docs": len(docs), "bytes": total_bytes, "mb": total_bytes / MB,
                  "sources": {n: {"docs": s["docs"], "bytes": s["bytes"]} for n, s in sources.items()}},
        "tokenizer": {"vocab_size": tokenizer.vocab_size, "train_seconds": train_seconds,
                      "train_cpu_seconds": train_cpu, "train_threads": TRAIN_THREADS,
                      "bytes_per_token": total_bytes / encoded if encoded else None,
                      "note": "trained on the benchmark's own documents; not part of tokenize-and-pack"},
        "encode": {"docs": len(docs), "tokens": encoded, "seconds": encode_seconds, "cpu_seconds": encode_cpu,
                   "tokens_per_s": encode_tps, "tokens_per_cpu_s": encoded / encode_cpu if encode_cpu else None,
                   "mb_per_s": total_bytes / MB / encode_seconds,
                   "how": "Tokenizer.encode(text) per document in one thread, no Beam"},
        "pack": {"runner": "Beam FnApiRunner in process (data.beam.runner=in_process)", "cores": 1,
                 "seq_len": seq_len, "num_shards": 1, "seconds": pack_seconds, "cpu_seconds": pack_cpu,
                 "docs": sum(c["docs"] for c in train_counts),
                 "tokens": pack_tokens, "tokens_dropped": dropped, "sequences": manifest["sequences"]["train"],
                 "packed_tokens": manifest["sequences"]["train"] * seq_len,
                 "tokens_per_s": pack_tps, "tokens_per_s_per_core": pack_tps,
                 "tokens_per_cpu_s": pack_tokens / pack_cpu if pack_cpu else None,
                 "mb_per_s_per_core": total_bytes / MB / pack_seconds,
                 "encode_over_pack": encode_tps / pack_tps,
                 "how": "palm.data.pack.run_pack_stage over one data-stage shard: read gzip JSONL, tokenize, "
                        "group by shard, pack with one EOD per document, write files of rows (tokens count EODs)"},
        "loader": loader,
        "h100": consumption,
        "headroom": {name: loader["tokens_per_s"] / tps for name, tps in needed.items()},
        "pack_cores_per_h100": {name: tps / pack_tps for name, tps in needed.items()},
        "note": ("the loader and the pack stage run on the CPU host; the H100 figures are what one GPU would "
                 "consume for " + spec.name + ", not measured here"),
    }


def render_input(r: dict[str, Any]) -> str:
    i, t, e, p, ld, h = r["input"], r["tokenizer"], r["encode"], r["pack"], r["loader"], r["h100"]
    host = r["host"]
    return "\n".join([
        f"host: {host['cpu']}, {host['cores']} cores ({host['platform']})",
        f"input: {i['docs']:,} documents, {i['mb']:.2f} MB of UTF-8 text",
        f"tokenizer: vocab {t['vocab_size']:,}, trained in {t['train_seconds']:.1f} s "
        f"({t['bytes_per_token']:.2f} bytes/token; not part of tokenize-and-pack)",
        f"encode (no Beam, 1 thread): {e['tokens']:,} tokens in {e['seconds']:.2f} s = "
        f"{e['tokens_per_s']:,.0f} tokens/s",
        f"tokenize-and-pack (Beam in process, 1 core, seq_len {p['seq_len']}): {p['tokens']:,} tokens in "
        f"{p['seconds']:.2f} s = {p['tokens_per_s_per_core']:,.0f} tokens/s per core, "
        f"{p['tokens_per_cpu_s']:,.0f} per CPU second "
        f"({p['sequences']:,} sequences, {p['tokens_dropped']:,} tail tokens dropped; encode alone is "
        f"{p['encode_over_pack']:.2f}x faster)",
        f"loader: {ld['batches']} batches of {ld['batch']} x {ld['seq_len']} in {ld['seconds']:.3f} s = "
        f"{ld['batches_per_s']:,.1f} batches/s, {ld['tokens_per_s']:,.0f} tokens/s "
        f"(median batch {ld['batch_seconds_median'] * 1e3:.2f} ms, {ld['epochs']} epoch(s) of "
        f"{ld['sequences_in_dataset']:,} sequences)",
        f"one H100 on {h['spec']}: reference step {h['reference_step']['tokens_per_s']:,.0f} tokens/s (measured, "
        f"shared/bench README), {MFU_GOAL:.0%} MFU goal {h['mfu_goal']['tokens_per_s']:,.0f} tokens/s (computed)",
        f"loader headroom: {r['headroom']['reference_step']:,.1f}x the reference step, "
        f"{r['headroom']['mfu_goal']:,.1f}x the {MFU_GOAL:.0%} MFU goal",
        f"note: {r['note']}",
    ])
