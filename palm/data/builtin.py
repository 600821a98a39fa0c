"""Corpora generated on this machine from what every Python installation has (format "builtin").

They let specs/tiny.yaml and the tests run the whole data stage with no download:

* ``python-docs``: prose. The help topics of ``pydoc_data.topics`` (sorted by key), then the module
  docstrings of a fixed list of pure-Python standard-library modules.
* ``python-stdlib-code``: code. The standard library's top-level ``.py`` files, raw bytes.
* ``synthetic-planted``: synthetic prose with planted exact duplicates, near duplicates, junk and invalid
  UTF-8, so that tests can assert exactly which documents each step removes (see `PLANTED`).

`builtin_records(name)` yields ``(record_id, raw_bytes)`` in a fixed order; the same Python installation
always gives the same records.
"""

from __future__ import annotations

import ast
import base64
import os
import random
import sysconfig
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from palm.base.errors import PalmError

#: Known corpus names.
CORPORA: tuple[str, ...] = ("python-docs", "python-stdlib-code", "synthetic-planted")

#: Pure-Python modules (present from 3.11 on) whose source docstring is a few hundred words of prose.
DOC_MODULES: tuple[str, ...] = (
    "argparse", "ast", "cmd", "codeop", "collections", "configparser", "copy", "difflib", "doctest",
    "fileinput", "heapq", "inspect", "json", "os", "pdb", "plistlib", "pyclbr", "pydoc", "random", "re",
    "sched", "shelve", "site", "smtplib", "socketserver", "statistics", "subprocess", "tempfile", "timeit",
    "tokenize", "typing", "unittest", "uuid", "wave",
)

#: Bigger files are generated tables (e.g. _pydecimal.py), not typical code, and would dominate a tiny run.
MAX_CODE_FILE_BYTES = 200_000


def builtin_records(name: str, max_docs: int | None = None) -> Iterator[tuple[str, bytes]]:
    """(record_id, raw_bytes) of corpus `name` in a fixed order, at most `max_docs` of them."""
    generators = {
        "python-docs": _python_docs,
        "python-stdlib-code": _python_stdlib_code,
        "synthetic-planted": _synthetic_planted,
    }
    if name not in generators:
        raise PalmError(f"unknown builtin corpus {name!r}; known: {', '.join(CORPORA)}")
    if max_docs is not None and max_docs < 0:
        raise PalmError(f"max_docs must be non-negative, got {max_docs}")
    # Validation above runs at the call, not at the first next(), so bad names fail where they are given.
    return _take(generators[name](), max_docs)


def _take(records: Iterator[tuple[str, bytes]], max_docs: int | None) -> Iterator[tuple[str, bytes]]:
    for i, record in enumerate(records):
        if max_docs is not None and i >= max_docs:
            return
        yield record


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# ------------------------------------------------------------------------------------ python-docs


@cache
def _module_docstring(module: str) -> str | None:
    """Read from the source with ast rather than imported: no import side effects (site, pdb's readline),
    and some modules rewrite __doc__ at import time. Parsing the 34 modules takes about 0.4 s, so a process
    that runs the data stage more than once (the test suite's workers, dozens of times) parses each once."""
    root = _stdlib_dir()
    for path in (root / f"{module}.py", root / module / "__init__.py"):
        if path.is_file():
            return ast.get_docstring(ast.parse(path.read_bytes()), clean=True)
    return None


def _python_docs() -> Iterator[tuple[str, bytes]]:
    from pydoc_data.topics import topics  # the docs' text (750 kB of source), loaded only for this corpus

    for key in sorted(topics):
        yield f"python-docs/topic/{key}", topics[key].encode("utf-8")
    for module in DOC_MODULES:
        doc = _module_docstring(module)
        if doc:
            yield f"python-docs/module/{module}", doc.encode("utf-8")


# ----------------------------------------------------------------------------- python-stdlib-code


