"""The corpus `palm bench data` measures: real text that mostly survives filtering, grown by recombination,
with planted exact and near copies of known similarity.

* wikipedia: WikiText-2 (valid + test) articles split into paragraphs, one document per paragraph;
* books: tinyshakespeare as scenes, one document per run of SCENE_SPEECHES consecutive speeches;
* grown to `target_mb` by recombination: each further document joins RECOMBINE randomly chosen paragraphs
  (or speeches) of its source. A recombined document shares at most one of its parts with any original,
  so no two are near duplicates (Jaccard about 1/RECOMBINE at most);
* planted copies of wikipedia paragraphs: exact copies, and copies with words swapped until the exact
  Jaccard similarity of the two documents' word 5-gram sets (palm.data.minhash's shingles) falls in each
  band of PLANTED_BANDS. Near-duplicate removal should catch the [0.8, 0.9] band and none below 0.7.

Everything is drawn from a seeded generator: the same data dir and arguments give the same bytes.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from palm.base.errors import PalmError
from palm.data.minhash import shingle_hashes, words

#: A speech starts after a blank line, at a "Name:" line (as in the real-corpora data-stage test).
BOOKS_SPLIT = r"\n\n(?=[A-Z][A-Za-z ]+:\n)"
#: A WikiText article starts at its " = Title = " line; " = = Section = = " lines stay inside it.
WIKI_SPLIT = r"^ = [^=\n]+ = *$"
SCENE_SPEECHES = 24
RECOMBINE = 3
#: (label, lowest, highest) exact Jaccard of a planted pair; exact copies are their own label.
PLANTED_BANDS: tuple[tuple[str, float, float], ...] = (
    ("0.80-0.90", 0.80, 0.90), ("0.70-0.80", 0.70, 0.80), ("0.50-0.70", 0.50, 0.70))
FILES = ("tinyshakespeare/input.txt", "wikitext2/valid.txt", "wikitext2/test.txt")


def split_text(text: str, pattern: str) -> list[str]:
    """Documents starting at each (multiline) match of pattern, as the data stage splits txt sources."""
    starts = [m.start() for m in re.finditer(pattern, text, re.MULTILINE)]
    bounds = sorted({0, *starts, len(text)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


def _read(data_dir: Path, rel: str) -> str:
    path = data_dir / rel
    if not path.is_file():
        raise PalmError(f"--data-dir {data_dir}: {rel} is missing (the data bench reads {', '.join(FILES)})")
    try:
        return path.read_bytes().decode("utf-8")  # bytes as they are: no newline translation
    except UnicodeDecodeError as e:
        raise PalmError(f"{path}: not UTF-8 ({e})") from None


def wiki_paragraphs(data_dir: Path, min_words: int = 50) -> list[str]:
    """Each article's body paragraphs of at least `min_words` words (not its headings, captions or list
    lines), one per document."""
    out = []
    for rel in ("wikitext2/valid.txt", "wikitext2/test.txt"):
        for article in split_text(_read(data_dir, rel), WIKI_SPLIT):
            for line in article.splitlines():
                stripped = line.strip()
                if len(stripped.split()) >= min_words and not stripped.startswith("="):
                    out.append(stripped + "\n")
    return out


def shakespeare_speeches(data_dir: Path) -> list[str]:
    return [s.strip("\n") + "\n" for s in split_text(_read(data_dir, "tinyshakespeare/input.txt"), BOOKS_SPLIT)]


def shingle_set(text: str, ngram: int = 5) -> set[int]:
    return set(np.asarray(shingle_hashes(words(text), ngram)).tolist())


def jaccard(a: str, b: str) -> float:
    x, y = shingle_set(a), shingle_set(b)
    return len(x & y) / len(x | y) if x or y else 1.0


def near_copy(text: str, low: float, high: float, rng: random.Random, vocabulary: list[str]) -> tuple[str, float] | None:
    """`text` with words swapped for others, spread over it, until its exact Jaccard with `text` is in
    [low, high); None when a swap jumps over the band (the caller tries another document)."""
    tokens = text.split(" ")
    order = [i for i in range(len(tokens)) if tokens[i].isalpha()]
    rng.shuffle(order)
    current = list(tokens)
    for i in order:
        current[i] = rng.choice(vocabulary)
        copy = " ".join(current)
        j = jaccard(text, copy)
        if j < low:
            return None
        if j < high:
            return copy, j
    return None


def build(data_dir: str | Path, out_dir: Path, target_mb: float = 20.0, pairs_per_band: int = 100,
          max_docs: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Write <out_dir>/books.jsonl and wikipedia.jsonl ({"id", "text"}); the sources and the planted pairs.

    `max_docs` caps each source's original documents (before growing and planting), for quick runs."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise PalmError(f"--data-dir {data_dir}: no such directory (it should hold tinyshakespeare/ and "
                        "wikitext2/ from ../shared/data)")
    rng = random.Random(f"palm-bench-data/{seed}")
    paragraphs = wiki_paragraphs(data_dir)
    speeches = shakespeare_speeches(data_dir)
    scenes = ["\n".join(speeches[i:i + SCENE_SPEECHES]) for i in range(0, len(speeches), SCENE_SPEECHES)]
    docs = {"books": scenes, "wikipedia": list(paragraphs)}
    if max_docs is not None:
        docs = {name: d[:max_docs] for name, d in docs.items()}
    parts = {"books": speeches, "wikipedia": paragraphs}
    original = {name: len(d) for name, d in docs.items()}

    # Grow by recombination, keeping the two sources' byte ratio.
    size = {name: sum(len(t.encode()) for t in d) for name, d in docs.items()}
    total = sum(size.values())
    target = target_mb * 1e6
    for name in docs:
        goal = target * size[name] / total
        while size[name] < goal:
            k = RECOMBINE * (SCENE_SPEECHES // 2 if name == "books" else 1)
            text = "\n".join(rng.sample(parts[name], k))  # parts end with a newline: a blank line between
            docs[name].append(text)
            size[name] += len(text.encode())

    # Planted copies of wikipedia paragraphs long enough to hold a band (at least 80 words).
    vocabulary = sorted({w for p in paragraphs[:2000] for w in p.split() if w.isalpha()})
    candidates = [i for i in range(original["wikipedia"]) if len(docs["wikipedia"][i].split()) >= 80]
    rng.shuffle(candidates)
    planted: list[dict[str, Any]] = []
    wiki_ids = [f"wikipedia/{i:07d}" for i in range(len(docs["wikipedia"]))]
    source_of_copy = []
    for label, low, high in (("exact", 1.0, 1.0), *PLANTED_BANDS):
        made = 0
        while made < pairs_per_band and candidates:
            i = candidates.pop()
            text = docs["wikipedia"][i]
            if label == "exact":
                copy, j = text, 1.0
            else:
                made_copy = near_copy(text, low, high, rng, vocabulary)
                if made_copy is None:
                    continue
                copy, j = made_copy
            source_of_copy.append(copy)
            planted.append({"band": label, "original": wiki_ids[i],
                            "copy": f"wikipedia/planted-{len(planted):05d}", "jaccard": j})
            made += 1

    out_dir.mkdir(parents=True, exist_ok=True)
    sources: dict[str, dict[str, Any]] = {}
    for name, texts in docs.items():
        rows = [(f"{name}/{i:07d}", t) for i, t in enumerate(texts)]
        if name == "wikipedia":
            rows += [(p["copy"], t) for p, t in zip(planted, source_of_copy)]
        file = out_dir / f"{name}.jsonl"
        with file.open("w", encoding="utf-8") as f:
            for doc_id, text in rows:
                f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        sources[name] = {"file": str(file), "docs": len(rows), "bytes": sum(len(t.encode("utf-8")) for _, t in rows),
                         "original_docs": original[name], "recombined_docs": len(texts) - original[name],
                         "planted_docs": len(planted) if name == "wikipedia" else 0}
    return {"sources": sources, "planted": planted}


def detection(planted: list[dict[str, Any]], eligible: set[str], kept: set[str]) -> dict[str, dict[str, Any]]:
    """Per band: of the planted pairs whose two documents both reached deduplication (`eligible`), how many
    lost one of the two (found); precision-style false finds are the low bands' found pairs."""
    out: dict[str, dict[str, Any]] = {}
    for p in planted:
        entry = out.setdefault(p["band"], {"pairs": 0, "found": 0, "not_eligible": 0})
        if p["original"] not in eligible or p["copy"] not in eligible:
            entry["not_eligible"] += 1
            continue
        entry["pairs"] += 1
        entry["found"] += int(p["original"] not in kept or p["copy"] not in kept)
    for entry in out.values():
        entry["rate"] = entry["found"] / entry["pairs"] if entry["pairs"] else None
    return out
