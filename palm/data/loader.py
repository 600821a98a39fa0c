"""Training input: a deterministic Grain pipeline over the pack stage's files of fixed-size rows.

The data stage already realized the mixture: each source's share of the packed sequences is its
weight. So the loader shuffles all sources' sequences together, globally, by seed: every window of
the stream holds the sources in their weights' proportions (in expectation), and the epoch is exact
(every sequence once, none repeated, none lost).

Training reads it through `HostBatches`: global batch k is the next `global_batch` sequences of that
one stream, whatever the number of hosts, and each host reads only the rows of it that its devices
hold (by index: the shuffled dataset is random access). So 1, 2 or 1536 hosts see exactly the same
global batches in the same order, and the loader's state is one number, the stream position, saved
in every checkpoint. Threads read a host's rows in parallel and one batch ahead of the accelerator.

The pack directory may be local or gs://. Row i of a file is bytes [i·row, (i+1)·row), so a host
reads its rows in place, one positioned read (local) or one bounded ranged GET (gs://) each, and
opens nothing else: no download of the pack output, no index.
"""

from __future__ import annotations

import bisect
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import grain
import numpy as np

from palm.base import storage
from palm.base.errors import PalmError

TOKEN_DTYPE = np.dtype("<i4")


class PackedRows:
    """Grain random-access source over the pack stage's row files (`palm.data.pack`), local or gs://.

    Files are taken in the given order; item k is row k of their concatenation. Each file's size is
    checked against its row count on first use, so a truncated or foreign file is an error naming it.
    """

    def __init__(self, pack_dir: str | os.PathLike, files: list[tuple[str, int]], seq_len: int):
        self.pack_dir, self.seq_len = str(pack_dir), int(seq_len)
        self.paths = [storage.join(self.pack_dir, rel) for rel, _ in files]
        self.counts = [int(n) for _, n in files]
        self.starts = np.cumsum([0] + self.counts).tolist()
        self.row_bytes = self.seq_len * TOKEN_DTYPE.itemsize
        self._checked: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.starts[-1]

    def __repr__(self) -> str:
        return f"PackedRows({self.pack_dir!r}, {len(self.paths)} files, {len(self)} rows of {self.seq_len})"

    def _check(self, f: int) -> None:
        if f in self._checked:
            return
        expected = self.counts[f] * self.row_bytes
        try:
            actual = storage.size(self.paths[f])
        except FileNotFoundError:
            raise PalmError(f"{self.paths[f]} is missing from the pack stage output; re-run the pack stage") from None
        if actual != expected:
            raise PalmError(f"{self.paths[f]} holds {actual} bytes, not the {expected} of its {self.counts[f]} rows "
                            f"of {self.seq_len} tokens in the manifest; re-run the pack stage")
        with self._lock:
            self._checked.add(f)

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        f = bisect.bisect_right(self.starts, index) - 1
        self._check(f)
        start = (index - self.starts[f]) * self.row_bytes
        data = storage.read_range(self.paths[f], start, start + self.row_bytes)
        return np.frombuffer(data, TOKEN_DTYPE, count=self.seq_len)


def split_files(manifest: dict[str, Any], split: str) -> list[tuple[str, int]]:
    """(file, rows) of a split's non-empty files, sources in name order."""
    by_source = manifest["splits"].get(split) or {}
    files = []
    for source in sorted(by_source):
        entries = by_source[source]["files"]
        if entries and not isinstance(entries[0], dict):
            raise PalmError("the pack stage output predates row files (it lists ArrayRecord files); "
                            "re-run the pack stage")
        files += [(f["path"], int(f["sequences"])) for f in entries if f["sequences"] > 0]
    return files


def sequence_dataset(pack_dir: str | os.PathLike, manifest: dict[str, Any], split: str = "train",
                     seed: int = 0) -> grain.MapDataset:
    """A random-access dataset of the split's sequences ([seq_len] int32 arrays), in training order."""
    files = split_files(manifest, split)
    if not files:
        raise PalmError(f"the pack stage output {pack_dir} has no {split} sequences; the data is too small "
                        "for model.seq_len (lower it or add data)")
    return grain.MapDataset.source(PackedRows(pack_dir, files, manifest["seq_len"])).seed(seed).shuffle()


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
    (`palm.core.train.Trainer.host_rows`); a single host holds them all. `take` is called once per step
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

    def skip(self, size: int, step: int) -> None:
        """Pass over the next global batch of `size` sequences without reading it (a loss spike's skip)."""
        if self.position + size > len(self.dataset):
            raise PalmError(f"the training data ran out at step {step} while skipping the batches after a loss "
                            "spike; lower train.steps or train.loss_spike.skip_batches, or add data")
        self.position += size
        self._ahead = None

    def state(self) -> dict[str, Any]:
        return {"position": self.position}

    def restore(self, state: dict[str, Any]) -> None:
        if "position" not in state:
            raise PalmError(f"the checkpoint's input state {sorted(state)} is not a HostBatches position; it was "
                            "written by an older loader and cannot be resumed exactly")
        self.position, self._ahead = int(state["position"]), None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
