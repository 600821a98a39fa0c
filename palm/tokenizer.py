"""PaLM's lossless SentencePiece vocabulary: training, the tokenizer stage, and encode/decode.

PaLM's vocabulary keeps every character: `decode(encode(x)) == x` for any Unicode string. SentencePiece
gets most of the way with these trainer settings (`trainer_options`):

- ``normalization_rule_name="identity"``: no NFKC, so every code point is kept as written;
- ``remove_extra_whitespaces=False``: runs of spaces, leading and trailing spaces survive;
- ``add_dummy_prefix=False``: no space is invented in front of the text (so none has to be removed);
- ``allow_whitespace_only_pieces=True``: runs of spaces (code indentation) become pieces of their own;
- ``byte_fallback=True``: a character outside the vocabulary becomes its UTF-8 bytes, ``<0xE4>...``,
  never ``<unk>``;
- ``split_digits=True``: every digit is its own piece (PaLM splits numbers into digits);
- pad 0, eos 1, bos 2, unk 3.

What still broke the round trip, found by encoding every code point (alone, between letters, between
spaces, doubled) and by property tests, and how `Tokenizer` fixes it:

- A literal U+2581 LOWER ONE EIGHTH BLOCK, "▁". SentencePiece writes spaces as this meta symbol, so a
  "▁" in the text is read as a space and decodes to " ". The wrapper cuts the text at every literal
  "▁", encodes the parts, and puts the three byte pieces of its UTF-8 form (<0xE2><0x96><0x81>) in
  between. Byte pieces are decoded as raw bytes, never as the meta symbol, so they come back as "▁".
  Training removes the literal "▁" the same way (the parts become separate sentences), so the learnt
  statistics match what encoding does.
- Lone surrogates (U+D800..U+DFFF alone) are not Unicode scalar values and have no UTF-8 form, so no
  UTF-8 tokenizer can keep them; `encode` raises ValueError naming the position instead of the
  binding's opaque cast error. (The data stage decodes UTF-8 bytes, so its documents never hold one.)

Checked and fine with these settings: NUL and every other control character, "\\r\\n", tabs, U+3000,
U+2028, combining marks, ZWJ emoji sequences, text that looks like special pieces ("<s>", "<0x41>";
SentencePiece never matches control or byte pieces in input text), and lines of a million characters
(SentencePiece's `max_sentence_length` limits training sentences only, not encoding).

This module needs only sentencepiece, numpy and the standard library (it runs on accelerator hosts);
`build_tokenizer_stage` takes the spec's tokenizer section duck-typed.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from palm.base import storage
from palm.base.errors import PalmError

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3

#: SentencePiece's whitespace meta symbol; a literal one in text is routed through byte pieces.
META = "\u2581"

#: Training sentences are at most this many UTF-8 bytes, and SentencePiece is told the same limit, so its
#: "too long lines are skipped" rule can never drop text: longer text is cut (see `training_sentences`).
MAX_SENTENCE_BYTES = 8192

#: Threads for training. The unigram EM sums per-thread expected counts, so the learnt vocabulary depends
#: on the thread count (measured: 1, 2, 4 and 16 threads give four different vocabularies), while a fixed
#: count gives byte-identical models run after run. The count is therefore a constant, not the machine's
#: core count, so a spec trains the same model on a laptop and on a 200-core host.
TRAIN_THREADS = 16

#: Peak resident memory of training per sampled character, bytes, plus a fixed allowance. Measured with
#: `resource.getrusage(RUSAGE_SELF).ru_maxrss` around sampling + training (unigram, the settings above):
#: English prose plus Python source, 8M/32M/64M characters, vocab 8k-64k: 26-28 bytes/char, flat in
#: both size and vocabulary; unsegmented Chinese (no spaces, 5,000 distinct characters): 49 bytes/char.
#: The estimate uses 64 bytes/char, a margin above the worst case measured.
TRAIN_BYTES_PER_CHAR = 64
TRAIN_FIXED_BYTES = 256 << 20

#: Validation text read for bytes_per_token and the round-trip check (documents in shard order).
EVAL_MAX_CHARS = 20_000_000

_BYTE_PIECE = re.compile(r"^<0x([0-9A-F]{2})>$")


# ------------------------------------------------------------------------------------ tokenizer


class Tokenizer:
    """A trained SentencePiece model with the lossless wrapper (see the module docstring)."""

    def __init__(self, model: str | os.PathLike | bytes):
        if isinstance(model, (bytes, bytearray, memoryview)):
            self._proto = bytes(model)
        else:
            self._proto = storage.read_bytes(model)  # a local path or gs://
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        # With byte_fallback every byte has a piece; without it, unknown pieces map to unk.
        self.has_byte_fallback = all(self._sp.is_byte(i) for i in byte_ids)
        self._meta_ids = [byte_ids[b] for b in META.encode("utf-8")] if self.has_byte_fallback else None

    def __reduce__(self):
        return Tokenizer, (self._proto,)

    # ---- vocabulary

    @property
    def model_bytes(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def is_byte(self, token_id: int) -> bool:
        return self._sp.is_byte(int(token_id))

    # ---- encode / decode

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added); decode gives `text` back exactly."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Iterable[str], num_threads: int = -1) -> list[list[int]]:
        """Token ids of each text; one call into SentencePiece for the whole batch."""
        texts = list(texts)
        parts: list[str] = []
        counts: list[int] = []
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode takes str, got {type(text).__name__}")
            # A literal "▁" would be read as a space: encode the text around it, bytes for it (below).
            split = text.split(META) if self._meta_ids is not None and META in text else [text]
            parts.extend(split)
            counts.append(len(split))
        try:
            encoded = self._sp.encode(parts, num_threads=num_threads)
        except (RuntimeError, TypeError, UnicodeError):
            _raise_if_not_scalar_values(texts)
            raise
        out: list[list[int]] = []
        i = 0
        for n in counts:
            ids = list(encoded[i])
            for k in range(1, n):
                ids.extend(self._meta_ids)  # type: ignore[arg-type]
                ids.extend(encoded[i + k])
            out.append(ids)
            i += n
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of token ids. pad/eos/bos decode to nothing; byte pieces are joined into UTF-8 (an
        invalid byte sequence, which only a model's own sampling can produce, becomes U+FFFD)."""
        ids = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        return self._sp.decode(ids)

    def decode_batch(self, batch: Iterable[Sequence[int] | np.ndarray]) -> list[str]:
        return [self.decode(ids) for ids in batch]


