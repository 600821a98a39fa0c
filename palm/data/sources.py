"""Reading the data sources: their files, the raw records of each file and their ids, and each record's text.

A source's patterns are listed in pattern order, each one's files sorted by path (`match_files`); a
file's records get ids "<source>/<file key>/<record index>" (a builtin corpus names its own), at most
the source's `max_docs` per file (`source_records`). That one reader serves the data stage (the Beam
transform `ReadSources`, which also caps each source at `max_docs` overall) and the quality classifier's
sample (palm.data.quality), as do `decode_record` and `normalize`, so both see the same documents.
Raw records are (doc_id, source, bytes, format) elements; decoded documents (doc_id, source, text).

A compressed file (by its suffix, as Beam's CompressionTypes.AUTO detects it: .gz, .zst/.zstd, .bz2,
.xz/.lzma, .deflate) is read to the end-of-stream marker of its last member or frame, its checksums
verified (`decompress`); a truncated or corrupt one is a `DamagedSource` naming the file, never the
records before the damage.
"""

from __future__ import annotations

import bz2
import heapq
import io
import json
import lzma
import re
import unicodedata
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import apache_beam as beam
import pyarrow.parquet as pq
import zstandard
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from palm.base import storage
from palm.base.errors import EnvironmentFault, PalmError
from palm.data import builtin
from palm.data.beam import DROPPED, FAIL
from palm.spec.schema import DataSpec, Source


#: Formats whose records are JSON lines.
JSON_LINES = ("jsonl", "jsonl.gz", "jsonl.zst")


class DamagedSource(PalmError):
    """A source file that cannot be read to its end (truncated, corrupt): bad input, exit 2, no retry."""


def _decompressor(ctype: str):
    if ctype == CompressionTypes.GZIP:
        return zlib.decompressobj(16 + zlib.MAX_WBITS)  # verifies each member's CRC-32 and length
    if ctype == CompressionTypes.DEFLATE:
        return zlib.decompressobj(zlib.MAX_WBITS)
    if ctype == CompressionTypes.BZIP2:
        return bz2.BZ2Decompressor()
    if ctype == CompressionTypes.LZMA:
        return lzma.LZMADecompressor()
    if ctype == CompressionTypes.ZSTD:
        return zstandard.ZstdDecompressor().decompressobj()  # verifies a frame's checksum where it has one
    raise ValueError(f"unknown compression {ctype}")


def decompress(path: str, data: bytes) -> bytes:
    """The content of a file's bytes `data`, by its suffix (uncompressed: `data` itself): every member
    (gzip) or frame (zstd) read to its end-of-stream marker; trailing NUL padding is allowed. Anything
    else (a truncated tail, a bad checksum, bytes that are not the format) is a DamagedSource naming the
    file: the records before the damage are never returned as if they were the whole file."""
    ctype = CompressionTypes.detect_compression_type(path)
    if ctype == CompressionTypes.UNCOMPRESSED:
        return data
    kind = ctype  # "gzip", "zstd", ...
    parts, done = [], 0
    while True:
        d = _decompressor(ctype)
        try:
            parts.append(d.decompress(data))
        except (zlib.error, OSError, EOFError, ValueError, lzma.LZMAError, zstandard.ZstdError) as e:
            raise DamagedSource(f"{path}: not a valid {kind} file at byte {done:,} ({e}); replace it with an "
                                "intact copy or remove it from the source's paths") from None
        if not d.eof:
            raise DamagedSource(f"{path}: truncated: its {kind} stream ends before the end-of-stream marker "
                                f"(read {done + len(data):,} bytes); replace it with an intact copy or remove it "
                                "from the source's paths")
        done += len(data) - len(d.unused_data)
        data = d.unused_data
        if not data.strip(b"\0"):
            return b"".join(parts)


