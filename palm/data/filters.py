"""Document quality: Gopher/C4-style rule-based filters, a quality score, and PaLM/GLaM quality sampling.

The rules (Rae et al. 2021, "Gopher", appendix A; Raffel et al. 2020, "C4") drop documents that are not
natural-language prose: too short or too long, gibberish word lengths, symbol soup, teaser text cut off with
ellipses, mostly numbers or markup, or boilerplate repeated line after line. Every threshold lives in
`QualityFilters`; a threshold of None disables its check.

Definitions, all on the text as it is (no normalization):

* words: ``text.split()`` (any Unicode whitespace);
* lines: ``text.splitlines()``; a line is non-empty when it has a non-whitespace character, and lines are
  compared after stripping surrounding whitespace.

A check that measures a fraction of words (or of non-empty lines) passes when there are none to measure:
a document without words is rejected by ``too_few_words`` instead, when ``min_words`` is set.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only annotations need it: the filters run without pydantic
    from palm.spec import QualityFilters

#: Drop reasons in the order `quality_drop_reason` tries them; the names are manifest keys.
REASONS: tuple[str, ...] = (
    "too_few_words",
    "too_many_words",
    "mean_word_length",
    "hash_to_word_ratio",
    "ellipsis_to_word_ratio",
    "lines_ending_ellipsis",
    "words_without_alpha",
    "duplicate_lines",
)

_ELLIPSES = ("...", "\u2026")


@dataclass(frozen=True)
class DocStats:
    """The counts every check reads, computed in one pass so that the eight checks split the text once."""

    num_words: int
    num_word_chars: int
    num_hashes: int
    num_ellipses: int
    num_words_with_alpha: int
    num_lines: int
    num_lines_ending_ellipsis: int
    num_duplicate_lines: int

    @classmethod
    def of(cls, text: str) -> DocStats:
        words = text.split()
        lines = [line.strip() for line in text.splitlines()]
        lines = [line for line in lines if line]
        seen: set[str] = set()
        duplicates = 0
        for line in lines:
            if line in seen:
                duplicates += 1
            else:
                seen.add(line)
        return cls(
            num_words=len(words),
            num_word_chars=sum(len(w) for w in words),
            num_hashes=text.count("#"),
            num_ellipses=sum(text.count(e) for e in _ELLIPSES),
            num_words_with_alpha=sum(1 for w in words if any(c.isalpha() for c in w)),
            num_lines=len(lines),
            num_lines_ending_ellipsis=sum(1 for line in lines if line.endswith(_ELLIPSES)),
            num_duplicate_lines=duplicates,
        )

    @property
    def mean_word_length(self) -> float:
        return self.num_word_chars / self.num_words if self.num_words else 0.0


def _stats(doc: str | DocStats) -> DocStats:
    return doc if isinstance(doc, DocStats) else DocStats.of(doc)


# ------------------------------------------------------------------------------ one check each
# Each takes the text (or its DocStats, to share one pass) and its threshold(s), and says whether the
# document passes. None as a threshold passes everything.


def enough_words(doc: str | DocStats, min_words: int | None) -> bool:
    """At least `min_words` words (an empty document has none)."""
    return min_words is None or _stats(doc).num_words >= min_words


def not_too_many_words(doc: str | DocStats, max_words: int | None) -> bool:
    """At most `max_words` words."""
    return max_words is None or _stats(doc).num_words <= max_words


def mean_word_length_ok(doc: str | DocStats, min_length: float | None, max_length: float | None) -> bool:
    """Mean word length (characters) within [min_length, max_length]; either bound may be None."""
    s = _stats(doc)
    if not s.num_words:
        return True
    mean = s.mean_word_length
    return (min_length is None or mean >= min_length) and (max_length is None or mean <= max_length)


def hash_ratio_ok(doc: str | DocStats, max_ratio: float | None) -> bool:
    """(Occurrences of "#") / words at most `max_ratio` (Gopher: 0.1)."""
    s = _stats(doc)
    if max_ratio is None or not s.num_words:
        return True
    return s.num_hashes / s.num_words <= max_ratio


def ellipsis_ratio_ok(doc: str | DocStats, max_ratio: float | None) -> bool:
    """(Occurrences of "..." and "…") / words at most `max_ratio` (Gopher: 0.1, apart from the "#" one)."""
    s = _stats(doc)
    if max_ratio is None or not s.num_words:
        return True
    return s.num_ellipses / s.num_words <= max_ratio


def ellipsis_lines_ok(doc: str | DocStats, max_fraction: float | None) -> bool:
    """Fraction of non-empty lines ending with "..." or "…" at most `max_fraction`."""
    s = _stats(doc)
    if max_fraction is None or not s.num_lines:
        return True
    return s.num_lines_ending_ellipsis / s.num_lines <= max_fraction


def alpha_words_ok(doc: str | DocStats, min_fraction: float | None) -> bool:
    """Fraction of words with at least one alphabetic character at least `min_fraction`."""
    s = _stats(doc)
    if min_fraction is None or not s.num_words:
        return True
    return s.num_words_with_alpha / s.num_words >= min_fraction


def duplicate_lines_ok(doc: str | DocStats, max_fraction: float | None) -> bool:
    """Fraction of non-empty lines repeating an earlier line at most `max_fraction`."""
    s = _stats(doc)
    if max_fraction is None or not s.num_lines:
        return True
    return s.num_duplicate_lines / s.num_lines <= max_fraction


#: (reason, check) in the order of REASONS.
CHECKS: tuple[tuple[str, Callable[[DocStats, QualityFilters], bool]], ...] = (
    ("too_few_words", lambda s, f: enough_words(s, f.min_words)),
    ("too_many_words", lambda s, f: not_too_many_words(s, f.max_words)),
    ("mean_word_length", lambda s, f: mean_word_length_ok(s, f.min_mean_word_length, f.max_mean_word_length)),
    ("hash_to_word_ratio", lambda s, f: hash_ratio_ok(s, f.max_hash_to_word_ratio)),
    ("ellipsis_to_word_ratio", lambda s, f: ellipsis_ratio_ok(s, f.max_ellipsis_to_word_ratio)),
    ("lines_ending_ellipsis", lambda s, f: ellipsis_lines_ok(s, f.max_fraction_lines_ending_ellipsis)),
    ("words_without_alpha", lambda s, f: alpha_words_ok(s, f.min_fraction_words_with_alpha)),
    ("duplicate_lines", lambda s, f: duplicate_lines_ok(s, f.max_fraction_duplicate_lines)),
)
assert tuple(r for r, _ in CHECKS) == REASONS


def quality_drop_reason(text: str, f: QualityFilters) -> str | None:
    """The first check in REASONS order that `text` fails under `f`, or None when it passes them all."""
    s = DocStats.of(text)
    for reason, check in CHECKS:
        if not check(s, f):
            return reason
    return None


# ------------------------------------------------------------------------------- quality score

#: Closed-class English words: frequent in any prose, rare in keyword lists, tables, markup and code.
FUNCTION_WORDS: frozenset[str] = frozenset("""
a about above after again against all also although am among an and another any are as at be because
been before being below between both but by can could did do does doing down during each either
every few for from had has have having he her here hers herself him himself his how however i if in
into is it its itself just many may me might more most much must my myself neither no nor not of off
often on once only or other our ours ourselves out over own same shall she should since so some such
than that the their theirs them themselves then there these they this those though through thus to
too under until up upon us very was we were what when where whether which while who whom whose why
will with within without would yet you your yours yourself
""".split())

#: A word as prose writes it: letters (inner apostrophes and hyphens allowed), maybe quoted, bracketed or
#: followed by punctuation. Code tokens (``self.x``, ``f(a)``, ``==``, ``__init__``) and numbers are not.
_PLAIN_WORD = re.compile(r"[\"'(\[\u201c\u2018]*[^\W\d_]+(?:['\u2019-][^\W\d_]+)*[\"')\]\u201d\u2019.,;:!?]*")
_STRIP = string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb\u2014\u2013\u2026"


def _ramp(x: float, zero: float, one: float) -> float:
    """0 at or below `zero`, 1 at or above `one`, linear between."""
    return min(1.0, max(0.0, (x - zero) / (one - zero)))


def _length_component(mean: float) -> float:
    """1 for English-like mean word lengths (3.5-7.5), falling linearly to 0 at 2 and at 12."""
    return min(_ramp(mean, 2.0, 3.5), 1.0 - _ramp(mean, 7.5, 12.0))


def quality_score(text: str) -> float:
    """How much `text` looks like well-formed natural-language prose, in [0, 1].

    PaLM (like GLaM) scored webpages with a trained linear classifier of "high quality" text (books,
    Wikipedia, curated pages versus random web text). This heuristic is a stand-in with the same
    interface, so that `keep_by_quality` can sample on it without a trained model. It multiplies three
    components, each in [0, 1], so that text must look right on all three:

    * function words: the share of words that are English function words ("the", "of", "which"...),
      ramping from 0 to 1 at 0.3. Prose needs them to hold sentences together (English runs 0.35-0.5);
      keyword soup and tables have almost none, code few;
    * plain words: the share of words that are letters with at most surrounding punctuation, ramping from 0
      at 0.4 to 1 at 0.9. Prose is ~0.9; code (``self.x``, ``==``), markup and numbers are not;
    * word length: 1 for mean word lengths of 3.5-7.5 characters, falling to 0 at 2 and at 12.

    Calibration on the builtin corpora: Python's documentation has median 1.0, the standard library's code
    about 0.4, and keyword lists about 0.
    """
    words = text.split()
    if not words:
        return 0.0
    n = len(words)
    function = sum(1 for w in words if w.lower().strip(_STRIP) in FUNCTION_WORDS) / n
    plain = sum(1 for w in words if _PLAIN_WORD.fullmatch(w)) / n
    mean = sum(len(w) for w in words) / n
    return _ramp(function, 0.0, 0.3) * _ramp(plain, 0.4, 0.9) * _length_component(mean)


# ---------------------------------------------------------------------------- quality sampling


def _uniform(seed: int, doc_id: str) -> float:
    """A uniform draw in (0, 1) fixed by (seed, doc_id): the same on every machine and process."""
    digest = hashlib.sha256(f"palm-quality/{seed}/{doc_id}".encode("utf-8")).digest()
    # The centre of one of 2**53 bins, exact in a double: never 0 (infinite draw) nor 1 (zero draw).
    return ((int.from_bytes(digest[:8], "big") >> 11) + 0.5) / 2.0**53


def keep_by_quality(score: float, doc_id: str, seed: int, alpha: float = 9.0) -> bool:
    """PaLM/GLaM quality sampling: keep the document when a Pareto(alpha) draw exceeds 1 - score.

    The draw has the distribution of numpy's ``random.pareto`` (Pareto II / Lomax: P(X > x) =
    (1 + x) ** -alpha), as in the GLaM paper's rule ``np.random.pareto(alpha) > 1 - score``, so a
    document is kept with probability ``(2 - score) ** -alpha``: always at score 1, about 0.2% at score 0
    with alpha 9. Low-scoring documents are thinned rather than all cut, which keeps some diversity. The
    draw comes from a SHA-256 of (seed, doc_id) instead of a random generator so that reruns, retries and
    parallel workers agree.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    draw = _uniform(seed, doc_id) ** (-1.0 / alpha) - 1.0
    return draw > 1.0 - score


def keep_probability(score: float, alpha: float = 9.0) -> float:
    """The chance that `keep_by_quality` keeps a document of this score, over doc ids."""
    threshold = 1.0 - score
    return 1.0 if threshold < 0 else math.pow(1.0 + threshold, -alpha)


__all__ = [
    "REASONS", "CHECKS", "DocStats", "quality_drop_reason", "quality_score", "keep_by_quality",
    "keep_probability", "FUNCTION_WORDS", "enough_words", "not_too_many_words", "mean_word_length_ok",
    "hash_ratio_ok", "ellipsis_ratio_ok", "ellipsis_lines_ok", "alpha_words_ok", "duplicate_lines_ok",
]
