"""The data stage: one Apache Beam pipeline from raw sources to a deduplicated, mixed, split corpus.

    read ─► decode ─► normalize ─► quality ─► exact dedup ─► near dedup (prose | code) ─► mixture ─► split ─► shards

Every step is a named transform. A document leaves the pipeline either in an output shard or with a
drop reason; the reasons are counted per source, so for every source
    docs_in == docs_kept + sum(dropped.values())
holds and is checked before the manifest is written. Output shards are deterministic: each document's
shard is a hash of its id, and a shard's documents are sorted by id.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import heapq
import importlib
import io
import json
import logging
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from palm.base import storage
from palm.data import builtin, filters, minhash
from palm.data.quality import SCORE_BINS, score_bin
from palm.base.errors import EnvironmentFault, PalmError, environment_fault
from palm.spec.schema import DataSpec, Source

# Elements: raw records (doc_id, source, bytes, format) and documents (doc_id, source, text).
DROPPED = "dropped"
_FAIL = "palm-data-error: "
NUM_BINS = 1 << 16  # mixture priority histogram resolution: quotas are met to 1/65536 of a source


def stable_unit(*parts: str) -> float:
    """A deterministic number in [0, 1) from strings (same on every machine and process)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# ------------------------------------------------------------------------------------------ read


def source_patterns(spec: DataSpec) -> list[tuple[str, int, str]]:
    """(source name, pattern index, pattern) of every source path (builtin corpora by name).

    Each pattern must match a file: that is checked here, with one listing call of at most one result
    per pattern, so a typo fails before any worker starts; the files themselves are listed by the
    workers (`match_pattern`), never on the submitting machine.
    """
    out = []
    for i, src in enumerate(spec.sources):
        for p, pattern in enumerate(src.paths):
            if src.format == "builtin":
                if pattern not in builtin.CORPORA:
                    raise PalmError(f"data.sources.{i}.paths: unknown builtin corpus {pattern!r}; "
                                    f"choose from {', '.join(sorted(builtin.CORPORA))}")
            elif not storage.is_remote(pattern) and Path(pattern).is_dir():
                raise EnvironmentFault(f"data.sources.{i}.paths: {pattern} is a directory, where a file was expected "
                                       f"(EISDIR); name its files with a glob, such as {pattern.rstrip('/')}/*."
                                       f"{src.format}", path=pattern)
            elif not any(r.metadata_list for r in FileSystems.match([pattern], limits=[1])):
                raise PalmError(f"data.sources.{i}.paths: no file matches {pattern!r} (source {src.name!r})")
            out.append((src.name, p, pattern))
    return out


def file_key(pattern_index: int, file_index: int) -> str:
    """A file's part of its documents' ids: its index among its pattern's matches, sorted by path
    ("00003"), prefixed by the pattern's index after the first ("1.00003")."""
    return f"{file_index:05d}" if pattern_index == 0 else f"{pattern_index}.{file_index:05d}"


def match_pattern(element: tuple[str, int, str], formats: dict[str, str]) -> Iterator[tuple[str, str, str]]:
    """(source, file key, path) of each file a source pattern matches, listed on a worker."""
    source, p, pattern = element
    if formats[source] == "builtin":
        yield source, str(p), pattern
        return
    matched = sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
    if not matched:  # it matched when the job was submitted
        raise ValueError(f"{_FAIL}no file matches {pattern!r} (source {source!r}) any more")
    for i, path in enumerate(matched):
        yield source, file_key(p, i), path


def read_file(element: tuple[str, str, str], sources: dict[str, Source]) -> Iterator[tuple[str, str, bytes, str]]:
    """Raw records (doc id, source, bytes, format) of one file, ids "<source>/<file key>/<record index>";
    at most the source's `max_docs` (the source-wide limit is applied after, `SmallestIds`)."""
    name, key, path = element
    src = sources[name]
    if src.format == "builtin":
        records: Iterable[tuple[str, bytes]] = ((f"{name}/{doc_id}", raw) for doc_id, raw in builtin.builtin_records(path))
    else:
        records = ((f"{name}/{key}/{i:08d}", raw) for i, raw in enumerate(_file_records(src, path)))
    for count, (doc_id, raw) in enumerate(records):
        if src.max_docs is not None and count >= src.max_docs:
            return
        yield doc_id, name, raw, src.format


