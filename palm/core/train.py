"""The training step and loop: loss with z-loss, Adafactor, the batch-size ramp, 2D sharding.

`Trainer` runs the jitted steps of one model, train config and mesh; trainers of the same model, loss,
optimizer and mesh in a process share those programs (`_Programs`). `batches` turns a stream of packed
sequences into per-step global batches under the ramp: step s takes the next `global_batch_at(s)`
sequences, so the order of tokens seen is the same with or without a ramp, and jit compiles once per
distinct batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from palm.core import optimizer as palm_optimizer
from palm.spec.config import ModelConfig, OptimizerConfig, ScheduleConfig, TrainConfig
from palm.base.errors import PalmError, Preempted
from palm.base.hardware import device_peak_flops
from palm.core.model import (START_TOKEN, PaLM, abstract_params, count_params, logit_divisor, matrix_axes,
                             model_flops_per_token, unscaled_logits)
from palm.core.sharding import Sharding, make_mesh
from palm.core.checkpoint import params_digest, precompile_digest, state_digest
from palm.core.checkpoint import model_digest, restore_params_onto

logger = logging.getLogger("palm.core.train")



def peak_flops(device: jax.Device) -> float | None:
    """Dense bf16 peak FLOP/s of a device, or None where unknown (CPU): palm.base.hardware's table."""
    return device_peak_flops(device.device_kind)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


#: Float32 logits per device above which the loss projects onto the vocabulary a chunk of the sequence
#: at a time. At 62B on 64-way FSDP x 8-way model with batch 1024 the whole [batch, length, vocab]
#: logits would be 4 GiB per device (33 GiB without the vocabulary split), and their gradient as much again.
LOGITS_CHUNK_BYTES = 256 * 2**20


def _logit_statistics(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, ...]:
    """Per target: (log Z, target logit, argmax) of logits [..., vocab], in one reduction over the vocabulary.

    One variadic reduce (the online softmax: a running max and the sum of exp(logit - max) rescaled
    whenever the max grows, beside the argmax and the target's logit), so the compiler reads the logits
    once for all four statistics, where max, sum of exponentials, target and argmax were four passes
    (five with the subtraction of the max). The division by sqrt(d_model) and the target comparison are
    elementwise producers that fuse into it. The running values start at float32's lowest finite number,
    never -inf, so that two empty partial results combine to an empty one (0 · exp(0), not 0 · exp(nan))."""
    vocab_axis = logits.ndim - 1
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, vocab_axis)
    # The target's logit picked by comparison, not a gather: with the vocabulary split over devices a gather
    # would first assemble every device's logits (the whole vocabulary per device); this stays per shard.
    target = jnp.where(vocab == targets[..., None].astype(jnp.int32), logits, 0.0)
    ones = jnp.ones_like(logits)

    def combine(a, b):
        (m1, s1, i1, t1), (m2, s2, i2, t2) = a, b
        first = m1 >= m2  # the larger max keeps its sum; the other's is rescaled by exp(-(difference))
        total = jnp.where(first, s1, s2) + jnp.where(first, s2, s1) * jnp.exp(-jnp.abs(m1 - m2))
        index = jnp.where((m1 > m2) | ((m1 == m2) & (i1 < i2)), i1, i2)  # jnp.argmax: the first of equal maxima
        return jnp.maximum(m1, m2), total, index, t1 + t2

    lowest = jnp.finfo(jnp.float32).min
    init = (jnp.float32(lowest), jnp.float32(0), jnp.int32(logits.shape[-1]), jnp.float32(0))
    top, sum_exp, argmax, target_logit = jax.lax.reduce((logits, ones, vocab, target), init, combine, (vocab_axis,))
    return top + jnp.log(sum_exp), target_logit, argmax


def _weighted_sums(log_z, target_logit, argmax, targets, weights) -> tuple[jax.Array, ...]:
    correct = argmax == targets
    return ((log_z - target_logit) * weights).sum(), (jnp.square(log_z) * weights).sum(), (correct * weights).sum()


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _target_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                 divisor: float = 1.0) -> tuple[jax.Array, ...]:
    """Weighted sums over the targets of cross-entropy, log²Z and correct argmax predictions, of the float32
    logits `logits / divisor` (the matmul's output and sqrt(d_model): `palm.core.model.unscaled_logits`).

    Written so that the float32 [b, t, vocab] logits are written once, by the matmul, and read twice: by
    the forward's one reduction (`_logit_statistics`) and by the backward's one elementwise pass, which
    computes the logits' gradient, (softmax - one-hot) · w · g_ce + 2 log Z · softmax · w · g_z, from the
    logits, log Z and the target alone and hands it to the projection's backward, which casts it to the
    compute dtype in the same fusion (`palm.core.model.project_to_vocab`). Autodiff of the same formulas
    kept the divided logits and their exponentials for the backward pass and made a float32 gradient:
    five float32 passes over the logits and a convert (the profile in docs/benchmarks.md). Same value and
    gradient as autodiff's up to the order of float32 sums (tests/test_train.py); no gradient flows to
    `divisor` or to the weights."""
    log_z, target_logit, argmax = _logit_statistics(logits / jnp.float32(divisor), targets)
    return _weighted_sums(log_z, target_logit, argmax, targets, weights)


