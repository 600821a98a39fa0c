"""MinHash LSH near-duplicate detection: tokenizers, shingles, signatures, banding, components."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from palm.data.minhash import (
    MAX_HASH,
    MERSENNE_61,
    MinHasher,
    band_keys,
    candidate_probability,
    code_tokens,
    connected_components,
    duplicates_to_drop,
    estimated_jaccard,
    optimal_bands,
    shingle_hashes,
    words,
)
from tests.conftest import ROOT

BANDS, ROWS = optimal_bands(0.8, 128)


def vocabulary(n: int = 5000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = {"".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 10))) for _ in range(n)}
    return sorted(vocab)


VOCAB = vocabulary()


def random_words(rng: random.Random, n: int) -> list[str]:
    return rng.choices(VOCAB, k=n)


def set_pair(rng: np.random.Generator, jaccard: float, union: int = 1000) -> tuple[np.ndarray, np.ndarray, float]:
    """Two shingle sets with (almost exactly) the requested Jaccard similarity, and the exact value."""
    pool = np.unique(rng.integers(0, 2**32, size=union + 64, dtype=np.uint64).astype(np.uint32))[:union]
    pool = rng.permutation(pool)
    common = round(jaccard * union)
    only = (union - common) // 2
    a = pool[: common + only]
    b = np.concatenate([pool[:common], pool[common + only : common + 2 * only]])
    true = len(np.intersect1d(a, b)) / len(np.union1d(a, b))
    return a, b, true


def shares_band(sig_a: np.ndarray, sig_b: np.ndarray) -> bool:
    return bool(set(band_keys(sig_a, BANDS, ROWS)) & set(band_keys(sig_b, BANDS, ROWS)))


# --- tokenizers -------------------------------------------------------------------------------------------


def test_words_lowercases_and_strips_punctuation_at_the_ends_only():
    text = '  Hello, World!  «Bonjour»  -- it\'s "Quoted" ...  café. e-mail (x)\n\tU.S.A. '
    assert words(text) == ["hello", "world", "bonjour", "it's", "quoted", "café", "e-mail", "x", "u.s.a"]


def test_code_tokens_ignore_layout_and_comments_but_not_hash_in_strings():
    assert code_tokens('color = "#fff"  # the colour') == ["color", "=", '"#fff"']
    assert code_tokens("x**2 >= 1.5e3 != y  # c\n") == ["x", "**", "2", ">=", "1.5e3", "!=", "y"]


ORIGINAL_PY = '''\
import os


def walk_sizes(root, min_size=0):
    """Yield (path, size) for files under root."""
    # skip hidden directories
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = os.path.join(dirpath, name)
            size = os.path.getsize(path)
            if size >= min_size:  # filter small files
                yield path, size


def total(root):
    return sum(size for _, size in walk_sizes(root, min_size=1))
'''

# Same program: 2-space indentation, different blank lines, comments rewritten/added/removed,
# trailing whitespace, and the docstring reflowed.
REFORMATTED_PY = '''\
# utilities for disk usage
import os
def walk_sizes(root, min_size=0):
  """Yield (path, size)
     for files under root."""
  for dirpath, dirnames, filenames in os.walk(root):   # walk everything

    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for name in filenames:
      path = os.path.join(dirpath, name)
      size = os.path.getsize(path)    \n\
      if size >= min_size:
        yield path, size



def total(root):
  # sum over all non-empty files
  return sum(size for _, size in walk_sizes(root, min_size=1))
'''

DIFFERENT_PY = '''\
import json


def load_config(path, defaults=None):
    """Read a JSON config and merge it over the defaults."""
    with open(path) as f:
        data = json.load(f)
    merged = dict(defaults or {})
    merged.update(data)
    if "version" not in merged:
        raise ValueError("config has no version")
    return merged
'''


def test_code_tokens_match_a_reformatted_recommented_copy_and_not_a_different_function():
    orig, copy, other = (shingle_hashes(code_tokens(src), 5) for src in (ORIGINAL_PY, REFORMATTED_PY, DIFFERENT_PY))
    assert len(orig) > 50
    np.testing.assert_array_equal(orig, copy)
    assert not np.array_equal(orig, other)
    true = len(np.intersect1d(orig, other)) / len(np.union1d(orig, other))
    assert true < 0.1
    mh = MinHasher()
    assert estimated_jaccard(mh.signature(orig), mh.signature(copy)) == 1.0
    assert not shares_band(mh.signature(orig), mh.signature(other))
    # Prose tokenization would not have matched them: layout and comments leak into the words.
    assert not np.array_equal(shingle_hashes(words(ORIGINAL_PY), 5), shingle_hashes(words(REFORMATTED_PY), 5))


# --- shingles ---------------------------------------------------------------------------------------------


def test_shingle_hashes_are_unique_uint32_and_order_sensitive():
    sh = shingle_hashes("a b c d e a b c d e".split(), 5)
    assert sh.dtype == np.uint32
    assert len(sh) == 5  # 6 windows, "a b c d e" twice
    assert np.all(np.diff(sh.astype(np.int64)) > 0)
    swapped = shingle_hashes(["a", "b", "c", "e", "d"], 5)
    assert not np.array_equal(shingle_hashes(["a", "b", "c", "d", "e"], 5), swapped)
    # One shingle over all tokens when there are fewer than n, still order-sensitive.
    assert len(shingle_hashes(["a", "b"], 5)) == 1
    assert shingle_hashes(["a", "b"], 5)[0] != shingle_hashes(["b", "a"], 5)[0]
    with pytest.raises(ValueError):
        shingle_hashes(["a"], 0)


def test_empty_and_one_word_text_do_not_crash():
    mh = MinHasher()
    for text in ("", "   \n\t ", "... !!! --"):
        assert words(text) == []
        sh = shingle_hashes(words(text), 5)
        assert sh.dtype == np.uint32 and sh.size == 0
        sig = mh.signature(sh)
        assert sig.dtype == np.uint32 and sig.shape == (128,) and np.all(sig == MAX_HASH)
        assert len(band_keys(sig, BANDS, ROWS)) == BANDS
    assert code_tokens("") == [] and shingle_hashes(code_tokens("# only a comment\n"), 5).size == 0
    one = shingle_hashes(words("Hello!"), 5)
    assert words("Hello!") == ["hello"] and one.shape == (1,)
    sig = mh.signature(one)
    assert np.all(sig < MAX_HASH)
    assert estimated_jaccard(sig, mh.signature(shingle_hashes(["hello"], 5))) == 1.0
    assert estimated_jaccard(sig, mh.signature(shingle_hashes(["world"], 5))) < 0.1
    # Lone surrogates (surrogateescape-decoded bytes) must not take a worker down.
    assert shingle_hashes(words("bad \udcff bytes here"), 5).shape == (1,)


# --- signatures -------------------------------------------------------------------------------------------


def reference_signature(mh: MinHasher, hashes: np.ndarray) -> np.ndarray:
    """The textbook formula in Python integers: no overflow is possible here."""
    a, b = [int(x) for x in mh.a], [int(x) for x in mh.b]
    hs = [int(h) for h in hashes]
    return np.array([min(((ai * h + bi) % MERSENNE_61) & MAX_HASH for h in hs) for ai, bi in zip(a, b)], np.uint32)


def test_signature_matches_exact_integer_arithmetic_across_chunks_and_edge_cases():
    mh = MinHasher(num_perm=16, seed=7)
    assert np.all(mh.a % 2 == 1) and np.all(mh.a < 2**32) and np.all(mh.b < 2**32)
    rng = np.random.default_rng(3)
    # More shingles than one chunk (2,048 rows at 16 perms), plus the extremes of the input range.
    hashes = np.concatenate([rng.integers(0, 2**32, 5000, dtype=np.uint64).astype(np.uint32),
                             np.array([0, 1, MAX_HASH], np.uint32)])
    np.testing.assert_array_equal(mh.signature(hashes), reference_signature(mh, hashes))

    # Crafted a*h + b landing on and around multiples of p, and the largest possible a*h + b: the cases a
    # sloppy Mersenne reduction gets wrong (they are ~1e-18 likely by chance, so random data never finds them).
    a_max = MAX_HASH
    cases = [(MAX_HASH, MAX_HASH)]
    for k in range(1, 8):
        h = (k * MERSENNE_61) // a_max
        for d in (-2, -1, 0, 1, 2):
            b = k * MERSENNE_61 - a_max * h + d
            if 0 <= b < 2**32:
                cases.append((h, b))
    assert len(cases) > 20
    for h, b in cases:
        edge = MinHasher(num_perm=1)
        edge.a = np.array([a_max], np.uint64)
        edge.b = np.array([b], np.uint64)
        hs = np.array([h], np.uint32)
        assert int(edge.signature(hs)[0]) == int(reference_signature(edge, hs)[0]), (h, b)


def test_signature_input_validation():
    mh = MinHasher(num_perm=8)
    np.testing.assert_array_equal(mh.signature([1, 2, 3]), mh.signature(np.array([1, 2, 3], np.uint32)))
    with pytest.raises(ValueError):
        mh.signature(np.array([2**32], np.uint64))  # would void the a*h < 2^64 guarantee
    with pytest.raises(ValueError):
        mh.signature(np.array([-1]))
    with pytest.raises(ValueError):
        MinHasher(num_perm=0)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8, 0.95])
def test_estimated_jaccard_tracks_true_jaccard(target):
    mh = MinHasher()
    rng = np.random.default_rng(int(target * 100))
    errors = []
    for _ in range(10):
        a, b, true = set_pair(rng, target)
        assert abs(true - target) < 0.01
        est = estimated_jaccard(mh.signature(a), mh.signature(b))
        assert abs(est - true) < 0.1, (est, true)
        errors.append(est - true)
    # sd of one estimate is sqrt(J(1-J)/128) <= 0.045; the mean of 10 must show no systematic bias.
    assert abs(np.mean(errors)) < 0.035


def test_estimated_jaccard_on_text_pairs():
    mh = MinHasher()
    rng = random.Random(11)
    for n_changed in (3, 15, 40):
        base = random_words(rng, 400)
        edited = list(base)
        for i in rng.sample(range(400), n_changed):
            edited[i] = rng.choice(VOCAB)
        sa, sb = shingle_hashes(base, 5), shingle_hashes(edited, 5)
        true = len(np.intersect1d(sa, sb)) / len(np.union1d(sa, sb))
        assert abs(estimated_jaccard(mh.signature(sa), mh.signature(sb)) - true) < 0.1
    with pytest.raises(ValueError):
        estimated_jaccard(np.zeros(4, np.uint32), np.zeros(5, np.uint32))


# --- banding ----------------------------------------------------------------------------------------------


def band_error(threshold: float, bands: int, rows: int, n: int = 20001) -> float:
    """FP + FN area by the trapezoid rule (a different quadrature than the module's midpoint rule)."""

    def trap(lo, hi, f):
        s = np.linspace(lo, hi, n)
        y = f(s)
        return float(((y[1:] + y[:-1]) / 2).sum() * (hi - lo) / (n - 1))

    return trap(0, threshold, lambda s: candidate_probability(s, bands, rows)) + trap(
        threshold, 1, lambda s: 1 - candidate_probability(s, bands, rows)
    )


def test_optimal_bands_for_the_paper_defaults_gives_a_sharp_s_curve_at_08():
    b, r = BANDS, ROWS
    assert (b, r) == (9, 13)
    assert b * r <= 128
    p = lambda s: float(candidate_probability(s, b, r))  # noqa: E731
    assert 0.3 < p(0.8) < 0.5  # the steep part of the S sits on the threshold
    assert p(0.95) > 0.99 and p(0.9) > 0.9
    assert p(0.7) < 0.1 and p(0.5) < 0.005 and p(0.3) < 1e-5
    # And it is the optimum over every (bands, rows) with bands*rows <= 128, by an independent quadrature.
    chosen = band_error(0.8, b, r, n=4001)
    for bb in range(1, 129):
        for rr in range(1, 128 // bb + 1):
            if (bb, rr) != (b, r):
                assert chosen <= band_error(0.8, bb, rr, n=4001) + 1e-6, (bb, rr)


def test_optimal_bands_moves_with_the_threshold_and_validates():
    rows = [optimal_bands(t, 128)[1] for t in (0.5, 0.7, 0.8, 0.9)]
    assert rows == sorted(rows) and rows[0] < rows[-1]  # a higher bar needs more rows per band
    for t in (0.5, 0.7, 0.9):
        b, r = optimal_bands(t, 128)
        assert b * r <= 128
        assert float(candidate_probability(t - 0.15, b, r)) < 0.25
        assert float(candidate_probability(min(t + 0.1, 1.0), b, r)) > 0.75
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            optimal_bands(bad, 128)


def test_band_keys_separate_bands_and_are_64_bit():
    sig = np.tile(np.arange(ROWS, dtype=np.uint32), BANDS)  # every band holds the same values
    keys = band_keys(sig, BANDS, ROWS)
    assert len(keys) == BANDS == len(set(keys))
    assert all(isinstance(k, int) and 0 <= k < 2**64 for k in keys)
    other = sig.copy()
    other[ROWS] += 1  # change band 1 only
    diff = [i for i, (x, y) in enumerate(zip(keys, band_keys(other, BANDS, ROWS))) if x != y]
    assert diff == [1]
    with pytest.raises(ValueError):
        band_keys(sig[:-1], BANDS, ROWS)


def test_near_duplicate_documents_share_a_band_key_and_unrelated_ones_do_not():
    mh = MinHasher()
    rng = random.Random(5)
    doc = random_words(rng, 300)
    copy = list(doc)
    for i in (40, 150, 260):  # three scattered edits: up to 15 of ~296 shingles change
        copy[i] = "changed"
    sig_doc = mh.signature(shingle_hashes(doc, 5))
    assert shares_band(sig_doc, mh.signature(shingle_hashes(copy, 5)))
    assert not shares_band(sig_doc, mh.signature(shingle_hashes(random_words(rng, 300), 5)))
    # Also through the prose tokenizer: casing and punctuation do not hide a copy.
    text = " ".join(doc)
    noisy = " ".join(w.capitalize() + ("," if i % 7 == 0 else "") for i, w in enumerate(copy))
    assert shares_band(mh.signature(shingle_hashes(words(text), 5)), mh.signature(shingle_hashes(words(noisy), 5)))

    # Over many documents: J ~ 0.9 pairs are caught at about the S-curve's rate (~0.93), unrelated never.
    caught = unrelated_hits = 0
    for _ in range(40):
        base = random_words(rng, 300)
        edited = list(base)
        for i in rng.sample(range(300), 3):
            edited[i] = rng.choice(VOCAB)
        sig_a = mh.signature(shingle_hashes(base, 5))
        caught += shares_band(sig_a, mh.signature(shingle_hashes(edited, 5)))
        unrelated_hits += shares_band(sig_a, mh.signature(shingle_hashes(random_words(rng, 300), 5)))
    assert caught >= 34
    assert unrelated_hits == 0


def test_half_similar_sets_almost_never_become_candidates():
    mh = MinHasher()
    rng = np.random.default_rng(21)
    hits = 0
    for _ in range(60):
        a, b, true = set_pair(rng, 0.5)
        hits += shares_band(mh.signature(a), mh.signature(b))
    assert hits <= 1  # P(0.5) ~ 0.001 for (9, 13)

    # While at 0.95 nearly all are.
    hits = sum(shares_band(*(mh.signature(s) for s in set_pair(rng, 0.95)[:2])) for _ in range(60))
    assert hits >= 57


# --- determinism ------------------------------------------------------------------------------------------

DETERMINISM_SCRIPT = """
import json, sys
from palm.data.minhash import MinHasher, band_keys, code_tokens, optimal_bands, shingle_hashes, words
text, code = json.loads(sys.stdin.read())
b, r = optimal_bands(0.8, 128)
out = {"hash": hash("palm")}
for name, toks in (("text", words(text)), ("code", code_tokens(code))):
    sh = shingle_hashes(toks, 5)
    sig = MinHasher(128, seed=1).signature(sh)
    out[name] = {"shingles": sh.tolist(), "sig": sig.tolist(), "keys": band_keys(sig, b, r)}
print(json.dumps(out))
"""


def test_signatures_and_band_keys_are_identical_in_other_processes():
    text = " ".join(random_words(random.Random(99), 500)) + " The End."
    local = {}
    for name, toks in (("text", words(text)), ("code", code_tokens(ORIGINAL_PY))):
        sh = shingle_hashes(toks, 5)
        sig = MinHasher(128, seed=1).signature(sh)
        local[name] = {"shingles": sh.tolist(), "sig": sig.tolist(), "keys": band_keys(sig, BANDS, ROWS)}

    remote = []
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT], input=json.dumps([text, ORIGINAL_PY]),
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        remote.append(json.loads(proc.stdout))
    # The two children really do hash strings differently, yet agree with us on everything we emit.
    assert remote[0]["hash"] != remote[1]["hash"]
    for r in remote:
        assert r["text"] == local["text"]
        assert r["code"] == local["code"]


def test_permutations_and_shingles_are_pinned():
    # Band keys from different pipeline runs (or numpy upgrades) must match, or incremental dedup against
    # earlier output silently stops finding duplicates; these pin the inputs of every key.
    mh = MinHasher(128, seed=1)
    assert mh.a[:3].tolist() == PINNED_A and mh.b[:3].tolist() == PINNED_B
    assert shingle_hashes(words("The quick brown fox jumps over the lazy dog."), 5).tolist() == PINNED_SHINGLES
    assert not np.array_equal(MinHasher(128, seed=2).a, mh.a)


PINNED_A = [2032329983, 2198257139, 3243419751]
PINNED_B = [1773912972, 3588742458, 4287418908]
PINNED_SHINGLES = [446489440, 1014670405, 1021156008, 1043024617, 1449187767]


# --- components -------------------------------------------------------------------------------------------


def test_connected_components_are_order_independent_and_pick_the_smallest_id():
    edges = [("a", "b"), ("b", "c"), ("d", "e")]
    expected = {"a": "a", "b": "a", "c": "a", "d": "d", "e": "d"}
    rng = random.Random(0)
    for _ in range(30):
        shuffled = [(v, u) if rng.random() < 0.5 else (u, v) for u, v in edges]
        rng.shuffle(shuffled)
        members = connected_components(shuffled)
        assert members == expected, shuffled
        assert duplicates_to_drop(members) == {"b", "c", "e"}
    assert connected_components(iter(edges)) == expected  # any iterable, consumed once
    assert connected_components([]) == {} and duplicates_to_drop({}) == set()
    assert connected_components([("x", "x")]) == {"x": "x"}


def test_connected_components_match_a_bfs_reference_on_a_random_graph():
    rng = random.Random(1)
    nodes = [f"doc-{i:04d}" for i in range(300)]
    edges = [(rng.choice(nodes), rng.choice(nodes)) for _ in range(200)]
    adj: dict[str, set[str]] = {}
    for u, v in edges:
        adj.setdefault(u, set()).add(v)
        adj.setdefault(v, set()).add(u)
    expected, seen = {}, set()
    for start in adj:
        if start in seen:
            continue
        comp, stack = set(), [start]
        while stack:
            n = stack.pop()
            if n not in comp:
                comp.add(n)
                stack.extend(adj[n] - comp)
        seen |= comp
        expected.update({n: min(comp) for n in comp})
    members = connected_components(edges)
    assert members == expected
    assert duplicates_to_drop(members) == {n for n in expected if expected[n] != n}
    assert len(set(members.values())) == len(members) - len(duplicates_to_drop(members))


def test_distributed_components_match_union_find():
    """`NearDuplicates` (min-label rounds on Beam, the rest merged on one worker) marks exactly the
    documents union-find drops: on a chain far longer than its rounds, on stars, and on random graphs."""
    import random

    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.util import assert_that, equal_to

    from palm.data import minhash
    from palm.data.dedup import LABEL_ROUNDS, NearDuplicates

    rng = random.Random(0)
    chain = [(f"c{i:03d}", f"c{i + 1:03d}") for i in range(4 * LABEL_ROUNDS + 5)]
    rng.shuffle(chain)
    star = [("s000", f"s{i:03d}") for i in range(1, 9)]
    nodes = [f"r{i:03d}" for i in range(120)]
    random_edges = [tuple(sorted(rng.sample(nodes, 2))) for _ in range(100)]
    # A chain whose smallest id sits in the middle: labels flow both ways.
    middle = [("m050", "m060"), ("m040", "m050"), ("m060", "m070"), ("m030", "m040"), ("m070", "m080")]
    edges = chain + star + random_edges + middle
    expected = sorted(minhash.duplicates_to_drop(minhash.connected_components(edges)))
    assert len(expected) > 100

    with beam.Pipeline(runner=FnApiRunner()) as p:
        marks = p | beam.Create(edges) | NearDuplicates()
        assert_that(marks, equal_to([(node, True) for node in expected]))
