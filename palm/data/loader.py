"""Training input: a deterministic Grain pipeline over the pack stage's ArrayRecord shards.

The data stage already realized the mixture: each source's share of the packed sequences is its
weight. So the loader shuffles all sources' sequences together, globally, by seed: every window of
the stream holds the sources in their weights' proportions (in expectation), and the epoch is exact
(every sequence once, none repeated, none lost).

Training reads it through `HostBatches`: global batch k is the next `global_batch` sequences of that
one stream, whatever the number of hosts, and each host reads only the rows of it that its devices
hold (by index: the shuffled dataset is random access). So 1, 2 or 1536 hosts see exactly the same
global batches in the same order, and the loader's state is one number, the stream position, saved
in every checkpoint. Threads read a host's rows in parallel and one batch ahead of the accelerator.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import grain
import numpy as np

from palm.errors import PalmError

TOKEN_DTYPE = np.dtype("<i4")


def sequence_dataset(pack_dir: str | Path, manifest: dict[str, Any], split: str = "train",
                     seed: int = 0) -> grain.MapDataset:
    """A random-access dataset of the split's sequences ([seq_len] int32 arrays), in training order."""
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


class HostBatches:
    """This host's rows of each global batch, read by index from the globally shuffled sequences.

    `rows(global_batch) -> (start, stop)` names the rows of a global batch this host's devices hold
    (`palm.train.Trainer.host_rows`); a single host holds them all. `take` is called once per step
    with that step's global batch size (the batch ramp changes it) and advances the stream position
    by the whole global batch on every host alike.
    """

    def __init__(self, dataset: grain.MapDataset, rows: Callable[[int], tuple[int, int]], threads: int = 4):
        self.dataset, self.rows = dataset, rows
        self.position = 0
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="palm-input")
        self._ahead: tuple[tuple[int, int], Future] | None = None

    def _read(self, position: int, size: int) -> Future:
        start, stop = self.rows(size)
        futures = [self._pool.submit(self.dataset.__getitem__, i) for i in range(position + start, position + stop)]
        return self._pool.submit(lambda: np.stack([f.result() for f in futures]))

    def take(self, size: int, step: int) -> np.ndarray:
        """This host's rows of the next global batch of `size` sequences, [rows, seq_len] int32."""
        if self.position + size > len(self.dataset):
            raise PalmError(f"the training data ran out at step {step}: more steps (train.steps) than the "
                            "pack stage produced sequences for; lower train.steps or add data")
        if self._ahead is not None and self._ahead[0] == (self.position, size):
            batch = self._ahead[1].result()
        else:
            batch = self._read(self.position, size).result()
        self.position += size
        # Read the next batch (assuming the same size; the ramp changes it rarely) while this one trains.
        self._ahead = ((self.position, size), self._read(self.position, size)) \
            if self.position + size <= len(self.dataset) else None
        return batch

    def state(self) -> dict[str, Any]:
        return {"position": self.position}

    def restore(self, state: dict[str, Any]) -> None:
        if "position" not in state:
            raise PalmError(f"the checkpoint's input state {sorted(state)} is not a HostBatches position; it was "
                            "written by an older loader and cannot be resumed exactly")
        self.position, self._ahead = int(state["position"]), None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