def _target_sums_fwd(logits, targets, weights, divisor):
    log_z, target_logit, argmax = _logit_statistics(logits / jnp.float32(divisor), targets)
    return _weighted_sums(log_z, target_logit, argmax, targets, weights), (logits, targets, weights, log_z)


def _target_sums_bwd(divisor, residuals, cotangents):
    logits, targets, weights, log_z = residuals
    g_ce, g_z, _ = cotangents  # the count of correct predictions has no gradient
    scale = jnp.float32(divisor)
    ce = g_ce * weights  # d(sum)/d(log Z) per target: cross-entropy's share, then the z-loss's
    softmax_coef = ce + g_z * weights * 2.0 * log_z
    probs = jnp.exp(logits / scale - log_z[..., None])
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    one_hot = jnp.where(vocab == targets[..., None].astype(jnp.int32), ce[..., None], 0.0)
    grad = (softmax_coef[..., None] * probs - one_hot) / scale
    return grad, None, jnp.zeros_like(weights)


_target_sums.defvjp(_target_sums_fwd, _target_sums_bwd)


def _vocab_sums(x: jax.Array, embedding: jax.Array, targets: jax.Array, weights: jax.Array,
                model: PaLM) -> tuple[jax.Array, ...]:
    """`_target_sums` of the logits of final hidden states x [b, t, d] (the model's output projection)."""
    logits = unscaled_logits(x, embedding, model.config, model.constrain, model.vocab_split)
    return _target_sums(logits, targets, weights, logit_divisor(model.config))


