"""Configuration of the JAX core, as plain frozen dataclasses.

These are the sections of the spec that `palm.core.model`, `palm.core.optimizer` and `palm.core.train` read. They
import nothing but the standard library, so the core runs on machines without pydantic; `palm.spec.schema`
embeds them in the validated `Spec` (pydantic validates stdlib dataclasses field by field, with
`extra="forbid"` taken from `__pydantic_config__`). Field names are the PaLM paper's words.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

#: pydantic's config for each section (read only when palm.spec.schema validates them): unknown keys and
#: non-finite floats (NaN, infinity) are refused.
_STRICT = {"extra": "forbid", "allow_inf_nan": False, "use_attribute_docstrings": True}

Remat = Literal["none", "full", "save_dots", "offload"]
Attention = Literal["auto", "xla", "cudnn", "pallas"]
DType = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """PaLM's architecture (paper, section 2 and Table 1)."""

    __pydantic_config__ = _STRICT

    num_layers: int = 2
    """Transformer blocks (PaLM 540B: 118)."""
    d_model: int = 64
    """Width of the residual stream (PaLM 540B: 18432)."""
    num_heads: int = 4
    """Query heads per attention layer (PaLM 540B: 48)."""
    head_dim: int = 16
    """Size of each attention head (PaLM: 256); even, as RoPE rotates pairs."""
    num_kv_heads: int = 1
    """Key/value heads; 1 is PaLM's multi-query attention."""
    ffw_multiplier: int = 4
    """d_ff = ffw_multiplier * d_model (PaLM: 4, with SwiGLU)."""
    vocab_size: int = 256_000
    """Rows of the (tied) embedding table; at least the tokenizer's vocabulary (PaLM: 256k)."""
    seq_len: int = 2048
    """Tokens per training sequence (PaLM: 2048)."""
    rope_max_wavelength: float = 10_000.0
    """RoPE's base wavelength (10,000 as in RoFormer)."""
    layer_norm_epsilon: float = 1e-6
    """Epsilon of the bias-free layer norms."""
    dtype: DType = "bfloat16"
    """Compute dtype of matmuls; parameters stay in `param_dtype` (float32 master weights)."""
    param_dtype: DType = "float32"
    """Storage dtype of the parameters (float32 master weights)."""
    remat: Remat = "full"
    """Rematerialization: recompute everything, save matmul outputs, or offload them to host memory."""
    attention: Attention = "auto"
    """Attention kernel; "auto" picks cuDNN flash on NVIDIA GPUs, Pallas splash attention on TPUs, XLA elsewhere."""
    scan_layers: bool = True
    """Scan over layers, so compile time does not grow with depth."""

    @property
    def d_ff(self) -> int:
        return self.ffw_multiplier * self.d_model


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Adafactor as PaLM used it (section 5): unfactored, with momentum and parameter scaling."""

    __pydantic_config__ = _STRICT

    name: Literal["adafactor"] = "adafactor"
    """The optimizer; only Adafactor, as PaLM used it."""
    beta1: float = 0.9
    """First-moment decay β1."""
    decay_exponent: float = 0.8
    """Second-moment decay β2 = 1 - k^(-decay_exponent), k the 1-based step."""
    factored: bool = False
    """Keep full second moments (PaLM: no factorization)."""
    parameter_scaling: bool = True
    """Scale each update by max(parameter RMS, min_parameter_scale)."""
    min_parameter_scale: float = 1e-3
    """Floor of the parameter RMS that scales the updates (parameter_scaling)."""
    epsilon: float = 1e-30
    """Adafactor's epsilon added to squared gradients."""
    update_clip: float = 1.0
    """Clip each update matrix to this RMS (Adafactor update clipping)."""
    gradient_clip: float = 1.0
    """Clip the gradients' global L2 norm to this value before the optimizer."""
    weight_decay_lr_power: float | None = 2.0
    """Decoupled weight decay of lr**weight_decay_lr_power per step (PaLM: lr², so 2); null for none."""
    momentum_dtype: DType = "float32"
    """Storage dtype of the first moment (bfloat16 halves its memory)."""


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Learning rate: constant for `constant_steps`, then peak·sqrt(constant_steps/k) (PaLM: 1/√k)."""

    __pydantic_config__ = _STRICT

    peak_learning_rate: float = 1e-2
    """Learning rate of the constant phase (PaLM: 1e-2)."""
    constant_steps: int = 10_000
    """Steps at the peak learning rate before the 1/sqrt(k) decay (PaLM: 10,000)."""
    warmup_steps: int = 0
    """Optional linear warm-up from 0 inside the constant phase (PaLM: 0)."""


@dataclasses.dataclass(frozen=True)
class RampStage:
    """From step `from_step` on, the global batch is `global_batch` sequences."""

    __pydantic_config__ = _STRICT

    from_step: int
    """First step (0-based) of this stage of the ramp."""
    global_batch: int
    """Sequences per step from `from_step` on; a multiple of the data-parallel size."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are saved and how many are kept (Orbax)."""

    __pydantic_config__ = _STRICT

    every_steps: int = 1000
    """Save a checkpoint every this many training steps (and at the last step)."""
    keep_last: int = 3
    """Keep the latest `keep_last` checkpoints, plus every `keep_every`-th step permanently."""
    keep_every: int | None = None
    """Keep every checkpoint whose step is a multiple of this permanently; null: none beyond `keep_last`."""
    async_save: bool = True
    """Write checkpoints in the background while training goes on (Orbax async checkpointing)."""


