"""The data stage's deduplication transforms (Beam).

Exact: documents grouped by a hash of their content keep the smallest id (`keep_first`). Near (MinHash
LSH, palm.data.minhash): each document's shingle set is hashed into a signature and LSH band keys, code
and prose apart (`BandKeys`, with `lsh_bands`); documents sharing a band key whose signatures agree
enough are candidate pairs (`candidate_edges`), verified by the exact Jaccard similarity of their
shingle sets (`VerifiedPairs`); the verified pairs' connected components keep their smallest id
(`NearDuplicates`), the rest are dropped (`drop_marked`).
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
import numpy as np

from palm.data import minhash
from palm.data.beam import DROPPED
from palm.spec.schema import DataSpec


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
