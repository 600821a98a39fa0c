r"""Document quality: Gopher/C4-style rule-based filters, a quality score, and PaLM/GLaM quality sampling.

The rules (Rae et al. 2021, "Gopher", appendix A and Table A1; Raffel et al. 2020, "C4") drop documents
that are not natural-language prose: too short or too long, gibberish word lengths, symbol soup, teaser
text cut off with ellipses, mostly numbers or markup, no English stop words, or boilerplate repeated
line after line, paragraph after paragraph or phrase after phrase. Every threshold lives in
`QualityFilters`; a threshold of None disables its check. (`palm.spec.schema.Source` turns the prose rules off
by default for sources of kind "code": see `palm.spec.schema.CODE_FILTER_DEFAULTS`.)

Definitions, all on the text as it is (no normalization, no lower-casing):

* characters: ``len(text)``, whitespace included; every character fraction below is over it;
* words: ``text.split()`` (any Unicode whitespace), punctuation left attached;
* lines: ``text.splitlines()``; a line is non-empty when it has a non-whitespace character, and lines are
  compared (and their characters counted) after stripping surrounding whitespace;
* paragraphs: the text cut at every run of two or more line breaks (the blank lines between may hold
  spaces), each stripped of surrounding whitespace; empty ones do not count;
* a line (paragraph) is a duplicate when it repeats an earlier one: a text of the same line three times
  has two duplicate lines, and its duplicate line characters are those of the two repeats;
* stop words (Gopher's quality filter): a document needs at least `min_stop_words` distinct words of
  STOP_WORDS = {the, be, to, of, and, that, have, with}. Here words are runs of word characters
  (``\w+``), with "n't" split off as a tokenizer would: "the," and "cannot--the" hold "the", "that's"
  holds "that", "haven't" holds "have". Case matters, as in datatrove: "The" alone is not "the";
* word n-grams: n consecutive words, across line and paragraph breaks, each word stripped of the
  punctuation around it ("blood," is "blood"; a word of punctuation only, such as "=====", stays as it
  is); two n-grams are the same when their words are;
* top n-gram character fraction (n = 2, 3, 4 by default): the most frequent n-gram's count times its
  length (its words joined by single spaces), over all characters. Ties go to the n-gram that occurs
  first. It is 0 when no n-gram occurs twice;
* duplicate n-gram character fraction (n = 5..10 by default): the characters of the words covered by an
  n-gram that repeats an earlier occurrence of itself (the first occurrence does not count, as for
  lines), each word counted once however many such n-grams cover it, over all characters. Word
  characters only: the spaces between words do not count (as in datatrove).

These follow datatrove's GopherRepetitionFilter and GopherQualityFilter (0.10) with these differences:

* datatrove splits words with spaCy's English tokenizer, which also makes every character of a
  punctuation run its own word: a reStructuredText underline ``*****`` or a table rule ``=====`` is a
  run of identical 1-character words whose n-grams then fail the top n-gram rule. 26 of the 113
  documents of the builtin python-docs corpus fail that way there and none here;
* datatrove's lines are ``re.split("\n+", text)``, not stripped, so lines holding only spaces count (and
  repeat): 88 of 122 WikiText-2 articles, whose blank lines are " ", fail its duplicate line fraction
  there and none here. Its paragraphs are cut at ``\n\n`` only;
* datatrove's top n-gram fraction is not 0 when no n-gram repeats, so it drops short texts with no
  repetition at all (a 9-word sentence's top 3-gram is over 18% of it). Here that is too_few_words' job;
* datatrove finds duplicate n-grams greedily: after a repeat it jumps n words and does not look at the
  n-grams it jumped over, so it can miss the last few words of a repeated passage, which are counted here;
  on the tinyshakespeare speeches of 50 words or more this is the one disagreement (1 of 1,080).

A check that measures a fraction of words (or of non-empty lines, paragraphs or characters) passes when
there are none to measure: a document without words is rejected by ``too_few_words`` instead, when
``min_words`` is set.

Cost: one pass over the words (counted per distinct word) and lines, plus one regex split for the
paragraphs, gives the stats every check reads. The rest is done only when a check needs it: the
stop-word tokens only when fewer than the required stop words stand as bare words; the top n-gram
counts only when the most any one word's occurrences hold could reach the threshold; the duplicate
n-grams from one dict of first positions, which says (in C) that no n-gram repeats for ordinary prose,
stopping at the first n whose fraction is within every threshold for larger n (it never grows with n).
Nothing is quadratic in the document's length.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter, mul, ne
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only annotations need it: the filters run without pydantic
    from palm.spec.schema import QualityFilters

#: Drop reasons in the order `quality_drop_reason` tries them; the names are manifest keys.
REASONS: tuple[str, ...] = (
    "too_few_words",
    "too_many_words",
    "mean_word_length",
    "hash_to_word_ratio",
    "ellipsis_to_word_ratio",
    "lines_ending_ellipsis",
    "words_without_alpha",
    "too_few_stop_words",
    "duplicate_lines",
    "duplicate_line_chars",
    "duplicate_paragraphs",
    "duplicate_paragraph_chars",
    "top_ngram_char_fraction",
    "duplicate_ngram_char_fraction",
)

_ELLIPSES = ("...", "\u2026")

#: Gopher's stop words: prose has at least two of them (Rae et al. 2021, appendix A.1.1).
STOP_WORDS: frozenset[str] = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))

#: Punctuation stripped from both ends of a word before its n-grams are compared.
_STRIP = string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb\u2014\u2013\u2026"
#: Words as a tokenizer splits them for the stop-word rule: runs of word characters, "n't" split off
#: ("haven't" is "have" and "n't"; "that's" is "that" and "s"; "cannot--the" is "cannot" and "the").
_STOP_WORD_TOKEN = re.compile(r"\w+?(?=n['\u2019]t\b)|\w+")
#: Two or more line breaks, with only whitespace between them.
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


@dataclass(frozen=True)
class DocStats:
    """The counts every check reads, computed in one pass so that the checks split the text once.

    `words` is kept for the n-gram checks, which count n-grams only when they run."""

    num_chars: int
    num_words: int
    num_word_chars: int
    num_hashes: int
    num_ellipses: int
    num_words_with_alpha: int
    #: Stop words that stand as whole words ("the", not "the," nor "The"): `num_stop_words` at least.
    num_bare_stop_words: int
    num_lines: int
    num_lines_ending_ellipsis: int
    num_duplicate_lines: int
    num_duplicate_line_chars: int
    num_paragraphs: int
    num_duplicate_paragraphs: int
    num_duplicate_paragraph_chars: int
    words: Sequence[str] = field(default=(), repr=False, compare=False)
    text: str = field(default="", repr=False, compare=False)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, text: str) -> DocStats:
        words = text.split()
        # Per distinct word where a word is tested: prose repeats its words (stop words most) many times.
        counts = Counter(words)
        lines = [line.strip() for line in text.splitlines()]
        lines = [line for line in lines if line]
        duplicate_lines, duplicate_line_chars = _duplicates(lines)
        paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text)] if "\n" in text else [text.strip()]
        paragraphs = [p for p in paragraphs if p]
        duplicate_paragraphs, duplicate_paragraph_chars = _duplicates(paragraphs)
        return cls(
            num_chars=len(text),
            num_words=len(words),
            num_word_chars=sum(map(len, words)),
            num_hashes=text.count("#"),
            num_ellipses=sum(text.count(e) for e in _ELLIPSES),
            num_words_with_alpha=sum(c for w, c in counts.items() if any(map(str.isalpha, w))),
            num_bare_stop_words=len(STOP_WORDS.intersection(counts)),
            num_lines=len(lines),
            num_lines_ending_ellipsis=sum(1 for line in lines if line.endswith(_ELLIPSES)),
            num_duplicate_lines=duplicate_lines,
            num_duplicate_line_chars=duplicate_line_chars,
            num_paragraphs=len(paragraphs),
            num_duplicate_paragraphs=duplicate_paragraphs,
            num_duplicate_paragraph_chars=duplicate_paragraph_chars,
            words=words,
            text=text,
        )

    @property
    def mean_word_length(self) -> float:
        return self.num_word_chars / self.num_words if self.num_words else 0.0

    @property
    def num_stop_words(self) -> int:
        """Distinct STOP_WORDS among the text's words, punctuation split off. Computed on first use."""
        count = self._cache.get("num_stop_words")
        if count is None:
            count = self._cache["num_stop_words"] = len(STOP_WORDS.intersection(_STOP_WORD_TOKEN.findall(self.text)))
        return count

    @property
    def ngram_words(self) -> Sequence[str]:
        """`words` as the n-gram checks compare them: surrounding punctuation stripped ("blood," is
        "blood"), unless nothing would be left ("=====" stays). Computed on first use."""
        words = self._cache.get("ngram_words")
        if words is None:
            stripped = {w: w.strip(_STRIP) or w for w in set(self.words)}
            words = self._cache["ngram_words"] = [stripped[w] for w in self.words]
        return words

    @property
    def ngram_word_counts(self) -> Mapping[str, int]:
        """Occurrences of each of `ngram_words`. Computed on first use."""
        counts = self._cache.get("ngram_word_counts")
        if counts is None:
            counts = self._cache["ngram_word_counts"] = Counter(self.ngram_words)
        return counts