def _python_stdlib_code() -> Iterator[tuple[str, bytes]]:
    root = _stdlib_dir()
    with os.scandir(root) as entries:
        names = sorted(e.name for e in entries if e.name.endswith(".py") and e.is_file())
    if not names:
        raise PalmError(f"builtin corpus 'python-stdlib-code': no .py files in {root} "
                        "(this Python installation ships its standard library compiled only)")
    for name in names:
        path = root / name
        if path.stat().st_size <= MAX_CODE_FILE_BYTES:
            yield f"python-stdlib-code/{name}", path.read_bytes()


# ------------------------------------------------------------------------------ synthetic-planted

SYNTHETIC_SEED = 20220405  # PaLM's arXiv date; any fixed value would do

# Word classes for template sentences. A few words carry non-ASCII letters so valid UTF-8 beyond ASCII is
# exercised too.
_NOUNS = """
river stone valley garden window lantern harbor meadow forest island bridge tower market village engine
letter mirror ladder candle basket compass anchor orchard kettle blanket violin painter sailor farmer
teacher doctor baker merchant soldier captain student artist writer gardener pilot miner weaver potter
hunter shepherd keeper cabinet doorway chimney courtyard library kitchen cellar attic balcony corridor
staircase fountain statue monument cathedral monastery castle fortress cottage barn stable mill quarry
canyon glacier volcano desert prairie marsh lagoon reef shore cliff summit ridge plateau delta estuary
journal ledger manuscript pamphlet atlas almanac diary chronicle telescope microscope barometer
thermometer pendulum lever pulley wagon carriage bicycle tram ferry schooner canoe raft café façade
""".split()
_ADJECTIVES = """
quiet distant ancient bright narrow heavy gentle hollow silent golden crooked patient careful restless
curious humble clever stubborn weary eager modest sturdy fragile rusty dusty muddy frozen sunny windy
cloudy misty shallow steep rugged smooth polished faded crimson amber pale dark wooden iron copper
marble velvet woolen bitter sweet fragrant noisy crowded empty forgotten hidden famous ordinary
peculiar remarkable splendid humble tidy cluttered northern southern eastern western naïve
""".split()
_VERBS = """
carried repaired painted noticed followed borrowed described admired measured opened closed guarded
visited crossed climbed watched studied counted polished gathered planted harvested mended sketched
photographed remembered forgot discovered abandoned rebuilt explored praised ignored delivered
examined reached protected surrounded traded carved lifted pulled pushed cleaned filled emptied
inspected recorded collected organized arranged decorated welcomed questioned answered
""".split()
_ADVERBS = """
slowly quickly carefully quietly suddenly gradually eagerly patiently rarely often gently boldly
cheerfully reluctantly silently loudly briefly warmly calmly nervously proudly openly secretly
""".split()
_PREPOSITIONS = "near beyond beside behind across toward above below along under".split()
_CONNECTORS = "Meanwhile Later Afterwards Eventually Still Yesterday Today Sometimes".split()

# Fixed text between slots is at most three words, so every word 5-gram contains random slots and
# unrelated documents share almost no 5-grams. Two thirds of the templates hold two of Gopher's stop words
# ("the" and "and" or "that"), so every document passes the stop-word rule.
_TEMPLATES = (
    "The {A} {N} {V} the {N} {P} a {A} {N}.",
    "{C}, the {N} {V} that {A} {N} {D}.",
    "Nobody {V} the {A} {N}, and the {N} {V} it {D}.",
    "When the {N} {V} that {N}, the {A} {N} {V} the {N}.",
    "A {A} {N} and a {A} {N} {V} the {N} {D}.",
    "It was the {A} {N} that {V} our {N} {P} the {N}.",
    "Her {N} {V} the {A} {N} {P} the {N}.",
    "They {V} the {N} and the {N} was {A}.",
    "Before the {N} {V} that, the {A} {N} {V} {D}.",
    "His {A} {N} never {V} the {N} {P} that {N}.",
    "{C} we {V} a {A} {N} {P} the {A} {N}.",
    "Which {N} {V} the {A} {N} first is still {A}.",
)


