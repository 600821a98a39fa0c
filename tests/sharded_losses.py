"""Run N train steps of a small PaLM on each given mesh; print one JSON line of losses per mesh.

Run in a child process so that XLA_FLAGS can give it 8 simulated CPU devices:
    python tests/sharded_losses.py '[{"data": 2, "fsdp": 2, "model": 2}]' 20
"""

import json
import sys

import jax
import numpy as np

from palm.spec.config import ModelConfig, RampStage, ScheduleConfig, TrainConfig
from palm.core.train import Trainer, train

MODEL = ModelConfig(num_layers=2, d_model=64, num_heads=4, head_dim=16, vocab_size=512, seq_len=32,
                    dtype="float32", remat="full")
TRAIN = TrainConfig(steps=20, batch_ramp=(RampStage(0, 8),), schedule=ScheduleConfig(peak_learning_rate=3e-2,
                                                                                       constant_steps=10))


def run(mesh: dict, steps: int) -> dict:
    n = mesh.get("data", 1) * mesh.get("fsdp", 1) * mesh.get("model", 1)
    trainer = Trainer(MODEL, TrainConfig(**{**TRAIN.__dict__, "steps": steps}), mesh, jax.devices()[:n])
    rng = np.random.default_rng(0)  # the same stream for every mesh
    # A learnable stream: a fixed random bigram chain, so losses move and differences would show.
    table = rng.integers(0, MODEL.vocab_size, MODEL.vocab_size)
    def sequences():
        while True:
            seq = np.empty(MODEL.seq_len, np.int32)
            seq[0] = rng.integers(MODEL.vocab_size)
            for i in range(1, MODEL.seq_len):
                seq[i] = table[seq[i - 1]] if rng.random() < 0.9 else rng.integers(MODEL.vocab_size)
            yield seq
    state, logs = train(trainer, sequences())
    specs = {name: str(spec) for name, _, spec in trainer.sharding.describe(
        __import__("palm.core.model", fromlist=["abstract_params"]).abstract_params(MODEL))}
    return {"mesh": mesh, "devices": n, "losses": [log.loss for log in logs], "layout": specs}


def main() -> None:
    for mesh in json.loads(sys.argv[1]):
        print(json.dumps(run(mesh, int(sys.argv[2]))), flush=True)


if __name__ == "__main__":
    main()
