"""The digests of one train state laid out on each given mesh; one JSON line per mesh.

Run in a child process, so that XLA_FLAGS can give it simulated CPU devices:
    python tests/digest_state.py '[{"data": 2, "fsdp": 2, "model": 2}]'
With JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set it first joins a multi-process job
(palm.app.worker.initialize_distributed), and the meshes span every process's devices.
"""

import json
import sys

import jax

from palm.core.checkpoint import _leaf_sums_jit, params_digest, state_digest
from palm.spec.config import ModelConfig, RampStage, TrainConfig
from palm.core.train import Trainer, TrainState
from palm.app.worker import initialize_distributed

MODEL = ModelConfig(num_layers=2, d_model=64, num_heads=4, head_dim=16, vocab_size=512, seq_len=32,
                    dtype="float32", remat="full")
TRAIN = TrainConfig(steps=1, batch_ramp=(RampStage(0, 8),))


def digests(mesh: dict) -> dict:
    n = mesh.get("data", 1) * mesh.get("fsdp", 1) * mesh.get("model", 1)
    trainer = Trainer(MODEL, TRAIN, mesh, jax.devices()[:n])
    state = trainer.init(seed=0)  # the same values on every mesh (partitionable threefry)
    # Non-zero optimizer moments and step, by elementwise arithmetic only (bitwise the same on any mesh).
    state = TrainState(step=state.step + 7, params=state.params,
                       opt_state=jax.tree.map(lambda x: x + 0.5 if x.dtype.kind == "f" else x + 1, state.opt_state))
    leaves = jax.tree.leaves(state)
    hlo = _leaf_sums_jit.lower(leaves).compile().as_text()
    sharded = sorted({str(leaf.sharding.spec) for leaf in leaves if hasattr(leaf.sharding, "spec")})
    return {"mesh": mesh, "devices": n, "processes": jax.process_count(), "state_digest": state_digest(state),
            "params_digest": params_digest(state.params), "all_gather": "all-gather" in hlo, "specs": sharded}


if __name__ == "__main__":
    initialize_distributed()
    for mesh in json.loads(sys.argv[1]):
        print(json.dumps(digests(mesh)), flush=True)