def _stats(doc: str | DocStats) -> DocStats:
    return doc if isinstance(doc, DocStats) else DocStats.of(doc)


def _ngrams(words: Sequence[str], n: int) -> Iterator[tuple[str, ...]]:
    """The word n-grams of `words` in order, as tuples (no copies of `words`)."""
    return zip(*(itertools.islice(words, i, None) for i in range(n)))


def top_ngram_chars(words: Sequence[str], n: int) -> int:
    """Characters of the most frequent word n-gram (joined by single spaces) times its count; 0 when no
    n-gram occurs twice. Ties go to the n-gram that occurs first."""
    counts = Counter(_ngrams(words, n))
    if not counts:
        return 0
    gram, count = max(counts.items(), key=itemgetter(1))  # the first of the most frequent, as most_common
    return count * (sum(map(len, gram)) + n - 1) if count > 1 else 0


def top_ngram_chars_bound(word_counts: Mapping[str, int], n: int) -> int:
    """An upper bound on `top_ngram_chars` for every n from the words' counts alone: an n-gram occurring c
    times has n words each occurring at least c times, so its characters (each word with the space after
    it) are at most n times the most any one word's occurrences hold, c * (len(word) + 1)."""
    if not word_counts:
        return 0
    return n * (max(map(mul, word_counts.values(), map(len, word_counts))) + max(word_counts.values()))