def _chunked_target_sums(x: jax.Array, embedding: jax.Array, targets: jax.Array, weights: jax.Array,
                         model: PaLM, chunks: int) -> tuple[jax.Array, ...]:
    """`_target_sums` of the logits of hidden states x [b, t, d], `chunks` slices of the sequence at a time.

    A scan over the slices, each rematerialized: the forward and the backward pass hold one slice's
    logits (and their gradient) at a time, never the whole batch's. Same value and gradient as the whole
    logits, up to the order of float32 sums."""
    b, t, d = x.shape
    if t % chunks:
        raise PalmError(f"the loss's {chunks} chunks must divide the sequence length {t}")
    if chunks == 1:
        return _vocab_sums(x, embedding, targets, weights, model)

    def split(a: jax.Array) -> jax.Array:  # [b, t, ...] -> [chunks, b, t / chunks, ...]
        return jnp.moveaxis(a.reshape(b, chunks, t // chunks, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(carry, chunk):
        xc, tc, wc = chunk
        return tuple(a + s for a, s in zip(carry, _vocab_sums(xc, embedding, tc, wc, model))), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(body, (zero, zero, zero), (split(x), split(targets), split(weights)))
    return sums


def loss_chunks(batch_per_device: int, seq_len: int, vocab_per_device: int,
                budget: int = LOGITS_CHUNK_BYTES) -> int:
    """Fewest slices of the sequence (a divisor of its length) whose float32 logits per device fit `budget`."""
    whole = batch_per_device * seq_len * vocab_per_device * 4
    for chunks in range(1, seq_len + 1):
        if seq_len % chunks == 0 and whole <= budget * chunks:
            return chunks
    return seq_len


def loss_fn(params: Any, model: PaLM, tokens: jax.Array, weights: jax.Array, z_loss: float, chunks: int = 1):
    """Mean next-token cross-entropy plus z_loss·log²Z over the weighted (unmasked) targets.

    The model's final hidden states are projected onto the vocabulary here, not by the model (the same
    logits: `palm.core.model.output_logits`), so that the loss's statistics fuse with the projection's
    output (`_target_sums`); with `chunks` > 1 a slice of the sequence at a time (`_chunked_target_sums`)."""
    inputs = jnp.concatenate([jnp.full_like(tokens[:, :1], START_TOKEN), tokens[:, :-1]], axis=1)
    x = model.apply({"params": params}, inputs, hidden=True)
    sums = _chunked_target_sums(x, params["embedding"], tokens, weights, model, chunks)
    ce_sum, z_sum, correct = sums
    denom = jnp.maximum(weights.sum(), 1.0)
    ce, z = ce_sum / denom, z_loss * z_sum / denom
    return ce + z, {"loss": ce, "z_loss": z, "accuracy": correct / denom}


@dataclasses.dataclass(frozen=True)
class ProgramConfig:
    """What the jitted programs of training read from a TrainConfig: the loss, the optimizer and its schedule.
    The rest (steps, the ramp, seed, checkpoints, logging) is the host loop's."""

    z_loss: float
    loss_chunk_mib: int
    optimizer: OptimizerConfig
    schedule: ScheduleConfig

    @classmethod
    def of(cls, train_config: TrainConfig) -> "ProgramConfig":
        return cls(train_config.z_loss, train_config.loss_chunk_mib, train_config.optimizer, train_config.schedule)


class _Programs:
    """The jitted initialisation, train and evaluation steps of one model, ProgramConfig and mesh, with their
    shardings. Trainers of the same three share one (`_programs`), so a process that trains or resumes the
    same model again (a flow's next run, a retried task, an evaluation beside training) traces and compiles
    nothing again: each jitted function keeps its executables."""

    def __init__(self, model_config: ModelConfig, config: ProgramConfig, mesh_shape: tuple[tuple[str, int], ...],
                 devices: tuple[jax.Device, ...]):
        self.model_config, self.config = model_config, config
        self.sharding = Sharding.on(make_mesh(dict(mesh_shape), list(devices)))
        platform = devices[0].platform
        self.num_devices = len(devices)
        constrain = self.sharding.constrain if self.num_devices > 1 else (lambda x, names: x)
        model_ways = self.sharding.axis_sizes["model"]
        self.model = PaLM(model_config, constrain=constrain, platform=platform,
                          vocab_split=model_ways > 1 and model_config.vocab_size % model_ways == 0)
        boxed = abstract_params(model_config)
        self.tx = palm_optimizer.adafactor(config.optimizer, config.schedule, matrix_axes(boxed))
        self.learning_rate = palm_optimizer.learning_rate(config.schedule)

        param_shardings = self.sharding.for_params(boxed)
        abstract = jax.tree.map(lambda p: p.value, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        abstract_opt = jax.eval_shape(self.tx.init, abstract)
        # Optimizer leaves shaped like their parameter (second moments, momentum) share its layout;
        # the rest (counters, Adafactor's unused factor slots) are replicated.
        opt_shardings = optax.tree_map_params(
            self.tx, lambda leaf, s, p: s if leaf.shape == p.shape else self.sharding.replicated,
            abstract_opt, param_shardings, abstract, transform_non_params=lambda _: self.sharding.replicated)
        self.state_shardings = TrainState(step=self.sharding.replicated, params=param_shardings,
                                          opt_state=opt_shardings)
        self.batch_sharding = self.sharding.named(("batch", "length"))

        self.init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
        self.init_from = jax.jit(self._init_from_fn, in_shardings=(param_shardings,),
                                 out_shardings=self.state_shardings)
        self.steps: dict[int, Any] = {}  # the jitted step per microbatch count
        self.eval = jax.jit(self._eval_fn, in_shardings=(param_shardings, self.batch_sharding, self.batch_sharding),
                            out_shardings=self.sharding.replicated)

    @functools.cached_property
    def abstract_state(self) -> TrainState:
        shapes = jax.eval_shape(self._init_fn, jax.random.key(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_shardings)

    def step(self, microbatches: int) -> Any:
        if microbatches not in self.steps:
            self.steps[microbatches] = jax.jit(
                functools.partial(self._step_fn, microbatches=microbatches), donate_argnums=0,
                in_shardings=(self.state_shardings, self.batch_sharding, self.batch_sharding),
                out_shardings=(self.state_shardings, self.sharding.replicated))
        return self.steps[microbatches]

    # -- jitted bodies ----------------------------------------------------------------------------

    def _init_fn(self, rng: jax.Array) -> TrainState:
        tokens = jnp.zeros((1, min(8, self.model_config.seq_len)), jnp.int32)
        params = nn.unbox(self.model.init(rng, tokens)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def loss_chunks(self, global_batch: int) -> int:
        sizes = self.sharding.axis_sizes
        per_device = -(-global_batch // self.sharding.data_parallel_size)
        vocab = self.model_config.vocab_size
        vocab_per_device = vocab // sizes["model"] if vocab % sizes["model"] == 0 else vocab
        return loss_chunks(per_device, self.model_config.seq_len, vocab_per_device,
                           self.config.loss_chunk_mib * 2**20)

    def _init_from_fn(self, params: Any) -> TrainState:
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def _step_fn(self, state: TrainState, tokens: jax.Array, weights: jax.Array, microbatches: int = 1):
        if microbatches == 1:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (_, metrics), grads = grad_fn(state.params, self.model, tokens, weights, self.config.z_loss,
                                          self.loss_chunks(tokens.shape[0]))
        else:
            metrics, grads = self.accumulated_grads(state.params, tokens, weights, microbatches)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates),
                       learning_rate=self.learning_rate(state.step),
                       finite=jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.tree.norm(grads)))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def accumulated_grads(self, params: Any, tokens: jax.Array, weights: jax.Array, microbatches: int):
        """loss_fn's metrics and gradient over the global batch, `microbatches` parts at a time.

        A scan over the parts sums float32 gradients and metrics. Each part's loss_fn value is normalized by
        its own tokens; rescaled by (its tokens / the global batch's tokens) the sum is the global batch's
        mean, the same as without microbatching up to the order of float32 sums. Row i of part j is global
        row i * microbatches + j: where the count divides each data-parallel device's rows, every part keeps
        the global batch's layout (each device holds the same number of rows of every part, from its own
        rows, with no data moved); otherwise XLA moves rows, with the same result."""
        b, t = tokens.shape
        if b % microbatches:
            raise PalmError(f"{microbatches} microbatches do not divide the global batch of {b} sequences")
        rows = b // microbatches
        split = lambda a: jnp.swapaxes(a.reshape(rows, microbatches, t), 0, 1)  # [microbatches, rows, t]
        parts = tuple(self.model.constrain(split(a), (None, "batch", "length")) for a in (tokens, weights))
        denom = jnp.maximum(weights.sum(), 1.0)
        chunks = self.loss_chunks(rows)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def body(carry, part):
            acc_grads, acc_metrics = carry
            tok, w = part
            tok, w = self.model.constrain(tok, ("batch", "length")), self.model.constrain(w, ("batch", "length"))
            scale = jnp.maximum(w.sum(), 1.0) / denom
            # loss_fn normalizes by this part's tokens: its value and gradient times `scale` are this part's
            # share of the global batch's mean (the gradient is linear in that constant).
            (_, m), g = grad_fn(params, self.model, tok, w, self.config.z_loss, chunks)
            acc_grads = jax.tree.map(lambda a, x: a + x.astype(jnp.float32) * scale, acc_grads, g)
            acc_metrics = {k: acc_metrics[k] + m[k].astype(jnp.float32) * scale for k in acc_metrics}
            return (acc_grads, acc_metrics), None

        zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        if self.num_devices > 1:  # the sum laid out like the parameters (each device its shard)
            zero_grads = jax.lax.with_sharding_constraint(zero_grads, self.state_shardings.params)
        zero_metrics = {k: jnp.zeros((), jnp.float32) for k in ("loss", "z_loss", "accuracy")}
        (grads, metrics), _ = jax.lax.scan(body, (zero_grads, zero_metrics), parts)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return metrics, grads

    def _eval_fn(self, params: Any, tokens: jax.Array, weights: jax.Array):
        _, metrics = loss_fn(params, self.model, tokens, weights, self.config.z_loss,
                             self.loss_chunks(tokens.shape[0]))
        return metrics


@functools.lru_cache(maxsize=16)
def _programs(model_config: ModelConfig, config: ProgramConfig, mesh_shape: tuple[tuple[str, int], ...],
              devices: tuple[jax.Device, ...]) -> _Programs:
    return _Programs(model_config, config, mesh_shape, devices)


class Trainer:
    """A jitted, sharded PaLM training step for one model, train config and mesh."""

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig,
                 mesh_shape: dict[str, int] | None = None, devices: list[jax.Device] | None = None,
                 microbatches: tuple[int, ...] | None = None):
        """`microbatches`: the count per batch_ramp stage, replacing train_config.microbatches (how the train
        stage and the plan pass the counts they chose for "auto")."""
        devices = list(jax.devices() if devices is None else devices)
        mesh_shape = mesh_shape or {"data": 1, "fsdp": len(devices), "model": 1}
        self.model_config, self.train_config = model_config, train_config
        counts = tuple(microbatches) if microbatches is not None else train_config.microbatch_counts()
        if counts is None:
            raise PalmError("train.microbatches is auto: choose the counts first (palm.analysis.memory."
                            "auto_microbatches, as the train stage and `palm plan` do) and pass them to Trainer")
        if len(counts) != len(train_config.batch_ramp):
            raise PalmError(f"{len(counts)} microbatch counts for {len(train_config.batch_ramp)} batch_ramp stages")
        self.microbatch_counts = counts
        # The jitted programs and their shardings, shared with every Trainer of the same model, loss, optimizer
        # and mesh in this process.
        self.programs = _programs(model_config, ProgramConfig.of(train_config), tuple(mesh_shape.items()),
                                  tuple(devices))
        self.sharding, self.model, self.tx = self.programs.sharding, self.programs.model, self.programs.tx
        self.learning_rate = self.programs.learning_rate
        self.state_shardings, self.batch_sharding = self.programs.state_shardings, self.programs.batch_sharding
        self.num_params = count_params(model_config)
        self.flops_per_token = model_flops_per_token(model_config, self.num_params)
        self.peak_flops = peak_flops(devices[0])
        self.num_devices = len(devices)

    def _jitted_step(self, microbatches: int) -> Any:
        return self.programs.step(microbatches)

    def microbatches_at(self, step: int) -> int:
        """Microbatches of the step `step` (its batch_ramp stage's count)."""
        return self.microbatch_counts[self.train_config.stage_index_at(step)]

    def loss_chunks(self, global_batch: int) -> int:
        """How many slices of the sequence the loss projects onto the vocabulary at a time (see loss_fn)."""
        return self.programs.loss_chunks(global_batch)

    # -- public -----------------------------------------------------------------------------------

    def init(self, seed: int | None = None) -> TrainState:
        """Fresh parameters and optimizer state, laid out on the mesh."""
        seed = self.train_config.seed if seed is None else seed
        with jax.set_mesh(self.sharding.mesh):  # Pallas kernels read the mesh to shard_map themselves
            return self.programs.init(jax.random.key(seed))

    def init_from(self, checkpoint: str) -> TrainState:
        """Step 0 from another run's parameters (a checkpoint step directory), with a fresh optimizer
        state: how a fine-tuning run starts (PaLM-Coder continued from PaLM 540B this way)."""
        params = restore_params_onto(checkpoint, self.abstract_state().params)
        with jax.set_mesh(self.sharding.mesh):
            return self.programs.init_from(params)

    def step(self, state: TrainState, tokens: np.ndarray, weights: np.ndarray | None = None,
             global_batch: int | None = None, microbatches: int = 1):
        """One optimizer step on a global batch [batch, seq_len] of token ids, in `microbatches` parts.

        With several processes (hosts), `tokens` are this host's rows of the global batch
        (`host_rows(global_batch)`), and the global array is assembled from every host's rows.
        """
        tokens, weights = self._global_batch(tokens, weights, global_batch)
        with jax.set_mesh(self.sharding.mesh):
            return self._jitted_step(microbatches)(state, tokens, weights)

    def _global_batch(self, tokens: np.ndarray, weights: np.ndarray | None, global_batch: int | None):
        """(tokens, weights) as global arrays: this host's rows assembled with every other host's."""
        if weights is None:
            weights = np.ones(tokens.shape, np.float32)
        if jax.process_count() > 1:
            shape = (global_batch or tokens.shape[0] * jax.process_count(), tokens.shape[1])
            tokens = jax.make_array_from_process_local_data(self.batch_sharding, tokens, shape)
            weights = jax.make_array_from_process_local_data(self.batch_sharding, weights, shape)
        return tokens, weights

    def evaluate(self, params: Any, tokens: np.ndarray, weights: np.ndarray | None = None,
                 global_batch: int | None = None) -> dict[str, Any]:
        """Loss, z-loss and accuracy of `params` on a global batch (the evaluation step: the training
        forward pass without gradients, on the training mesh). Rows as in `step`."""
        tokens, weights = self._global_batch(tokens, weights, global_batch)
        with jax.set_mesh(self.sharding.mesh):
            return jax.device_get(self.programs.eval(params, tokens, weights))

    def step_arguments(self, kind: str, global_batch: int) -> tuple[Any, ...]:
        """Abstract arguments (shapes, dtypes, shardings) of the train ("train") or evaluation ("eval") step."""
        batch = jax.ShapeDtypeStruct((global_batch, self.model_config.seq_len), jnp.int32,
                                     sharding=self.batch_sharding)
        weights = jax.ShapeDtypeStruct(batch.shape, jnp.float32, sharding=self.batch_sharding)
        state = self.abstract_state()
        if kind == "train":
            return state, batch, weights
        if kind == "eval":
            return state.params, batch, weights
        raise ValueError(f"unknown step kind {kind!r}")

    def lower(self, kind: str, global_batch: int, microbatches: int = 1) -> Any:
        """The train or evaluation step lowered for a global batch, from abstract shapes and shardings
        alone: nothing is allocated, so the devices may be a topology this host does not have (see
        palm.analysis.aot). `.compile()` it for the executable and its memory analysis."""
        args = self.step_arguments(kind, global_batch)
        with jax.set_mesh(self.sharding.mesh):
            return (self._jitted_step(microbatches) if kind == "train" else self.programs.eval).lower(*args)

    def precompile(self) -> None:
        """Compile the programs a run with this trainer calls, without running them: initialisation, the step
        at each batch_ramp stage the run reaches (`step_shapes`), and the digests of the state and parameters that each checkpoint records.
        With JAX's persistent compilation cache on, the run that follows loads them from it instead of
        compiling; `palm run` does this while Prefect's server starts (palm.stages.train.prepare). (A
        fine-tuning run starts from other parameters through `init_from`, which it compiles itself.)"""
        with jax.set_mesh(self.sharding.mesh):
            self.programs.init.lower(jax.random.key(self.train_config.seed)).compile()
        for shape in self.step_shapes():
            self.lower("train", *shape).compile()
        state = self.abstract_state()  # the digests recorded with every checkpoint: the state's, the parameters'
        precompile_digest(state)
        precompile_digest(state.params)

    def step_shapes(self) -> list[tuple[int, int]]:
        """(global batch, microbatches) of each step program a run of `steps` steps calls: the batch ramp's
        stages that start before the last step (a short run of a spec whose ramp goes on later compiles
        only what it reaches)."""
        steps = self.train_config.steps
        return sorted({(s.global_batch, n) for s, n in zip(self.train_config.batch_ramp, self.microbatch_counts)
                       if s.from_step < steps})

    def host_rows(self, global_batch: int) -> tuple[int, int]:
        """The rows [start, stop) of a global batch that this process's devices hold."""
        if jax.process_count() == 1:
            return 0, global_batch
        shape = (global_batch, self.model_config.seq_len)
        spans = {(i[0].start or 0, global_batch if i[0].stop is None else i[0].stop)
                 for i in self.batch_sharding.addressable_devices_indices_map(shape).values()}
        start, stop = min(a for a, _ in spans), max(b for _, b in spans)
        if sum(b - a for a, b in spans) != stop - start:
            raise PalmError(f"this host's devices hold rows {sorted(spans)} of the global batch, not one contiguous "
                            "block; order the mesh's devices by host (data and fsdp outermost)")
        return start, stop

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the train state, for restoring a checkpoint onto this mesh."""
        return self.programs.abstract_state

    def compiled_batch_sizes(self) -> int:
        """How many distinct batch shapes the step has been compiled for (in this process, by this trainer or
        another of the same programs)."""
        return sum(step._cache_size() for step in self.programs.steps.values())


@dataclasses.dataclass
class StepLog:
    step: int
    loss: float
    z_loss: float
    accuracy: float
    grad_norm: float
    update_norm: float
    learning_rate: float
    global_batch: int
    step_seconds: float
    tokens_per_second: float
    mfu: float | None
    microbatches: int = 1


@dataclasses.dataclass
class RunResult:
    state: TrainState
    logs: list[StepLog]
    #: Loss spikes and non-finite losses met, each with the rollback and the batches skipped.
    spikes: list[dict[str, Any]]
    #: Checkpoints found unusable on restore and moved aside.
    corrupt_checkpoints: list[dict[str, Any]]
    resumed_from: int | None


class _Stream:
    """Sequences with an optional saveable state (Grain iterators have one; plain iterators do not)."""

    def __init__(self, sequences: Iterable[np.ndarray]):
        self.it = iter(sequences)

    def take(self, n: int, step: int) -> np.ndarray:
        rows = []
        for _ in range(n):
            try:
                rows.append(np.asarray(next(self.it), np.int32))
            except StopIteration:
                raise PalmError(f"the training data ran out at step {step}: more steps (train.steps) than the "
                                "pack stage produced sequences for; lower train.steps or add data") from None
        return np.stack(rows)

    def skip(self, n: int, step: int) -> None:
        """Pass over the next `n` sequences (a plain iterator has to draw them)."""
        self.take(n, step)

    def state(self) -> dict[str, Any]:
        return self.it.state() if hasattr(self.it, "state") else {}

    def restore(self, state: dict[str, Any]) -> None:
        if hasattr(self.it, "restore"):
            self.it.restore(state)


def batches(sequences: Iterable[np.ndarray], train_config: TrainConfig, start_step: int = 0,
            end_step: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(step, [global_batch_at(step), seq_len] tokens), consuming `sequences` in order."""
    stream = _Stream(sequences)
    end = train_config.steps if end_step is None else end_step
    for step in range(start_step, end):
        yield step, stream.take(train_config.global_batch_at(step), step)


def stop_requested(stop: Any) -> bool:
    """Whether to checkpoint and stop now. With several hosts, a stop on any host stops them all at the
    same step (a checkpoint is a collective; hosts that disagreed would wait for each other forever)."""
    if stop is None:
        return False
    asked = bool(stop.is_set())
    if jax.process_count() == 1:
        return asked
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([asked]))))


