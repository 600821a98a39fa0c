"""`palm bench data` times the data stage against datatrove (Hugging Face's pipeline library) on the same
documents, one core each. The documents are cut from the shared corpora once (palm.app.bench.corpus) and
written as JSON lines, so both systems read identical bytes; only the pipelines are timed. It also trains the
quality classifier on the corpus's prose against synthetic web spam (held-out AUC)."""

from __future__ import annotations

import contextlib
import gzip
import importlib
import json
import random
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from palm.app.bench import corpus as bench_corpus
from palm.app.bench.common import MB, cpu_seconds, default_data_dir, palm_data_spec
from palm.base.errors import PalmError
from palm.data.filters import quality_drop_reason, quality_score
from palm.data.dedup import lsh_bands
from palm.data.pipeline import run_data_stage
from palm.data.quality import QualityClassifier, train_quality_stage
from palm.data.synthetic_web import fluent_spam, keyword_list, web_page
from palm.spec.schema import DataSpec, NearDedup

PALM_EXTRA_STEPS = ("exact dedup (SHA-256 of the content)", "near-dup candidates verified against signatures",
                    "token mixture by weight", "train/validation split", "deterministic sharding (sorted by id)",
                    "per-source drop accounting")
BENCH_REQUIREMENTS = ("datatrove", "spacy", "xxhash", "orjson")


def run_palm_once(spec, out_dir: Path) -> dict[str, Any]:
    """One timed run of the whole data stage (pipeline construction, Beam run, accounting)."""
    out_dir.mkdir(parents=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    manifest = run_data_stage(spec, out_dir)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
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
    # datatrove and spaCy: the optional bench group, imported only once it is known to be installed
    import datatrove
    import spacy

    try:
        spacy.blank("en")  # the Gopher filter's word tokenizer; a blank pipeline needs no model download
    except Exception as e:  # noqa: BLE001 - any failure here means the bench cannot run datatrove
        raise PalmError(f"spacy cannot build its blank English tokenizer ({e}); run `uv sync --group bench`") \
            from None
    return getattr(datatrove, "__version__", None) or _dist_version("datatrove")


def _dist_version(name: str) -> str:
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
    # datatrove: the optional bench group (require_datatrove checked it), imported only when it runs
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
    from datatrove.utils.logging import setup_default_logger  # the optional bench group, only when it runs

    root.mkdir(parents=True)
    log_path = root / "datatrove.log"
    with log_path.open("w") as log:
        try:
            with contextlib.redirect_stderr(log):
                setup_default_logger()  # binds datatrove's logger to the redirected stderr
                t0, c0 = time.perf_counter(), cpu_seconds()
                _datatrove_executors(input_dir, root, bands, rows, ngram).run()
                seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
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
    """Time palm's data stage and datatrove's Gopher + MinHash pipeline on the same documents (palm.app.bench.corpus:
    real text grown by recombination to `target_mb`, planted exact and near copies); compare what each
    filter drops and how many planted pairs each finds, per band of true Jaccard; and train the quality
    classifier on the corpus's curated prose against synthetic spam and keyword lists (held-out AUC)."""
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

        spec = palm_data_spec(sources)
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
