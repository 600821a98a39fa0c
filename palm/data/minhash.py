"""Near-duplicate detection with MinHash LSH (PaLM-style defaults: word 5-grams, 128 permutations, Jaccard 0.8).

Flow inside the Beam data stage, per document::

    hashes = shingle_hashes(words(text), ngram=5)          # or code_tokens(text) for source files
    sig = MinHasher(128).signature(hashes)
    keys = band_keys(sig, *optimal_bands(0.8, 128))          # group by key -> candidate pairs
    ...                                                     # optional: verify pairs with estimated_jaccard
    drop = duplicates_to_drop(connected_components(pairs))

Everything here is deterministic across processes and machines (no Python ``hash()``), so workers
that never talk to each other agree on shingles, signatures and band keys.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
import zlib
from collections.abc import Iterable
from functools import lru_cache

import numpy as np

__all__ = [
    "MinHasher",
    "band_keys",
    "candidate_probability",
    "code_tokens",
    "connected_components",
    "duplicates_to_drop",
    "estimated_jaccard",
    "optimal_bands",
    "shingle_hashes",
    "words",
]

DEFAULT_NGRAM = 5
DEFAULT_NUM_PERM = 128
DEFAULT_THRESHOLD = 0.8

MERSENNE_61 = (1 << 61) - 1
MAX_HASH = 0xFFFFFFFF

_U64_MASK32 = np.uint64(MAX_HASH)
_U64_ONE = np.uint64(1)
_U64_16 = np.uint64(16)
_U64_13 = np.uint64(13)
_U64_61 = np.uint64(61)
_U64_FMIX1 = np.uint64(0x85EBCA6B)
_U64_FMIX2 = np.uint64(0xC2B2AE35)
# Odd multiplier (golden ratio * 2^32): keeps the per-step map injective mod 2^32, so two n-grams that
# differ in a single token can never combine to the same pre-mix value.
_U64_SHINGLE_MUL = np.uint64(0x9E3779B1)

# Two work matrices of at most _CHUNK_ELEMS uint64 each (256 KiB apiece; 256 shingles x 128 perms): they
# stay in L2 between the arithmetic passes (1 MiB blocks measured up to 4x slower on a 1,000-shingle
# document), are large enough to
# amortise numpy's per-call overhead, and bound memory on huge documents.
_CHUNK_ELEMS = 1 << 15

# Python's string.punctuation (ASCII, includes symbols such as $ and +) plus Unicode punctuation (P*).
# Only the BMP is scanned: building the table over all of Unicode costs ~150 ms per worker process for a
# couple hundred historic-script marks, while the BMP costs ~8 ms and holds all punctuation used in prose.
_ASCII_PUNCT = string.punctuation
_PUNCT = "".join(
    sorted(set(string.punctuation) | {chr(c) for c in range(0x10000) if unicodedata.category(chr(c))[0] == "P"})
)

# Alternation order matters: a string literal is consumed whole so a '#' inside it is not taken for a
# comment, and a comment is consumed whole so nothing inside it becomes a token.
_CODE_TOKEN_RE = re.compile(
    r"""
      \#[^\n]*                                   # comment (dropped below)
    | \"\"\"[\s\S]*?\"\"\" | '''[\s\S]*?'''      # triple-quoted string
    | "(?:\\.|[^"\\\n])*" | '(?:\\.|[^'\\\n])*'  # single-line string
    | [^\W\d]\w*                                 # identifier / keyword
    | \d[\w.]*                                   # number: 10, 0x1F, 1_000, 3.14, 1e9
    | \*\*=? | //=? | >>=? | <<=? | -> | := | \.\.\. | && | \|\| | :: | [-+*/%&|^@=<>!]=
    | [^\w\s]                                    # any other single operator / punctuation character
    """,
    re.VERBOSE,
)


def words(text: str) -> list[str]:
    """Prose tokens: lowercase, split on whitespace, strip punctuation at both ends, drop empties."""
    out = []
    for w in text.lower().split():
        # The ASCII strip is ~4x cheaper than the full Unicode one (its char set is tiny); and since
        # _PUNCT holds exactly string.punctuation in ASCII, an ASCII word needs nothing more.
        w = w.strip(_ASCII_PUNCT)
        if not w.isascii():
            w = w.strip(_PUNCT)
        if w:
            out.append(w)
    return out


def code_tokens(text: str) -> list[str]:
    """Source tokens (identifiers, numbers, strings, operators) without layout or ``#`` comments.

    Whitespace never reaches a token (runs inside string literals are collapsed to one space), so a
    reindented, reflowed or recommented copy of a file yields the same token sequence. Caveat: for
    languages where ``#`` is not a comment (C preprocessor lines) those lines are ignored too, which is
    consistent across copies and so harmless for dedup.
    """
    out = []
    for tok in _CODE_TOKEN_RE.findall(text):
        first = tok[0]
        if first == "#":
            continue
        if first in "\"'":
            tok = " ".join(tok.split())
        out.append(tok)
    return out


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, in place on a uint64 array holding 32-bit values."""
    x ^= x >> _U64_16
    x *= _U64_FMIX1
    x &= _U64_MASK32
    x ^= x >> _U64_13
    x *= _U64_FMIX2
    x &= _U64_MASK32
    x ^= x >> _U64_16
    return x


