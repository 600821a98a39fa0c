"""PaLM's learning-rate schedule: 1e-2 for 10k steps, then 1/sqrt(k)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palm.spec.config import ScheduleConfig
from palm.core.optimizer import learning_rate


@pytest.mark.parametrize("step, expected", [(0, 1e-2), (9_999, 1e-2), (10_000, 1e-2), (40_000, 1 / 200),
                                            (1_000_000, 1e-3)])
def test_palm_schedule(step, expected):
    lr = learning_rate(ScheduleConfig())
    np.testing.assert_allclose(float(lr(jnp.asarray(step))), expected, rtol=1e-6)


def test_inverse_sqrt_after_constant_phase():
    lr = learning_rate(ScheduleConfig())
    steps = np.arange(10_000, 100_000, 7_919)
    np.testing.assert_allclose(np.asarray(lr(jnp.asarray(steps))), 1 / np.sqrt(steps), rtol=1e-6)


def test_warmup():
    lr = learning_rate(ScheduleConfig(peak_learning_rate=1.0, constant_steps=8, warmup_steps=4))
    got = [float(lr(jnp.asarray(k))) for k in (0, 1, 3, 4, 7, 8, 32)]
    np.testing.assert_allclose(got, [0.25, 0.5, 1.0, 1.0, 1.0, 1.0, 0.5], rtol=1e-6)


def test_jit_and_int_steps():
    lr = learning_rate(ScheduleConfig(peak_learning_rate=0.1, constant_steps=4, warmup_steps=2))
    steps = jnp.arange(0, 20, dtype=jnp.int32)
    np.testing.assert_allclose(np.asarray(jax.jit(lr)(steps)), np.asarray(jax.vmap(lr)(steps)), rtol=1e-7)
    expected = [0.1 * min(1, (k + 1) / 2) * (1 if k < 4 else (4 / k) ** 0.5) for k in range(20)]
    np.testing.assert_allclose(np.asarray(jax.jit(lr)(steps)), expected, rtol=1e-6)


def test_rejects_empty_constant_phase():
    with pytest.raises(ValueError):
        learning_rate(ScheduleConfig(constant_steps=0))
