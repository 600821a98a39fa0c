"""Quality heuristics: each check fires on a document built to fail only it, thresholds of None disable,
reasons come in their documented order, the prose score ranks prose above soup and code, and quality
sampling is deterministic with the Pareto keep rates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from palm.data import filters
from palm.data.filters import REASONS, keep_by_quality, keep_probability, quality_drop_reason, quality_score
from palm.spec import QualityFilters

DEFAULT = QualityFilters()

PARAGRAPH = (
    "The old harbor town sits at the mouth of a wide river, and for most of its history the people who "
    "lived there made their living from the sea. Fishing boats left before dawn and came back in the "
    "afternoon with their catch, which was sold in the market square beside the church. When the railway "
    "arrived, the town changed quickly: merchants built warehouses along the quay, and visitors from the "
    "capital came in summer to walk on the beach and eat in the small restaurants near the water.\n"
    "Today the warehouses have become shops and apartments, but the market still opens every morning."
)

CODE = '''
def merge(self, other):
    for k, v in other.items():
        if k in self._data and isinstance(v, dict):
            self._data[k] = merge(self._data[k], v)
        else:
            self._data[k] = v
    return {"merged": len(self._data), "keys": sorted(self._data)}
'''

KEYWORD_SOUP = ("cheap watches replica luxury discount online shop best price deals free shipping "
                "watches cheap sale outlet brand authentic replica bargain clearance")


def _words(n: int, word: str = "stone") -> str:
    return " ".join([word] * n)


def _prose_lines(lines: int, words_per_line: int = 12) -> list[str]:
    """Distinct ordinary lines (so only the check under test can fire)."""
    return [" ".join(f"river{i}word{j % 3} walks" for j in range(words_per_line // 2)) for i in range(lines)]


# Each document fails exactly one check under the default filters (and passes every other).
FAILS_ONLY = {
    "too_few_words": "The river runs past the quiet village at dawn.",
    "too_many_words": None,  # built in the test: 100,001 words
    "mean_word_length": " ".join(["internationalization"] * 60),
    "hash_to_word_ratio": PARAGRAPH + "\n" + " ".join(["#topic"] * 15),
    "ellipsis_to_word_ratio": PARAGRAPH + "\n" + " ".join(["more... yes"] * 15),
    "lines_ending_ellipsis": "\n".join(line + "..." for line in _prose_lines(10, 20)),
    "words_without_alpha": PARAGRAPH + "\n" + " ".join(str(1000 + i) for i in range(60)),
    "duplicate_lines": "\n".join(["The same navigation line appears on every single page of this site."] * 10),
}


def _doc(reason: str) -> str:
    return _words(100_001) if reason == "too_many_words" else FAILS_ONLY[reason]


def test_normal_paragraph_passes_every_check():
    assert quality_drop_reason(PARAGRAPH, DEFAULT) is None
    for _, check in filters.CHECKS:
        assert check(filters.DocStats.of(PARAGRAPH), DEFAULT)


@pytest.mark.parametrize("reason", REASONS)
def test_each_check_fires_alone(reason):
    stats = filters.DocStats.of(_doc(reason))
    failing = [r for r, check in filters.CHECKS if not check(stats, DEFAULT)]
    assert failing == [reason]
    assert quality_drop_reason(_doc(reason), DEFAULT) == reason


@pytest.mark.parametrize("reason", REASONS)
def test_none_disables_the_check(reason):
    fields = {
        "too_few_words": ["min_words"],
        "too_many_words": ["max_words"],
        "mean_word_length": ["min_mean_word_length", "max_mean_word_length"],
        "hash_to_word_ratio": ["max_hash_to_word_ratio"],
        "ellipsis_to_word_ratio": ["max_ellipsis_to_word_ratio"],
        "lines_ending_ellipsis": ["max_fraction_lines_ending_ellipsis"],
        "words_without_alpha": ["min_fraction_words_with_alpha"],
        "duplicate_lines": ["max_fraction_duplicate_lines"],
    }[reason]
    off = QualityFilters(**{name: None for name in fields})
    assert quality_drop_reason(_doc(reason), off) is None


def test_all_none_passes_anything():
    off = QualityFilters(**{name: None for name in QualityFilters.model_fields if name != "quality_sampling"})
    for text in ("", "#", "... ... ...", KEYWORD_SOUP, _doc("duplicate_lines")):
        assert quality_drop_reason(text, off) is None


def test_individual_checks_and_thresholds():
    assert filters.enough_words("a b c", 3) and not filters.enough_words("a b", 3)
    assert filters.not_too_many_words("a b c", 3) and not filters.not_too_many_words("a b c d", 3)
    assert filters.mean_word_length_ok("abcd abcd", 4.0, 4.0)
    assert not filters.mean_word_length_ok("abcd abcd", None, 3.9)
    assert not filters.mean_word_length_ok("abcd abcd", 4.1, None)
    # "#" on its own: 1 over 6 words; both ellipsis spellings on their own: 2 over 6 words, so a document
    # with both at 0.1 passes both checks (Gopher applies them separately, not added together).
    assert filters.hash_ratio_ok("a #b c... d\u2026 e f", 1 / 6)
    assert not filters.hash_ratio_ok("a #b c... d\u2026 e f", 0.16)
    assert filters.ellipsis_ratio_ok("a #b c... d\u2026 e f", 2 / 6)
    assert not filters.ellipsis_ratio_ok("a #b c... d\u2026 e f", 0.33)
    both = " ".join(["#tag"] * 8 + ["wait... now"] * 8 + ["word"] * 76)  # 8/100 each, 16/100 together
    assert filters.quality_drop_reason(both, QualityFilters(min_words=None)) is None
    # Blank lines do not count: 1 of 2 non-empty lines ends in an ellipsis.
    assert filters.ellipsis_lines_ok("one two...\n\n   \nthree four", 0.5)
    assert not filters.ellipsis_lines_ok("one two\u2026\n\nthree four", 0.49)
    assert filters.alpha_words_ok("a1 22 b", 2 / 3) and not filters.alpha_words_ok("a1 22 33", 0.34)
    # Three non-empty lines, one of them a repeat (whitespace around a line is ignored).
    assert filters.duplicate_lines_ok("x y\n x y \n\nz", 1 / 3)
    assert not filters.duplicate_lines_ok("x y\n x y \n\nz", 0.33)


def test_empty_text_fails_too_few_words():
    assert quality_drop_reason("", DEFAULT) == "too_few_words"
    assert quality_drop_reason("   \n\n ", DEFAULT) == "too_few_words"
    assert quality_drop_reason("", QualityFilters(min_words=None)) is None


def test_reasons_come_in_documented_order():
    assert REASONS == ("too_few_words", "too_many_words", "mean_word_length", "hash_to_word_ratio",
                       "ellipsis_to_word_ratio", "lines_ending_ellipsis", "words_without_alpha", "duplicate_lines")
    # Short symbol soup of repeated lines fails several checks; each is reported once the earlier ones
    # are switched off.
    text = "\n".join(["# ... 1 2"] * 5)
    f = DEFAULT
    seen = []
    while (reason := quality_drop_reason(text, f)) is not None:
        seen.append(reason)
        f = f.model_copy(update={
            "too_few_words": {"min_words": None},
            "mean_word_length": {"min_mean_word_length": None, "max_mean_word_length": None},
            "hash_to_word_ratio": {"max_hash_to_word_ratio": None},
            "ellipsis_to_word_ratio": {"max_ellipsis_to_word_ratio": None},
            "lines_ending_ellipsis": {"max_fraction_lines_ending_ellipsis": None},
            "words_without_alpha": {"min_fraction_words_with_alpha": None},
            "duplicate_lines": {"max_fraction_duplicate_lines": None},
        }[reason])
    assert seen == ["too_few_words", "mean_word_length", "hash_to_word_ratio", "ellipsis_to_word_ratio",
                    "words_without_alpha", "duplicate_lines"]
    assert seen == sorted(seen, key=REASONS.index)


def test_quality_score_ranks_prose_above_soup_and_code():
    prose, soup, code = quality_score(PARAGRAPH), quality_score(KEYWORD_SOUP), quality_score(CODE)
    assert prose > 0.9
    assert prose > code + 0.3 and prose > soup + 0.5
    assert soup < 0.2 and code < 0.6
    for text in ("", "12 34 56", "#### $$$$", _doc("mean_word_length"), PARAGRAPH, CODE, KEYWORD_SOUP):
        assert 0.0 <= quality_score(text) <= 1.0
    assert quality_score("") == 0.0


def test_keep_by_quality_is_deterministic_and_stable_across_processes():
    ids = [f"doc-{i}" for i in range(200)]
    first = [keep_by_quality(0.9, d, seed=7) for d in ids]
    assert first == [keep_by_quality(0.9, d, seed=7) for d in ids]
    # A fresh interpreter (its own str hash randomization) decides the same way.
    script = ("from palm.data.filters import keep_by_quality; "
              f"print(''.join('1' if keep_by_quality(0.9, f'doc-{{i}}', seed=7) else '0' for i in range(200)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert out == "".join("1" if k else "0" for k in first)
    # The seed changes the draws.
    assert first != [keep_by_quality(0.9, d, seed=8) for d in ids]


def test_keep_by_quality_rates_follow_pareto():
    ids = [f"web/{i:06d}" for i in range(5000)]

    def rate(score: float) -> float:
        return sum(keep_by_quality(score, d, seed=0) for d in ids) / len(ids)

    assert rate(1.0) == 1.0
    assert rate(0.99) > 0.88  # (1.01) ** -9 = 0.914
    assert rate(0.1) < 0.01  # (1.9) ** -9 = 0.003
    assert rate(0.0) < 0.01
    for score in (0.0, 0.5, 0.8, 0.95):
        assert rate(score) == pytest.approx(keep_probability(score), abs=0.02)
    # Monotone in the score for a fixed document.
    for d in ids[:200]:
        kept = [keep_by_quality(s / 20, d, seed=0) for s in range(21)]
        assert kept == sorted(kept)


def test_keep_by_quality_rejects_bad_alpha():
    with pytest.raises(ValueError):
        keep_by_quality(0.5, "x", seed=0, alpha=0.0)