def source_patterns(spec: DataSpec) -> list[tuple[str, int, str]]:
    """(source name, pattern index, pattern) of every source path (builtin corpora by name).

    Each pattern must match a file: that is checked here, with one listing call of at most one result
    per pattern, so a typo fails before any worker starts; the files themselves are listed by the
    workers (`match_pattern`), never on the submitting machine.
    """
    out = []
    for i, src in enumerate(spec.sources):
        for p, pattern in enumerate(src.paths):
            if src.format == "builtin":
                if pattern not in builtin.CORPORA:
                    raise PalmError(f"data.sources.{i}.paths: unknown builtin corpus {pattern!r}; "
                                    f"choose from {', '.join(sorted(builtin.CORPORA))}")
            elif not storage.is_remote(pattern) and Path(pattern).is_dir():
                raise EnvironmentFault(f"data.sources.{i}.paths: {pattern} is a directory, where a file was expected "
                                       f"(EISDIR); name its files with a glob, such as {pattern.rstrip('/')}/*."
                                       f"{src.format}", path=pattern)
            elif not any(r.metadata_list for r in FileSystems.match([pattern], limits=[1])):
                raise PalmError(f"data.sources.{i}.paths: no file matches {pattern!r} (source {src.name!r})")
            out.append((src.name, p, pattern))
    return out


def file_key(pattern_index: int, file_index: int) -> str:
    """A file's part of its documents' ids: its index among its pattern's matches, sorted by path
    ("00003"), prefixed by the pattern's index after the first ("1.00003")."""
    return f"{file_index:05d}" if pattern_index == 0 else f"{pattern_index}.{file_index:05d}"


def match_files(fmt: str, pattern_index: int, pattern: str) -> list[tuple[str, str]]:
    """(file key, path) of each file a source pattern matches, sorted by path; a builtin corpus is one
    "file", keyed by its pattern's index."""
    if fmt == "builtin":
        return [(str(pattern_index), pattern)]
    matched = sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
    return [(file_key(pattern_index, i), path) for i, path in enumerate(matched)]


def source_files(src: Source) -> list[tuple[str, str]]:
    """(file key, path) of every file of a source, listed here: its patterns in order, each one's files
    sorted by path."""
    return [file for p, pattern in enumerate(src.paths) for file in match_files(src.format, p, pattern)]


def match_pattern(element: tuple[str, int, str], formats: dict[str, str]) -> Iterator[tuple[str, str, str]]:
    """(source, file key, path) of each file a source pattern matches, listed on a worker."""
    source, p, pattern = element
    files = match_files(formats[source], p, pattern)
    if not files:  # it matched when the job was submitted
        raise ValueError(f"{FAIL}no file matches {pattern!r} (source {source!r}) any more")
    for key, path in files:
        yield source, key, path


def source_records(src: Source, key: str, path: str) -> Iterator[tuple[str, bytes]]:
    """(doc id, raw bytes) of the records of one file of `src`, in file order, ids
    "<source>/<file key>/<record index>" (a builtin corpus's "<source>/<its own id>"); at most the
    source's `max_docs`. The one reader of source records: the data stage's and the quality classifier's."""
    if src.format == "builtin":
        records: Iterable[tuple[str, bytes]] = ((f"{src.name}/{doc_id}", raw)
                                                for doc_id, raw in builtin.builtin_records(path))
    else:
        records = ((f"{src.name}/{key}/{i:08d}", raw) for i, raw in enumerate(_file_records(src, path)))
    for count, (doc_id, raw) in enumerate(records):
        if src.max_docs is not None and count >= src.max_docs:
            return
        yield doc_id, raw


def read_file(element: tuple[str, str, str], sources: dict[str, Source]) -> Iterator[tuple[str, str, bytes, str]]:
    """Raw records (doc id, source, bytes, format) of one file (`source_records`); at most the source's
    `max_docs` (the source-wide limit is applied after, `SmallestIds`)."""
    name, key, path = element
    src = sources[name]
    try:
        for doc_id, raw in source_records(src, key, path):
            yield doc_id, name, raw, src.format
    except DamagedSource as e:  # one line, no retry: run_beam raises it as the user's error
        raise ValueError(f"{FAIL}{e}") from None


class SmallestIds(beam.CombineFn):
    """Per source: its `max_docs` records with the smallest ids (the first ones of its first files)."""

    def __init__(self, limits: dict[str, int]):
        self.limits = limits

    def create_accumulator(self):
        return []

    def add_input(self, acc, record):
        acc.append(record)
        return self._prune(acc) if len(acc) > 2 * self.limits[record[1]] else acc

    def merge_accumulators(self, accs):
        merged = [r for acc in accs for r in acc]
        return self._prune(merged) if merged else merged

    def _prune(self, acc):
        return heapq.nsmallest(self.limits[acc[0][1]], acc, key=lambda r: r[0])

    def extract_output(self, acc):
        return self._prune(acc) if acc else acc


