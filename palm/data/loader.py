"""Training input: a deterministic Grain pipeline over the pack stage's ArrayRecord shards.

The data stage already realized the mixture: each source's share of the packed sequences is its
weight. So the loader shuffles all sources' sequences together, globally, by seed: every window of
the stream holds the sources in their weights' proportions (in expectation), and the epoch is exact
(every sequence once, none repeated, none lost). Each host takes every `process_count`-th sequence
from its `process_index`. The iterator's state is
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
    files = []
    for source in sources:
        files += [str(Path(pack_dir) / f) for f in by_source[source]["files"]]
    files = [f for f in files if Path(f).stat().st_size > 0]
    mixed = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files)).seed(seed).shuffle()
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