def duplicate_ngram_chars(words: Sequence[str], n: int) -> int:
    """Characters (of words, not the spaces between them) covered by word n-grams that repeat an earlier
    occurrence of themselves, each word counted once."""
    grams = list(_ngrams(words, n))
    # Each n-gram's first position: filled from the end, so earlier positions overwrite later ones.
    first = dict(zip(reversed(grams), range(len(grams) - 1, -1, -1)))
    if len(first) == len(grams):
        return 0  # no n-gram repeats: the common case, decided in C
    positions = range(len(grams))
    repeats = itertools.compress(positions, map(ne, map(first.__getitem__, grams), positions))
    offsets = [0, *itertools.accumulate(map(len, words))]  # offsets[i]: characters of words[:i]
    chars = covered = 0  # covered: words[:covered] are counted already
    for i in repeats:
        start = max(i, covered)
        covered = i + n
        chars += offsets[covered] - offsets[start]
    return chars


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


def _at_most(part: int, whole: int, limit: float | None) -> bool:
    """part / whole <= limit; a check that is off (None) or has nothing to measure (whole 0) passes."""
    return limit is None or not whole or part / whole <= limit


def _at_least(part: int, whole: int, limit: float | None) -> bool:
    """part / whole >= limit; a check that is off (None) or has nothing to measure (whole 0) passes."""
    return limit is None or not whole or part / whole >= limit


def hash_ratio_ok(doc: str | DocStats, max_ratio: float | None) -> bool:
    """(Occurrences of "#") / words at most `max_ratio` (Gopher: 0.1)."""
    s = _stats(doc)
    return _at_most(s.num_hashes, s.num_words, max_ratio)


def ellipsis_ratio_ok(doc: str | DocStats, max_ratio: float | None) -> bool:
    """(Occurrences of "..." and "…") / words at most `max_ratio` (Gopher: 0.1, apart from the "#" one)."""
    s = _stats(doc)
    return _at_most(s.num_ellipses, s.num_words, max_ratio)


def ellipsis_lines_ok(doc: str | DocStats, max_fraction: float | None) -> bool:
    """Fraction of non-empty lines ending with "..." or "…" at most `max_fraction`."""
    s = _stats(doc)
    return _at_most(s.num_lines_ending_ellipsis, s.num_lines, max_fraction)


def alpha_words_ok(doc: str | DocStats, min_fraction: float | None) -> bool:
    """Fraction of words with at least one alphabetic character at least `min_fraction`."""
    s = _stats(doc)
    return _at_least(s.num_words_with_alpha, s.num_words, min_fraction)


def stop_words_ok(doc: str | DocStats, min_stop_words: int | None) -> bool:
    """At least `min_stop_words` distinct words of STOP_WORDS (Gopher: 2)."""
    if min_stop_words is None:
        return True
    s = _stats(doc)
    # Most prose has its stop words as bare words; only other text needs its words tokenized.
    return s.num_bare_stop_words >= min_stop_words or s.num_stop_words >= min_stop_words


def duplicate_lines_ok(doc: str | DocStats, max_fraction: float | None) -> bool:
    """Fraction of non-empty lines repeating an earlier line at most `max_fraction` (Gopher: 0.3)."""
    s = _stats(doc)
    return _at_most(s.num_duplicate_lines, s.num_lines, max_fraction)


def duplicate_line_chars_ok(doc: str | DocStats, max_fraction: float | None) -> bool:
    """Characters in lines repeating an earlier line, over all characters, at most `max_fraction`
    (Gopher: 0.2)."""
    s = _stats(doc)
    return _at_most(s.num_duplicate_line_chars, s.num_chars, max_fraction)