def _raise_if_not_scalar_values(texts: list[str]) -> None:
    for n, text in enumerate(texts):
        for i, ch in enumerate(text):
            if "\ud800" <= ch <= "\udfff":
                raise ValueError(
                    f"text {n} holds a lone surrogate U+{ord(ch):04X} at index {i}: it is not a Unicode "
                    "character and has no UTF-8 form, so it cannot be tokenized losslessly; repair the text "
                    "first (e.g. text.encode('utf-8', 'replace').decode())")


# ------------------------------------------------------------------------------------- training


def trainer_options(*, vocab_size: int, model_type: str = "unigram", byte_fallback: bool = True,
                    split_digits: bool = True, character_coverage: float = 0.99995,
                    num_threads: int = TRAIN_THREADS) -> dict[str, Any]:
    """SentencePiece trainer settings for PaLM's lossless vocabulary."""
    return dict(
        vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback, split_digits=split_digits,
        character_coverage=character_coverage, num_threads=num_threads,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_by_whitespace=True, treat_whitespace_as_suffix=False,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        # Every sentence given is used, in the order given: no sampling or shuffling inside SentencePiece.
        input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=MAX_SENTENCE_BYTES,
        # The vocabulary has exactly vocab_size pieces (the model's embedding table is sized by it).
        hard_vocab_limit=True,
        minloglevel=1,
    )


