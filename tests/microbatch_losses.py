"""Train specs/tiny.yaml on a mesh with several microbatch counts; print one JSON line per count.

Run in a child process so that XLA_FLAGS can give it 8 simulated CPU devices:
    python tests/microbatch_losses.py '{"data": 2, "fsdp": 2, "model": 2}' '[1, 2, 4]' 6
Each line: the losses of every step, and the relative difference of the first step's gradient (every
parameter) from the first count's.
"""

import json
import sys

import jax
import numpy as np

from palm.core.train import Trainer, loss_fn, train
from palm.dag.workflow import load_spec
from tests.conftest import SPECS


def sequences(vocab: int, seq_len: int, seed: int = 0):
    """A learnable stream: a fixed random bigram chain, the same for every run."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, vocab, vocab)
    while True:
        seq = np.empty(seq_len, np.int32)
        seq[0] = rng.integers(vocab)
        for i in range(1, seq_len):
            seq[i] = table[seq[i - 1]] if rng.random() < 0.9 else rng.integers(vocab)
        yield seq


def first_step_grads(trainer: Trainer, microbatches: int, tokens: np.ndarray, weights: np.ndarray):
    """The gradient the step computes (the optimizer's input), through the trainer's own step body."""
    state = trainer.init()

    def grads(params, tokens, weights):
        if microbatches == 1:
            return jax.grad(lambda p: loss_fn(p, trainer.model, tokens, weights, trainer.train_config.z_loss,
                                              trainer.loss_chunks(tokens.shape[0]))[0])(params)
        return trainer.programs.accumulated_grads(params, tokens, weights, microbatches)[1]

    with jax.set_mesh(trainer.sharding.mesh):
        g = jax.jit(grads, in_shardings=(trainer.state_shardings.params, trainer.batch_sharding,
                                         trainer.batch_sharding))(state.params, tokens, weights)
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf, np.float64)
            for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]}


def main() -> None:
    mesh, counts, steps = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    spec = load_spec(SPECS / "tiny.yaml", [f"train.steps={steps}"])
    n = mesh["data"] * mesh["fsdp"] * mesh["model"]
    batch = spec.train.global_batch_at(0)
    rng = np.random.default_rng(1)
    tokens = next(iter([np.stack([s for _, s in zip(range(batch), sequences(spec.model.vocab_size,
                                                                            spec.model.seq_len, 1))])]))
    weights = (rng.random(tokens.shape) < 0.8).astype(np.float32)  # uneven tokens per microbatch
    reference = None
    for count in counts:
        trainer = Trainer(spec.model, spec.train, mesh, jax.devices()[:n],
                          microbatches=(count,) * len(spec.train.batch_ramp))
        _, logs = train(trainer, sequences(spec.model.vocab_size, spec.model.seq_len))
        grads = first_step_grads(trainer, count, tokens, weights)
        if reference is None:
            reference = grads
        worst = max(float(np.abs(grads[k] - reference[k]).max() / max(np.abs(reference[k]).max(), 1e-30))
                    for k in reference)
        print(json.dumps({"microbatches": count, "losses": [log.loss for log in logs],
                          "logged": [log.microbatches for log in logs], "grad_max_rel_diff": worst,
                          "grad_norm": float(np.sqrt(sum((g ** 2).sum() for g in grads.values())))}), flush=True)


if __name__ == "__main__":
    main()