class ReadSources(beam.PTransform):
    """Every source's raw records: patterns listed by workers, files spread over workers (one element
    per file, after a reshuffle), each file read by one worker; `max_docs` applied per source."""

    def __init__(self, spec: DataSpec):
        super().__init__()
        self.spec = spec

    def expand(self, p):
        sources = {s.name: s for s in self.spec.sources}
        records = (p | "Patterns" >> beam.Create(source_patterns(self.spec))
                   | "MatchFiles" >> beam.FlatMap(match_pattern, {s.name: s.format for s in self.spec.sources})
                   | "SpreadFiles" >> beam.Reshuffle()
                   | "ReadFiles" >> beam.FlatMap(read_file, sources))
        limits = {s.name: s.max_docs for s in self.spec.sources if s.max_docs is not None}
        if not limits:
            return records
        limited, free = records | "ByLimit" >> beam.Partition(lambda r, n: 0 if r[1] in limits else 1, 2)
        capped = (limited | "BySource" >> beam.Map(lambda r: (r[1], r))
                  | "FirstDocs" >> beam.CombinePerKey(SmallestIds(limits))
                  | "Unpack" >> beam.FlatMap(lambda kv: kv[1]))
        return (capped, free) | "AllRecords" >> beam.Flatten()


def _file_records(src: Source, path: str) -> Iterator[bytes]:
    """The raw records of one file, by its source's format (a parquet row's text field as a JSON object)."""
    if src.format == "parquet":
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            table = pq.read_table(io.BytesIO(f.read()), columns=[src.text_field])
        for value in table.column(src.text_field).to_pylist():
            yield json.dumps({src.text_field: value}).encode()
        return
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        data = decompress(path, f.read())
    if src.format in JSON_LINES:
        for line in data.splitlines():
            if line.strip():
                yield line
    elif src.split_pattern is None:
        yield data
    else:
        starts = [m.start() for m in re.finditer(src.split_pattern.encode(), data, re.MULTILINE)]
        bounds = sorted({0, *starts, len(data)})
        for a, b in zip(bounds, bounds[1:]):
            if data[a:b].strip():
                yield data[a:b]


def decode_record(raw: bytes, fmt: str, text_field: str, policy: str) -> tuple[str | None, str | None, bool]:
    """(text, drop reason, repaired) of one raw record: invalid UTF-8 repaired (U+FFFD) or, under policy
    "drop", the record dropped as "invalid_utf8"; JSON records parsed for `text_field` ("malformed_record"
    when that fails or is not a string). The data stage and the quality classifier's sample share it."""
    repaired = False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        if policy == "drop":
            return None, "invalid_utf8", False
        text, repaired = raw.decode("utf-8", errors="replace"), True
    if fmt in (*JSON_LINES, "parquet"):
        try:
            value = json.loads(text)[text_field]
        except (ValueError, KeyError, TypeError):
            return None, "malformed_record", repaired
        if not isinstance(value, str):
            return None, "malformed_record", repaired
        text = value
    return text, None, repaired


class Decode(beam.DoFn):
    """Bytes to text (`decode_record`), drops and repairs counted."""

    def __init__(self, spec: DataSpec):
        self.policy = spec.invalid_utf8
        self.text_fields = {s.name: s.text_field for s in spec.sources}
        self.repaired = Metrics.counter("palm.data", "repaired_utf8")

    def process(self, record):
        doc_id, source, raw, fmt = record
        text, reason, repaired = decode_record(raw, fmt, self.text_fields[source], self.policy)
        if repaired:
            self.repaired.inc()
            yield beam.pvalue.TaggedOutput("repaired", source)
        if reason is not None:
            yield beam.pvalue.TaggedOutput(DROPPED, (source, reason))
            return
        yield doc_id, source, text


def normalize(doc, form: str):
    """Lossless by default ("none" keeps every character and whitespace run)."""
    if form == "none":
        return doc
    doc_id, source, text = doc
    return doc_id, source, unicodedata.normalize(form.upper(), text)
