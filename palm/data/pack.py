"""The pack stage (Beam): documents -> token ids + end-of-document -> fixed-length sequences, no padding.

Per split and source, documents are spread over shards by a hash of their id; within a shard they are
taken in id order, each followed by the end-of-document token, concatenated, and cut into sequences
of `seq_len` tokens. The last, partial sequence of each shard is dropped and counted (at most
seq_len - 1 tokens per shard).

Each shard is one file of fixed-size rows (`<split>/<source>-<shard>-of-<n>.tokens`: n × seq_len
little-endian int32, nothing else), and the manifest lists every file with its row count. Row i of a
file is bytes [i·row, (i+1)·row): a training host reads exactly its rows, locally or with one ranged
read each from gs://, and opens no index (ArrayRecord, used before, makes every reader fetch each
file's footer index first, about 1 MiB per file per host, and its gs:// reader cannot bound a read).

The stage runs on the spec's Beam runner (`data.beam.runner`): on a cluster runner its workers read
the data stage's shards from gs:// and write the rows there themselves, manifest fields last, so
nothing passes through the machine that submits it.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any

import apache_beam as beam
import numpy as np

from palm.base import storage
from palm.base.errors import PalmError
from palm.data.beam import run_beam, stable_unit
from palm.spec.schema import LOCAL_RUNNERS
from palm.spec.schema import DataSpec
from palm.tokenizer import Tokenizer

TOKEN_DTYPE = np.dtype("<i4")
SUFFIX = ".tokens"
COUNTS = "counts.json"


def read_documents(path: str):
    """(split, source, id, text) for each document of one data-stage shard (local or gs://, streamed)."""
    split = storage.name(path).split("-", 1)[0]
    with storage.open_read(path) as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            yield split, doc["source"], doc["id"], doc["text"]


class Tokenize(beam.DoFn):
    """Token ids of each document, keyed by (split, source, shard)."""

    def __init__(self, model_bytes: bytes, num_shards: dict[str, int]):
        self.model_bytes, self.num_shards = model_bytes, num_shards

    def setup(self):
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


def shard_file(split: str, source: str, shard: int, num_shards: int) -> str:
    """A shard's file, relative to the pack stage's directory."""
    return f"{split}/{source}-{shard:05d}-of-{num_shards:05d}{SUFFIX}"


class WriteSequences(beam.DoFn):
    """Write one (split, source, shard) group as a file of rows (one write, whole or not at all)."""

    def __init__(self, out_dir: str, eos_id: int, seq_len: int, num_shards: dict[str, int]):
        self.out_dir, self.eos_id, self.seq_len, self.num_shards = out_dir, eos_id, seq_len, num_shards

    def process(self, group):
        (split, source, shard), docs = group
        docs = sorted(docs, key=lambda d: d[0])
        sequences, dropped = pack_sequences(docs, self.eos_id, self.seq_len)
        rel = shard_file(split, source, shard, self.num_shards[split])
        storage.write_bytes_atomic(storage.join(self.out_dir, rel), np.ascontiguousarray(sequences, TOKEN_DTYPE).tobytes())
        tokens = int(sum(len(ids) + 1 for _, ids in docs))
        yield (split, source), {"docs": len(docs), "tokens": tokens, "sequences": int(len(sequences)),
                                "tokens_dropped": int(dropped),
                                "files": [{"path": rel, "sequences": int(len(sequences))}]}


def _merge(counts: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"docs": 0, "tokens": 0, "sequences": 0, "tokens_dropped": 0, "files": []}
    for c in counts:
        for k in ("docs", "tokens", "sequences", "tokens_dropped"):
            out[k] += c[k]
        out["files"] += c["files"]
    out["files"].sort(key=lambda f: f["path"])
    return out


def run_pack_stage(data_spec: DataSpec, num_shards: int, seq_len: int, data_dir: str | os.PathLike,
                   tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   worker_image: str | None = None, placement: dict[str, str] | None = None) -> dict[str, Any]:
    """Tokenize and pack the data stage's shards with the tokenizer stage's model; manifest fields.

    Every directory may be local or gs://; on a cluster runner all three must be gs://, and its workers
    run `worker_image` (the spec's infra.launcher.image) as for the data stage."""
    data_dir, out_dir = str(data_dir), str(out_dir)
    if data_spec.beam.runner not in LOCAL_RUNNERS:
        local = [str(d) for d in (data_dir, tokenizer_dir, out_dir) if not storage.is_remote(d)]
        if local:
            raise PalmError(f"data.beam.runner={data_spec.beam.runner!r} runs the pack stage on remote workers, "
                            f"which cannot read or write the local path {local[0]}; set infra.storage_root to "
                            "a gs:// bucket")
    model_bytes = storage.read_bytes(storage.join(tokenizer_dir, "tokenizer.model"))
    tokenizer = Tokenizer(model_bytes)
    shards = storage.glob(storage.join(data_dir, "*.jsonl.gz"))
    if not shards:
        raise PalmError(f"the data stage output {data_dir} holds no shards; re-run the data stage")
    per_split = {"train": num_shards, "validation": max(1, num_shards // 8)}

    def build(p: beam.Pipeline) -> None:
        (p | "Shards" >> beam.Create(shards)
           | "SpreadShards" >> beam.Reshuffle()
           | "Read" >> beam.FlatMap(read_documents)
           | "Spread" >> beam.Reshuffle()
           | "Tokenize" >> beam.ParDo(Tokenize(model_bytes, per_split))
           | "GroupByShard" >> beam.GroupByKey()
           | "Pack" >> beam.ParDo(WriteSequences(out_dir, tokenizer.eos_id, seq_len, per_split))
           | "BySource" >> beam.GroupByKey()
           | "Merge" >> beam.MapTuple(lambda key, counts: (key, _merge(list(counts))))
           | "Collect" >> beam.combiners.ToList()
           | "WriteCounts" >> beam.Map(_write_counts, out_dir))

    run_beam(data_spec, build, job_name="palm-pack", worker_image=worker_image, placement=placement)
    counts = json.loads(storage.read_text(storage.join(out_dir, COUNTS)))
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
    storage.write_text_atomic(storage.join(out_dir, COUNTS), json.dumps([[list(k), v] for k, v in sorted(counts)]))