def training_sentences(texts: Iterable[str], max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Cut texts (documents or lines) into SentencePiece training sentences of at most max_bytes bytes.

    Sentences are runs of whole lines joined by "\\n", not single lines: SentencePiece strips a
    trailing newline from every sentence, so with one line per sentence "\\n" would never be seen and
    could only ever be a byte piece. Keeping newlines inside sentences lets pieces like "):\\n" and
    "\\n\\n" be learnt (measured on tiny's corpus, vocab 4096: 3.50 bytes/token against 3.29 for one
    line per sentence). A line longer than max_bytes is cut into pieces of at most max_bytes // 4
    characters (4 bytes is the longest UTF-8 character), each cut placed before a space where there is
    one, so SentencePiece's `max_sentence_length` never silently drops text. Text is also cut at every
    literal "▁", which encoding routes through byte pieces.
    """
    max_chars = max(1, max_bytes // 4)
    for text in texts:
        for part in text.split(META):
            lines: list[str] = []
            size = 0
            for line in part.split("\n"):
                n = len(line.encode("utf-8")) + 1
                if n - 1 > max_bytes:
                    if lines:
                        yield "\n".join(lines)
                        lines, size = [], 0
                    yield from _cut_line(line, max_chars)
                    continue
                if lines and size + n > max_bytes:
                    yield "\n".join(lines)
                    lines, size = [], 0
                lines.append(line)
                size += n
            if lines and any(lines):
                yield "\n".join(lines)


def _cut_line(line: str, max_chars: int) -> Iterator[str]:
    start = 0
    while start < len(line):
        end = start + max_chars
        if end < len(line):
            space = line.rfind(" ", start + 1, end)
            if space > start:
                end = space
        yield line[start:end]
        start = end


def train_tokenizer(sentences: Iterable[str], model_path: str | os.PathLike, *, vocab_size: int,
                    model_type: str = "unigram", byte_fallback: bool = True, split_digits: bool = True,
                    character_coverage: float = 0.99995, seed: int = 0,
                    num_threads: int = TRAIN_THREADS) -> Path:
    """Train a lossless SentencePiece model on `sentences` (any texts; see `training_sentences`).

    Deterministic: the same texts, settings and num_threads give a byte-identical model file (the model
    is built in memory with `model_writer`, so no file path is recorded inside it). SentencePiece's
    random generator is seeded with `seed`, but with no sampling or shuffling of the input it does not
    change the result (measured); the seed that matters is the stage's, which picks the sample.
    """
    model_path = Path(model_path)
    writer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    options = trainer_options(vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
                              split_digits=split_digits, character_coverage=character_coverage,
                              num_threads=num_threads)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=training_sentences(sentences), model_writer=writer,
                                       **options)
    except RuntimeError as e:
        too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e))
        if too_high:
            raise PalmError(f"tokenizer.vocab_size={vocab_size} is more pieces than the sample supports "
                            f"(at most {too_high.group(2)}); raise tokenizer.sample_chars or lower "
                            "tokenizer.vocab_size") from None
        if "Vocabulary size is smaller than required_chars" in str(e):
            raise PalmError(f"tokenizer.vocab_size={vocab_size} cannot hold the special, byte and required "
                            f"character pieces ({e}); raise tokenizer.vocab_size") from None
        raise
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_name(f".{model_path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(writer.getvalue())
    os.replace(tmp, model_path)
    return model_path


# --------------------------------------------------------------------------------------- memory


def estimate_training_memory(sample_chars: int) -> int:
    """Bytes of peak memory to sample and train on `sample_chars` characters (conservative)."""
    return TRAIN_BYTES_PER_CHAR * int(sample_chars) + TRAIN_FIXED_BYTES


def available_memory() -> int:
    """Bytes this process can use: MemAvailable (or physical memory), capped by a cgroup limit."""
    avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:
                continue
            used = int(Path(usage_file).read_text().strip())
            avail = min(avail, max(0, int(limit) - used))
        except (OSError, ValueError):
            continue
    return avail


def check_fits_memory(sample_chars: int, available_bytes: int) -> None:
    """Raise PalmError before training if `sample_chars` would not fit in `available_bytes`."""
    need = estimate_training_memory(sample_chars)
    if need > available_bytes:
        fits = max(0, (available_bytes - TRAIN_FIXED_BYTES) // TRAIN_BYTES_PER_CHAR)
        raise PalmError(f"tokenizer.sample_chars={sample_chars} needs ~{need / 2**30:.1f} GiB to train but this "
                        f"machine has {available_bytes / 2**30:.1f} GiB; lower tokenizer.sample_chars "
                        f"(about {fits} fit)")


# ---------------------------------------------------------------------------------------- stage


def _shards(data_dir: str, split: str) -> list[str]:
    return storage.glob(storage.join(data_dir, f"{split}-*-of-*.jsonl.gz"))


def _documents(paths: Iterable[str]) -> Iterator[dict[str, str]]:
    """The documents of data-stage shards, local or gs://, streamed (a gs:// shard is not downloaded)."""
    for path in paths:
        with storage.open_read(path) as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def _priority(seed: int, doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\x1ftokenizer-sample\x1f{doc_id}".encode(),
                                          digest_size=8).digest(), "big")


