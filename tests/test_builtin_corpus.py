"""Builtin corpora: deterministic, non-empty, max_docs honoured; python-docs is prose; the synthetic
corpus holds exactly the planted duplicates, near duplicates, junk and invalid UTF-8 it declares."""

from __future__ import annotations

import itertools

import pytest

from palm.data import builtin
from palm.data.builtin import CORPORA, PLANTED, PLANTED_ORIGINAL, PLANTED_REASON, builtin_records
from palm.data.filters import quality_drop_reason
from palm.base.errors import PalmError
from palm.spec.schema import QualityFilters

DEFAULT = QualityFilters()
CATEGORIES = ("distinct", "exact_duplicate", "near_duplicate", "junk", "invalid_utf8")


@pytest.fixture(scope="module")
def corpora() -> dict[str, list[tuple[str, bytes]]]:
    return {name: list(builtin_records(name)) for name in CORPORA}


@pytest.fixture(scope="module")
def planted(corpora) -> dict[str, bytes]:
    return dict(corpora["synthetic-planted"])


def shingles(raw: bytes, n: int = 5) -> set[tuple[str, ...]]:
    words = raw.decode("utf-8", errors="replace").split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: bytes, b: bytes) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


# ------------------------------------------------------------------------------------- every corpus


@pytest.mark.parametrize("name", CORPORA)
def test_deterministic_nonempty_unique_ids(name, corpora):
    records = corpora[name]
    assert records, name
    assert records == list(builtin_records(name))
    ids = [rid for rid, _ in records]
    assert len(set(ids)) == len(ids)
    assert all(rid.startswith(f"{name}/") for rid in ids)
    assert all(isinstance(raw, bytes) and raw for _, raw in records)


@pytest.mark.parametrize("name", CORPORA)
def test_max_docs(name, corpora):
    assert list(builtin_records(name, max_docs=3)) == corpora[name][:3]
    assert list(builtin_records(name, max_docs=0)) == []
    assert list(builtin_records(name, max_docs=10**6)) == corpora[name]


def test_unknown_name_and_bad_max_docs_fail_at_the_call():
    with pytest.raises(PalmError) as err:
        builtin_records("python-doc")  # no next(): the error comes from the call itself
    assert all(name in str(err.value) for name in CORPORA)
    with pytest.raises(PalmError):
        builtin_records("python-docs", max_docs=-1)


# ----------------------------------------------------------------------------- python corpora


def test_python_docs_are_prose(corpora):
    records = corpora["python-docs"]
    texts = [raw.decode("utf-8") for _, raw in records]  # strict: must be valid UTF-8
    assert any(rid.startswith("python-docs/topic/") for rid, _ in records)
    assert any(rid.startswith("python-docs/module/") for rid, _ in records)
    passing = sum(quality_drop_reason(t, DEFAULT) is None for t in texts)
    assert passing / len(texts) > 0.7


def test_python_stdlib_code_is_source_files(corpora):
    records = corpora["python-stdlib-code"]
    names = [rid.removeprefix("python-stdlib-code/") for rid, _ in records]
    assert names == sorted(names) and all(n.endswith(".py") and "/" not in n for n in names)
    assert all(len(raw) <= builtin.MAX_CODE_FILE_BYTES for _, raw in records)
    assert "os.py" in names


# ------------------------------------------------------------------------------------ planted


def test_planted_categories_partition_the_corpus(corpora):
    ids = [rid for rid, _ in corpora["synthetic-planted"]]
    assert set(PLANTED) == set(CATEGORIES)
    listed = [rid for c in CATEGORIES for rid in PLANTED[c]]
    assert sorted(listed) == sorted(ids)
    assert 35 <= len(PLANTED["distinct"]) <= 45
    assert all(PLANTED[c] for c in CATEGORIES)
    assert set(PLANTED_ORIGINAL) == set(PLANTED["exact_duplicate"]) | set(PLANTED["near_duplicate"])
    assert set(PLANTED_ORIGINAL.values()) <= set(PLANTED["distinct"])
    assert set(PLANTED_REASON) == set(PLANTED["junk"])
    # Originals come first, so keeping the smallest id of a group removes exactly the copies.
    assert all(original < copy for copy, original in PLANTED_ORIGINAL.items())
    assert sum(len(raw) for raw in dict(corpora["synthetic-planted"]).values()) < 200_000


def test_exact_duplicates_are_byte_identical(planted):
    for copy in PLANTED["exact_duplicate"]:
        assert planted[copy] == planted[PLANTED_ORIGINAL[copy]]


def test_near_duplicates_are_close_but_not_equal(planted):
    for copy in PLANTED["near_duplicate"]:
        original = planted[PLANTED_ORIGINAL[copy]]
        assert planted[copy] != original
        assert len(original.split()) >= 200
        assert jaccard(planted[copy], original) > 0.85
        changed = [a != b for a, b in zip(planted[copy].split(), original.split(), strict=True)]
        assert 2 <= sum(changed) <= 4


def test_distinct_documents_are_far_apart(planted):
    prose = PLANTED["distinct"] + PLANTED["invalid_utf8"]
    for a, b in itertools.combinations(prose, 2):
        assert jaccard(planted[a], planted[b]) < 0.5, (a, b)
    for rid in PLANTED["distinct"]:
        assert 80 <= len(planted[rid].split()) <= 300


def test_invalid_utf8_is_invalid_but_otherwise_good_prose(planted):
    for rid in PLANTED["invalid_utf8"]:
        with pytest.raises(UnicodeDecodeError):
            planted[rid].decode("utf-8")
        assert quality_drop_reason(planted[rid].decode("utf-8", errors="replace"), DEFAULT) is None
    # Everything else is valid UTF-8.
    for rid in set(planted) - set(PLANTED["invalid_utf8"]):
        planted[rid].decode("utf-8")


def test_junk_fails_the_filters_and_prose_passes(planted):
    for rid in PLANTED["junk"]:
        assert quality_drop_reason(planted[rid].decode("utf-8"), DEFAULT) == PLANTED_REASON[rid]
    for rid in PLANTED["distinct"] + PLANTED["near_duplicate"]:
        assert quality_drop_reason(planted[rid].decode("utf-8"), DEFAULT) is None, rid
