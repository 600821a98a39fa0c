"""The quality classifier: PaLM's and GLaM's way of sampling web documents by quality.

GLaM (Du et al. 2022, section 3.1), whose data PaLM reused: "we train a linear classifier to distinguish
between [curated] text and other webpages", then sample webpages by its score under a Pareto rule
(`palm.data.filters.keep_by_quality`). Here, as a stage of its own (`quality`, before `data`):

* positives: documents of the curated sources (by default those of kind ``wikipedia`` and ``books``, or
  the ones ``data.quality.positive_sources`` names); negatives: documents of the sources that ask for
  ``filters.quality_sampling``. Each side is a sample of at most ``max_docs_per_class`` documents, read
  in process from the first documents of each source's files, the files in a seeded random order, after
  the source's own rule-based filters (the classifier learns what the rules let through);
* features: scikit-learn's ``HashingVectorizer`` (word 1..``ngram``-grams, lowercased, hashed into
  ``num_features`` columns, L2-normalized): stateless, so workers need only its settings;
* model: scikit-learn's ``LogisticRegression`` (balanced classes), fitted on all but a held-out
  fraction of each class (chosen by a hash of the document id); the held-out ROC AUC is reported;
* output: ``classifier.json`` (vectorizer settings, intercept, the training report) and ``weights.npy``
  (float32 coefficients), read by the data stage's workers from wherever the stage output lives
  (local or gs://). A document's score is the model's probability that it is curated text.

Nothing here hand-writes a learner or a feature extractor; the stage only samples, fits and reports.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from palm.base import storage
from palm.base.errors import PalmError
from palm.data.filters import keep_probability, quality_drop_reason
from palm.data.quality_report import CLASSIFIER
from palm.data.sources import decode_record, normalize, source_files, source_records

if TYPE_CHECKING:
    from palm.spec.schema import DataSpec, Source

WEIGHTS = "weights.npy"
#: Score quantiles reported per source.
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: Bins of the score histograms (the data stage's accounting uses the same).
SCORE_BINS = 10


# ------------------------------------------------------------------------------------ sampling


def _held_out(doc_id: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"palm-quality-split/{seed}/{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def sample_source(data: "DataSpec", src: "Source", limit: int) -> Iterator[tuple[str, str]]:
    """(doc id, text) of up to `limit` documents of `src` that pass its rule-based filters, read in
    process: the first documents of its files, the files in a random order fixed by data.seed.

    Files, records, ids, decoding and normalization are the data stage's own (palm.data.sources), and
    the rules too (palm.data.filters), so the classifier sees documents exactly as the data stage will
    score them."""
    files = source_files(src)  # (file key, path)
    random.Random(f"palm-quality/{data.seed}/{src.name}").shuffle(files)
    taken = 0
    for key, path in files:
        for doc_id, raw in source_records(src, key, path):
            text, reason, _ = decode_record(raw, src.format, src.text_field, data.invalid_utf8)
            if reason is not None:
                continue
            text = normalize((doc_id, src.name, text), data.normalize)[2]
            if quality_drop_reason(text, src.filters) is not None:
                continue
            yield doc_id, text
            taken += 1
            if taken >= limit:
                return


# ------------------------------------------------------------------------------------- the model


def vectorizer(settings: dict[str, Any]):
    # scikit-learn (seconds to import) loads only where a classifier is trained or scores
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=settings["num_features"], ngram_range=(1, settings["ngram"]),
                             alternate_sign=False, norm="l2", lowercase=True, dtype=np.float32)


@dataclass
class QualityClassifier:
    """A trained classifier: `score(text)` is its probability that the text is curated (in [0, 1])."""

    settings: dict[str, Any]
    weights: np.ndarray  # [num_features] float32
    intercept: float

    def __post_init__(self):
        self._vectorizer = vectorizer(self.settings)

    def decision(self, texts: list[str]) -> np.ndarray:
        features = self._vectorizer.transform(texts)
        return np.asarray(features @ self.weights, np.float64) + self.intercept

    def scores(self, texts: list[str]) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.decision(texts)))

    def score(self, text: str) -> float:
        return float(self.scores([text])[0])

    def save(self, out: Path, report: dict[str, Any]) -> None:
        np.save(out / WEIGHTS, self.weights.astype(np.float32))
        (out / CLASSIFIER).write_text(json.dumps({"settings": self.settings, "intercept": self.intercept,
                                                  "report": report}, indent=2))

    @classmethod
    def load(cls, path: str) -> "QualityClassifier":
        """From a quality stage's output directory, local or gs:// (PalmError naming what is wrong)."""
        try:
            meta = json.loads(storage.read_text(storage.join(path, CLASSIFIER)))
            weights = np.load(io.BytesIO(storage.read_bytes(storage.join(path, WEIGHTS))), allow_pickle=False)
            settings, intercept = meta["settings"], float(meta["intercept"])
        except FileNotFoundError as e:
            raise PalmError(f"quality classifier at {path}: {storage.name(e.filename or path)} is missing; "
                            "rerun the quality stage (palm run SPEC --stages quality --force)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise PalmError(f"quality classifier at {path} is unreadable ({e}); rerun the quality stage "
                            "(palm run SPEC --stages quality --force)") from None
        if weights.ndim != 1 or weights.shape[0] != settings.get("num_features") or not np.all(np.isfinite(weights)):
            raise PalmError(f"quality classifier at {path}: weights shaped {weights.shape}, expected "
                            f"[{settings.get('num_features')}] finite numbers; rerun the quality stage")
        return cls(settings, weights, intercept)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    return {f"p{round(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES}


def histogram(values: np.ndarray) -> list[int]:
    """Counts of scores in SCORE_BINS equal bins of [0, 1]."""
    bins = np.minimum((np.asarray(values) * SCORE_BINS).astype(int), SCORE_BINS - 1)
    return np.bincount(bins, minlength=SCORE_BINS).tolist()


def score_bin(score: float) -> int:
    return min(int(score * SCORE_BINS), SCORE_BINS - 1)


def check_auc(data: "DataSpec", report: dict[str, Any]) -> None:
    """Refuse a classifier whose held-out AUC is below data.quality.min_auc (PalmError, one line naming the
    AUC, both classes' sources and what to change): it would drop documents by a score that means nothing."""
    auc, floor = report["held_out_auc"], data.quality.min_auc
    if math.isfinite(auc) and auc >= floor:
        return
    pos, neg = ", ".join(report["positive_sources"]), ", ".join(report["negative_sources"])
    raise PalmError(f"the quality classifier's held-out AUC is {auc:.3f}, below data.quality.min_auc {floor:g}: it "
                    f"cannot tell the curated sources ({pos}) from the quality-sampled ones ({neg}), and would "
                    "drop documents by a meaningless score; choose curated sources that differ from the sampled "
                    "ones (data.quality.positive_sources), sample more documents (data.quality.max_docs_per_class), "
                    "turn off filters.quality_sampling for those sources, or lower data.quality.min_auc")


def train_quality_stage(data: "DataSpec", out: Path) -> dict[str, Any]:
    """Sample both classes, fit, evaluate on the held-out documents, save; the manifest's fields."""
    # scikit-learn (seconds to import) loads only where a classifier is trained
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    q = data.quality
    positives, negatives = data.positive_sources(), data.negative_sources()
    per_class = q.max_docs_per_class
    docs: dict[str, list[tuple[str, str]]] = {}
    for side, sources in (("positive", positives), ("negative", negatives)):
        quota = max(1, per_class // len(sources))
        for src in sources:
            docs[src.name] = list(sample_source(data, src, quota))
            if not docs[src.name]:
                raise PalmError(f"the quality classifier found no documents in source {src.name!r} ({side}s) "
                                "that pass its filters; check its paths and data.sources filters, or choose "
                                "other data.quality.positive_sources")
    label = {s.name: 1 for s in positives} | {s.name: 0 for s in negatives}
    rows = [(doc_id, text, label[name], name) for name, items in docs.items() for doc_id, text in items]
    held = np.array([_held_out(doc_id, data.seed, q.held_out_fraction) for doc_id, _, _, _ in rows])
    y = np.array([r[2] for r in rows])
    texts = [r[1] for r in rows]
    for part, mask in (("training", ~held), ("held-out", held)):
        if len(set(y[mask])) < 2:
            raise PalmError(f"the quality classifier's {part} documents hold only one class ({int(mask.sum())} "
                            f"documents); give it more documents (data.quality.max_docs_per_class) or a larger "
                            f"data.quality.held_out_fraction")
    settings = {"num_features": q.num_features, "ngram": q.ngram}
    features = vectorizer(settings).transform(texts)
    model = LogisticRegression(C=q.regularization, class_weight="balanced", max_iter=1000)
    model.fit(features[~held], y[~held])
    classifier = QualityClassifier(settings, model.coef_[0].astype(np.float32), float(model.intercept_[0]))
    scores = classifier.scores(texts)  # the saved float32 weights' scores, as the data stage will see them
    auc = float(roc_auc_score(y[held], scores[held]))
    names = np.array([r[3] for r in rows])
    per_source = {}
    for name in docs:
        mask = held & (names == name)
        s = scores[mask]
        per_source[name] = {
            "class": "positive" if label[name] else "negative",
            "sampled": int((names == name).sum()), "held_out": int(mask.sum()),
            "held_out_scores": _quantiles(s), "held_out_histogram": histogram(s),
            # The Pareto rule's expected keep rate at these scores (palm.data.filters.keep_probability).
            "expected_keep_rate": float(np.mean([keep_probability(v, q.alpha) for v in s])) if len(s) else None,
        }
    report = {
        "positive_sources": [s.name for s in positives], "negative_sources": [s.name for s in negatives],
        "documents": {"positive": int(y.sum()), "negative": int(len(y) - y.sum()),
                      "training": int((~held).sum()), "held_out": int(held.sum())},
        "held_out_auc": auc,
        "features": f"HashingVectorizer(word 1-{q.ngram}-grams, {q.num_features} hashed features, lowercase, l2)",
        "model": f"LogisticRegression(C={q.regularization:g}, class_weight=balanced)",
        "alpha": q.alpha,
        "sources": per_source,
    }
    check_auc(data, report)  # before anything is saved: a refused classifier is never cached
    classifier.save(out, report)
    return report
