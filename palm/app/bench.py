"""Benchmarks: `palm bench train` times the real jitted train step of a spec; `palm bench data` times the
data stage against datatrove on the same documents, per core."""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from palm.base.errors import PalmError
from palm.core.model import attention_implementation
from palm.spec.schema import Spec
from palm.core.train import Trainer


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
    import gzip

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


# ------------------------------------------------------------------------------ palm bench data
#
# `palm bench data` times the data stage against datatrove (Hugging Face's pipeline library) on the same
# documents, one core each. The documents are cut from the shared corpora once and written as JSON lines,
# so both systems read identical bytes; only the pipelines are timed.

from palm.app.bench_corpus import BOOKS_SPLIT, WIKI_SPLIT, split_text  # noqa: E402,F401 (the corpus's own cuts)

MB = 1e6  # throughput is reported in MB (10^6 bytes) of UTF-8 text per second
PALM_EXTRA_STEPS = ("exact dedup (SHA-256 of the content)", "near-dup candidates verified against signatures",
                    "token mixture by weight", "train/validation split", "deterministic sharding (sorted by id)",
                    "per-source drop accounting")
BENCH_REQUIREMENTS = ("datatrove", "spacy", "xxhash", "orjson")


def default_data_dir() -> Path:
    """../shared/data next to the repository root."""
    import palm

    return Path(palm.__file__).resolve().parents[2] / "shared" / "data"


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (datatrove's multiprocess manager)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _palm_data_spec(sources: dict[str, dict[str, Any]]):
    """Default quality filters, exact + near dedup with their defaults, the in-process runner (one core).

    The mixture's weights are the sources' shares of the bytes that pass the rules, so that the mixture
    drops (almost) nothing and every loss after filtering is deduplication's, which the planted pairs
    measure."""
    from palm.data.filters import quality_drop_reason
    from palm.spec.schema import DataSpec

    def spec(weights):
        return DataSpec.model_validate({
            "sources": [{"name": name, "kind": name, "format": "jsonl", "weight": weights[name],
                         "paths": [info["file"]]} for name, info in sources.items()],
            "beam": {"runner": "in_process"}})

    names = list(sources)
    first = spec({n: 1 / len(names) for n in names})
    passing = {}
    for src in first.sources:
        with open(sources[src.name]["file"], encoding="utf-8") as f:
            texts = (json.loads(line)["text"] for line in f)
            passing[src.name] = sum(len(t.encode()) for t in texts if quality_drop_reason(t, src.filters) is None)
    total = sum(passing.values()) or 1
    weights = {n: round(passing[n] / total, 6) for n in names[:-1]}
    weights[names[-1]] = round(1 - sum(weights.values()), 6)
    return spec(weights)


def run_palm_once(spec, out_dir: Path) -> dict[str, Any]:
    """One timed run of the whole data stage (pipeline construction, Beam run, accounting)."""
    import gzip

    from palm.data.pipeline import run_data_stage

    out_dir.mkdir(parents=True)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    manifest = run_data_stage(spec, out_dir)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    dropped: dict[str, int] = {}
    for entry in manifest["sources"].values():
        for reason, n in entry["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    # The stage names documents "<source>/<file key>/<record index>"; the corpus's own ids are read back
    # from each source's file by record index.
    ids = {}
    for src in spec.sources:
        with open(src.paths[0], encoding="utf-8") as f:
            ids[src.name] = [json.loads(line)["id"] for line in f if line.strip()]
    kept = set()
    for path in sorted(out_dir.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    source, _, index = json.loads(line)["id"].split("/")
                    kept.add(ids[source][int(index)])
    return {"seconds": seconds, "cpu_seconds": cpu, "docs_in": manifest["docs_in"],
            "docs_out": manifest["docs_kept"], "dropped": dict(sorted(dropped.items())), "kept_ids": kept,
            "near_duplicates": manifest["near_duplicates"]}


def require_datatrove() -> str:
    """datatrove's version, or a PalmError saying how to install the bench group."""
    import importlib

    missing = []
    for module in BENCH_REQUIREMENTS:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise PalmError(f"`palm bench data` compares against datatrove, but {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not installed: run `uv sync --group bench` "
                        "(or pass --no-datatrove to time palm alone)")
    import datatrove
    import spacy

    try:
        spacy.blank("en")  # the Gopher filter's word tokenizer; a blank pipeline needs no model download
    except Exception as e:  # noqa: BLE001 - any failure here means the bench cannot run datatrove
        raise PalmError(f"spacy cannot build its blank English tokenizer ({e}); run `uv sync --group bench`") \
            from None
    return getattr(datatrove, "__version__", None) or _dist_version("datatrove")


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _datatrove_executors(input_dir: Path, root: Path, bands: int, rows: int, ngram: int):
    """The standard four-stage datatrove MinHash recipe, with Gopher's repetition and quality filters before it
    (FineWeb's order).

    1. read -> Gopher repetition -> Gopher quality -> (kept documents to filtered/) -> signatures
    2. LSH buckets (one task per band, run one after another)   3. clusters   4. read filtered/ -> drop -> write
    Every stage runs as tasks on one worker, i.e. one core.
    """
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    config = MinhashConfig(n_grams=ngram, num_buckets=bands, hashes_per_bucket=rows)
    logs = root / "logs"
    signature = LocalPipelineExecutor(
        [JsonlReader(str(input_dir)), GopherRepetitionFilter(), GopherQualityFilter(),
         JsonlWriter(str(root / "filtered"), compression=None),
         MinhashDedupSignature(output_folder=str(root / "signatures"), config=config)],
        tasks=1, workers=1, logging_dir=str(logs / "1-signature"))
    buckets = LocalPipelineExecutor(
        [MinhashDedupBuckets(input_folder=str(root / "signatures"), output_folder=str(root / "buckets"),
                             config=config)],
        tasks=config.num_buckets, workers=1, logging_dir=str(logs / "2-buckets"), depends=signature)
    cluster = LocalPipelineExecutor(
        [MinhashDedupCluster(input_folder=str(root / "buckets"), output_folder=str(root / "remove"),
                             config=config)],
        tasks=1, workers=1, logging_dir=str(logs / "3-cluster"), depends=buckets)
    final = LocalPipelineExecutor(
        [JsonlReader(str(root / "filtered"), compression=None),
         MinhashDedupFilter(input_folder=str(root / "remove")),
         JsonlWriter(str(root / "output"))],
        tasks=1, workers=1, logging_dir=str(logs / "4-filter"), depends=cluster)
    return final


DATATROVE_STAGES = ("1-signature", "2-buckets", "3-cluster", "4-filter")


def _stage_stats(logging_dir: Path) -> list[dict[str, Any]]:
    return json.loads((logging_dir / "stats.json").read_text())


def _step_stats(stats: list[dict[str, Any]], name_part: str) -> dict[str, Any]:
    for step in stats:
        if name_part in step.get("name", ""):
            return step.get("stats", {})
    return {}


def _count(value: Any) -> int:
    """A datatrove stats entry: a bare number or {"total": n, ...}."""
    if isinstance(value, dict):
        return int(value.get("total", 0))
    return int(value or 0)


def run_datatrove_once(input_dir: Path, root: Path, bands: int, rows: int, ngram: int) -> dict[str, Any]:
    """One timed run of all four stages; datatrove's own logs go to <root>/datatrove.log, not the terminal."""
    import gzip

    from datatrove.utils.logging import setup_default_logger

    root.mkdir(parents=True)
    log_path = root / "datatrove.log"
    with log_path.open("w") as log:
        try:
            with contextlib.redirect_stderr(log):
                setup_default_logger()  # binds datatrove's logger to the redirected stderr
                t0, c0 = time.perf_counter(), _cpu_seconds()
                _datatrove_executors(input_dir, root, bands, rows, ngram).run()
                seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        except Exception as e:
            log.flush()
            tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
            raise PalmError(f"datatrove failed: {type(e).__name__}: {e}\n" + "\n".join(tail)) from None
        finally:
            setup_default_logger()  # its task loggers were bound to the redirected stderr
    first = _stage_stats(root / "logs" / "1-signature")
    last = _stage_stats(root / "logs" / "4-filter")
    reader = _step_stats(first, "Jsonl")
    repetition, quality = _step_stats(first, "Repetition"), _step_stats(first, "Gopher Quality")
    dedup = _step_stats(last, "MinHash stage 4")

    def ids(folder: str) -> set[str]:
        out = set()
        for path in sorted((root / folder).glob("*.jsonl*")):
            with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")) as f:
                out.update(json.loads(line)["id"] for line in f if line.strip())
        return out

    kept, filtered = ids("output"), ids("filtered")
    docs_out = len(kept)
    dropped = {f"repetition.{k.removeprefix('dropped_')}": _count(v) for k, v in repetition.items()
               if k.startswith("dropped_")}
    dropped |= {f"quality.{k.removeprefix('dropped_')}": _count(v) for k, v in quality.items()
                if k.startswith("dropped_")}
    dropped["minhash_duplicate"] = _count(dedup.get("dropped", 0))
    step_seconds = {}
    for stage in DATATROVE_STAGES:
        upstream = 0.0
        for step in _stage_stats(root / "logs" / stage):
            name = " ".join("".join(c for c in step.get("name", "") if c.isascii()).replace(" - ", " ").split())
            t = step.get("time_stats")
            total = float(t.get("total", 0.0)) if isinstance(t, dict) else 0.0
            if isinstance(t, dict) and "n" not in t:
                # timed once around its whole run, which pulls documents through the steps before it
                total = max(0.0, total - upstream)
            step_seconds[f"{stage}: {name}"] = total
            upstream += total
    return {"seconds": seconds, "cpu_seconds": cpu, "docs_in": _count(reader.get("documents", 0)),
            "docs_out": docs_out, "dropped": dict(sorted(dropped.items())), "step_seconds": step_seconds,
            "kept_ids": kept, "filtered_ids": filtered}


def _summarize_runs(runs: list[dict[str, Any]], mb: float, cores: int) -> dict[str, Any]:
    best = min(runs, key=lambda r: r["seconds"])
    mb_per_s = mb / best["seconds"]
    return {"seconds": best["seconds"], "seconds_all": [r["seconds"] for r in runs],
            "cpu_seconds": best["cpu_seconds"], "mb_per_s": mb_per_s, "cores": cores,
            "mb_per_s_per_core": mb_per_s / cores, "docs_in": best["docs_in"], "docs_out": best["docs_out"],
            "dropped": best["dropped"]}


def bench_data(data_dir: str | Path | None = None, repeat: int = 3, datatrove: bool = True,
               max_docs: int | None = None, target_mb: float = 20.0, pairs_per_band: int = 100,
               classifier: bool = True, log=None) -> dict[str, Any]:
    """Time palm's data stage and datatrove's Gopher + MinHash pipeline on the same documents (palm.app.bench_corpus:
    real text grown by recombination to `target_mb`, planted exact and near copies); compare what each
    filter drops and how many planted pairs each finds, per band of true Jaccard; and train the quality
    classifier on the corpus's curated prose against synthetic spam and keyword lists (held-out AUC)."""
    import tempfile

    from palm.app import bench_corpus
    from palm.data.filters import quality_drop_reason
    from palm.data.pipeline import lsh_bands
    from palm.spec.schema import NearDedup

    if repeat < 1:
        raise PalmError(f"--repeat must be at least 1, got {repeat}")
    if max_docs is not None and max_docs < 1:
        raise PalmError(f"--max-docs must be at least 1, got {max_docs}")
    if target_mb < 0 or pairs_per_band < 0:
        raise PalmError(f"--target-mb and --pairs-per-band must be non-negative, got {target_mb} and {pairs_per_band}")
    say = log or (lambda msg: print(msg, file=sys.stderr))
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    dt_version = require_datatrove() if datatrove else None
    near = NearDedup()
    bands, rows = lsh_bands(near)

    with tempfile.TemporaryDirectory(prefix="palm-bench-data-") as tmp:
        work = Path(tmp)
        corpus = bench_corpus.build(data_dir, work / "input", target_mb=target_mb, pairs_per_band=pairs_per_band,
                                    max_docs=max_docs)
        sources, planted = corpus["sources"], corpus["planted"]
        total_bytes = sum(s["bytes"] for s in sources.values())
        total_docs = sum(s["docs"] for s in sources.values())
        mb = total_bytes / MB
        per_source = ", ".join(f"{n} {s['docs']:,}" for n, s in sources.items())
        say(f"bench data: {total_docs:,} documents, {mb:.2f} MB of text ({per_source}), "
            f"{len(planted):,} planted copies")

        spec = _palm_data_spec(sources)
        eligible = set()  # documents that reach palm's deduplication: they pass its rules
        for src in spec.sources:
            with open(sources[src.name]["file"], encoding="utf-8") as f:
                for line in f:
                    doc = json.loads(line)
                    if quality_drop_reason(doc["text"], src.filters) is None:
                        eligible.add(doc["id"])
        palm_runs = []
        for i in range(repeat):
            palm_runs.append(run_palm_once(spec, work / f"palm-{i}"))
            say(f"  palm run {i + 1}/{repeat}: {palm_runs[-1]['seconds']:.2f} s")
        dt_runs = []
        if datatrove:
            for i in range(repeat):
                dt_runs.append(run_datatrove_once(work / "input", work / f"datatrove-{i}", bands, rows, near.ngram))
                say(f"  datatrove run {i + 1}/{repeat}: {dt_runs[-1]['seconds']:.2f} s")
        quality = bench_quality_classifier(data_dir, work / "quality", say) if classifier else None

    palm_result = _summarize_runs(palm_runs, mb, cores=1) | {
        "runner": "Beam FnApiRunner in process (data.beam.runner=in_process)",
        "weights": {s.name: s.weight for s in spec.sources},
        "near_duplicates": palm_runs[0]["near_duplicates"],
        "planted_detection": bench_corpus.detection(planted, eligible, palm_runs[0]["kept_ids"]),
        "steps": ["read", "decode", "quality (Gopher quality and repetition rules)", "exact dedup", "MinHash near dedup (verified)",
                  "mixture", "split", "sharded gzip JSONL write"]}
    dt_result = None
    if datatrove:
        best_dt = min(dt_runs, key=lambda r: r["seconds"])
        dt_result = _summarize_runs(dt_runs, mb, cores=1) | {
            "step_seconds": best_dt["step_seconds"],
            "planted_detection": bench_corpus.detection(planted, dt_runs[0]["filtered_ids"], dt_runs[0]["kept_ids"]),
            "version": dt_version,
            "executor": "LocalPipelineExecutor, workers=1 (tasks run one after another)",
            "steps": ["JsonlReader", "GopherRepetitionFilter (defaults)", "GopherQualityFilter (defaults)",
                      "MinhashDedupSignature", "MinhashDedupBuckets", "MinhashDedupCluster", "MinhashDedupFilter",
                      "JsonlWriter (gzip)"]}
    ratio = palm_result["mb_per_s_per_core"] / dt_result["mb_per_s_per_core"] if dt_result else None
    return {
        "data_dir": str(data_dir),
        "repeat": repeat,
        "max_docs_per_source": max_docs,
        "input": {"mb": mb, "bytes": total_bytes, "docs": total_docs, "target_mb": target_mb,
                  "sources": {n: {k: v for k, v in s.items() if k != "file"} for n, s in sources.items()},
                  "planted": {band: sum(1 for p in planted if p["band"] == band)
                              for band in dict.fromkeys(p["band"] for p in planted)},
                  "how": ("WikiText-2 paragraphs (wikipedia) and tinyshakespeare scenes of "
                          f"{bench_corpus.SCENE_SPEECHES} speeches (books), grown by documents of "
                          f"{bench_corpus.RECOMBINE} random paragraphs (or speeches x 12); planted copies of "
                          "paragraphs: exact, and with words swapped to a true word-5-gram Jaccard in each band")},
        "minhash": {"ngram": near.ngram, "bands": bands, "rows": rows, "threshold": near.threshold},
        "palm": palm_result,
        "datatrove": dt_result,
        "quality_classifier": quality,
        "ratio_palm_over_datatrove_mb_per_s_per_core": ratio,
        "note": ("palm's data stage does more than datatrove's pipeline here: " + "; ".join(PALM_EXTRA_STEPS)
                 + ". datatrove tokenizes words with spaCy in its filters and MinHash; palm splits on "
                 "whitespace. A planted pair is found when one of its two documents is dropped; pairs with a "
                 "document that did not reach deduplication (dropped by a filter) are left out."),
    }


def bench_quality_classifier(data_dir: Path, work: Path, say, per_class: int = 1000) -> dict[str, Any]:
    """The quality classifier trained on WikiText-2 paragraphs against synthetic fluent spam and keyword
    lists (palm.data.synthetic_web), as the quality stage trains it; its held-out AUC and its scores on
    documents of each kind it never saw."""
    import random

    from palm.app import bench_corpus
    from palm.data.filters import quality_score
    from palm.data.quality import QualityClassifier, train_quality_stage
    from palm.data.synthetic_web import fluent_spam, keyword_list, web_page
    from palm.spec.schema import DataSpec

    paragraphs = [p for p in bench_corpus.wiki_paragraphs(data_dir) if len(p.split()) >= 60]
    rng = random.Random(0)
    rng.shuffle(paragraphs)
    work.mkdir(parents=True)
    files = {}
    for name, docs in (("wiki", paragraphs[:2 * per_class]), ("web", [web_page(rng) for _ in range(2 * per_class)])):
        files[name] = work / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    spec = DataSpec.model_validate({
        "sources": [{"name": "wiki", "kind": "wikipedia", "weight": 0.5, "format": "jsonl", "paths": [str(files["wiki"])]},
                    {"name": "web", "kind": "web", "weight": 0.5, "format": "jsonl", "paths": [str(files["web"])],
                     "filters": {"quality_sampling": True}}],
        "quality": {"max_docs_per_class": per_class}})
    out = work / "classifier"
    out.mkdir()
    t0 = time.perf_counter()
    report = train_quality_stage(spec, out)
    seconds = time.perf_counter() - t0
    model = QualityClassifier.load(str(out))
    unseen = random.Random(99)
    kinds = {"prose (unseen WikiText-2 paragraphs)": paragraphs[2 * per_class:2 * per_class + 300],
             "fluent spam (unseen)": [fluent_spam(unseen) for _ in range(300)],
             "keyword lists (unseen)": [keyword_list(unseen) for _ in range(300)]}
    scores = {k: {"median_classifier": float(np.median(model.scores(v))),
                  "median_heuristic": float(np.median([quality_score(t) for t in v])), "docs": len(v)}
              for k, v in kinds.items()}
    say(f"  quality classifier: held-out AUC {report['held_out_auc']:.4f} ({seconds:.1f} s)")
    return {"held_out_auc": report["held_out_auc"], "documents": report["documents"], "seconds": seconds,
            "features": report["features"], "model": report["model"], "scores": scores}


def render_data(r: dict[str, Any]) -> str:
    i, m = r["input"], r["minhash"]
    per_source = ", ".join(f"{n}: {s['docs']:,} docs ({s['original_docs']:,} original), {s['bytes'] / MB:.2f} MB"
                           for n, s in i["sources"].items())
    lines = [
        f"input: {i['docs']:,} documents, {i['mb']:.2f} MB of UTF-8 text ({per_source})"
        + (f", at most {r['max_docs_per_source']:,} per source" if r["max_docs_per_source"] else ""),
        f"MinHash: word {m['ngram']}-grams, {m['bands']} bands x {m['rows']} rows (both systems); "
        f"best of {r['repeat']}",
        "",
        f"{'system':<10} {'seconds':>8} {'MB/s':>7} {'cores':>5} {'MB/s/core':>9} {'cpu s':>7} "
        f"{'docs in':>8} {'docs out':>8}",
    ]
    for name in ("palm", "datatrove"):
        s = r[name]
        if s is None:
            lines.append(f"{name:<10} (skipped: --no-datatrove)")
            continue
        lines.append(f"{name:<10} {s['seconds']:>8.2f} {s['mb_per_s']:>7.3f} {s['cores']:>5} "
                     f"{s['mb_per_s_per_core']:>9.3f} {s['cpu_seconds']:>7.2f} {s['docs_in']:>8,} "
                     f"{s['docs_out']:>8,}")
    for name in ("palm", "datatrove"):
        if r[name] is not None:
            lines.append(f"  {name} dropped: " + ", ".join(f"{k} {v:,}" for k, v in r[name]["dropped"].items()))
    if r["datatrove"] is not None:
        steps = sorted(r["datatrove"]["step_seconds"].items(), key=lambda kv: -kv[1])
        lines.append("  datatrove time by step (its own stats, upstream steps excluded): "
                     + ", ".join(f"{k} {v:.2f} s" for k, v in steps if v >= 0.005))
    if r["ratio_palm_over_datatrove_mb_per_s_per_core"] is not None:
        lines.append(f"palm / datatrove, MB/s per core: {r['ratio_palm_over_datatrove_mb_per_s_per_core']:.2f}x")
    bands = list(r["input"]["planted"])
    if bands:
        lines.append("planted pairs found (one of the two dropped), by true word-5-gram Jaccard:")
        for name in ("palm", "datatrove"):
            if r[name] is None:
                continue
            det = r[name]["planted_detection"]
            lines.append(f"  {name:<10} " + ", ".join(
                f"{b} {det[b]['found']}/{det[b]['pairs']}" + (f" ({det[b]['not_eligible']} filtered)"
                                                               if det[b]["not_eligible"] else "")
                for b in bands if b in det))
    q = r.get("quality_classifier")
    if q:
        lines.append(f"quality classifier: held-out AUC {q['held_out_auc']:.4f} ({q['documents']['positive']:,} "
                     f"curated vs {q['documents']['negative']:,} web documents, {q['seconds']:.1f} s); median score "
                     "classifier / heuristic: " + ", ".join(
                         f"{k} {v['median_classifier']:.3f} / {v['median_heuristic']:.3f}" for k, v in q["scores"].items()))
    lines.append(f"note: {r['note']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- palm bench input
#
# `palm bench input` measures the training input: tokenize-and-pack throughput per core (the pack stage on
# Beam's in-process runner, and plain Tokenizer.encode beside it so the Beam overhead shows), and the Grain
# loader's batches/s, against the tokens/s one H100 consumes for specs/palm-1b-gpu.yaml.

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
    import palm

    return Path(palm.__file__).resolve().parents[1] / "specs"


def host_description() -> dict[str, Any]:
    """The CPU this process runs on (the loader and the pack stage run on the host, never the accelerator)."""
    import os
    import platform

    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": usable, "platform": platform.platform(), "python": platform.python_version()}


def write_data_stage_shard(sources: dict[str, dict[str, Any]], out_dir: Path) -> tuple[Path, list[tuple[str, str]]]:
    """The materialized corpora as one data-stage train shard (gzip JSONL of {"id", "source", "text"}).

    Returns the shard and the (source, text) of every document, in the shard's order.
    """
    import gzip

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
    from palm.core.model import count_params, model_flops_per_token
    from palm.base.hardware import PEAK_FLOPS

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
    import math

    from palm.data.loader import HostBatches, sequence_dataset

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
    import tempfile

    from palm.data.pack import run_pack_stage
    from palm.spec.schema import load_spec
    from palm.tokenizer import TRAIN_THREADS, Tokenizer, train_tokenizer

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
        from palm.app.bench_corpus import build

        # The shared corpora as they are (no growth, nothing planted): real text for the tokenizer.
        sources = build(data_dir, work / "corpora", target_mb=0, pairs_per_band=0)["sources"]
        shard, docs = write_data_stage_shard(sources, work / "data")
        texts = [text for _, text in docs]
        total_bytes = sum(s["bytes"] for s in sources.values())
        say(f"bench input: {len(docs):,} documents, {total_bytes / MB:.2f} MB of text")

        t0, c0 = time.perf_counter(), _cpu_seconds()
        try:
            train_tokenizer(texts, work / "tokenizer" / "tokenizer.model", vocab_size=vocab_size)
        except PalmError as e:
            most = re.search(r"at most (\d+)", str(e))
            if most is None:
                raise
            raise PalmError(f"--vocab-size {vocab_size} is more pieces than the benchmark's {total_bytes / MB:.1f} MB "
                            f"of text supports (at most {int(most.group(1)):,}); lower --vocab-size") from None
        train_seconds, train_cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        say(f"  tokenizer: vocab {vocab_size:,} trained in {train_seconds:.1f} s")

        tokenizer = Tokenizer(work / "tokenizer" / "tokenizer.model")
        t0, c0 = time.perf_counter(), time.process_time()
        doc_tokens = [len(tokenizer.encode(text)) for text in texts]
        encode_seconds, encode_cpu = time.perf_counter() - t0, time.process_time() - c0
        encoded = sum(doc_tokens)
        say(f"  encode: {encoded:,} tokens in {encode_seconds:.2f} s")

        pack_dir = work / "pack"
        t0, c0 = time.perf_counter(), _cpu_seconds()
        manifest = run_pack_stage(_palm_data_spec(sources), 1, seq_len, shard.parent, work / "tokenizer", pack_dir)
        pack_seconds, pack_cpu = time.perf_counter() - t0, _cpu_seconds() - c0
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


# ------------------------------------------------------------------------------ palm bench decode
#
# `palm bench decode` times LanguageModel's own jitted decode step (palm.core.lm: one token per row against a
# KV cache, greedy sampling included) on random parameters and random prompt ids, per batch size, and
# compares it with the memory-bandwidth roofline: a decode step must read every parameter (the tied
# embedding too, for the logits) and the keys and values it attends to, so tokens/s is at most
# batch x bandwidth / bytes read per step, the bandwidth measured on the same device.

DECODE_BANDWIDTH_BYTES = {"gpu": 2 << 30, "tpu": 2 << 30, "cpu": 256 << 20}


class _TokenIdsOnly:
    """Stands in for a Tokenizer: the decode bench feeds token ids, so only the sizes LanguageModel checks."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_id = -1  # never sampled, so nothing stops early
        self.pad_id = 0


def measure_memory_bandwidth(num_bytes: int | None = None, repeats: int = 10) -> dict[str, Any]:
    """Read bandwidth of the default device: the median time of a jitted float32 sum over num_bytes."""
    import jax.numpy as jnp

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
    import dataclasses

    import flax.linen as nn

    from palm.core.lm import LanguageModel
    from palm.core.model import PaLM

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


def bench_generate(checkpoint: str | Path, requests: int = 32, max_gen_toks: int = 32, batch_size: int = 8,
                   prompt_chars: int = 400, until: Sequence[str] = ("\n\n",), log=None) -> dict[str, Any]:
    """lm-eval generate_until requests/s through the palm backend (palm.evaluation.lmeval.PalmLM), batched (one
    LanguageModel with `batch_size` rows, requests grouped and decoded together) against one request at a
    time (a batch_size-1 LanguageModel, one generate call per request), on the same parameters. Prompts:
    the first `prompt_chars` characters of the run's first validation documents; greedy decoding. Each
    mode runs the whole workload once untimed (compiling every shape), then once timed."""
    import dataclasses

    from lm_eval.api.instance import Instance

    from palm.core.lm import LanguageModel
    from palm.evaluation.run import _validation_texts, locate_run
    from palm.evaluation.lmeval import PalmLM, load_checkpoint

    say = log or (lambda msg: print(msg, file=sys.stderr))
    if requests < 1 or max_gen_toks < 1 or batch_size < 1 or prompt_chars < 1:
        raise PalmError(f"need --requests, --max-gen-toks, --batch-size and --prompt-chars >= 1, got {requests}, "
                        f"{max_gen_toks}, {batch_size}, {prompt_chars}")
    run = locate_run(checkpoint)
    texts = [t for t in _validation_texts(run["data_dir"], None) if t.strip()][:requests]
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
