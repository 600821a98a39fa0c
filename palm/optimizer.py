"""PaLM's optimizer (Chowdhery et al. 2022, section 5): Adafactor with momentum, unfactored, lr² weight decay.

Per step, in optax.adafactor's order: clip the gradients' global norm; divide by the root of the
second moment (β2 = 1 - k^-0.8); clip each update matrix to RMS 1; multiply by the learning rate and
by max(parameter RMS, 1e-3); momentum β1; add lr²·parameter; negate. Parameters scanned over layers
carry a leading layer axis, and both RMS terms are taken per layer, since PaLM treats each layer's
matrix as its own.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from palm.config import OptimizerConfig, ScheduleConfig

Schedule = Callable[[jax.Array], jax.Array]


def global_norm(tree: Any) -> jax.Array:
    """L2 norm over every leaf of a pytree."""
    return optax.tree.norm(tree)


def learning_rate(schedule: ScheduleConfig) -> Schedule:
    """peak for steps < constant_steps, then peak·sqrt(constant_steps / step); optional linear warm-up."""
    if schedule.constant_steps < 1:
        raise ValueError(f"schedule.constant_steps must be at least 1, got {schedule.constant_steps}")
    peak, constant, warmup = schedule.peak_learning_rate, schedule.constant_steps, schedule.warmup_steps

    def lr(step: jax.Array) -> jax.Array:
        k = jnp.asarray(step, jnp.float32)
        # Taking max(k, constant) makes the decay term 1 in the constant phase and keeps k=0 finite.
        rate = peak * jnp.sqrt(constant / jnp.maximum(k, constant))
        if warmup > 0:
            rate = rate * jnp.minimum(1.0, (k + 1.0) / warmup)
        return rate

    return lr


def per_layer_rms(x: jax.Array, layer_axis: int | None) -> jax.Array:
    """RMS of x, per slice along `layer_axis` (None: over the whole array), broadcastable against x."""
    axes = tuple(i for i in range(x.ndim) if layer_axis is None or i != layer_axis % x.ndim)
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True))


def clip_by_layer_rms(threshold: float, layer_axis: Any) -> optax.GradientTransformation:
    """Divide each update (each layer's, for stacked parameters) by max(1, RMS / threshold)."""

    def update_fn(updates, state, params=None):
        del params

        def clip(u, axis):
            return (u / jnp.maximum(1.0, per_layer_rms(u, axis) / threshold)).astype(u.dtype)

        return jax.tree.map(clip, updates, layer_axis), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_param_layer_rms(min_scale: float, layer_axis: Any) -> optax.GradientTransformation:
    """Multiply each update by max(RMS of its parameter, min_scale), per layer for stacked parameters."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("parameter scaling needs the params: call update(grads, state, params)")

        def scale(u, p, axis):
            return (u * jnp.maximum(per_layer_rms(p, axis), min_scale)).astype(u.dtype)

        return jax.tree.map(scale, updates, params, layer_axis), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def adafactor(opt: OptimizerConfig, schedule: ScheduleConfig, layer_axis: Any) -> optax.GradientTransformation:
    """PaLM's Adafactor; `layer_axis` mirrors the params, 0 for leaves stacked over layers, None otherwise."""
    lr = learning_rate(schedule)
    # Each counter below starts at 0 and advances once per update, so all see the same 0-based step.
    chain = [
        optax.clip_by_global_norm(opt.gradient_clip),
        optax.scale_by_factored_rms(factored=opt.factored, decay_rate=opt.decay_exponent, epsilon=opt.epsilon),
        clip_by_layer_rms(opt.update_clip, layer_axis),
        optax.scale_by_learning_rate(lr, flip_sign=False),
    ]
    if opt.parameter_scaling:
        chain.append(scale_by_param_layer_rms(opt.min_parameter_scale, layer_axis))
    if opt.beta1 > 0:
        chain.append(optax.ema(opt.beta1, debias=False, accumulator_dtype=jnp.dtype(opt.momentum_dtype)))
    if opt.weight_decay_lr_power is not None:
        power = opt.weight_decay_lr_power
        # Decoupled: added after momentum, so the decay is lr(k)^power · param at step k exactly.
        chain.append(optax.add_decayed_weights(lambda step: lr(step) ** power))
    chain.append(optax.scale(-1.0))
    return optax.chain(*chain)