def duplicate_paragraphs_ok(doc: str | DocStats, max_fraction: float | None) -> bool:
    """Fraction of paragraphs repeating an earlier paragraph at most `max_fraction` (Gopher: 0.3)."""
    s = _stats(doc)
    return _at_most(s.num_duplicate_paragraphs, s.num_paragraphs, max_fraction)


def duplicate_paragraph_chars_ok(doc: str | DocStats, max_fraction: float | None) -> bool:
    """Characters in paragraphs repeating an earlier paragraph, over all characters, at most
    `max_fraction` (Gopher: 0.2)."""
    s = _stats(doc)
    return _at_most(s.num_duplicate_paragraph_chars, s.num_chars, max_fraction)


def top_ngrams_ok(doc: str | DocStats, max_fractions: Mapping[int, float] | None) -> bool:
    """For each n in `max_fractions`, the top word n-gram's characters over all characters at most
    ``max_fractions[n]`` (Gopher: {2: 0.20, 3: 0.18, 4: 0.16})."""
    s = _stats(doc)
    if not max_fractions or not s.num_chars:
        return True
    for n, limit in sorted(max_fractions.items()):
        if top_ngram_chars_bound(s.ngram_word_counts, n) <= limit * s.num_chars:
            continue  # ordinary prose: no word is frequent and long enough to need counting n-grams
        if top_ngram_chars(s.ngram_words, n) > limit * s.num_chars:
            return False
    return True


def duplicate_ngrams_ok(doc: str | DocStats, max_fractions: Mapping[int, float] | None) -> bool:
    """For each n in `max_fractions`, the characters in duplicate word n-grams over all characters at most
    ``max_fractions[n]`` (Gopher: 0.15 for n = 5 down to 0.10 for n = 10).

    The fraction never grows with n (a word covered by a repeated (n+1)-gram is covered by a repeated
    n-gram), so once it is within every threshold of the larger n, those are not computed."""
    s = _stats(doc)
    if not max_fractions or not s.num_chars:
        return True
    order = sorted(max_fractions.items())
    for k, (n, limit) in enumerate(order):
        chars = duplicate_ngram_chars(s.ngram_words, n)
        if chars > limit * s.num_chars:
            return False
        if all(chars <= later * s.num_chars for _, later in order[k + 1:]):
            return True
    return True


#: (reason, check) in the order of REASONS.
CHECKS: tuple[tuple[str, Callable[[DocStats, QualityFilters], bool]], ...] = (
    ("too_few_words", lambda s, f: enough_words(s, f.min_words)),
    ("too_many_words", lambda s, f: not_too_many_words(s, f.max_words)),
    ("mean_word_length", lambda s, f: mean_word_length_ok(s, f.min_mean_word_length, f.max_mean_word_length)),
    ("hash_to_word_ratio", lambda s, f: hash_ratio_ok(s, f.max_hash_to_word_ratio)),
    ("ellipsis_to_word_ratio", lambda s, f: ellipsis_ratio_ok(s, f.max_ellipsis_to_word_ratio)),
    ("lines_ending_ellipsis", lambda s, f: ellipsis_lines_ok(s, f.max_fraction_lines_ending_ellipsis)),
    ("words_without_alpha", lambda s, f: alpha_words_ok(s, f.min_fraction_words_with_alpha)),
    ("too_few_stop_words", lambda s, f: stop_words_ok(s, f.min_stop_words)),
    ("duplicate_lines", lambda s, f: duplicate_lines_ok(s, f.max_fraction_duplicate_lines)),
    ("duplicate_line_chars", lambda s, f: duplicate_line_chars_ok(s, f.max_fraction_duplicate_line_chars)),
    ("duplicate_paragraphs", lambda s, f: duplicate_paragraphs_ok(s, f.max_fraction_duplicate_paragraphs)),
    ("duplicate_paragraph_chars",
     lambda s, f: duplicate_paragraph_chars_ok(s, f.max_fraction_duplicate_paragraph_chars)),
    ("top_ngram_char_fraction", lambda s, f: top_ngrams_ok(s, f.max_fraction_top_ngram_chars)),
    ("duplicate_ngram_char_fraction", lambda s, f: duplicate_ngrams_ok(s, f.max_fraction_duplicate_ngram_chars)),
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
    "STOP_WORDS", "stop_words_ok", "duplicate_line_chars_ok", "duplicate_paragraphs_ok",
    "duplicate_paragraph_chars_ok", "top_ngrams_ok", "duplicate_ngrams_ok", "top_ngram_chars",
    "duplicate_ngram_chars", "top_ngram_chars_bound",
]