class SmallestIds(beam.CombineFn):
    """Per source: its `max_docs` records with the smallest ids (the first ones of its first files)."""

    def __init__(self, limits: dict[str, int]):
        self.limits = limits

    def create_accumulator(self):
        return []

    def add_input(self, acc, record):
        acc.append(record)
        return self._prune(acc) if len(acc) > 2 * self.limits[record[1]] else acc

    def merge_accumulators(self, accs):
        merged = [r for acc in accs for r in acc]
        return self._prune(merged) if merged else merged

    def _prune(self, acc):
        return heapq.nsmallest(self.limits[acc[0][1]], acc, key=lambda r: r[0])

    def extract_output(self, acc):
        return self._prune(acc) if acc else acc


class ReadSources(beam.PTransform):
    """Every source's raw records: patterns listed by workers, files spread over workers (one element
    per file, after a reshuffle), each file read by one worker; `max_docs` applied per source."""

    def __init__(self, spec: DataSpec):
        super().__init__()
        self.spec = spec

    def expand(self, p):
        sources = {s.name: s for s in self.spec.sources}
        records = (p | "Patterns" >> beam.Create(source_patterns(self.spec))
                   | "MatchFiles" >> beam.FlatMap(match_pattern, {s.name: s.format for s in self.spec.sources})
                   | "SpreadFiles" >> beam.Reshuffle()
                   | "ReadFiles" >> beam.FlatMap(read_file, sources))
        limits = {s.name: s.max_docs for s in self.spec.sources if s.max_docs is not None}
        if not limits:
            return records
        limited, free = records | "ByLimit" >> beam.Partition(lambda r, n: 0 if r[1] in limits else 1, 2)
        capped = (limited | "BySource" >> beam.Map(lambda r: (r[1], r))
                  | "FirstDocs" >> beam.CombinePerKey(SmallestIds(limits))
                  | "Unpack" >> beam.FlatMap(lambda kv: kv[1]))
        return (capped, free) | "AllRecords" >> beam.Flatten()


def _file_records(src: Source, path: str) -> Iterator[bytes]:
    if src.format == "parquet":
        import pyarrow.parquet as pq

        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            table = pq.read_table(io.BytesIO(f.read()), columns=[src.text_field])
        for value in table.column(src.text_field).to_pylist():
            yield json.dumps({src.text_field: value}).encode()
        return
    with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as f:
        data = f.read()
    if src.format in ("jsonl", "jsonl.gz"):
        for line in data.splitlines():
            if line.strip():
                yield line
    elif src.split_pattern is None:
        yield data
    else:
        starts = [m.start() for m in re.finditer(src.split_pattern.encode(), data, re.MULTILINE)]
        bounds = sorted({0, *starts, len(data)})
        for a, b in zip(bounds, bounds[1:]):
            if data[a:b].strip():
                yield data[a:b]


# ----------------------------------------------------------------------------------- the steps


def decode_record(raw: bytes, fmt: str, text_field: str, policy: str) -> tuple[str | None, str | None, bool]:
    """(text, drop reason, repaired) of one raw record: invalid UTF-8 repaired (U+FFFD) or, under policy
    "drop", the record dropped as "invalid_utf8"; JSON records parsed for `text_field` ("malformed_record"
    when that fails or is not a string). The data stage and the quality classifier's sample share it."""
    repaired = False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        if policy == "drop":
            return None, "invalid_utf8", False
        text, repaired = raw.decode("utf-8", errors="replace"), True
    if fmt in ("jsonl", "jsonl.gz", "parquet"):
        try:
            value = json.loads(text)[text_field]
        except (ValueError, KeyError, TypeError):
            return None, "malformed_record", repaired
        if not isinstance(value, str):
            return None, "malformed_record", repaired
        text = value
    return text, None, repaired


class Decode(beam.DoFn):
    """Bytes to text (`decode_record`), drops and repairs counted."""

    def __init__(self, spec: DataSpec):
        self.policy = spec.invalid_utf8
        self.text_fields = {s.name: s.text_field for s in spec.sources}
        self.repaired = Metrics.counter("palm.data", "repaired_utf8")

    def process(self, record):
        doc_id, source, raw, fmt = record
        text, reason, repaired = decode_record(raw, fmt, self.text_fields[source], self.policy)
        if repaired:
            self.repaired.inc()
            yield beam.pvalue.TaggedOutput("repaired", source)
        if reason is not None:
            yield beam.pvalue.TaggedOutput(DROPPED, (source, reason))
            return
        yield doc_id, source, text


