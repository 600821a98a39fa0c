"""Configuration of the JAX core, as plain frozen dataclasses.

These are the sections of the spec that `palm.model`, `palm.optimizer` and `palm.train` read. They
import nothing but the standard library, so the core runs on machines without pydantic; `palm.spec`
embeds them in the validated `Spec` (pydantic validates stdlib dataclasses field by field, with
`extra="forbid"` taken from `__pydantic_config__`). Field names are the PaLM paper's words.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

#: pydantic's config for each section (read only when palm.spec validates them): unknown keys and
#: non-finite floats (NaN, infinity) are refused.
_STRICT = {"extra": "forbid", "allow_inf_nan": False}

Remat = Literal["none", "full", "save_dots", "offload"]
Attention = Literal["auto", "xla", "cudnn", "pallas"]
DType = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """PaLM's architecture (paper, section 2 and Table 1)."""

    __pydantic_config__ = _STRICT

    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    head_dim: int = 16
    #: Key/value heads; 1 is PaLM's multi-query attention.
    num_kv_heads: int = 1
    #: d_ff = ffw_multiplier * d_model (PaLM: 4, with SwiGLU).
    ffw_multiplier: int = 4
    vocab_size: int = 256_000
    seq_len: int = 2048
    rope_max_wavelength: float = 10_000.0
    layer_norm_epsilon: float = 1e-6
    #: Compute dtype of matmuls; parameters stay in `param_dtype` (float32 master weights).
    dtype: DType = "bfloat16"
    param_dtype: DType = "float32"
    #: Rematerialization: recompute everything, save matmul outputs, or offload them to host memory.
    remat: Remat = "full"
    #: Attention kernel; "auto" picks cuDNN flash on NVIDIA GPUs, Pallas splash attention on TPUs, XLA elsewhere.
    attention: Attention = "auto"
    #: Scan over layers, so compile time does not grow with depth.
    scan_layers: bool = True

    @property
    def d_ff(self) -> int:
        return self.ffw_multiplier * self.d_model


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Adafactor as PaLM used it (section 5): unfactored, with momentum and parameter scaling."""

    __pydantic_config__ = _STRICT

    name: Literal["adafactor"] = "adafactor"
    #: First-moment decay β1.
    beta1: float = 0.9
    #: Second-moment decay β2 = 1 - k^(-decay_exponent), k the 1-based step.
    decay_exponent: float = 0.8
    #: Keep full second moments (PaLM: no factorization).
    factored: bool = False
    #: Scale each update by max(parameter RMS, min_parameter_scale).
    parameter_scaling: bool = True
    min_parameter_scale: float = 1e-3
    #: Adafactor's epsilon added to squared gradients.
    epsilon: float = 1e-30
    #: Clip each update matrix to this RMS (Adafactor update clipping).
    update_clip: float = 1.0
    #: Clip the gradients' global L2 norm to this value before the optimizer.
    gradient_clip: float = 1.0
    #: Decoupled weight decay of lr**weight_decay_lr_power per step (PaLM: lr², so 2); null for none.
    weight_decay_lr_power: float | None = 2.0
    momentum_dtype: DType = "float32"


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Learning rate: constant for `constant_steps`, then peak·sqrt(constant_steps/k) (PaLM: 1/√k)."""

    __pydantic_config__ = _STRICT

    peak_learning_rate: float = 1e-2
    constant_steps: int = 10_000
    #: Optional linear warm-up from 0 inside the constant phase (PaLM: 0).
    warmup_steps: int = 0


@dataclasses.dataclass(frozen=True)
class RampStage:
    """From step `from_step` on, the global batch is `global_batch` sequences."""

    __pydantic_config__ = _STRICT

    from_step: int
    global_batch: int


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    __pydantic_config__ = _STRICT

    every_steps: int = 1000
    #: Keep the latest `keep_last` checkpoints, plus every `keep_every`-th step permanently.
    keep_last: int = 3
    keep_every: int | None = None
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LossSpikeConfig:
    """Section 5.1: on a spike, roll back to an earlier checkpoint and skip the batches that caused it."""

    __pydantic_config__ = _STRICT

    enabled: bool = True
    #: A loss above `threshold` times the median of the last `window` losses is a spike.
    threshold: float = 2.0
    window: int = 100
    #: Batches skipped after rolling back (the paper skipped about 200 to 500).
    skip_batches: int = 300


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training loop: steps, batch-size ramp, loss, optimizer, schedule, checkpoints."""

    __pydantic_config__ = _STRICT

    steps: int = 100
    batch_ramp: tuple[RampStage, ...] = (RampStage(from_step=0, global_batch=8),)
    seed: int = 0
    #: Auxiliary loss z_loss * log²Z that keeps the softmax normalizer near 1.
    z_loss: float = 1e-4
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    loss_spike: LossSpikeConfig = LossSpikeConfig()
    log_every: int = 10
    #: Most float32 logits (MiB per device) the loss holds at once: above it the loss projects onto the
    #: vocabulary a slice of the sequence at a time (palm.train.loss_chunks). Each slice re-reads the
    #: embedding table and adds to its gradient, so fewer slices are faster where memory allows.
    loss_chunk_mib: int = 256
    #: Trace training steps [first, last) with jax.profiler into the train stage's `profile/` directory
    #: (null: no trace). Like loss_chunk_mib, not part of the train stage's key: results do not change.
    profile_steps: tuple[int, int] | None = None

    def global_batch_at(self, step: int) -> int:
        """Global batch size (sequences) at `step` under the batch-size ramp."""
        size = self.batch_ramp[0].global_batch
        for stage in self.batch_ramp:
            if step >= stage.from_step:
                size = stage.global_batch
        return size
