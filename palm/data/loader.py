"""Training input: a deterministic Grain pipeline over the pack stage's ArrayRecord shards.

Per source, sequences are shuffled globally by seed; the sources are then interleaved by weight
(the realized sequence counts, so every source runs out at the same moment: one epoch, no repeats);
each host takes every `process_count`-th sequence from its `process_index`. The iterator's state is
a small dict saved in the training checkpoint, so a resumed run continues with exactly the next
sequence. Threads prefetch ahead of the accelerator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import grain
import numpy as np

from palm.errors import PalmError

TOKEN_DTYPE = np.dtype("<i4")


def sequence_dataset(pack_dir: str | Path, manifest: dict[str, Any], split: str = "train", seed: int = 0,
                     process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """A random-access dataset of this host's sequences ([seq_len] int32 arrays), in training order."""
    by_source = manifest["splits"].get(split) or {}
    sources = sorted(s for s, c in by_source.items() if c["sequences"] > 0)
    if not sources:
        raise PalmError(f"the pack stage output {pack_dir} has no {split} sequences; the data is too small "
                        "for model.seq_len (lower it or add data)")
    parts, weights = [], []
    for i, source in enumerate(sources):
        files = [str(Path(pack_dir) / f) for f in by_source[source]["files"]]
        files = [f for f in files if Path(f).stat().st_size > 0]
        ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files)).seed(seed + i).shuffle()
        parts.append(ds)
        weights.append(len(ds))
    mixed = grain.MapDataset.mix(parts, weights) if len(parts) > 1 else parts[0]
    if process_count > 1:
        mixed = mixed[process_index::process_count]
    seq_len = manifest["seq_len"]
    return mixed.map(lambda record: np.frombuffer(record, TOKEN_DTYPE, count=seq_len))


class SequenceIterator:
    """Iterator over a host's sequences with `state()` / `restore(state)` for exact resume."""

    def __init__(self, dataset: grain.MapDataset, prefetch: int = 256, threads: int = 2):
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
        self._it = iter(dataset.to_iter_dataset(options))

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._it)

    def state(self) -> dict[str, Any]:
        return self._it.get_state()

    def restore(self, state: dict[str, Any]) -> None:
        self._it.set_state(state)