def _sentence(rng: random.Random) -> str:
    template = rng.choice(_TEMPLATES)
    out = []
    for part in template.split("{"):
        if "}" in part:
            slot, rest = part.split("}", 1)
            pool = {"N": _NOUNS, "A": _ADJECTIVES, "V": _VERBS, "D": _ADVERBS, "P": _PREPOSITIONS,
                    "C": _CONNECTORS}[slot]
            out.append(rng.choice(pool) + rest)
        else:
            out.append(part)
    return "".join(out)


def _prose(rng: random.Random, target_words: int) -> str:
    """Sentences until at least `target_words` words, in 2-4 one-line paragraphs."""
    sentences, count = [], 0
    while count < target_words:
        s = _sentence(rng)
        sentences.append(s)
        count += len(s.split())
    num_paragraphs = min(len(sentences), rng.randint(2, 4))
    cuts = sorted(rng.sample(range(1, len(sentences)), num_paragraphs - 1))
    paragraphs = [" ".join(sentences[a:b]) for a, b in zip([0, *cuts], [*cuts, len(sentences)])]
    return "\n\n".join(paragraphs) + "\n"


def _near_copy(text: str, rng: random.Random, num_substitutions: int) -> str:
    """`text` with a few nouns/adjectives swapped for others of the same class, spread over the document
    (so each touches its own five 5-grams) and whitespace kept as it is."""
    tokens = text.split(" ")
    classes = {w: pool for pool in (_NOUNS, _ADJECTIVES) for w in pool}
    eligible = [i for i, t in enumerate(tokens) if t in classes]
    span = len(eligible) // num_substitutions
    for k in range(num_substitutions):
        i = eligible[k * span + rng.randrange(span // 2)]
        pool = classes[tokens[i]]
        tokens[i] = rng.choice([w for w in pool if w != tokens[i]])
    return " ".join(tokens)


def _junk(rng: random.Random) -> list[tuple[bytes, str]]:
    """(document, the first default-filter check it fails)."""
    soup = " ".join("#" + "".join(rng.choice("#@$%&*+=~^!") for _ in range(rng.randint(2, 6)))
                    for _ in range(120))
    teaser_lines = []
    for i in range(12):
        words = _sentence(rng).split() + _sentence(rng).split()
        teaser_lines.append(" ".join(words[:15]).rstrip(".,") + ("\u2026" if i % 3 == 0 else "..."))
    teasers = "\n".join(teaser_lines) + "\n"
    boilerplate_line = "Sign in to your account to see the latest offers from our trusted partners."
    boilerplate = "\n".join([_sentence(rng)] + [boilerplate_line] * 15 + [_sentence(rng)]) + "\n"
    table = "\n".join(" ".join(f"{rng.uniform(0, 1000):.{rng.randint(1, 3)}f}" for _ in range(8))
                      for _ in range(12)) + "\n"
    blob = "\n".join(base64.b64encode(rng.randbytes(45)).decode("ascii") for _ in range(60)) + "\n"
    return [
        (soup.encode(), "hash_to_word_ratio"),
        (teasers.encode(), "lines_ending_ellipsis"),
        (b"Click here to continue reading.\n", "too_few_words"),
        (boilerplate.encode(), "duplicate_lines"),
        (table.encode(), "words_without_alpha"),
        (blob.encode(), "mean_word_length"),
    ]


def _with_fault(raw: bytes, rng: random.Random, fault: bytes) -> bytes:
    """`fault` inserted at the start of a word in the middle half of the document."""
    spaces = [i for i, b in enumerate(raw) if b == 0x20]
    at = spaces[rng.randrange(len(spaces) // 4, 3 * len(spaces) // 4)] + 1
    return raw[:at] + fault + raw[at:]


def _invalid_utf8(rng: random.Random) -> list[bytes]:
    """Good prose with one kind of broken UTF-8 each; repaired (U+FFFD) they pass the filters."""
    docs = [_prose(rng, rng.randint(100, 200)).encode("utf-8") for _ in range(4)]
    return [
        _with_fault(docs[0], rng, b"\xff\xfe "),  # bytes that never occur in UTF-8 (a stray UTF-16 BOM)
        _with_fault(docs[1], rng, "caf\u00e9".encode()[:-1] + b" "),  # 2-byte sequence cut after its lead
        _with_fault(docs[2], rng, b"\x80\xbfold \xc0\xafslash \xed\xa0\x80 "),  # lone continuation,
        # overlong "/", an encoded surrogate
        docs[3].rstrip(b"\n") + " \u2014".encode()[:-1],  # file cut inside its last 3-byte character
    ]


@cache
def _planted_corpus() -> tuple[tuple[tuple[str, bytes], ...], dict[str, list[str]], dict[str, str],
                               dict[str, str]]:
    rng = random.Random(SYNTHETIC_SEED)
    # (category, bytes, index of the original among the distinct documents or None, drop reason or None)
    items: list[tuple[str, bytes, int | None, str | None]] = []
    distinct = []
    for i in range(40):
        # The near-duplicated originals are long so that 2-4 substitutions keep 5-gram Jaccard above 0.85.
        target = rng.randint(270, 285) if 5 <= i < 10 else rng.randint(80, 280)
        distinct.append(_prose(rng, target).encode("utf-8"))
    items += [("distinct", doc, None, None) for doc in distinct]
    items += [("exact_duplicate", distinct[i], i, None) for i in (0, 0, 1, 2, 3, 4)]
    items += [("near_duplicate", _near_copy(distinct[i].decode(), rng, k).encode("utf-8"), i, None)
              for i, k in zip(range(5, 10), (2, 3, 4, 2, 3))]
    items += [("junk", doc, None, reason) for doc, reason in _junk(rng)]
    items += [("invalid_utf8", doc, None, None) for doc in _invalid_utf8(rng)]

    order = list(range(len(items)))
    rng.shuffle(order)
    # Each original takes the earliest position of its group, so "keep the smallest id" keeps originals
    # and removes exactly the planted copies.
    position = {item: pos for pos, item in enumerate(order)}
    for original in range(10):
        group = [original] + [j for j, it in enumerate(items) if it[2] == original]
        first = min(group, key=position.__getitem__)
        if first != original:
            a, b = position[original], position[first]
            order[a], order[b] = order[b], order[a]
            position[original], position[first] = b, a

    ids = {item: f"synthetic-planted/{pos:04d}" for pos, item in enumerate(order)}
    records = tuple((ids[j], items[j][1]) for j in order)
    categories: dict[str, list[str]] = {c: [] for c in
                                        ("distinct", "exact_duplicate", "near_duplicate", "junk", "invalid_utf8")}
    originals, reasons = {}, {}
    for j in order:
        category, _, original, reason = items[j]
        categories[category].append(ids[j])
        if original is not None:
            originals[ids[j]] = ids[original]
        if reason is not None:
            reasons[ids[j]] = reason
    return records, categories, originals, reasons


def _synthetic_planted() -> Iterator[tuple[str, bytes]]:
    yield from _planted_corpus()[0]


#: Category -> record ids (sorted): "distinct", "exact_duplicate", "near_duplicate", "junk", "invalid_utf8".
#: Originals of the copies are among "distinct"; invalid_utf8 documents are distinct prose too.
PLANTED: dict[str, list[str]] = _planted_corpus()[1]
#: Exact or near duplicate -> the distinct document it copies (which always has the smaller id).
PLANTED_ORIGINAL: dict[str, str] = _planted_corpus()[2]
#: Junk document -> the first check of `quality_drop_reason` it fails under default QualityFilters.
PLANTED_REASON: dict[str, str] = _planted_corpus()[3]

__all__ = ["CORPORA", "DOC_MODULES", "builtin_records", "PLANTED", "PLANTED_ORIGINAL", "PLANTED_REASON",
           "SYNTHETIC_SEED", "MAX_CODE_FILE_BYTES"]
