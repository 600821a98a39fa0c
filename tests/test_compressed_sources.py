"""Compressed data sources are read to their end-of-stream marker or refused, naming the file (issue 27.1).

A truncated `jsonl.gz` used to yield the lines before the damage, exit 0; the data stage now stops with
one line. `jsonl.zst` (Dolma's and RedPajama's format) is read with the same guarantee."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from palm.base.errors import PalmError
from palm.data.pipeline import run_data_stage
from palm.data.sources import DamagedSource, decompress
from palm.spec.schema import DataSpec
from palm.store.outputs import run_stage

WORDS = "the weather report said that rivers would overflow their banks before morning arrived near the town"


def _lines(n: int, start: int = 0) -> bytes:
    return "".join(json.dumps({"text": f"{WORDS} {i}"}) + "\n" for i in range(start, start + n)).encode()


def _spec(fmt: str, pattern: str) -> DataSpec:
    return DataSpec.model_validate({
        "sources": [{"name": "docs", "format": fmt, "paths": [pattern], "weight": 1.0,
                     "filters": {"min_words": 1, "min_stop_words": None}}],
        "validation_fraction": 0.0, "num_shards": 1, "dedup": {"exact": True, "near": {"enabled": False}}})


def _beam_auto(path: Path) -> bytes:
    with FileSystems.open(str(path), compression_type=CompressionTypes.AUTO) as f:
        return f.read()


def test_intact_files_read_exactly_as_beams_reader(tmp_path):
    """Multi-member gzip and multi-frame zstd (as shards are often concatenated) read whole, as before."""
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(_lines(50)) + gzip.compress(_lines(50, 50)))
    zst = tmp_path / "a.jsonl.zst"
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    zst.write_bytes(cctx.compress(_lines(50)) + cctx.compress(_lines(50, 50)))
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(_lines(100))
    for path in (gz, zst, plain):
        assert decompress(str(path), path.read_bytes()) == _beam_auto(path) == _lines(100)


@pytest.mark.parametrize("suffix", ["gz", "zst"])
def test_a_truncated_file_is_refused_naming_it(tmp_path, suffix):
    data = _lines(100)
    packed = gzip.compress(data) if suffix == "gz" else zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"docs.jsonl.{suffix}"
    path.write_bytes(packed[: len(packed) // 2])
    if suffix == "gz":  # what the issue found: Beam's reader returns the lines before the damage, silently
        assert 0 < _beam_auto(path).count(b"\n") < 100
    with pytest.raises(DamagedSource, match=rf"^{path}: truncated: its {'gzip' if suffix == 'gz' else 'zstd'} "
                                            r"stream ends before the end-of-stream marker"):
        decompress(str(path), path.read_bytes())


def test_a_corrupt_checksum_or_foreign_bytes_are_refused(tmp_path):
    packed = bytearray(gzip.compress(_lines(20)))
    packed[-6] ^= 0xFF  # the CRC-32 in the trailer
    with pytest.raises(DamagedSource, match=r"x.jsonl.gz: not a valid gzip file at byte 0 \(.*incorrect data check"):
        decompress("/d/x.jsonl.gz", bytes(packed))
    with pytest.raises(DamagedSource, match=r"x.jsonl.zst: not a valid zstd file"):
        decompress("/d/x.jsonl.zst", b"this is not zstd at all")
    # a good member followed by garbage is damage too, not a shorter file
    with pytest.raises(DamagedSource, match=r"x.jsonl.gz: not a valid gzip file at byte [\d,]+"):
        decompress("/d/x.jsonl.gz", gzip.compress(_lines(5)) + b"garbage")


def test_jsonl_zst_source_reads_the_same_documents_as_jsonl_gz(tmp_path):
    (tmp_path / "gz").mkdir()
    (tmp_path / "zst").mkdir()
    (tmp_path / "gz" / "a.jsonl.gz").write_bytes(gzip.compress(_lines(30)))
    (tmp_path / "zst" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_lines(30)))
    manifests = {}
    for fmt in ("jsonl.gz", "jsonl.zst"):
        out = tmp_path / f"out-{fmt}"
        out.mkdir()
        manifests[fmt] = run_data_stage(_spec(fmt, str(tmp_path / fmt.split(".")[1] / "*")), out)
        assert manifests[fmt]["sources"]["docs"]["docs_in"] == 30
    assert manifests["jsonl.gz"]["sources"] == manifests["jsonl.zst"]["sources"]


def test_data_stage_with_a_truncated_source_stops_in_one_line_and_writes_nothing(tmp_path):
    for i in range(3):
        (tmp_path / f"part-{i}.jsonl.gz").write_bytes(gzip.compress(_lines(40, 40 * i)))
    bad = tmp_path / "part-1.jsonl.gz"
    bad.write_bytes(bad.read_bytes()[:-200])
    spec = _spec("jsonl.gz", str(tmp_path / "part-*.jsonl.gz"))
    root = tmp_path / "runs"
    with pytest.raises(PalmError) as info:
        run_stage("data", spec.model_dump(), {}, root, lambda out: run_data_stage(spec, out))
    message = str(info.value)
    assert message.startswith(f"{bad}: truncated: its gzip stream ends before the end-of-stream marker")
    assert "\n" not in message
    assert list((root / "data").iterdir()) == []