def _token_hashes(tokens: list[str]) -> np.ndarray:
    try:
        return np.fromiter(map(zlib.crc32, map(str.encode, tokens)), dtype=np.uint64, count=len(tokens))
    except UnicodeEncodeError:
        # Lone surrogates (from surrogateescape-decoded input) must not crash a Beam worker.
        enc = [t.encode("utf-8", "surrogatepass") for t in tokens]
        return np.fromiter(map(zlib.crc32, enc), dtype=np.uint64, count=len(tokens))


def shingle_hashes(tokens: list[str], ngram: int = DEFAULT_NGRAM) -> np.ndarray:
    """Sorted, unique uint32 hashes of the token n-grams (one shingle over all tokens when fewer than n)."""
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    if not tokens:
        return np.empty(0, dtype=np.uint32)
    # crc32 is stable across processes and platforms, unlike hash(), and is the fastest stable hash in
    # the standard library; the finalizer below supplies the avalanche crc32 lacks.
    tok = _token_hashes(tokens)
    n = min(ngram, len(tok))
    m = len(tok) - n + 1
    acc = tok[:m].copy()
    for i in range(1, n):
        acc *= _U64_SHINGLE_MUL
        acc += tok[i : i + m]
        acc &= _U64_MASK32
    _fmix32(acc)
    return np.unique(acc.astype(np.uint32))