def normalize(doc, form: str):
    """Lossless by default ("none" keeps every character and whitespace run)."""
    if form == "none":
        return doc
    doc_id, source, text = doc
    return doc_id, source, unicodedata.normalize(form.upper(), text)


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
            from palm.data.quality import QualityClassifier

            try:
                self.scorer = QualityClassifier.load(self.classifier_path).score
            except PalmError as e:
                raise ValueError(f"{_FAIL}{e}") from None
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


def keep_first(group):
    """Of documents with identical content, keep the one with the smallest id."""
    _, docs = group
    docs = sorted(docs)
    yield docs[0]
    for doc_id, source, _ in docs[1:]:
        yield beam.pvalue.TaggedOutput(DROPPED, (source, "exact_duplicate"))


SHINGLES = "shingles"
BANDS = "bands"
PAIRS = "near_duplicate_pairs"  # accounting: ("near_duplicate_pairs", "", "candidate" | "verified")


def lsh_bands(near: Any) -> tuple[int, int]:
    """(bands, rows) of the LSH buckets: the spec's, or chosen for threshold - candidate_margin."""
    if near.bands is not None:
        return near.bands, near.rows
    return minhash.optimal_bands(max(0.05, near.threshold - near.candidate_margin), near.num_perm,
                                 near.recall_weight)


class BandKeys(beam.DoFn):
    """Tagged BANDS: (domain, band key) -> (doc id, signature): code and prose are compared only within
    their domain. Also emits each document's shingle set (tagged SHINGLES: (doc id, sorted unique shingle hashes)) for
    the exact verification of candidate pairs."""

    def __init__(self, spec: DataSpec, code_sources: frozenset[str]):
        near = spec.dedup.near
        self.ngram, self.num_perm, self.code_sources = near.ngram, near.num_perm, code_sources
        self.bands, self.rows = lsh_bands(near)

    def setup(self):
        self.hasher = minhash.MinHasher(self.num_perm)

    def process(self, doc):
        doc_id, source, text = doc
        code = source in self.code_sources
        tokens = minhash.code_tokens(text) if code else minhash.words(text)
        if not tokens:  # every empty document would share one signature; it has nothing to duplicate
            return
        shingles = minhash.shingle_hashes(tokens, self.ngram)
        signature = self.hasher.signature(shingles)
        yield beam.pvalue.TaggedOutput(SHINGLES, (doc_id, shingles))
        domain = "code" if code else "prose"
        for key in minhash.band_keys(signature, self.bands, self.rows):
            yield beam.pvalue.TaggedOutput(BANDS, ((domain, key), (doc_id, signature)))


def candidate_edges(group, threshold: float):
    """Within one LSH bucket: (the bucket's smallest id, member) for each member whose signature agrees
    with the smallest's on at least `threshold` of its positions (the candidate level, below the
    verification threshold)."""
    _, members = group
    members = sorted(members, key=lambda m: m[0])
    if len(members) < 2:
        return
    head_id, head_sig = members[0]
    for doc_id, sig in members[1:]:
        if minhash.estimated_jaccard(head_sig, sig) >= threshold:
            yield head_id, doc_id


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two sorted unique shingle-hash arrays."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return inter / union if union else 1.0


def _send_shingles(joined):
    """At document a: (b, (a, a's shingles)) for each candidate pair (a, b)."""
    _, grouped = joined
    for shingles in grouped["shingles"]:
        for pair in grouped["pair"]:
            yield pair[1], (pair[0], shingles)


def _verify(joined, threshold: float):
    """At document b: each candidate pair (a, b) whose exact shingle Jaccard reaches `threshold`."""
    b, grouped = joined
    for own in grouped["shingles"]:
        for a, other in grouped["from"]:
            if exact_jaccard(other, own) >= threshold:
                yield a, b