class _Quota:
    """One source's documents with the smallest priorities whose characters fit its quota, streaming.

    Equivalent to sorting all of the source's documents by priority and taking the longest prefix that
    fits, in one pass and with memory bounded by the quota: kept documents sit in a max-heap; when they
    overflow, the largest priority is evicted and becomes the cut, and later documents at or above the
    cut are refused. The first document past the prefix (the smallest evicted) is remembered so its
    beginning can fill what is left of the quota.
    """

    def __init__(self, quota: int):
        self.quota, self.chars, self.heap = quota, 0, []
        self.cut: tuple[int, str, str] | None = None  # (priority, id, text) of the smallest evicted

    def offer(self, priority: int, doc_id: str, text: str) -> None:
        if self.cut is not None and priority >= self.cut[0]:  # 64-bit hashes: ties do not occur
            return
        heapq.heappush(self.heap, (-priority, doc_id, text))
        self.chars += len(text)
        while self.chars > self.quota:
            neg, evicted_id, evicted = heapq.heappop(self.heap)
            self.chars -= len(evicted)
            self.cut = (-neg, evicted_id, evicted)

    @property
    def full(self) -> bool:
        return self.cut is not None

    def sample(self) -> list[tuple[str, str]]:
        """(id, text) in priority order; the first document past the prefix truncated to fill the quota."""
        docs = [(-neg, doc_id, text) for neg, doc_id, text in self.heap]
        docs.sort()
        out = [(doc_id, text) for _, doc_id, text in docs]
        if self.cut is not None and self.quota > self.chars:
            out.append((self.cut[1], self.cut[2][: self.quota - self.chars]))
        return out


def _source_shares(manifest: dict[str, Any]) -> dict[str, float]:
    sources = manifest.get("sources") or {}
    shares = {name: float(info.get("share", info.get("weight", 0.0))) for name, info in sources.items()}
    total = sum(shares.values())
    if not shares or total <= 0:
        raise PalmError("the data stage's manifest lists no sources with a share; re-run the data stage")
    return {name: share / total for name, share in shares.items()}


def sample_documents(data_dir: str | os.PathLike, sample_chars: int, shares: dict[str, float], seed: int) \
        -> list[tuple[str, str, str]]:
    """A deterministic sample of up to `sample_chars` characters of the train split, (source, id, text).

    The data stage has already mixed the sources by weight and assigned each document to a shard by a
    hash of its id, so every train shard is a uniform random slice of the mixture. Each source gets a
    quota of characters in proportion to its share of the mixture; within a source, documents are taken
    in the order of a seeded hash of their id (a uniform random order) while they fit, and the next one
    is cut to fill the quota. Shards are read in a seeded order and reading stops as soon as every
    source's quota is filled, so a corpus far larger than the sample is not read to the end.
    """
    quotas = {name: _Quota(int(sample_chars * share)) for name, share in shares.items()}
    shards = _shards(str(data_dir), "train")
    shards.sort(key=lambda p: _priority(seed, storage.name(p)))
    for shard in shards:
        for doc in _documents([shard]):
            quota = quotas.get(doc["source"])
            if quota is not None:
                quota.offer(_priority(seed, doc["id"]), doc["id"], doc["text"])
        if all(q.full for q in quotas.values()):
            break
    return [(name, doc_id, text) for name, q in quotas.items() for doc_id, text in q.sample()]


def evaluate(tokenizer: Tokenizer, texts: Iterable[tuple[str, str]], batch: int = 256) -> dict[str, Any]:
    """bytes_per_token and an exact round-trip check over (id, text) documents."""
    docs = tokens = nbytes = 0
    mismatched: list[str] = []

    def run(chunk: list[tuple[str, str]]) -> None:
        nonlocal docs, tokens, nbytes
        encoded = tokenizer.encode_batch([t for _, t in chunk])
        for (doc_id, text), ids in zip(chunk, encoded):
            docs += 1
            tokens += len(ids)
            nbytes += len(text.encode("utf-8"))
            if tokenizer.decode(ids) != text:
                mismatched.append(doc_id)

    chunk: list[tuple[str, str]] = []
    for item in texts:
        chunk.append(item)
        if len(chunk) >= batch:
            run(chunk)
            chunk = []
    if chunk:
        run(chunk)
    return {"bytes_per_token": nbytes / tokens if tokens else None, "docs": docs, "tokens": tokens,
            "bytes": nbytes, "round_trip": {"docs_checked": docs, "all_exact": not mismatched,
                                            "mismatched": mismatched[:20]}}