class MinHasher:
    """MinHash signatures under ``num_perm`` universal hashes ``((a*h + b) mod (2^61 - 1)) & 0xFFFFFFFF``."""

    def __init__(self, num_perm: int = DEFAULT_NUM_PERM, seed: int = 1):
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        self.num_perm = int(num_perm)
        self.seed = int(seed)
        rng = np.random.default_rng(seed)
        # a and b below 2^32 keep a*h + b <= (2^32-1)^2 + 2^32-1 = 2^64 - 2^32, so the whole affine step
        # runs in uint64 without wrapping and the reduction mod 2^61-1 needs no division. a odd: never
        # zero, and the low 32 bits of a*h stay a bijection of h.
        self.a = rng.integers(1, 1 << 32, size=self.num_perm, dtype=np.uint64) | _U64_ONE
        self.b = rng.integers(0, 1 << 32, size=self.num_perm, dtype=np.uint64)
        self.a.flags.writeable = False
        self.b.flags.writeable = False
        self._chunk = max(1, _CHUNK_ELEMS // self.num_perm)

    def __repr__(self) -> str:
        return f"MinHasher(num_perm={self.num_perm}, seed={self.seed})"

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """Per-permutation minimum over the shingle hashes, uint32 (num_perm,); all 0xFFFFFFFF when empty.

        Expects well-mixed 32-bit hashes such as shingle_hashes() returns: with a, h < 2^32 this family
        is close to multiplicative hashing mod 2^32, which is unbiased on random-looking input but not on
        structured input (raw consecutive ids at true Jaccard 0.5 read ~0.1 low).
        """
        h = _as_u32(hashes)
        sig = np.full(self.num_perm, MAX_HASH, dtype=np.uint64)
        if h.size == 0:
            return sig.astype(np.uint32)
        h = h.astype(np.uint64)
        a, b = self.a, self.b
        rows = min(self._chunk, h.size)
        x = np.empty((rows, self.num_perm), dtype=np.uint64)
        t = np.empty_like(x)
        for start in range(0, h.size, rows):
            hc = h[start : start + rows, None]
            xc, tc = x[: hc.shape[0]], t[: hc.shape[0]]
            np.multiply(hc, a, out=xc)
            xc += b  # x = a*h + b < 2^64 - 2^32, see __init__
            # For k = floor(x / p), x mod p = x - k*p = x + k - k*2^61, which shares its low 32 bits with
            # x + k: no division needed. Writing x = hi*2^61 + lo = hi*p + (hi + lo) with hi = x >> 61
            # (<= 7) and lo < 2^61 gives k = hi + [hi + lo >= p] = (x + hi + 1) >> 61, exact and free of
            # overflow (x + 8 < 2^64).
            np.right_shift(xc, _U64_61, out=tc)
            tc += xc
            tc += _U64_ONE
            tc >>= _U64_61
            xc += tc
            xc &= _U64_MASK32
            np.minimum(sig, xc.min(axis=0), out=sig)
        return sig.astype(np.uint32)


def _as_u32(hashes) -> np.ndarray:
    arr = np.asarray(hashes)
    if arr.ndim != 1:
        raise ValueError(f"hashes must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.uint32:
        return arr
    if arr.size == 0:
        return arr.astype(np.uint32)
    if arr.dtype.kind not in "iu" or int(arr.min()) < 0 or int(arr.max()) > MAX_HASH:
        # Wider values would break the a*h < 2^64 guarantee the arithmetic relies on.
        raise ValueError("hashes must be integers in [0, 2^32)")
    return arr.astype(np.uint32)


def candidate_probability(s, bands: int, rows: int):
    """P(two documents with Jaccard s share at least one band key) = 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


@lru_cache(maxsize=64)
def optimal_bands(threshold: float = DEFAULT_THRESHOLD, num_perm: int = DEFAULT_NUM_PERM,
                  false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows), bands*rows <= num_perm, minimising weighted false-positive + false-negative area.

    When candidate pairs are verified against their signatures afterwards, a false positive costs only
    a comparison while a false negative leaves a duplicate in the corpus: weight false negatives up.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    # Midpoint rule on both intervals; 2,000 nodes each puts the quadrature error (~1e-7) far below the
    # gaps between neighbouring (bands, rows) choices.
    n = 2000
    s_lo = (np.arange(n) + 0.5) * (threshold / n)
    s_hi = threshold + (np.arange(n) + 0.5) * ((1.0 - threshold) / n)
    best_key, best = None, None
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1, dtype=np.float64)[:, None]
        fp = (1.0 - (1.0 - s_lo**r) ** b).mean(axis=1) * threshold * (1.0 - false_negative_weight)
        fn = ((1.0 - s_hi**r) ** b).mean(axis=1) * (1.0 - threshold) * false_negative_weight
        for ri, err in enumerate(fp + fn, start=1):
            # Round so float noise cannot break a tie; then prefer using every permutation, then more
            # rows (fewer keys to shuffle in Beam).
            key = (round(float(err), 9), b * ri != num_perm, -ri)
            if best_key is None or key < best_key:
                best_key, best = key, (b, ri)
    return best


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[int]:
    """One unsigned 64-bit key per band; the band index is hashed in so bands never share keys."""
    sig = np.asarray(signature)
    if sig.ndim != 1 or bands < 1 or rows < 1 or bands * rows > sig.size:
        raise ValueError(f"need a 1-D signature of at least bands*rows={bands * rows} values, got {sig.shape}")
    # Fixed little-endian bytes: the keys must match between workers on any platform.
    data = sig[: bands * rows].astype("<u4", copy=False).tobytes()
    width = 4 * rows
    keys = []
    for i in range(bands):
        digest = hashlib.blake2b(data[i * width : (i + 1) * width], digest_size=8, salt=i.to_bytes(16, "little"))
        keys.append(int.from_bytes(digest.digest(), "little"))
    return keys


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of positions where two signatures agree (an unbiased estimate of Jaccard)."""
    a, b = np.asarray(sig_a), np.asarray(sig_b)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"signatures must be 1-D, non-empty and the same length, got {a.shape} and {b.shape}")
    return float(np.count_nonzero(a == b)) / a.size


def connected_components(edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Map every node in the edges to the smallest id (string order) in its connected component."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for u, v in edges:
        parent.setdefault(u, u)
        parent.setdefault(v, v)
        ru, rv = find(u), find(v)
        if ru != rv:
            # Always hanging the larger root under the smaller keeps every root its component's minimum,
            # which makes the result independent of edge order.
            if rv < ru:
                ru, rv = rv, ru
            parent[rv] = ru
    return {node: find(node) for node in parent}


def duplicates_to_drop(members: dict[str, str]) -> set[str]:
    """Every node that is not its component's representative."""
    return {node for node, rep in members.items() if node != rep}
