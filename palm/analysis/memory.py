"""The plan's memory estimate: bytes per chip of a train or evaluation step, from shapes alone.

The TPU compiler (palm.analysis.aot) measures the real step; this estimate needs no compiler and is held
against it in docs/benchmarks.md.
"""

from __future__ import annotations

import jax.numpy as jnp

from palm.core.model import abstract_params, count_params
from palm.core.sharding import Sharding
from palm.core.train import loss_chunks
from palm.spec.config import ModelConfig, TrainConfig

#: How many bytes of each kind the compiled steps hold per byte of the quantity named, read off the TPU
#: compiler's buffer assignment (XLA_FLAGS=--xla_dump_to) and fitted over the configurations in
#: docs/benchmarks.md (8B, 62B and 540B on their specs' slices, on five other meshes and at other depths:
#: 29 compiled steps).
#: The names say what dominates each term; a coefficient above 1 is copies XLA keeps alive together
#: (a value and its gradient, a buffer and the next layer's prefetch).
MEMORY_COEFFICIENTS = {
    "train": {"gradients_and_optimizer": 0.6, "saved_activations": 2.0, "embedding": 4 / 3,
              "layer_weights": 3.0, "final_hidden": 1.6, "logits": 2.0},
    "eval": {"embedding": 0.4, "layer_weights": 1.9, "final_hidden": 0.3, "logits": 1.0},
}


def estimate_memory(model: ModelConfig, train: TrainConfig, mesh: dict[str, int], global_batch: int,
                    kind: str = "train", microbatches: int = 1) -> dict[str, int]:
    """Bytes per device of one train (or evaluation) step at its peak, by part, from shapes and the
    sharding rules alone (no compiler): within 25% of the TPU compiler for every training step measured,
    and within 20% for the evaluation step but one: pure FSDP without model parallelism, where the compiler
    gathers the float32 embedding table twice for the forward pass alone (docs/benchmarks.md).

    The parts: the train state (parameters and unfactored Adafactor's moments, as laid out on the mesh);
    the float32 gradients and the optimizer's temporaries (less than the parameters' size: gradients are
    reduce-scattered layer by layer and the update reuses the donated state); the activations kept for
    the backward pass under the remat policy (full remat: the residual stream of every layer, split over
    `model`); the tied embedding table gathered over FSDP with its float32 gradient; one layer's weights
    gathered over FSDP; the final hidden states and their gradient in float32; and one chunk of the loss's
    float32 logits (palm.core.train.loss_chunks) with its gradient. MEMORY_COEFFICIENTS weighs each.

    With `microbatches` > 1 (train.microbatches) the activations, final hidden states and logits are one
    microbatch's, and the float32 sum of the gradients (one copy of the parameters, as laid out) is added.
    """
    if kind not in MEMORY_COEFFICIENTS:
        raise ValueError(f"unknown step kind {kind!r}")
    c = MEMORY_COEFFICIENTS[kind]
    layout = Sharding.planned(mesh)
    boxed = abstract_params(model)
    mp, dp = layout.axis_sizes["model"], layout.data_parallel_size
    m, t = model, model.seq_len
    b = -(-global_batch // (dp * (microbatches if kind == "train" else 1)))  # sequences per device at a time
    tokens = b * t
    f32, act = 4, jnp.dtype(m.dtype).itemsize
    opt = train.optimizer

    params_f32 = layout.param_bytes_per_device(boxed, 4)
    params = layout.param_bytes_per_device(boxed, jnp.dtype(m.param_dtype).itemsize)
    momentum = layout.param_bytes_per_device(boxed, jnp.dtype(opt.momentum_dtype).itemsize) if opt.beta1 else 0
    second_moment = params_f32 if not opt.factored else 0

    per_layer = (count_params(m) - m.vocab_size * m.d_model - m.d_model) // m.num_layers
    layer_weights = per_layer // mp * act  # one layer gathered over FSDP, split over `model`
    residual = tokens * act * m.d_model // mp
    layer_act = tokens * act * (2 * m.d_model + 2 * m.num_heads * m.head_dim // mp + 2 * m.num_kv_heads * m.head_dim
                                + 3 * m.d_ff // mp)
    kept_per_layer = {"full": residual, "save_dots": residual + layer_act, "offload": residual,
                      "none": residual + 2 * layer_act}[m.remat]
    vocab_split = mp > 1 and m.vocab_size % mp == 0  # as palm.core.train.Trainer decides
    vocab_per_device = m.vocab_size // mp if vocab_split else m.vocab_size
    logits = b * (t // loss_chunks(b, t, vocab_per_device, train.loss_chunk_mib * 2**20)) * vocab_per_device * f32
    table = m.vocab_size * m.d_model // mp * f32
    hidden = tokens * m.d_model * f32 // (1 if vocab_split else mp)

    parts = {"params": params}
    if kind == "train":
        parts.update(optimizer_state=momentum + second_moment,
                     gradients_and_optimizer=int(c["gradients_and_optimizer"] * params_f32),
                     saved_activations=int(c["saved_activations"] * m.num_layers * kept_per_layer))
        if microbatches > 1:
            parts["gradient_accumulator"] = params_f32
    parts.update(gathered_embedding=int(c["embedding"] * table),
                 gathered_layer_weights=int(c["layer_weights"] * layer_weights),
                 final_hidden=int(c["final_hidden"] * hidden),
                 logits=int(c["logits"] * logits))
    parts["total"] = sum(parts.values())
    return parts


def microbatch_candidates(global_batch: int, data_parallel: int) -> list[int]:
    """Microbatch counts for a global batch, fewest first: the divisors of each data-parallel device's rows
    (no data moved between devices), then the other divisors of the global batch."""
    per_device = global_batch // data_parallel if global_batch % data_parallel == 0 else 0
    even = [m for m in range(1, per_device + 1) if per_device % m == 0]
    rest = [m for m in range(1, global_batch + 1) if global_batch % m == 0 and m not in even]
    return even + rest


def auto_microbatches(model: ModelConfig, train: TrainConfig, mesh: dict[str, int],
                      hbm_bytes: int | None) -> tuple[int, ...]:
    """train.microbatches: auto by the estimate: per batch_ramp stage, the fewest microbatches whose train
    step's estimate fits `hbm_bytes` per device (1 where the memory is unknown; the most there are where
    none fits). `palm plan --compile` asks the TPU compiler instead (palm.analysis.aot)."""
    counts = []
    dp = Sharding.planned(mesh).data_parallel_size
    for stage in train.batch_ramp:
        candidates = microbatch_candidates(stage.global_batch, dp)
        fits = [m for m in candidates if hbm_bytes is None
                or estimate_memory(model, train, mesh, stage.global_batch, "train", m)["total"] <= hbm_bytes]
        counts.append(fits[0] if fits else max(candidates))
    return tuple(counts)


def microbatch_counts(model: ModelConfig, train: TrainConfig, mesh: dict[str, int],
                      hbm_bytes: int | None) -> tuple[int, ...]:
    """The counts per batch_ramp stage: the spec's, or for "auto" the estimate's choice."""
    counts = train.microbatch_counts()
    return counts if counts is not None else auto_microbatches(model, train, mesh, hbm_bytes)