class VerifiedPairs(beam.PTransform):
    """Candidate pairs (a, b), deduplicated, verified by the exact Jaccard similarity of their shingle
    sets: each pair's two sets meet at b through two CoGroupByKeys, so no worker holds more than a
    document's candidates. Returns {"verified": pairs, "candidate_counts"/"verified_counts": the
    accounting's count elements}."""

    def __init__(self, shingles, threshold: float):
        super().__init__()
        self.shingles, self.threshold = shingles, threshold

    def expand(self, candidates):
        pairs = candidates | "DistinctPairs" >> beam.Distinct()
        sent = ({"pair": pairs | "ByFirst" >> beam.Map(lambda ab: (ab[0], ab)), "shingles": self.shingles}
                | "JoinFirst" >> beam.CoGroupByKey() | "SendShingles" >> beam.FlatMap(_send_shingles))
        verified = ({"from": sent, "shingles": self.shingles} | "JoinSecond" >> beam.CoGroupByKey()
                    | "ExactJaccard" >> beam.FlatMap(_verify, self.threshold))
        return {"verified": verified,
                "candidate_counts": pairs | "CountCandidates" >> beam.Map(lambda _: ((PAIRS, "", "candidate"), 1)),
                "verified_counts": verified | "CountVerified" >> beam.Map(lambda _: ((PAIRS, "", "verified"), 1))}


LABEL_ROUNDS = 3  # distributed min-label rounds before the (small) rest is finished on one worker


def _spread_label(joined):
    """One min-label round at one node: its label goes to itself and to each neighbour."""
    node, grouped = joined
    labels = list(grouped["label"])
    if not labels:
        return
    label = labels[0]
    yield node, label
    for neighbour in grouped["adjacent"]:
        yield neighbour, label


def _label_to_neighbours(joined):
    """(neighbour, the node's label) for each edge leaving a node."""
    node, grouped = joined
    for label in grouped["label"]:
        for neighbour in grouped["adjacent"]:
            yield neighbour, label


def _disagreements(joined):
    """(the smaller label, the larger) where an edge joins nodes whose labels still differ."""
    _, grouped = joined
    for own in grouped["label"]:
        for other in grouped["from"]:
            if other != own:
                yield (min(own, other), max(own, other))


