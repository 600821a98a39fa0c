"""The data stage's mixture and split (Beam): which documents the corpus takes from each source, by weight.

Each document gets a priority from a hash of its id (one of NUM_BINS bins); a source's documents are
taken in priority order until its share (`weight`) of the token budget is met (`mixture_cutoffs`, from
a per-source histogram of estimated tokens per bin, `BinTokens`), the rest dropped as "mixture_excess";
the taken are split into train and validation by another hash of the id (`Select`).
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
import numpy as np

from palm.data.beam import DROPPED, FAIL, stable_unit
from palm.spec.schema import DataSpec

NUM_BINS = 1 << 16  # mixture priority histogram resolution: quotas are met to 1/65536 of a source


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
                    f"{FAIL}source {name!r} has ~{available[name]:,} tokens after filtering and dedup, but "
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