@dataclasses.dataclass(frozen=True)
class LossSpikeConfig:
    """Section 5.1: on a loss spike, restart from about 100 steps before the spike began and skip the
    batches seen since then (the paper skipped about 200 to 500).

    A spike is detected at step s when the loss is non-finite or above `threshold` times the median of
    the last `window` losses. It began at the earliest of the steps just before s (at most `onset_steps`
    back, in an unbroken run) whose losses were already above (1 + threshold) / 2 times that median,
    or at s. Training rolls back to the latest restart point at or before max(0, start - rollback_steps)
    and skips max(skip_batches, s - restart + 1) batches from there, so every batch from the restart
    point through the spike is skipped. With the defaults that restart point lies in [s - 149, s - 100],
    inside the paper's window: rollback_steps to rollback_steps + onset_steps + restart_every - 1 steps
    before s.

    Restart points are copies of the train state (parameters, optimizer state, step) with the data
    iterator's position, kept in host memory (each host its own devices' shards) every `restart_every`
    steps and at every (re)start. Only those a later spike could still roll back to are kept: at most
    ceil((rollback_steps + onset_steps) / restart_every) + 2 copies (7 with the defaults). A copy is
    the train state's size: 12 bytes per parameter with float32 momentum (4 parameter, 4 second
    moment, 4 momentum), so about 100 GB for 8B and 6.5 TB for 540B over the whole job (about 4 GB per
    copy per host on 1536 hosts of four TPU v4 chips). Where host memory is short, raise
    `restart_every` (fewer copies, a coarser restart step) or set it to null (none kept). Restart
    points live in memory only: after a resume the first is the resume step.

    Where no restart point is old enough (none kept, the first steps of a run, just after a resume) the
    rollback goes to the latest valid checkpoint at or before the target; failing that, to the oldest
    restart point kept, or the latest checkpoint before the spike. The checkpoints after the restart
    step (the abandoned trajectory) are deleted, and the restart step is checkpointed again with the data
    position after the skip, so a preemption right after a rollback does not train on skipped batches.

    Rollback needs checkpoints (run_training without them neither detects spikes nor keeps restart
    points). Every event is recorded with the checkpoints' metadata and the train stage's manifest
    (`loss_spikes`): the spike's step and start, the restart step and where it came from, and the
    skipped batches and their sequence range in the data stream.
    """

    __pydantic_config__ = _STRICT

    enabled: bool = True
    """Detect loss spikes and roll back (needs checkpoints)."""
    threshold: float = 2.0
    """A loss above `threshold` times the median of the last `window` losses is a spike."""
    window: int = 100
    """Losses in the running median that `threshold` multiplies."""
    skip_batches: int = 300
    """Batches skipped after rolling back (the paper skipped about 200 to 500), at least those from the
    restart point through the spike."""
    rollback_steps: int = 100
    """Roll back to the latest restart point at or before this many steps before the spike began (paper: ~100)."""
    onset_steps: int = 25
    """How many steps before its detection a spike's start is looked for."""
    restart_every: int | None = 25
    """Steps between restart points kept in host memory; null: none (roll back to checkpoints only)."""

    def max_restart_points(self) -> int:
        """The most restart points kept at once (see the class docstring); 0 without them."""
        if self.restart_every is None:
            return 0
        return -(-(self.rollback_steps + self.onset_steps) // self.restart_every) + 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training loop: steps, batch-size ramp, loss, optimizer, schedule, checkpoints."""

    __pydantic_config__ = _STRICT

    steps: int = 100
    """Optimizer updates in the whole run."""
    batch_ramp: tuple[RampStage, ...] = (RampStage(from_step=0, global_batch=8),)
    """Global batch by step: stages of (from_step, global_batch), the first from step 0 (PaLM: 512, 1024, 2048)."""
    seed: int = 0
    """Seed of parameter initialization and the data order."""
    z_loss: float = 1e-4
    """Auxiliary loss z_loss * log²Z that keeps the softmax normalizer near 1."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """Adafactor's settings."""
    schedule: ScheduleConfig = ScheduleConfig()
    """Learning-rate schedule."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """When checkpoints are saved and how many are kept."""
    loss_spike: LossSpikeConfig = LossSpikeConfig()
    """Loss-spike rollback (paper, section 5.1)."""
    log_every: int = 10
    """Steps between logged metrics lines (a terminal shows a live bar besides)."""
    loss_chunk_mib: int = 256
    """Most float32 logits (MiB per device) the loss holds at once: above it the loss projects onto the
    vocabulary a slice of the sequence at a time (palm.core.train.loss_chunks). Each slice re-reads the
    embedding table and adds to its gradient, so fewer slices are faster where memory allows."""
    profile_steps: tuple[int, int] | None = None
    """Trace training steps [first, last) with jax.profiler into the train stage's `profile/` directory
    (null: no trace). Like loss_chunk_mib, not part of the train stage's key: results do not change."""
    microbatches: int | Literal["auto"] | tuple[int, ...] = 1
    """Microbatches per step (gradient accumulation): the step splits its global batch into this many parts,
    runs them one after another inside the one jitted step (a scan), sums their float32 gradients and makes one
    optimizer update; loss and z-loss are normalized over the whole global batch's tokens, as without
    microbatching. An integer >= 1 for every stage of `batch_ramp`, a list with one count per stage, or "auto":
    per stage, the fewest that fit the chip's memory (the TPU compiler's measure where `palm plan --compile`
    runs, else the plan's estimate). Each count must divide the stage's sequences per data-parallel device. Like
    the mesh, not part of the train stage's key: the same run on fewer chips, differing only by float rounding."""

    def stage_index_at(self, step: int) -> int:
        """The index of the `batch_ramp` stage that `step` is in."""
        index = 0
        for i, stage in enumerate(self.batch_ramp):
            if step >= stage.from_step:
                index = i
        return index

    def microbatch_counts(self) -> tuple[int, ...] | None:
        """Microbatches per `batch_ramp` stage; None for "auto" (resolved by the train stage or the plan)."""
        m = self.microbatches
        if m == "auto":
            return None
        if isinstance(m, int):
            return (m,) * len(self.batch_ramp)
        return tuple(m)

    def global_batch_at(self, step: int) -> int:
        """Global batch size (sequences) at `step` under the batch-size ramp."""
        size = self.batch_ramp[0].global_batch
        for stage in self.batch_ramp:
            if step >= stage.from_step:
                size = stage.global_batch
        return size
