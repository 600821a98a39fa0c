"""The training step and loop: loss with z-loss, Adafactor, the batch-size ramp, 2D sharding.

`Trainer` owns the jitted step for one (model, train config, mesh). `batches` turns a stream of packed
sequences into per-step global batches under the ramp: step s takes the next `global_batch_at(s)`
sequences, so the order of tokens seen is the same with or without a ramp, and jit compiles once per
distinct batch size.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from palm import optimizer as palm_optimizer
from palm.config import ModelConfig, TrainConfig
from palm.errors import PalmError
from palm.model import PaLM, abstract_params, count_params, model_flops_per_token
from palm.sharding import Sharding, make_mesh

#: Token placed before the first token of each packed sequence (the end-of-document id).
START_TOKEN = 1

PEAK_FLOPS_BY_DEVICE = {"h100": 989.4e12, "h200": 989.4e12, "a100": 312e12, "tpu v4": 275e12,
                        "tpu v5p": 459e12}


def peak_flops(device: jax.Device) -> float | None:
    """Dense bf16 peak FLOP/s of a device, or None where unknown (CPU)."""
    kind = device.device_kind.lower()
    for name, peak in PEAK_FLOPS_BY_DEVICE.items():
        if name in kind:
            return peak
    return None


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def loss_fn(params: Any, model: PaLM, tokens: jax.Array, weights: jax.Array, z_loss: float):
    """Mean next-token cross-entropy plus z_loss·log²Z over the weighted (unmasked) targets."""
    inputs = jnp.concatenate([jnp.full_like(tokens[:, :1], START_TOKEN), tokens[:, :-1]], axis=1)
    logits = model.apply({"params": params}, inputs)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    cross_entropy = log_z - target_logit
    z_term = z_loss * jnp.square(log_z)
    denom = jnp.maximum(weights.sum(), 1.0)
    ce = (cross_entropy * weights).sum() / denom
    z = (z_term * weights).sum() / denom
    accuracy = ((jnp.argmax(logits, -1) == tokens) * weights).sum() / denom
    return ce + z, {"loss": ce, "z_loss": z, "accuracy": accuracy}


def layer_axes(boxed: Any) -> Any:
    """0 for parameters stacked over layers (leading axis named "layers"), None for the rest."""
    return jax.tree.map(lambda p: 0 if p.names and p.names[0] == "layers" else None, boxed,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


class Trainer:
    """A jitted, sharded PaLM training step for one model, train config and mesh."""

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig,
                 mesh_shape: dict[str, int] | None = None, devices: list[jax.Device] | None = None):
        devices = list(jax.devices() if devices is None else devices)
        mesh_shape = mesh_shape or {"data": 1, "fsdp": len(devices), "model": 1}
        self.model_config, self.train_config = model_config, train_config
        self.sharding = Sharding.on(make_mesh(mesh_shape, devices))
        platform = devices[0].platform
        constrain = self.sharding.constrain if len(devices) > 1 else (lambda x, names: x)
        self.model = PaLM(model_config, constrain=constrain, platform=platform)
        boxed = abstract_params(model_config)
        self.num_params = count_params(model_config)
        self.flops_per_token = model_flops_per_token(model_config, self.num_params)
        self.peak_flops = peak_flops(devices[0])
        self.num_devices = len(devices)
        self.tx = palm_optimizer.adafactor(train_config.optimizer, train_config.schedule, layer_axes(boxed))
        self.learning_rate = palm_optimizer.learning_rate(train_config.schedule)

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

        self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
        self._step = jax.jit(self._step_fn, donate_argnums=0,
                             in_shardings=(self.state_shardings, self.batch_sharding, self.batch_sharding),
                             out_shardings=(self.state_shardings, self.sharding.replicated))

    # -- jitted bodies ----------------------------------------------------------------------------

    def _init_fn(self, rng: jax.Array) -> TrainState:
        tokens = jnp.zeros((1, min(8, self.model_config.seq_len)), jnp.int32)
        params = nn.unbox(self.model.init(rng, tokens)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def _step_fn(self, state: TrainState, tokens: jax.Array, weights: jax.Array):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, self.model, tokens, weights, self.train_config.z_loss)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), update_norm=optax.tree.norm(updates),
                       learning_rate=self.learning_rate(state.step),
                       finite=jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.tree.norm(grads)))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    # -- public -----------------------------------------------------------------------------------

    def init(self, seed: int | None = None) -> TrainState:
        """Fresh parameters and optimizer state, laid out on the mesh."""
        seed = self.train_config.seed if seed is None else seed
        with jax.set_mesh(self.sharding.mesh):  # Pallas kernels read the mesh to shard_map themselves
            return self._init(jax.random.key(seed))

    def step(self, state: TrainState, tokens: np.ndarray, weights: np.ndarray | None = None):
        """One optimizer step on a global batch [batch, seq_len] of token ids."""
        if weights is None:
            weights = np.ones(tokens.shape, np.float32)
        with jax.set_mesh(self.sharding.mesh):
            return self._step(state, tokens, weights)

    def compiled_batch_sizes(self) -> int:
        """How many distinct batch shapes the step has been compiled for."""
        return self._step._cache_size()


def batches(sequences: Iterable[np.ndarray], train_config: TrainConfig, start_step: int = 0,
            end_step: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(step, [global_batch_at(step), seq_len] tokens), consuming `sequences` in order."""
    it = iter(sequences)
    end = train_config.steps if end_step is None else end_step
    for step in range(start_step, end):
        size = train_config.global_batch_at(step)
        rows = []
        for _ in range(size):
            try:
                rows.append(np.asarray(next(it), np.int32))
            except StopIteration:
                raise PalmError(f"the training data ran out at step {step}: {train_config.steps} steps need "
                                "more sequences than the pack stage produced; lower train.steps or add data"
                                ) from None
        yield step, np.stack(rows)


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


def train(trainer: Trainer, sequences: Iterable[np.ndarray], state: TrainState | None = None,
          on_step: Callable[[StepLog, TrainState], None] | None = None) -> tuple[TrainState, list[StepLog]]:
    """Run `trainer.train_config.steps` steps from `state` (fresh if None); returns the state and logs."""
    cfg = trainer.train_config
    state = trainer.init() if state is None else state
    start = int(state.step)
    logs: list[StepLog] = []
    for step, tokens in batches(sequences, cfg, start):
        t0 = time.perf_counter()
        state, metrics = trainer.step(state, tokens)
        metrics = jax.device_get(metrics)
        dt = time.perf_counter() - t0
        tps = tokens.size / dt
        mfu = tps * trainer.flops_per_token / (trainer.peak_flops * trainer.num_devices) if trainer.peak_flops else None
        log = StepLog(step=step, loss=float(metrics["loss"]), z_loss=float(metrics["z_loss"]),
                      accuracy=float(metrics["accuracy"]), grad_norm=float(metrics["grad_norm"]),
                      update_norm=float(metrics["update_norm"]), learning_rate=float(metrics["learning_rate"]),
                      global_batch=int(tokens.shape[0]), step_seconds=dt, tokens_per_second=tps, mfu=mfu)
        logs.append(log)
        if on_step is not None:
            on_step(log, state)
    return state, logs