def _capped(docs: Iterable[dict[str, str]], max_chars: int) -> Iterator[tuple[str, str]]:
    total = 0
    for doc in docs:
        if total >= max_chars:
            return
        total += len(doc["text"])
        yield doc["id"], doc["text"]


def build_tokenizer_stage(tok_spec: Any, data_dir: str | os.PathLike, out_dir: Path) -> dict[str, Any]:
    """The tokenizer stage: sample the data stage's train split, train, write tokenizer.model, evaluate.

    `tok_spec` is the spec's tokenizer section (read by attribute: vocab_size, model_type, byte_fallback,
    split_digits, character_coverage, sample_chars, seed; normalization must be "identity").
    Returns the manifest fields.
    """
    data_dir, out_dir = str(data_dir), Path(out_dir)
    if getattr(tok_spec, "normalization", "identity") != "identity":
        raise PalmError(f"tokenizer.normalization={tok_spec.normalization!r}: only 'identity' is lossless")
    try:
        data_manifest = json.loads(storage.read_text(storage.join(data_dir, "manifest.json")))
    except (OSError, ValueError):
        raise PalmError(f"{data_dir} is not a complete data stage output (no readable manifest.json); "
                        "run the data stage first") from None
    shares = _source_shares(data_manifest)

    # Memory first: the sample is at most sample_chars, and at most the corpus (bytes >= characters).
    corpus_bytes = sum(int(s.get("bytes_kept", 0)) for s in data_manifest["sources"].values())
    sample_bound = min(int(tok_spec.sample_chars), corpus_bytes) if corpus_bytes else int(tok_spec.sample_chars)
    check_fits_memory(sample_bound, available_memory())

    started = time.time()
    sample = sample_documents(data_dir, int(tok_spec.sample_chars), shares, int(tok_spec.seed))
    if not sample:
        raise PalmError(f"the data stage's train split ({data_dir}) has no documents to train a tokenizer on")
    sample_docs = len(sample)
    chars_per_source = {name: 0 for name in shares}
    for source, _, text in sample:
        chars_per_source[source] += len(text)
    sampled = time.time()

    model_path = train_tokenizer(
        (text for _, _, text in sample), out_dir / "tokenizer.model", vocab_size=int(tok_spec.vocab_size),
        model_type=str(tok_spec.model_type), byte_fallback=bool(tok_spec.byte_fallback),
        split_digits=bool(tok_spec.split_digits), character_coverage=float(tok_spec.character_coverage),
        seed=int(tok_spec.seed))
    trained = time.time()
    del sample

    tokenizer = Tokenizer(model_path)
    split = "validation" if any(True for _ in _documents(_shards(data_dir, "validation"))) else "train"
    report = evaluate(tokenizer, _capped(_documents(_shards(data_dir, split)), EVAL_MAX_CHARS))
    if tokenizer.has_byte_fallback and not report["round_trip"]["all_exact"]:
        raise RuntimeError(f"the trained tokenizer is not lossless on {split} documents "
                           f"{report['round_trip']['mismatched']}: decode(encode(text)) != text")
    model_bytes = model_path.read_bytes()
    return {
        "model_file": model_path.name,
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "vocab_size": tokenizer.vocab_size,
        "model_type": str(tok_spec.model_type),
        "special_ids": {"pad": tokenizer.pad_id, "eos": tokenizer.eos_id, "bos": tokenizer.bos_id,
                        "unk": tokenizer.unk_id},
        "sample_chars": sum(chars_per_source.values()),
        "sample_docs": sample_docs,
        "chars_per_source": chars_per_source,
        "memory_estimate_bytes": estimate_training_memory(sample_bound),
        "train_threads": TRAIN_THREADS,
        "eval_split": split,
        "eval_docs": report["docs"],
        "eval_tokens": report["tokens"],
        "eval_bytes": report["bytes"],
        "bytes_per_token": report["bytes_per_token"],
        "round_trip": report["round_trip"],
        "seconds_sample": sampled - started,
        "seconds_train": trained - sampled,
        "seconds_eval": time.time() - trained,
    }


__all__ = [
    "Tokenizer", "train_tokenizer", "trainer_options", "training_sentences", "estimate_training_memory",
    "available_memory", "check_fits_memory", "sample_documents", "evaluate", "build_tokenizer_stage",
    "PAD_ID", "EOS_ID", "BOS_ID", "UNK_ID", "META", "MAX_SENTENCE_BYTES", "TRAIN_THREADS",
]
