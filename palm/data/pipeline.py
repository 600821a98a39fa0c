"""The data stage: one Apache Beam pipeline from raw sources to a deduplicated, mixed, split corpus.

    read ─► decode ─► normalize ─► quality ─► exact dedup ─► near dedup (prose | code) ─► mixture ─► split ─► shards

Every step is a named transform: reading, decoding and normalizing in palm.data.sources, the quality
filter here, deduplication in palm.data.dedup, the mixture and split in palm.data.mixture, the shards
here; palm.data.beam runs the pipeline. A document leaves the pipeline either in an output shard or with
a drop reason; the reasons are counted per source, so for every source
    docs_in == docs_kept + sum(dropped.values())
holds and is checked before the manifest is written. Output shards are deterministic: each document's
shard is a hash of its id, and a shard's documents are sorted by id.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from palm.base import storage
from palm.base.errors import PalmError
from palm.data import filters
from palm.data.beam import DROPPED, FAIL, run_beam, stable_unit
from palm.spec.schema import LOCAL_RUNNERS
from palm.data.dedup import (BANDS, PAIRS, SHINGLES, BandKeys, NearDuplicates, VerifiedPairs, candidate_edges,
                             drop_marked, keep_first)
from palm.data.mixture import BinTokens, Select, add_priority_bin, estimated_tokens, mixture_cutoffs
from palm.data.quality import SCORE_BINS, QualityClassifier, score_bin
from palm.data.quality_report import read_report
from palm.data.sources import Decode, ReadSources, normalize
from palm.spec.schema import DataSpec

# ------------------------------------------------------------------------------------- quality


SCORED = "quality_scored"  # accounting: ("quality_scored", source, "<score bin>:kept" | "<score bin>:dropped")


class QualityFilter(beam.DoFn):
    """Per-source Gopher/C4 heuristics, then optional score-proportional (Pareto) sampling.

    The score is the quality classifier's (`classifier`: the quality stage's output directory, read once
    per worker) or, where data.quality.scorer is "heuristic", palm.data.filters.quality_score. Every
    scored document is counted by score bin and verdict (the SCORED output), for the accounting."""

    def __init__(self, spec: DataSpec, classifier: str | None = None):
        self.filters = {s.name: s.filters for s in spec.sources}
        self.seed = spec.seed
        self.alpha = spec.quality.alpha
        self.classifier_path = classifier
        self.scorer = None

    def setup(self):
        if self.classifier_path is not None:
            try:
                self.scorer = QualityClassifier.load(self.classifier_path).score
            except PalmError as e:
                raise ValueError(f"{FAIL}{e}") from None
        else:
            self.scorer = filters.quality_score

    def process(self, doc):
        doc_id, source, text = doc
        f = self.filters[source]
        reason = filters.quality_drop_reason(text, f)
        if reason is None and f.quality_sampling:
            score = self.scorer(text)
            kept = filters.keep_by_quality(score, doc_id, self.seed, self.alpha)
            yield beam.pvalue.TaggedOutput(SCORED, (source, f"{score_bin(score)}:{'kept' if kept else 'dropped'}"))
            if not kept:
                reason = "quality_sampling"
        if reason is not None:
            Metrics.counter("palm.data", f"{source}.{reason}").inc()
            yield beam.pvalue.TaggedOutput(DROPPED, (source, reason))
        else:
            yield doc


# --------------------------------------------------------------------------------------- write


class WriteShard(beam.DoFn):
    """Write one shard as gzip JSON lines, documents sorted by id, byte-for-byte reproducible."""

    def __init__(self, out_dir: str, num_shards: dict[str, int]):
        self.out_dir, self.num_shards = out_dir, num_shards

    def process(self, group):
        (split, shard), docs = group
        docs = sorted(d for d in docs if d is not None)
        path = f"{self.out_dir}/{split}-{shard:05d}-of-{self.num_shards[split]:05d}.jsonl.gz"
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
            for doc_id, source, text in docs:
                gz.write(json.dumps({"id": doc_id, "source": source, "text": text}, ensure_ascii=False).encode())
                gz.write(b"\n")
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(buf.getvalue())
        for doc_id, source, text in docs:
            yield ("kept", source, split), 1
            yield ("kept_tokens", source, split), estimated_tokens(text, 1.0)  # UTF-8 bytes


def shard_of(item, num_shards: dict[str, int]):
    split, doc = item
    return (split, int(stable_unit("shard", doc[0]) * num_shards[split])), doc


# ------------------------------------------------------------------------------------ pipeline


def build_pipeline(p: beam.Pipeline, spec: DataSpec, out_dir: str, classifier: str | None = None) -> None:
    """Attach the whole data stage to pipeline `p`, writing shards and accounting.json to out_dir.

    `classifier`: the quality stage's output, which scores the quality-sampled sources (palm.data.quality)."""
    code_sources = frozenset(s.name for s in spec.sources if s.kind == "code")
    near = spec.dedup.near
    dropped: list[beam.PCollection] = []

    records = p | "Read" >> ReadSources(spec) | "Spread" >> beam.Reshuffle()
    decoded = records | "Decode" >> beam.ParDo(Decode(spec)).with_outputs(DROPPED, "repaired", main="docs")
    dropped.append(decoded[DROPPED])
    docs = decoded.docs | "Normalize" >> beam.Map(normalize, spec.normalize)

    quality = docs | "Quality" >> beam.ParDo(QualityFilter(spec, classifier)).with_outputs(DROPPED, SCORED,
                                                                                          main="docs")
    dropped.append(quality[DROPPED])
    docs = quality.docs

    if spec.dedup.exact:
        exact = (docs | "ContentHash" >> beam.Map(lambda d: (hashlib.sha256(d[2].encode()).digest(), d))
                 | "GroupByContent" >> beam.GroupByKey()
                 | "ExactDedup" >> beam.FlatMap(keep_first).with_outputs(DROPPED, main="docs"))
        dropped.append(exact[DROPPED])
        docs = exact.docs

    pair_counts: list[beam.PCollection] = []
    if near.enabled:
        hashed = docs | "MinHash" >> beam.ParDo(BandKeys(spec, code_sources)).with_outputs(SHINGLES, BANDS)
        candidates = (hashed[BANDS] | "GroupByBand" >> beam.GroupByKey()
                      | "CandidatePairs" >> beam.FlatMap(candidate_edges, near.threshold - near.candidate_margin))
        checked = candidates | "Verify" >> VerifiedPairs(hashed[SHINGLES], near.threshold)
        pair_counts = [checked["candidate_counts"], checked["verified_counts"]]
        marks = checked["verified"] | "Clusters" >> NearDuplicates()
        keyed = docs | "ById" >> beam.Map(lambda d: (d[0], d))
        near_out = ({"doc": keyed, "mark": marks} | "JoinMarks" >> beam.CoGroupByKey()
                    | "NearDedup" >> beam.FlatMap(drop_marked, code_sources).with_outputs(DROPPED, main="docs"))
        dropped.append(near_out[DROPPED])
        docs = near_out.docs

    histograms = (docs | "PriorityBins" >> beam.Map(add_priority_bin, spec)
                  | "TokensPerBin" >> beam.CombinePerKey(BinTokens()))
    mixture = (histograms | "AllSources" >> beam.combiners.ToDict()
               | "Cutoffs" >> beam.Map(mixture_cutoffs, spec))
    selected = docs | "Mixture" >> beam.ParDo(Select(spec), beam.pvalue.AsSingleton(mixture)).with_outputs(
        DROPPED, main="docs")
    dropped.append(selected[DROPPED])

    num_shards = {"train": spec.num_shards, "validation": max(1, spec.num_shards // 8)}
    # Every shard exists, even an empty one, so readers can rely on the names.
    empty = [((split, i), None) for split, n in num_shards.items() for i in range(n)]
    written = ((selected.docs | "AssignShard" >> beam.Map(shard_of, num_shards),
                p | "EmptyShards" >> beam.Create(empty)) | "AllShards" >> beam.Flatten()
               | "GroupByShard" >> beam.GroupByKey()
               | "WriteShards" >> beam.ParDo(WriteShard(out_dir, num_shards)))

    counts = [
        records | "CountIn" >> beam.Map(lambda r: (("docs_in", r[1], ""), 1)),
        decoded.repaired | "CountRepaired" >> beam.Map(lambda s: (("repaired_utf8", s, ""), 1)),
        (dropped | "AllDropped" >> beam.Flatten()) | "CountDropped" >> beam.Map(lambda d: (("dropped", *d), 1)),
        written,
        *pair_counts,
        quality[SCORED] | "CountScored" >> beam.Map(lambda d: ((SCORED, *d), 1)),
    ]
    accounting = (counts | "AllCounts" >> beam.Flatten() | "Sum" >> beam.CombinePerKey(sum)
                  | "Collect" >> beam.combiners.ToList())
    (accounting | "WriteAccounting" >> beam.Map(_write_accounting, out_dir, beam.pvalue.AsSingleton(mixture)))


def _write_accounting(counts, out_dir: str, mixture: dict[str, Any]) -> None:
    payload = {"counts": [[list(k), v] for k, v in sorted(counts)],
               "mixture": {k: v for k, v in mixture.items()}}
    with FileSystems.create(f"{out_dir}/accounting.json", compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(json.dumps(payload, default=int).encode())


def summarize(out_dir: str, spec: DataSpec, classifier: str | None = None,
              classifier_key: str | None = None) -> dict[str, Any]:
    """Per-source accounting from accounting.json, checked to balance; the manifest's data fields
    (with the quality classifier's held-out AUC and, per quality-sampled source, its keep rate and scores)."""
    payload = json.loads(storage.read_text(storage.join(out_dir, "accounting.json")))  # local or gs:// (Dataflow)
    per_source: dict[str, dict[str, Any]] = {
        s.name: {"docs_in": 0, "docs_kept": 0, "kept_by_split": {"train": 0, "validation": 0}, "dropped": {},
                 "repaired_utf8": 0, "bytes_kept": 0, "weight": s.weight} for s in spec.sources}
    pairs = {"candidate": 0, "verified": 0}
    scored: dict[str, dict[str, list[int]]] = {}
    for (kind, source, detail), value in payload["counts"]:
        if kind == PAIRS:
            pairs[detail] += value
            continue
        if kind == SCORED:
            score_bin, verdict = detail.split(":")
            hist = scored.setdefault(source, {"kept": [0] * SCORE_BINS, "dropped": [0] * SCORE_BINS})
            hist[verdict][int(score_bin)] += value
            continue
        entry = per_source[source]
        if kind == "docs_in":
            entry["docs_in"] += value
        elif kind == "repaired_utf8":
            entry["repaired_utf8"] += value
        elif kind == "dropped":
            entry["dropped"][detail] = entry["dropped"].get(detail, 0) + value
        elif kind == "kept":
            entry["docs_kept"] += value
            entry["kept_by_split"][detail] += value
        elif kind == "kept_tokens":
            entry["bytes_kept"] += value
    for name, entry in per_source.items():
        entry["dropped"] = dict(sorted(entry["dropped"].items()))
        if entry["docs_in"] != entry["docs_kept"] + sum(entry["dropped"].values()):
            raise RuntimeError(f"data accounting does not balance for source {name!r}: {entry}")
    for i, src in enumerate(spec.sources):  # no manifest is written: an empty source is never cached
        entry = per_source[src.name]
        cleaned = {reason: n for reason, n in entry["dropped"].items() if reason != "mixture_excess"}
        if entry["docs_in"] == sum(cleaned.values()):  # nothing reached the mixture
            why = ", ".join(f"{reason} {n:,}" for reason, n in sorted(cleaned.items(), key=lambda x: -x[1]))
            raise PalmError(f"data.sources.{i} ({src.name!r}) has no documents left: {entry['docs_in']:,} read"
                            + (f", dropped: {why}" if why else "")
                            + f"; loosen data.sources.{i}.filters or check its files")
    mixture = payload["mixture"]
    total = sum(mixture["achieved_tokens"].values()) or 1
    for name, entry in per_source.items():
        entry["estimated_tokens"] = mixture["achieved_tokens"][name]
        entry["share"] = mixture["achieved_tokens"][name] / total
    shards = sorted(storage.name(p) for p in storage.glob(storage.join(out_dir, "*.jsonl.gz")))
    near = {"candidate_pairs": pairs["candidate"], "verified_pairs": pairs["verified"],
            "documents_dropped": sum(e["dropped"].get(r, 0) for e in per_source.values()
                                     for r in ("near_duplicate", "near_duplicate_code"))}
    for name, hist in scored.items():
        n_kept, n_scored = sum(hist["kept"]), sum(hist["kept"]) + sum(hist["dropped"])
        per_source[name]["quality_sampling"] = {"scored": n_scored, "kept": n_kept,
                                                "keep_rate": n_kept / n_scored if n_scored else None,
                                                "score_histogram": hist}
    quality = {"scorer": spec.quality.scorer if scored else None}
    if classifier is not None:
        report = read_report(classifier)
        quality.update(classifier=classifier, classifier_key=classifier_key, held_out_auc=report["held_out_auc"],
                       positive_sources=report["positive_sources"], negative_sources=report["negative_sources"])
    return {"sources": per_source, "token_budget": mixture["budget"], "shards": shards, "near_duplicates": near,
            "quality": quality,
            "docs_in": sum(e["docs_in"] for e in per_source.values()),
            "docs_kept": sum(e["docs_kept"] for e in per_source.values())}



def run_data_stage(spec: DataSpec, out_dir: str | Path, worker_image: str | None = None,
                   classifier: str | None = None, classifier_key: str | None = None,
                   placement: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the Beam pipeline into out_dir; return the manifest fields (accounting per source).

    `classifier`: the quality stage's output directory (local or gs://), which the quality-sampled
    sources are scored by; None where no source samples by the classifier's score."""
    if spec.uses_classifier() and classifier is None:
        raise PalmError("the data stage samples by the quality classifier's score but was given no classifier: "
                        "run the quality stage first (palm run SPEC runs it), or set data.quality.scorer: heuristic")
    out_dir = str(out_dir)
    if spec.beam.runner not in LOCAL_RUNNERS and not out_dir.startswith("gs://"):
        raise PalmError(f"data.beam.runner={spec.beam.runner!r} runs on remote workers, which cannot write "
                        f"to the local path {out_dir}; set infra.storage_root to a gs:// bucket")
    run_beam(spec, lambda p: build_pipeline(p, spec, out_dir, classifier), worker_image=worker_image,
             placement=placement)
    return summarize(out_dir, spec, classifier, classifier_key)