def is_spike(loss: float, recent: list[float], threshold: float) -> bool:
    """Non-finite, or above `threshold` times the median of the recent losses (section 5.1)."""
    if not np.isfinite(loss):
        return True
    return len(recent) >= 5 and loss > threshold * float(np.median(recent))


def spike_start(step: int, recent: list[tuple[int, float]], median: float | None, threshold: float,
                onset_steps: int) -> int:
    """The step a spike detected at `step` began: the earliest of an unbroken run of steps just before it
    (at most `onset_steps` back) whose losses were already above (1 + threshold) / 2 times the median,
    half way to the detection threshold; `step` itself when the loss jumped at once. `recent` holds the
    (step, loss) of the steps trained before `step`, in order."""
    if median is None or not np.isfinite(median):
        return step
    rising = median * (1.0 + threshold) / 2.0
    start = step
    for s, loss in reversed(recent):
        if s != start - 1 or s < step - onset_steps or not loss > rising:
            break
        start = s
    return start


def restart_target(start: int, rollback_steps: int) -> int:
    """The step a spike that began at `start` rolls back to at the latest: max(0, start - rollback_steps)."""
    return max(0, start - rollback_steps)


def _shard_key(index: tuple[slice, ...]) -> tuple[tuple[Any, Any, Any], ...]:
    return tuple((i.start, i.stop, i.step) for i in index)


