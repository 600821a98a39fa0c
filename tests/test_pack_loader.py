"""The pack stage (Beam -> files of rows) and the Grain training input over its shards."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from palm.base import storage
from palm.data.loader import SequenceIterator, sequence_dataset
from palm.data.pack import TOKEN_DTYPE, pack_sequences
from palm.base.errors import PalmError
from palm.data.beam import stable_unit
from palm.tokenizer import Tokenizer
from tests.conftest import SPECS, copy_of


def test_pack_sequences_cuts_without_padding():
    docs = [("a", np.array([5, 6, 7], TOKEN_DTYPE)), ("b", np.array([8, 9], TOKEN_DTYPE))]
    seqs, dropped = pack_sequences(docs, eos_id=1, seq_len=3)
    assert seqs.tolist() == [[5, 6, 7], [1, 8, 9]]
    assert dropped == 1  # the final eos waits for a sequence that never fills


@pytest.fixture(scope="module")
def run(tiny_upstream, tmp_path_factory):
    root = copy_of(tiny_upstream, tmp_path_factory.mktemp("run") / "root")
    stage = {s: next((root / s).glob("*/manifest.json")).parent for s in ("data", "tokenizer", "pack")}
    manifest = json.loads((stage["pack"] / "manifest.json").read_text())
    return stage, manifest


def read_sequences(path: Path, seq_len: int) -> np.ndarray:
    return np.fromfile(path, TOKEN_DTYPE).reshape(-1, seq_len)


@pytest.mark.slow
def test_packed_shards_decode_back_to_the_documents_in_order(run):
    stage, manifest = run
    tok = Tokenizer((stage["tokenizer"] / "tokenizer.model").read_bytes())
    docs: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for shard in sorted(stage["data"].glob("*.jsonl.gz")):
        split = shard.name.split("-", 1)[0]
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                docs.setdefault((split, d["source"]), []).append((d["id"], d["text"]))
    checked = 0
    num = {"train": 2, "validation": 1}
    for split, by_source in manifest["splits"].items():
        for source, counts in by_source.items():
            for entry in counts["files"]:
                rel = entry["path"]
                assert len(read_sequences(stage["pack"] / rel, manifest["seq_len"])) == entry["sequences"]
                shard = int(Path(rel).stem.rsplit("-of-", 1)[0].rsplit("-", 1)[1])
                expected = sorted(d for d in docs[(split, source)]
                                  if int(stable_unit("pack-shard", d[0]) * num[split]) == shard)
                stream = read_sequences(stage["pack"] / rel, manifest["seq_len"]).reshape(-1)
                cut = np.flatnonzero(stream == manifest["eos_id"])
                pieces = np.split(stream, cut + 1)
                complete = pieces[:len(cut)]  # each ends with eos; what follows the last eos was cut off
                assert len(complete) <= len(expected)
                for (doc_id, text), ids in zip(expected, complete):
                    assert ids[-1] == manifest["eos_id"]
                    assert tok.decode(ids[:-1].tolist()) == text, doc_id
                    checked += 1
    assert checked > 50


@pytest.mark.slow
def test_manifest_counts_tokens_and_sequences_per_source(run):
    _, manifest = run
    train = manifest["splits"]["train"]
    assert set(train) == {"stdlib-docs", "stdlib-code", "planted"}
    for source, c in train.items():
        assert c["sequences"] == (c["tokens"] - c["tokens_dropped"]) // manifest["seq_len"], source
        assert c["tokens_dropped"] < manifest["seq_len"] * 2  # at most one partial sequence per shard
    assert manifest["sequences"]["train"] > 100 and manifest["sequences"]["validation"] > 0


@pytest.mark.slow
def test_loader_is_one_epoch_deterministic_and_resumes_exactly(run):
    stage, manifest = run
    ds = sequence_dataset(stage["pack"], manifest, "train", seed=7)
    assert len(ds) == manifest["sequences"]["train"]  # the exact epoch
    epoch = [tuple(x) for x in SequenceIterator(ds)]
    # Every stored row exactly once: the epoch is a permutation of the rows as the files hold them (compared
    # as multisets of contents; two rows may hold the same tokens, e.g. two files that start alike).
    from palm.data.loader import PackedRows, split_files

    rows = PackedRows(stage["pack"], split_files(manifest, "train"), manifest["seq_len"])
    assert sorted(epoch) == sorted(tuple(rows[i]) for i in range(len(rows)))
    again = [tuple(x) for x in SequenceIterator(sequence_dataset(stage["pack"], manifest, "train", seed=7))]
    assert epoch == again
    other = [tuple(x) for x in SequenceIterator(sequence_dataset(stage["pack"], manifest, "train", seed=8))]
    assert other != epoch and sorted(other) == sorted(epoch)  # another order of the same sequences

    it = SequenceIterator(ds)
    for _ in range(37):
        next(it)
    state = it.state()
    rest = [tuple(next(it)) for _ in range(25)]
    resumed = SequenceIterator(sequence_dataset(stage["pack"], manifest, "train", seed=7))
    resumed.restore(state)
    assert [tuple(next(resumed)) for _ in range(25)] == rest == epoch[37:62]


@pytest.mark.slow
def test_hosts_read_their_rows_of_the_same_global_batches(run):
    """1, 2 or 4 hosts: the union of the hosts' rows at every step is the single host's global batch,
    in order, under a batch ramp; a host reads only its own rows; the state resumes exactly."""
    from palm.data.loader import HostBatches

    stage, manifest = run
    ds = sequence_dataset(stage["pack"], manifest, seed=3)
    sizes = [4, 4, 8, 8, 8]  # a ramp from 4 to 8 sequences per global batch
    single = HostBatches(ds, rows=lambda n: (0, n))
    expected = [single.take(n, step) for step, n in enumerate(sizes)]
    full = [x for x in ds]
    assert np.array_equal(np.concatenate(expected), np.stack(full[:sum(sizes)]))
    for hosts in (2, 4):
        readers = [HostBatches(ds, rows=lambda n, h=h, k=hosts: (h * n // k, (h + 1) * n // k)) for h in range(hosts)]
        for step, n in enumerate(sizes):
            parts = [r.take(n, step) for r in readers]
            assert all(len(p) == n // hosts for p in parts)
            assert np.array_equal(np.concatenate(parts), expected[step])
    resumed = HostBatches(ds, rows=lambda n: (0, n))
    resumed.restore(single.state())
    assert resumed.state() == {"position": sum(sizes)}
    assert np.array_equal(resumed.take(4, 5), np.stack(full[sum(sizes):sum(sizes) + 4]))
    with pytest.raises(PalmError, match="ran out at step 9"):
        HostBatches(ds, rows=lambda n: (0, n)).take(len(ds) + 1, 9)
    # A loss spike's skip passes over whole global batches without reading them, prefetched or not.
    skipping = HostBatches(ds, rows=lambda n: (0, n))
    skipping.take(4, 0)  # prefetches positions 4..7, which the skip passes over
    skipping.skip(8, 1)
    assert skipping.state() == {"position": 12}
    assert np.array_equal(skipping.take(4, 2), np.stack(full[12:16]))
    with pytest.raises(PalmError, match="ran out at step 3 while skipping"):
        skipping.skip(len(ds), 3)


@pytest.mark.slow
def test_mixture_interleaves_sources_by_weight(run):
    stage, manifest = run
    counts = {s: c["sequences"] for s, c in manifest["splits"]["train"].items()}
    lookup = {}
    for source, c in manifest["splits"]["train"].items():
        for entry in c["files"]:
            for row in read_sequences(stage["pack"] / entry["path"], manifest["seq_len"]):
                lookup[tuple(row)] = source
    order = [lookup[tuple(x)] for x in sequence_dataset(stage["pack"], manifest, seed=0)]
    half = order[: len(order) // 2]
    for source, n in counts.items():
        # Interleaved, not concatenated: each source's share of the first half matches its overall share.
        assert abs(half.count(source) / len(half) - n / len(order)) < 0.05, source


@pytest.mark.slow
def test_pack_stage_writes_to_gs_and_hosts_read_only_their_rows(run, gcs_emulator):
    """The pack stage writes its rows straight to gs:// (as a cluster runner's workers do), the same
    rows as on local disk; then each of 4 training hosts, reading its rows of 6 global batches of 8 from
    the bucket, fetches about its quarter of those batches' bytes (counted by the GCS emulator), and
    nothing like the whole pack output."""
    import uuid

    from palm.data.loader import HostBatches
    from palm.data.pack import run_pack_stage
    from palm.dag.workflow import load_spec

    stage, local = run
    spec = load_spec(SPECS / "tiny.yaml")
    remote = f"gs://bucket/pack-{uuid.uuid4().hex[:8]}"
    fields = run_pack_stage(spec.data, spec.pack.num_shards, local["seq_len"], stage["data"], stage["tokenizer"],
                            remote)
    assert fields["splits"] == local["splits"] and fields["sequences"] == local["sequences"]
    for entry in local["splits"]["train"]["stdlib-code"]["files"]:
        assert storage.read_bytes(f"{remote}/{entry['path']}") == (stage["pack"] / entry["path"]).read_bytes()

    row_bytes = local["seq_len"] * TOKEN_DTYPE.itemsize
    hosts, global_batch, steps = 4, 8, 6
    whole = sum(storage.size(f"{remote}/{f['path']}") for by in local["splits"].values()
                for c in by.values() for f in c["files"])
    local_ds = sequence_dataset(stage["pack"], local, seed=5)
    served = []
    for h in range(hosts):
        ds = sequence_dataset(remote, fields, seed=5)
        reader = HostBatches(ds, rows=lambda n, h=h: (h * n // hosts, (h + 1) * n // hosts))
        gcs_emulator.served(reset=True)
        for step in range(steps):
            rows = reader.take(global_batch, step)
            lo = step * global_batch + h * global_batch // hosts
            assert np.array_equal(rows, np.stack([local_ds[i] for i in range(lo, lo + len(rows))]))
        reader._ahead[1].result()  # the batch it reads ahead, counted too
        reader.close()
        served.append(gcs_emulator.served())
    share = (steps + 1) * global_batch // hosts * row_bytes  # its rows of 6 batches and the one read ahead
    for h, s in enumerate(served):
        assert abs(s["bytes"] - share) <= 0.1 * share, (h, s, share)
        assert s["requests"] == (steps + 1) * global_batch // hosts  # one bounded ranged read per row
    assert sum(s["bytes"] for s in served) < whole / 2, (served, whole)


@pytest.mark.slow
def test_a_truncated_row_file_is_named(run, tmp_path):
    import shutil

    stage, manifest = run
    pack = tmp_path / "pack"
    shutil.copytree(stage["pack"], pack)
    entry = next(f for c in manifest["splits"]["train"].values() for f in c["files"] if f["sequences"] > 0)
    with open(pack / entry["path"], "r+b") as f:
        f.truncate(f.seek(0, 2) - 4)
    ds = sequence_dataset(pack, manifest, seed=0)
    with pytest.raises(PalmError, match=rf"{entry['path']} holds .* bytes, not the .* re-run the pack stage"):
        [ds[i] for i in range(len(ds))]