def _merge_labels(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Label -> its component's smallest label, for the labels the rounds left apart."""
    return {label: rep for label, rep in minhash.connected_components(pairs).items() if label != rep}


def _final_label(item, merged: dict[str, str]):
    node, label = item
    return node, merged.get(label, label)


class NearDuplicates(beam.PTransform):
    """Connected components of the near-duplicate edges, distributed: every document but its
    component's smallest id is marked (node, True). Same result as `minhash.connected_components`.

    Min-label propagation: each node starts with the smallest id among itself and its neighbours,
    then `LABEL_ROUNDS` rounds each give every node the smallest label among itself and its
    neighbours (one CoGroupByKey and one combine each, spread over workers). Nodes with one label
    are in one component, and a component's smallest id already carries its own id as label; edges
    whose ends still disagree join label classes, and only those pairs of labels (few: bucket graphs
    are shallow) are merged on one worker and handed back as a side input. No list of all edges or
    documents is ever held by one worker.
    """

    def expand(self, edges):
        adjacent = edges | "BothWays" >> beam.FlatMap(lambda e: [(e[0], e[1]), (e[1], e[0])])
        labels = (adjacent | "OwnOrNeighbour" >> beam.MapTuple(lambda node, other: (node, min(node, other)))
                  | "FirstLabel" >> beam.CombinePerKey(min))
        for r in range(LABEL_ROUNDS):
            labels = ({"label": labels, "adjacent": adjacent} | f"JoinRound{r}" >> beam.CoGroupByKey()
                      | f"Spread{r}" >> beam.FlatMap(_spread_label)
                      | f"Label{r}" >> beam.CombinePerKey(min))
        sent = ({"label": labels, "adjacent": adjacent} | "JoinLast" >> beam.CoGroupByKey()
                | "ToNeighbours" >> beam.FlatMap(_label_to_neighbours))
        merged = ({"label": labels, "from": sent} | "Compare" >> beam.CoGroupByKey()
                  | "Disagree" >> beam.FlatMap(_disagreements)
                  | "Distinct" >> beam.Distinct()
                  | "Apart" >> beam.combiners.ToList()
                  | "Merge" >> beam.Map(_merge_labels))
        return (labels | "Final" >> beam.Map(_final_label, beam.pvalue.AsSingleton(merged))
                | "NotSmallest" >> beam.Filter(lambda item: item[0] != item[1])
                | "Mark" >> beam.MapTuple(lambda node, _: (node, True)))


def drop_marked(joined, code_sources: frozenset[str]):
    """CoGroupByKey(doc, mark) -> the doc, unless it was marked a near duplicate."""
    _, grouped = joined
    docs, marks = grouped["doc"], grouped["mark"]
    for doc in docs:
        if marks:
            reason = "near_duplicate_code" if doc[1] in code_sources else "near_duplicate"
            yield beam.pvalue.TaggedOutput(DROPPED, (doc[1], reason))
        else:
            yield doc


# ------------------------------------------------------------------------------------- mixture


def estimated_tokens(text: str, bytes_per_token: float) -> int:
    return max(1, round(len(text.encode("utf-8")) / bytes_per_token))


def add_priority_bin(doc, spec: DataSpec):
    doc_id, source, text = doc
    return source, (int(stable_unit(str(spec.seed), "mixture", doc_id) * NUM_BINS),
                    estimated_tokens(text, spec.bytes_per_token))


class BinTokens(beam.CombineFn):
    """Tokens per priority bin for one source: a fixed-size histogram, so the mixture scales."""

    def create_accumulator(self):
        return np.zeros(NUM_BINS, np.int64)

    def add_input(self, acc, item):
        acc[item[0]] += item[1]
        return acc

    def merge_accumulators(self, accs):
        return np.sum(list(accs), axis=0)

    def extract_output(self, acc):
        return acc


def mixture_cutoffs(histograms: dict[str, np.ndarray], spec: DataSpec) -> dict[str, Any]:
    """Per source, the priority bin below which documents are taken, and the achieved shares.

    The budget is `token_budget`, or, when null, the largest budget every source can supply at its
    weight without repeating a document (one epoch). A source that cannot supply its share of an
    explicit budget is an error naming it.
    """
    weights = {s.name: s.weight for s in spec.sources}
    available = {name: int(histograms.get(name, np.zeros(1)).sum()) for name in weights}
    if spec.token_budget is None:
        budget = min(available[n] / w for n, w in weights.items())
    else:
        budget = spec.token_budget
        for name, w in weights.items():
            if available[name] < w * budget:
                raise ValueError(
                    f"{_FAIL}source {name!r} has ~{available[name]:,} tokens after filtering and dedup, but "
                    f"its weight {w} of data.token_budget {budget:,} needs {w * budget:,.0f}; add data, lower "
                    "the weight or the budget (PaLM never repeats a source within the epoch)")
    cutoffs, achieved = {}, {}
    for name, w in weights.items():
        hist = histograms.get(name, np.zeros(NUM_BINS, np.int64))
        cumulative = np.cumsum(hist)
        quota = w * budget
        cutoffs[name] = int(np.searchsorted(cumulative, quota * (1 + 1e-9), side="right"))
        achieved[name] = int(cumulative[cutoffs[name] - 1]) if cutoffs[name] > 0 else 0
    return {"budget": budget, "cutoffs": cutoffs, "achieved_tokens": achieved, "available_tokens": available}


class Select(beam.DoFn):
    """Take the documents below their source's cutoff; split the taken into train and validation."""

    def __init__(self, spec: DataSpec):
        self.spec = spec

    def process(self, doc, mixture):
        doc_id, source, _ = doc
        priority = int(stable_unit(str(self.spec.seed), "mixture", doc_id) * NUM_BINS)
        if priority >= mixture["cutoffs"][source]:
            yield beam.pvalue.TaggedOutput(DROPPED, (source, "mixture_excess"))
            return
        split = "validation" if stable_unit(str(self.spec.seed), "split", doc_id) < self.spec.validation_fraction \
            else "train"
        yield split, doc


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


LOCAL_RUNNERS = ("in_process", "multi_process")


def pipeline_options(spec: DataSpec, job_name: str = "palm-data", package_dir: str | Path | None = None,
                     worker_image: str | None = None) -> PipelineOptions:
    """Beam options for the spec's runner.

    Locally the in-process FnApiRunner is pinned (plain DirectRunner may try Prism, which downloads a
    binary). On Dataflow, Flink or Spark the workers need palm-pipeline itself, as `data.beam.packaging`
    says:

    - "image" (the default): the workers run an SDK container image with palm and its locked environment
      installed: `data.beam.sdk_container_image`, or else `worker_image` (the spec's `infra.launcher.image`,
      which `palm image` builds from infra/Dockerfile). Nothing is staged for the workers or installed when
      one starts; the Beam SDK comes from the image too (`sdk_location=container`).
    - "wheel": wheels in `data.beam.extra_packages` plus a requirements file, staged with the job and
      pip-installed on every worker at start-up. Without extra packages palm packages itself here
      (palm/data/package.py): the project's wheel and requirements.txt exported from uv.lock, written to
      `package_dir` (default: a fresh temporary directory, which Beam stages when the job is submitted);
      a `data.beam.requirements_file` in the spec is used instead of the exported one.

    See infra/dataflow.md.
    """
    b = spec.beam
    if b.runner == "in_process":
        return PipelineOptions(flags=[], direct_running_mode="in_memory", direct_num_workers=1)
    if b.runner == "multi_process":
        return PipelineOptions(flags=[], direct_running_mode="multi_processing", direct_num_workers=b.num_workers)
    packaging: dict[str, Any] = {"save_main_session": False}
    if b.packaging == "image":
        image = b.sdk_container_image or worker_image
        if not image:
            raise PalmError(f"data.beam.sdk_container_image: the {b.runner} workers run palm from a container image; "
                            "set infra.launcher.image (the image `palm image` builds) or data.beam.sdk_container_image, "
                            "or set data.beam.packaging: wheel")
        if b.extra_packages or b.requirements_file:
            raise PalmError("data.beam.extra_packages and data.beam.requirements_file are staged only with "
                            "data.beam.packaging: wheel; remove them or set data.beam.packaging: wheel")
        packaging.update(sdk_container_image=image, sdk_location="container")
    else:
        extra_packages, requirements_file = list(b.extra_packages), b.requirements_file
        if not extra_packages:
            import tempfile

            from palm.data.package import build_worker_package

            out = package_dir if package_dir is not None else tempfile.mkdtemp(prefix="palm-worker-package-")
            built = build_worker_package(out, requirements=requirements_file is None)
            extra_packages = [built["wheel"]]
            requirements_file = requirements_file or built["requirements"]
        packaging["extra_packages"] = extra_packages
        if requirements_file:
            packaging["requirements_file"] = requirements_file
        if b.sdk_container_image:  # a base image of the user's own, palm installed on it at start-up
            packaging["sdk_container_image"] = b.sdk_container_image
    if b.runner == "dataflow":
        cloud = {"runner": "DataflowRunner", "project": b.project, "region": b.region,
                 "temp_location": b.temp_location, "job_name": job_name, "num_workers": b.num_workers}
        if b.machine_type:
            cloud["machine_type"] = b.machine_type
        if b.max_num_workers:
            cloud["max_num_workers"] = b.max_num_workers
            cloud["autoscaling_algorithm"] = "THROUGHPUT_BASED"
        return PipelineOptions(flags=[], **cloud, **packaging)
    environment = "DOCKER" if "sdk_container_image" in packaging else "LOOPBACK"
    if b.runner == "flink":
        return PipelineOptions(flags=[], runner="FlinkRunner", flink_master=b.master_url, environment_type=environment,
                               **packaging)
    return PipelineOptions(flags=[], runner="SparkRunner", spark_master_url=b.master_url,
                           environment_type=environment, **packaging)


def check_submission_environment(spec: DataSpec) -> None:
    """PalmError naming what to install when this environment cannot submit the spec's Dataflow job.

    DataflowRunner needs Beam's gcp extra (the Dataflow API client, Cloud Storage staging); with
    packaging: wheel and a requirements file, Beam's stager also runs `python -m pip download` for every
    requirement, and a uv environment has no pip of its own. The `dataflow` dependency group holds both.
    """
    b = spec.beam
    if b.runner != "dataflow":
        return
    needed = {"apache_beam.runners.dataflow.internal.apiclient": "Beam's gcp extra (apache-beam[gcp])"}
    if b.packaging == "wheel" and (b.requirements_file or not b.extra_packages):
        needed["pip"] = "pip (Beam's stager downloads the requirements with it)"
    missing = []
    for module, what in needed.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(what)
    if missing:
        raise PalmError(f"submitting a Beam stage (data, pack) to Dataflow needs {' and '.join(missing)} in this environment: "
                        "run `uv sync --frozen --group dataflow` (with the other groups you use)")


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
        from palm.data.quality import CLASSIFIER

        report = json.loads(storage.read_text(storage.join(classifier, CLASSIFIER)))["report"]
        quality.update(classifier=classifier, classifier_key=classifier_key, held_out_auc=report["held_out_auc"],
                       positive_sources=report["positive_sources"], negative_sources=report["negative_sources"])
    return {"sources": per_source, "token_budget": mixture["budget"], "shards": shards, "near_duplicates": near,
            "quality": quality,
            "docs_in": sum(e["docs_in"] for e in per_source.values()),
            "docs_kept": sum(e["docs_kept"] for e in per_source.values())}


def run_beam(spec: DataSpec, build: Any, job_name: str = "palm-data", worker_image: str | None = None) -> None:
    """Run `build(pipeline)` on the spec's runner (a local one is pinned to the in-process FnApiRunner);
    a `palm-data-error:` raised in a worker comes back as the user's PalmError.

    `worker_image` is the spec's infra.launcher.image: remote workers run it unless
    data.beam.sdk_container_image names another (see `pipeline_options`). A fault of the machine in a
    worker that names its file (a forbidden path, a directory read as a file) is one EnvironmentFault; one
    that names none (a full disk) is raised as it is, for the stage task to name the run's root."""
    check_submission_environment(spec)
    options = pipeline_options(spec, job_name=job_name, worker_image=worker_image)
    runner = None
    if spec.beam.runner in LOCAL_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        runner = FnApiRunner()
    try:
        with _quiet_environment_faults(), beam.Pipeline(runner=runner, options=options) as p:
            build(p)
    except Exception as e:  # Beam wraps worker errors; surface ours as the user's error
        message = str(e)
        if _FAIL in message:
            raise PalmError(message.split(_FAIL, 1)[1].split("\n")[0].rstrip(" '\"[]")) from None
        fault = environment_fault(e)
        if fault is not None and fault.path is not None:
            raise fault from None
        raise


class _DropEnvironmentFaults(logging.Filter):
    """Beam's workers log every failed bundle with its traceback (one per thread or retry of the bundle);
    for a fault of the machine, which run_beam turns into one line, those are noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return environment_fault(error if error is not None else Exception(record.getMessage())) is None


@contextlib.contextmanager
def _quiet_environment_faults() -> Iterator[None]:
    drop = _DropEnvironmentFaults()
    loggers = [logging.getLogger(name) for name in _BEAM_ERROR_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


#: The Beam loggers that report a failed DoFn (in process and in the SDK harness).
_BEAM_ERROR_LOGGERS = ("apache_beam.runners.common", "apache_beam.runners.worker.sdk_worker",
                       "apache_beam.runners.worker.bundle_processor",
                       "apache_beam.runners.portability.fn_api_runner.fn_runner")


def run_data_stage(spec: DataSpec, out_dir: str | Path, worker_image: str | None = None,
                   classifier: str | None = None, classifier_key: str | None = None) -> dict[str, Any]:
    """Run the Beam pipeline into out_dir; return the manifest fields (accounting per source).

    `classifier`: the quality stage's output directory (local or gs://), which the quality-sampled
    sources are scored by; None where no source samples by the classifier's score."""
    from palm.data.quality import uses_classifier

    if uses_classifier(spec) and classifier is None:
        raise PalmError("the data stage samples by the quality classifier's score but was given no classifier: "
                        "run the quality stage first (palm run SPEC runs it), or set data.quality.scorer: heuristic")
    out_dir = str(out_dir)
    if spec.beam.runner not in LOCAL_RUNNERS and not out_dir.startswith("gs://"):
        raise PalmError(f"data.beam.runner={spec.beam.runner!r} runs on remote workers, which cannot write "
                        f"to the local path {out_dir}; set infra.storage_root to a gs:// bucket")
    run_beam(spec, lambda p: build_pipeline(p, spec, out_dir, classifier), worker_image=worker_image)
    return summarize(out_dir, spec, classifier, classifier_key)
