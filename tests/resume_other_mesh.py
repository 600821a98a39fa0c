"""Train specs/tiny.yaml with checkpoints on one mesh, or resume it on another; print one JSON line.

Run in a child process so that XLA_FLAGS can give it simulated CPU devices:
    python tests/resume_other_mesh.py DIR '{"data": 2, "fsdp": 2, "model": 2}' STEPS MICROBATCHES
The line: the losses by step, and the stream positions (sequence numbers) each step read.
"""

import json
import sys

import jax
import numpy as np

from palm.core.checkpoint import Checkpoints
from palm.core.train import Trainer, run_training
from palm.dag.workflow import load_spec
from tests.conftest import SPECS


class Stream:
    """A learnable stream with a saveable position (like the Grain iterator); records what it hands out."""

    def __init__(self, vocab: int, seq_len: int):
        self.position, self.vocab, self.seq_len = 0, vocab, seq_len
        self.table = np.random.default_rng(0).integers(0, vocab, vocab)
        self.read: list[int] = []

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng(self.position)
        seq = np.empty(self.seq_len, np.int64)
        seq[0] = rng.integers(self.vocab)
        for i in range(1, self.seq_len):
            seq[i] = self.table[seq[i - 1]] if rng.random() < 0.9 else rng.integers(self.vocab)
        self.read.append(self.position)
        self.position += 1
        return seq.astype(np.int32)

    def state(self):
        return {"position": self.position}

    def restore(self, state):
        self.position = state["position"]


def main() -> None:
    directory, mesh, steps, microbatches = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    spec = load_spec(SPECS / "tiny.yaml", [f"train.steps={steps}", "train.checkpoint.every_steps=5",
                                           "train.checkpoint.async_save=false", "train.loss_spike.enabled=false",
                                           f"train.microbatches={microbatches}"])
    n = mesh["data"] * mesh["fsdp"] * mesh["model"]
    assert jax.device_count() == n, (jax.device_count(), n)
    trainer = Trainer(spec.model, spec.train, mesh)
    stream = Stream(spec.model.vocab_size, spec.model.seq_len)
    by_step: dict[int, list[int]] = {}
    losses: dict[int, float] = {}

    def on_step(log, state):
        losses[log.step] = log.loss

    start = len(stream.read)
    ckpts = Checkpoints(directory, spec.train.checkpoint)
    result = run_training(trainer, stream, checkpoints=ckpts, on_step=on_step)
    ckpts.close()
    # The positions read, step by step, from the step it started at.
    first = result.resumed_from or 0
    read = stream.read[start:]
    for step in range(first, steps):
        size = spec.train.global_batch_at(step)
        by_step[step], read = read[:size], read[size:]
    print(json.dumps({"mesh": mesh, "devices": n, "resumed_from": result.resumed_from, "losses": losses,
                      "read": by_step, "microbatches": [log.microbatches for log in result.logs]}), flush=True)


if __name__ == "__main__":
    main()
