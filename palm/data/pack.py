"""The pack stage (Beam): documents -> token ids + end-of-document -> fixed-length sequences, no padding.

Per split and source, documents are spread over shards by a hash of their id; within a shard they are
taken in id order, each followed by the end-of-document token, concatenated, and cut into sequences
of `seq_len` tokens. The last, partial sequence of each shard is dropped and counted (at most
seq_len - 1 tokens per shard). Sequences are stored as ArrayRecord files (random access, one record per
sequence: `seq_len` little-endian int32), which the Grain loader reads.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np

from palm.data.pipeline import LOCAL_RUNNERS, pipeline_options, stable_unit
from palm.errors import PalmError
from palm.spec import DataSpec

TOKEN_DTYPE = np.dtype("<i4")


def read_documents(path: str):
    """(split, source, id, text) for each document of one data-stage shard."""
    split = Path(path).name.split("-", 1)[0]
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            yield split, doc["source"], doc["id"], doc["text"]


class Tokenize(beam.DoFn):
    """Token ids of each document, keyed by (split, source, shard)."""

    def __init__(self, model_bytes: bytes, num_shards: dict[str, int]):
        self.model_bytes, self.num_shards = model_bytes, num_shards

    def setup(self):
        from palm.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(self.model_bytes)

    def process(self, doc):
        split, source, doc_id, text = doc
        shard = int(stable_unit("pack-shard", doc_id) * self.num_shards[split])
        yield (split, source, shard), (doc_id, np.asarray(self.tokenizer.encode(text), TOKEN_DTYPE))


def pack_sequences(docs: list[tuple[str, np.ndarray]], eos_id: int, seq_len: int) -> tuple[np.ndarray, int]:
    """Concatenate documents (in the given order), each followed by eos, and cut into [n, seq_len]."""
    pieces = []
    for _, ids in docs:
        pieces.append(ids)
        pieces.append(np.array([eos_id], TOKEN_DTYPE))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, TOKEN_DTYPE)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len), len(stream) - n * seq_len


class WriteSequences(beam.DoFn):
    """Write one (split, source, shard) group as an ArrayRecord file; emit its counts."""

    def __init__(self, out_dir: str, eos_id: int, seq_len: int, num_shards: dict[str, int]):
        self.out_dir, self.eos_id, self.seq_len, self.num_shards = out_dir, eos_id, seq_len, num_shards

    def process(self, group):
        from array_record.python.array_record_module import ArrayRecordWriter

        (split, source, shard), docs = group
        docs = sorted(docs, key=lambda d: d[0])
        sequences, dropped = pack_sequences(docs, self.eos_id, self.seq_len)
        path = Path(self.out_dir) / split / f"{source}-{shard:05d}-of-{self.num_shards[split]:05d}.array_record"
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = ArrayRecordWriter(str(path), "group_size:1")
        for row in sequences:
            writer.write(row.astype(TOKEN_DTYPE).tobytes())
        writer.close()
        tokens = int(sum(len(ids) + 1 for _, ids in docs))
        yield (split, source), {"docs": len(docs), "tokens": tokens, "sequences": int(len(sequences)),
                                "tokens_dropped": int(dropped), "files": [str(path.relative_to(self.out_dir))]}


def _merge(counts: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"docs": 0, "tokens": 0, "sequences": 0, "tokens_dropped": 0, "files": []}
    for c in counts:
        for k in ("docs", "tokens", "sequences", "tokens_dropped"):
            out[k] += c[k]
        out["files"] += c["files"]
    out["files"].sort()
    return out


def run_pack_stage(data_spec: DataSpec, num_shards: int, seq_len: int, data_dir: Path, tokenizer_dir: Path,
                   out_dir: Path) -> dict[str, Any]:
    """Tokenize and pack the data stage's shards with the tokenizer stage's model; manifest fields."""
    from palm.tokenizer import Tokenizer

    model_bytes = (Path(tokenizer_dir) / "tokenizer.model").read_bytes()
    tokenizer = Tokenizer(model_bytes)
    shards = sorted(str(p) for p in Path(data_dir).glob("*.jsonl.gz"))
    if not shards:
        raise PalmError(f"the data stage output {data_dir} holds no shards; re-run the data stage")
    per_split = {"train": num_shards, "validation": max(1, num_shards // 8)}
    if data_spec.beam.runner not in LOCAL_RUNNERS:
        raise PalmError("the pack stage writes ArrayRecord files to local disk; cluster runners need the "
                        "gs:// storage of issue #9")
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    with beam.Pipeline(runner=FnApiRunner(), options=pipeline_options(data_spec)) as p:
        (p | "Shards" >> beam.Create(shards)
           | "Read" >> beam.FlatMap(read_documents)
           | "Spread" >> beam.Reshuffle()
           | "Tokenize" >> beam.ParDo(Tokenize(model_bytes, per_split))
           | "GroupByShard" >> beam.GroupByKey()
           | "Pack" >> beam.ParDo(WriteSequences(str(out_dir), tokenizer.eos_id, seq_len, per_split))
           | "BySource" >> beam.GroupByKey()
           | "Merge" >> beam.MapTuple(lambda key, counts: (key, _merge(list(counts))))
           | "Collect" >> beam.combiners.ToList()
           | "WriteCounts" >> beam.Map(_write_counts, str(out_dir)))

    counts = json.loads((Path(out_dir) / "counts.json").read_text())
    splits: dict[str, dict[str, Any]] = {"train": {}, "validation": {}}
    for (split, source), c in counts:
        splits[split][source] = c
    return {
        "seq_len": seq_len,
        "eos_id": tokenizer.eos_id,
        "vocab_size": tokenizer.vocab_size,
        "token_dtype": TOKEN_DTYPE.str,
        "splits": {split: dict(sorted(by_source.items())) for split, by_source in splits.items()},
        "sequences": {split: sum(c["sequences"] for c in by_source.values()) for split, by_source in splits.items()},
        "tokens": {split: sum(c["tokens"] for c in by_source.values()) for split, by_source in splits.items()},
    }


def _write_counts(counts, out_dir: str) -> None:
    Path(out_dir, "counts.json").write_text(json.dumps([[list(k), v] for k, v in sorted(counts)]))
