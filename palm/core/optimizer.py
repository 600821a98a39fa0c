"""PaLM's optimizer (Chowdhery et al. 2022, section 5): Adafactor with momentum, unfactored, lr² weight decay.

Per step, in optax.adafactor's order: clip the gradients' global norm; divide by the root of the
second moment (β2 = 1 - k^-0.8); clip each update matrix to RMS 1; multiply by the learning rate and
by max(parameter RMS, 1e-3); momentum β1; add lr²·parameter; negate.

Both RMS terms are taken per weight matrix, as the paper's optimizer sees each matrix on its own. Some
parameters hold several matrices in one array: those scanned over layers carry a leading layer axis,
and the fused kernels (multi-query attention's key and value, SwiGLU's gate and up) a slot axis. The
axes that index separate matrices come from the model's logical axis names (`palm.core.model.matrix_axes`);
the RMS is taken over the other axes, once per index of these. Second moments and momentum are
elementwise, so they need no such split. (With `factored=True`, optax factors the last two axes of
each array as they are; PaLM's optimizer is unfactored.)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from palm.spec.config import OptimizerConfig, ScheduleConfig

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


def _as_axes(axes: Any) -> tuple[int, ...]:
    """Matrix axes as a tuple: None (one matrix) -> (), an int -> (it,), a sequence as given."""
    if axes is None:
        return ()
    if isinstance(axes, int):
        return (axes,)
    return tuple(int(a) for a in axes)


def _leaf_axes(matrix_axes: Any) -> Any:
    """`matrix_axes` with each leaf's entry (None, an int or a tuple of ints) boxed, so tree.map sees one leaf."""
    return jax.tree.map(lambda a: _Axes(_as_axes(a)), matrix_axes,
                        is_leaf=lambda a: a is None or isinstance(a, (int, tuple)))


class _Axes(tuple):
    """A tuple of axes that pytree functions treat as one leaf (a plain tuple would be a node)."""


def per_matrix_rms(x: jax.Array, matrix_axes: Any) -> jax.Array:
    """RMS of x per matrix, broadcastable against x: the mean of squares over every axis but
    `matrix_axes` (the axes that index separate matrices: layers, fused slots), in float32."""
    keep = {a % x.ndim for a in _as_axes(matrix_axes)} if x.ndim else set()
    reduce = tuple(i for i in range(x.ndim) if i not in keep)
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=reduce, keepdims=True))


def clip_by_matrix_rms(threshold: float, matrix_axes: Any) -> optax.GradientTransformation:
    """Divide each matrix of each update by max(1, RMS / threshold) (Adafactor's update clipping)."""
    axes = _leaf_axes(matrix_axes)

    def update_fn(updates, state, params=None):
        del params

        def clip(u, a):
            return (u / jnp.maximum(1.0, per_matrix_rms(u, a) / threshold)).astype(u.dtype)

        return jax.tree.map(clip, updates, axes), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_param_matrix_rms(min_scale: float, matrix_axes: Any) -> optax.GradientTransformation:
    """Multiply each matrix of each update by max(RMS of that matrix of the parameter, min_scale)."""
    axes = _leaf_axes(matrix_axes)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("parameter scaling needs the params: call update(grads, state, params)")

        def scale(u, p, a):
            return (u * jnp.maximum(per_matrix_rms(p, a), min_scale)).astype(u.dtype)

        return jax.tree.map(scale, updates, params, axes), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def adafactor(opt: OptimizerConfig, schedule: ScheduleConfig, matrix_axes: Any) -> optax.GradientTransformation:
    """PaLM's Adafactor. `matrix_axes` mirrors the params: for each, the axes that index separate weight
    matrices (`palm.core.model.matrix_axes`: a tuple of ints; None or an int are read as () and (int,))."""
    lr = learning_rate(schedule)
    # Each counter below starts at 0 and advances once per update, so all see the same 0-based step.
    chain = [
        optax.clip_by_global_norm(opt.gradient_clip),
        optax.scale_by_factored_rms(factored=opt.factored, decay_rate=opt.decay_exponent, epsilon=opt.epsilon),
        clip_by_matrix_rms(opt.update_clip, matrix_axes),
        optax.scale_by_learning_rate(lr, flip_sign=False),
    ]
    if opt.parameter_scaling:
        chain.append(scale_by_param_matrix_rms(opt.min_parameter_scale, matrix_axes))
    if opt.beta1 > 0:
        chain.append(optax.ema(opt.beta1, debias=False, accumulator_dtype=jnp.dtype(opt.momentum_dtype)))
    if opt.weight_decay_lr_power is not None:
        power = opt.weight_decay_lr_power
        # Decoupled: added after momentum, so the decay is lr(k)^power · param at step k exactly.
        chain.append(optax.add_decayed_weights(lambda step: lr(step) ** power))
    chain.append(optax.scale(-1.0))
    return optax.chain(*chain)