@dataclasses.dataclass
class _HostArray:
    """One array's shards on this host, each distinct shard once with the devices that hold it."""

    shape: tuple[int, ...]
    sharding: Any
    shards: list[tuple[np.ndarray, list[jax.Device]]]


def to_host(tree: Any) -> Any:
    """A copy of a tree of (sharded) jax.Arrays in this host's memory: each addressable shard copied once
    (replicas on several local devices share a copy). Works with several hosts, each copying its own."""

    def copy(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return np.array(x, copy=True)
        shards: dict[Any, tuple[np.ndarray, list[jax.Device]]] = {}
        for shard in x.addressable_shards:
            key = _shard_key(shard.index)
            if key not in shards:  # np.array copies: a view of a buffer the step later donates would change
                shards[key] = (np.array(shard.data, copy=True), [])
            shards[key][1].append(shard.device)
        return _HostArray(tuple(x.shape), x.sharding, list(shards.values()))

    return jax.tree.map(copy, tree)


def to_devices(tree: Any) -> Any:
    """The tree of `to_host`, back on the devices and shardings it came from."""

    def put(x: Any) -> Any:
        if not isinstance(x, _HostArray):
            return x
        arrays = [jax.device_put(data, device) for data, devices in x.shards for device in devices]
        return jax.make_array_from_single_device_arrays(x.shape, x.sharding, arrays)

    return jax.tree.map(put, tree, is_leaf=lambda x: isinstance(x, _HostArray))


@dataclasses.dataclass
class RestartPoint:
    step: int
    state: Any  # the train state as `to_host` copies it
    data: dict[str, Any]  # the data iterator's state
    position: int | None  # sequences drawn from the data stream before it


class RestartPoints:
    """Recent train states in host memory to roll a loss spike back to (see LossSpikeConfig).

    `add` keeps a point every `every` steps (and wherever `force`d); it drops the points that no later
    spike can roll back to: a spike detected at step s >= now began at s - onset_steps or later, so it
    rolls back to the latest point at or before now - onset_steps - rollback_steps, or a later one."""

    def __init__(self, every: int, reach: int):
        self.every, self.reach = every, reach
        self.points: dict[int, RestartPoint] = {}

    def due(self, step: int) -> bool:
        return step not in self.points and (step % self.every == 0 or not self.points)

    def add(self, step: int, state: Any, data: dict[str, Any], position: int | None) -> None:
        import copy

        self.points[step] = RestartPoint(step, to_host(state), copy.deepcopy(data), position)
        oldest_needed = self.latest_at_or_before(step - self.reach)
        if oldest_needed is not None:
            self.points = {s: p for s, p in self.points.items() if s >= oldest_needed}

    def latest_at_or_before(self, step: int) -> int | None:
        return max((s for s in self.points if s <= step), default=None)

    def oldest(self) -> int | None:
        return min(self.points, default=None)

    def drop_after(self, step: int) -> None:
        """Forget the points after `step` (another trajectory, once training rolled back to `step`)."""
        self.points = {s: p for s, p in self.points.items() if s <= step}

    def restore(self, step: int) -> RestartPoint:
        import copy

        p = self.points[step]
        return RestartPoint(step, to_devices(p.state), copy.deepcopy(p.data), p.position)


def run_training(trainer: Trainer, sequences: Iterable[np.ndarray], *, checkpoints: Any = None,
                 meta: dict[str, Any] | None = None, on_step: Callable[[StepLog, TrainState], None] | None = None,
                 on_checkpoint: Callable[[int, dict[str, Any]], None] | None = None,
                 stop: Any = None, init_from: str | None = None) -> RunResult:
    """Train to `train.steps`, resuming from the latest valid checkpoint and surviving loss spikes.

    `checkpoints` is a `palm.core.checkpoint.Checkpoints` (None: no checkpoints, no rollback). A loss spike
    rolls back to a restart point (or checkpoint) about `loss_spike.rollback_steps` before it began and
    skips the batches from there through it (`palm.spec.config.LossSpikeConfig`). `stop` is any
    object with `is_set()` (a threading.Event set by a SIGTERM handler): the loop then saves at the
    current step and raises `Preempted`.
    """
    cfg, spike_cfg = trainer.train_config, trainer.train_config.loss_spike
    stream = sequences if hasattr(sequences, "take") else _Stream(sequences)  # HostBatches, or any iterable
    meta = dict(meta or {})
    logs: list[StepLog] = []
    spikes: list[dict[str, Any]] = []
    recent: list[tuple[int, float]] = []  # (step, loss) of the current trajectory
    resumed_from = None
    handle_spikes = spike_cfg.enabled and checkpoints is not None
    points = (RestartPoints(spike_cfg.restart_every, spike_cfg.rollback_steps + spike_cfg.onset_steps)
              if handle_spikes and spike_cfg.restart_every is not None else None)
    position: int | None = 0  # sequences drawn from the data stream (None: unknown, an older checkpoint)

    saved: list[int] = []  # the last step saved by this run

    def save(step: int, state: TrainState, metrics: dict[str, Any]) -> None:
        if checkpoints is None:
            return
        saved[:] = [step]
        data_state = stream.state()
        record = {**meta, "step": step, "seed": cfg.seed, "digest": params_digest(state.params),
                  "model_digest": model_digest(state.params),
                  "state_digest": state_digest(state, data_state), "state_digest_data": True,
                  "metrics": metrics, "spikes": spikes, "data_position": position}
        checkpoints.save(step, state, data_state, record)
        if on_checkpoint is not None:
            on_checkpoint(step, record)

    def restore(before: int | None = None):
        restored = checkpoints.restore_latest_valid(trainer.abstract_state(), before=before)
        if restored is not None:
            stream.restore(restored.data)
        return restored

    def draw(size: int, step: int) -> np.ndarray:
        nonlocal position
        tokens = stream.take(size, step)
        position = None if position is None else position + size
        return tokens

    def roll_back(step: int, loss: float) -> TrainState:
        """Roll back from a spike detected at `step`; returns the state to go on from (its step)."""
        nonlocal position, recent
        window = [loss for _, loss in recent[-spike_cfg.window:]]
        median = float(np.median(window)) if window else None
        start = spike_start(step, recent, median, spike_cfg.threshold, spike_cfg.onset_steps)
        target = restart_target(start, spike_cfg.rollback_steps)
        # The latest restart point at or before the target, else the latest checkpoint there, else the
        # oldest restart point kept, else the latest checkpoint before the spike.
        state = source = None
        point = points.latest_at_or_before(target) if points is not None else None
        if point is None:
            restored = restore(before=target + 1)
            if restored is not None:
                source, state, rolled_to = "checkpoint", restored.state, restored.step
                position = restored.meta.get("data_position")
        if state is None and point is None and points is not None:
            point = points.oldest()
        if state is None and point is not None:
            p = points.restore(point)
            stream.restore(p.data)
            source, state, rolled_to, position = "restart_point", p.state, point, p.position
        if state is None:
            restored = restore(before=step + 1)
            if restored is None:
                raise PalmError(f"loss spike at step {step} (loss {loss}) and no restart point or valid checkpoint "
                                "to roll back to")
            source, state, rolled_to = "checkpoint", restored.state, restored.step
            position = restored.meta.get("data_position")
        # Skip at least the batches from the restart step through the spike, so the batch that caused it is
        # never seen again (the paper skipped about 200 to 500): those the next steps would have taken.
        skip = max(spike_cfg.skip_batches, step - rolled_to + 1)
        first = position
        for i in range(skip):
            size = cfg.global_batch_at(rolled_to + i)
            stream.skip(size, rolled_to + i) if hasattr(stream, "skip") else stream.take(size, rolled_to + i)
            position = None if position is None else position + size
        spikes.append({"step": step, "loss": loss, "median": median, "start": start, "target": target,
                       "rolled_back_to": rolled_to, "restart_from": source, "skipped_batches": skip,
                       "skipped_sequences": None if first is None else [first, position]})
        logger.warning("loss spike at step %d (loss %.4g, median %s), begun at step %d: rolled back to step %d (%s), "
                    "skipped %d batches", step, loss, median, start, rolled_to, source, skip)
        recent = [(s, x) for s, x in recent if s < rolled_to]
        # The checkpoints after the restart step hold another trajectory; one at that step is replaced by the
        # state with the data position after the skip, so a resume from it does not see the skipped batches.
        checkpoints.discard_from(rolled_to)
        save(rolled_to, state, {})
        if points is not None:
            points.drop_after(rolled_to)
            points.add(rolled_to, state, stream.state(), position)
        return state

    state = None
    if checkpoints is not None:
        restored = restore()
        if restored is not None:
            state, resumed_from = restored.state, restored.step
            saved[:] = [restored.step]
            spikes.extend(restored.meta.get("spikes", []))
            position = restored.meta.get("data_position")
    if state is None:  # nothing to resume: fresh, or from another run's parameters (fine-tuning)
        state = trainer.init() if init_from is None else trainer.init_from(init_from)
        save(0, state, {})
    step = int(state.step)

    while step < cfg.steps:
        if stop_requested(stop):
            if saved != [step]:  # a stop right after a scheduled checkpoint has nothing new to save
                save(step, state, logs[-1].__dict__ if logs else {})
            checkpoints.wait() if checkpoints is not None else None
            raise Preempted(step)
        if points is not None and points.due(step):
            points.add(step, state, stream.state(), position)
        size = cfg.global_batch_at(step)
        tokens = draw(size, step)
        t0 = time.perf_counter()
        new_state, metrics = trainer.step(state, tokens, global_batch=size, microbatches=trainer.microbatches_at(step))
        metrics = jax.device_get(metrics)
        dt = time.perf_counter() - t0
        loss = float(metrics["loss"])

        if handle_spikes and is_spike(loss, [x for _, x in recent[-spike_cfg.window:]], spike_cfg.threshold):
            state = roll_back(step, loss)
            step = int(state.step)
            continue

        state = new_state
        recent.append((step, loss))
        del recent[:-max(spike_cfg.window, spike_cfg.onset_steps + 1)]
        tps = size * tokens.shape[1] / dt  # the global batch's tokens, over all hosts
        mfu = tps * trainer.flops_per_token / (trainer.peak_flops * trainer.num_devices) if trainer.peak_flops else None
        log = StepLog(step=step, loss=loss, z_loss=float(metrics["z_loss"]), accuracy=float(metrics["accuracy"]),
                      grad_norm=float(metrics["grad_norm"]), update_norm=float(metrics["update_norm"]),
                      learning_rate=float(metrics["learning_rate"]), global_batch=size, step_seconds=dt,
                      tokens_per_second=tps, mfu=mfu, microbatches=trainer.microbatches_at(step))
        logs.append(log)
        step += 1
        if on_step is not None:
            on_step(log, state)
        if checkpoints is not None and (step % cfg.checkpoint.every_steps == 0 or step == cfg.steps):
            save(step, state, dataclasses.asdict(log))

    if checkpoints is not None:
        checkpoints.wait()
    return RunResult(state, logs, spikes, list(getattr(checkpoints, "corrupt", [])), resumed_from)


def train(trainer: Trainer, sequences: Iterable[np.ndarray], state: TrainState | None = None,
          on_step: Callable[[StepLog, TrainState], None] | None = None) -> tuple[TrainState, list[StepLog]]:
    """Train without checkpoints (tests, benchmarks): `trainer.train_config.steps` steps from `state`."""
    if state is not None:
        raise PalmError("train() starts fresh; resume through run_training with checkpoints")
    result = run_training(trainer, sequences, on_step=on_step)
    return result.state, result.logs
