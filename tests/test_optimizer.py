"""PaLM's Adafactor against an independent float64 NumPy reimplementation of section 5, setting by setting."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from palm.spec.config import OptimizerConfig, ScheduleConfig
from palm.core.optimizer import adafactor

LAYER_AXIS = {"matrix": None, "stacked": 0, "vector": None}
SHAPES = {"matrix": (3, 4), "stacked": (2, 3, 4), "vector": (5,)}
OFF = 1e30  # a clipping threshold that never triggers
#: Every optional part off; each test turns on the one it is about.
BARE = OptimizerConfig(beta1=0.0, parameter_scaling=False, update_clip=OFF, gradient_clip=OFF,
                       weight_decay_lr_power=None)
SCHEDULE = ScheduleConfig(peak_learning_rate=0.1, constant_steps=1)


def reference_lr(k: int, s: ScheduleConfig) -> float:
    rate = s.peak_learning_rate if k < s.constant_steps else s.peak_learning_rate * math.sqrt(s.constant_steps / k)
    return rate * min(1.0, (k + 1) / s.warmup_steps) if s.warmup_steps else rate


def reference_rms(x: np.ndarray, layer_axis, per_layer: bool = True) -> np.ndarray:
    if layer_axis is None or not per_layer:
        return np.sqrt(np.mean(x ** 2))
    assert layer_axis == 0
    return np.sqrt(np.mean(x ** 2, axis=tuple(range(1, x.ndim)), keepdims=True))


class Reference:
    """Section 5 of the PaLM paper, written out step by step in float64."""

    def __init__(self, opt: OptimizerConfig, schedule: ScheduleConfig, per_layer: bool = True):
        self.opt, self.schedule, self.per_layer = opt, schedule, per_layer
        self.k, self.v, self.m = 0, {}, {}
        self.pre_clip_updates = {}

    def update(self, grads: dict, params: dict) -> dict:
        o, k = self.opt, self.k
        g = {n: np.asarray(x, np.float64) for n, x in grads.items()}
        p = {n: np.asarray(x, np.float64) for n, x in params.items()}
        norm = math.sqrt(sum(float(np.sum(x ** 2)) for x in g.values()))
        if norm >= o.gradient_clip:
            g = {n: x * o.gradient_clip / norm for n, x in g.items()}
        beta2 = 1.0 - (k + 1) ** -o.decay_exponent
        lr = reference_lr(k, self.schedule)
        out = {}
        for n in g:
            self.v[n] = beta2 * self.v.get(n, 0.0) + (1 - beta2) * (g[n] ** 2 + o.epsilon)
            u = g[n] / np.sqrt(self.v[n])
            self.pre_clip_updates[n] = u
            u = u / np.maximum(1.0, reference_rms(u, LAYER_AXIS[n], self.per_layer) / o.update_clip)
            u = u * lr
            if o.parameter_scaling:
                u = u * np.maximum(reference_rms(p[n], LAYER_AXIS[n], self.per_layer), o.min_parameter_scale)
            if o.beta1:
                self.m[n] = o.beta1 * self.m.get(n, 0.0) + (1 - o.beta1) * u
                u = self.m[n]
            if o.weight_decay_lr_power is not None:
                u = u + lr ** o.weight_decay_lr_power * p[n]
            out[n] = -u
        self.k += 1
        return out


def random_tree(rng: np.random.Generator, scale: dict | float = 1.0) -> dict:
    """Normal values of SHAPES; `scale` per leaf, and for "stacked" optionally one scale per layer."""
    scales = scale if isinstance(scale, dict) else dict.fromkeys(SHAPES, scale)
    tree = {}
    for n, shape in SHAPES.items():
        s = np.asarray(scales[n], np.float64)
        s = s.reshape((-1,) + (1,) * (len(shape) - 1)) if s.ndim else s
        tree[n] = (rng.standard_normal(shape) * s).astype(np.float32)
    return tree


def run(opt, schedule, params, grads_seq, per_layer=True, apply=True):
    """Updates from palm.core.optimizer.adafactor (jitted), the reference's, and the final optax state."""
    tx = adafactor(opt, schedule, LAYER_AXIS)
    jparams = {n: jnp.asarray(x) for n, x in params.items()}
    state = tx.init(jparams)
    step = jax.jit(tx.update)
    ref = Reference(opt, schedule, per_layer)
    got, want, states = [], [], []
    for grads in grads_seq:
        want.append(ref.update(grads, jparams))
        updates, state = step({n: jnp.asarray(x) for n, x in grads.items()}, state, jparams)
        got.append({n: np.asarray(x) for n, x in updates.items()})
        states.append(state)
        if apply:
            jparams = optax.apply_updates(jparams, updates)
    return got, want, states, ref


def assert_close(got: list, want: list, rtol: float = 1e-6) -> None:
    """Equal to `rtol` relative, elements near 0 (where float32 cancels) to `rtol` of the leaf's largest."""
    for i, (g, w) in enumerate(zip(got, want)):
        for n in SHAPES:
            np.testing.assert_allclose(g[n], w[n], rtol=rtol, atol=rtol * np.max(np.abs(w[n])),
                                       err_msg=f"step {i + 1}, {n}")


def differs(a: list, b: list, at_least: float = 1e-3) -> bool:
    """Whether two update sequences differ by more than `at_least` relative somewhere."""
    return any(np.max(np.abs(x[n] - y[n]) / np.abs(y[n])) > at_least for x, y in zip(a, b) for n in SHAPES)


def test_global_norm_clipping():
    rng = np.random.default_rng(0)
    params = random_tree(rng)
    # Step 1's gradients get clipped, step 2's do not, so clipping changes the second moment ratio.
    grads = [random_tree(rng, 100.0), random_tree(rng, 0.01)]
    norms = [math.sqrt(sum(float(np.sum(np.float64(x) ** 2)) for x in g.values())) for g in grads]
    assert norms[0] > 1.0 > norms[1]
    opt = OptimizerConfig(**{**BARE.__dict__, "gradient_clip": 1.0})
    got, want, _, _ = run(opt, SCHEDULE, params, grads)
    assert_close(got, want)
    _, unclipped, _, _ = run(BARE, SCHEDULE, params, grads)
    assert differs(got, unclipped)


def test_update_clipping_is_per_layer():
    rng = np.random.default_rng(1)
    params = random_tree(rng)
    # Gradients that grow 100x give |update| near 1/sqrt(1 - β2) = 2^0.4 > 1 on step 2; shrinking ones stay small.
    grads = [random_tree(rng, 0.01),
             random_tree(rng, {"matrix": 1.0, "stacked": [1.0, 1e-4], "vector": 1e-4})]
    opt = OptimizerConfig(**{**BARE.__dict__, "update_clip": 1.0})
    got, want, _, ref = run(opt, SCHEDULE, params, grads)
    assert_close(got, want)
    pre = ref.pre_clip_updates
    layer_rms = reference_rms(pre["stacked"], 0).ravel()
    assert layer_rms[0] > 1.0 > layer_rms[1] and reference_rms(pre["matrix"], None) > 1.0
    # Step 2 of layer 0 is clipped to RMS exactly 1 (times lr); layer 1 is left alone.
    lr = reference_lr(1, SCHEDULE)
    np.testing.assert_allclose(np.sqrt(np.mean(got[1]["stacked"][0] ** 2)), lr, rtol=1e-6)
    _, unclipped, _, _ = run(BARE, SCHEDULE, params, grads)
    np.testing.assert_allclose(got[1]["stacked"][1], unclipped[1]["stacked"][1], rtol=1e-6)
    assert differs(got, unclipped)
    _, whole_leaf, _, _ = run(opt, SCHEDULE, params, grads, per_layer=False)
    assert differs(got, whole_leaf)


def test_parameter_scaling_per_layer_with_floor():
    rng = np.random.default_rng(2)
    # The vector and layer 1 have RMS below min_parameter_scale (1e-3), so the floor applies to them.
    params = random_tree(rng, {"matrix": 0.5, "stacked": [2.0, 1e-5], "vector": 1e-5})
    assert reference_rms(np.float64(params["vector"]), None) < 1e-3
    layer_rms = reference_rms(np.float64(params["stacked"]), 0).ravel()
    assert layer_rms[1] < 1e-3 < layer_rms[0]
    grads = [random_tree(rng, 0.1), random_tree(rng, 0.1)]
    opt = OptimizerConfig(**{**BARE.__dict__, "parameter_scaling": True})
    got, want, _, _ = run(opt, SCHEDULE, params, grads)
    assert_close(got, want)
    # Step 1's update is lr·sign(g)·max(RMS(param), 1e-3): check the floored vector directly.
    np.testing.assert_allclose(got[0]["vector"], -0.1 * np.sign(grads[0]["vector"]) * 1e-3, rtol=1e-6)
    _, unscaled, _, _ = run(BARE, SCHEDULE, params, grads)
    assert differs(got, unscaled)
    _, whole_leaf, _, _ = run(opt, SCHEDULE, params, grads, per_layer=False)
    assert differs(got, whole_leaf)


def test_second_moment_decay():
    rng = np.random.default_rng(3)
    params = random_tree(rng)
    grads = [random_tree(rng, 0.1), random_tree(rng, 3.0)]
    got, want, states, _ = run(BARE, SCHEDULE, params, grads)
    assert_close(got, want)
    v1, v2 = (optax.tree_utils.tree_get(s, "v") for s in states)
    beta2 = 1.0 - 2.0 ** -0.8  # β2 at step 2; at step 1 it is 0, so v holds g² alone
    for n in SHAPES:
        g1, g2 = (np.float64(g[n]) for g in grads)
        np.testing.assert_allclose(v1[n], g1 ** 2 + 1e-30, rtol=1e-6)
        np.testing.assert_allclose(v2[n], beta2 * g1 ** 2 + (1 - beta2) * g2 ** 2, rtol=1e-6)
        np.testing.assert_allclose(got[0][n], -0.1 * np.sign(g1), rtol=1e-6)


def test_momentum_on_second_step():
    rng = np.random.default_rng(4)
    params = random_tree(rng)
    grads = [random_tree(rng), random_tree(rng)]
    opt = OptimizerConfig(**{**BARE.__dict__, "beta1": 0.9})
    got, want, _, _ = run(opt, SCHEDULE, params, grads)
    assert_close(got, want)
    _, plain, _, _ = run(BARE, SCHEDULE, params, grads)
    # Without debiasing, step 1 is (1 - β1) of the plain update; step 2 mixes in step 1.
    for n in SHAPES:
        np.testing.assert_allclose(got[0][n], 0.1 * plain[0][n], rtol=1e-6)
        np.testing.assert_allclose(got[1][n], 0.9 * got[0][n] + 0.1 * plain[1][n], rtol=1e-5)
    assert differs(got[1:], plain[1:])


def test_momentum_dtype():
    opt = OptimizerConfig(momentum_dtype="bfloat16")
    params = {n: jnp.ones(s) for n, s in SHAPES.items()}
    mu = optax.tree_utils.tree_get(adafactor(opt, SCHEDULE, LAYER_AXIS).init(params), "ema")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(mu))


def test_weight_decay_is_lr_squared_times_param():
    rng = np.random.default_rng(5)
    params = random_tree(rng)
    grads = [random_tree(rng) for _ in range(4)]
    schedule = ScheduleConfig(peak_learning_rate=0.5, constant_steps=1)
    # Steps 2 and 3 (0-based) are in the 1/sqrt(k) phase: lr² = 0.25/2, 0.25/3.
    lr2 = [0.25, 0.25, 0.125, 0.25 / 3]
    decayed, want, _, _ = run(OptimizerConfig(), schedule, params, grads, apply=False)
    assert_close(decayed, want)
    plain, _, _, _ = run(OptimizerConfig(weight_decay_lr_power=None), schedule, params, grads, apply=False)
    for k in range(4):
        for n in SHAPES:
            np.testing.assert_allclose(decayed[k][n] - plain[k][n], -lr2[k] * params[n], rtol=1e-5, atol=1e-7)


def test_learning_rate_follows_optimizer_step():
    rng = np.random.default_rng(6)
    params = random_tree(rng)
    grads = [random_tree(rng) for _ in range(4)]
    schedule = ScheduleConfig(peak_learning_rate=0.2, constant_steps=2, warmup_steps=3)
    got, want, _, _ = run(BARE, schedule, params, grads)
    assert_close(got, want)
    # Step 1 is bare Adafactor's lr·sign(g) with lr = 0.2 · 1/3 (warm-up at the 0-based step 0).
    np.testing.assert_allclose(got[0]["matrix"], -0.2 / 3 * np.sign(grads[0]["matrix"]), rtol=1e-6)


def test_palm_configuration_end_to_end():
    rng = np.random.default_rng(7)
    params = random_tree(rng, {"matrix": 0.5, "stacked": [1.0, 1e-4], "vector": 1e-5})
    grads = [random_tree(rng, s) for s in (0.01, 5.0, 1.0)]
    got, want, _, _ = run(OptimizerConfig(), ScheduleConfig(peak_learning_rate=1e-2, constant_steps=2),
                          params, grads)
    assert_close(got, want)


def test_palm_defaults():
    opt, schedule = OptimizerConfig(), ScheduleConfig()
    paper = (0.9, 0.8, False, 1.0, 1.0)
    assert (opt.beta1, opt.decay_exponent, opt.factored, opt.update_clip, opt.gradient_clip) == paper
    assert opt.weight_decay_lr_power == 2.0 and opt.parameter_scaling and opt.min_parameter_scale == 1e-3
    assert (schedule.peak_learning_rate, schedule.constant_steps, schedule.warmup_steps) == (1e-2, 10_000, 0)
    params = {"w": jnp.zeros((64, 32)), "stacked": jnp.zeros((2, 64, 32)), "b": jnp.zeros(32)}
    axes = {"w": None, "stacked": 0, "b": None}
    v = optax.tree_utils.tree_get(adafactor(opt, schedule, axes).init(params), "v")
    assert {n: x.shape for n, x in v.items()} == {n: x.shape for n, x in params.items()}
    # Factored would keep row and column statistics instead (for dimensions of at least 128).
    factored = OptimizerConfig(factored=True)
    big = {"w": jnp.zeros((256, 128))}
    state = adafactor(factored, schedule, {"w": None}).init(big)
    assert optax.tree_utils.tree_get(state, "v")["w"].size == 1
    factors = {optax.tree_utils.tree_get(state, f)["w"].shape for f in ("v_row", "v_col")}
    assert factors == {(256,), (128,)}


def test_parameter_scaling_needs_params():
    tx = adafactor(OptimizerConfig(), SCHEDULE, {"w": None})
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError):
        tx.update(params, tx.init(params))


# ------------------------------------------------------------------------- per weight matrix

from palm.spec.config import ModelConfig  # noqa: E402
from palm.core.model import abstract_params, matrix_axes  # noqa: E402
from palm.core.optimizer import per_matrix_rms  # noqa: E402

#: Two layers, scanned: key_value is [2, 16, 2, 1, 8] and mlp_in [2, 16, 2, 64], each holding four matrices.
SMALL = ModelConfig(num_layers=2, d_model=16, num_heads=2, head_dim=8, vocab_size=32, seq_len=8,
                    dtype="float32", remat="none")
#: The fused kernels, where the slot axis separates key from value and gate from up.
FUSED_KERNELS = ("key_value", "mlp_in")


def model_tree(config: ModelConfig, rng: np.random.Generator, scale: float = 1.0) -> dict:
    """Normal values shaped like the model's parameters."""
    shapes = jax.tree.map(lambda p: p.value.shape, abstract_params(config),
                          is_leaf=lambda x: hasattr(x, "names"))
    return jax.tree.map(lambda s: (rng.standard_normal(s) * scale).astype(np.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def unstack(tree: dict, axes: dict) -> dict:
    """Every matrix of `tree` as its own leaf: each index of each matrix axis split off, keyed by path."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        pieces = {name: np.asarray(leaf)}
        leaf_axes = _axes_at(axes, path)
        for axis in sorted(leaf_axes, reverse=True):  # split the later axes first, so earlier indices hold
            pieces = {f"{n}[{axis}={i}]": np.take(x, i, axis=axis) for n, x in pieces.items()
                      for i in range(x.shape[axis])}
        out.update(pieces)
    return out


def _axes_at(axes: dict, path) -> tuple:
    node = axes
    for k in path:
        node = node[getattr(k, "key", k)]
    return node


def test_matrix_axes_come_from_the_models_axis_names():
    axes = matrix_axes(abstract_params(SMALL))
    assert axes["layers"] == {"query": (0,), "key_value": (0, 2), "out": (0,), "mlp_in": (0, 2), "mlp_out": (0,),
                              "layer_norm": {"scale": (0,)}}
    assert axes["embedding"] == () and axes["final_norm"] == {"scale": ()}
    # Unscanned layers keep the fused slot axis, now the second.
    unscanned = matrix_axes(abstract_params(ModelConfig(**{**SMALL.__dict__, "scan_layers": False})))
    assert unscanned["layer_1"]["key_value"] == (1,) and unscanned["layer_1"]["mlp_in"] == (1,)
    assert unscanned["layer_1"]["query"] == ()


def stacked_vs_separate(params: dict, grads_seq: list, opt: OptimizerConfig, schedule: ScheduleConfig):
    """Updates of the stacked, fused tree (split into matrices afterwards) and of the same matrices as
    separate leaves, each with its own statistics, by the same optimizer."""
    axes = matrix_axes(abstract_params(SMALL))
    tx = adafactor(opt, schedule, axes)
    p = jax.tree.map(jnp.asarray, params)
    state, step = tx.init(p), jax.jit(tx.update)
    sep_params = {n: jnp.asarray(x) for n, x in unstack(params, axes).items()}
    sep_tx = adafactor(opt, schedule, jax.tree.map(lambda _: (), sep_params))
    sep_state, sep_step = sep_tx.init(sep_params), jax.jit(sep_tx.update)
    got, want = [], []
    for grads in grads_seq:
        updates, state = step(jax.tree.map(jnp.asarray, grads), state, p)
        p = optax.apply_updates(p, updates)
        got.append(unstack(jax.tree.map(np.asarray, updates), axes))
        sep_updates, sep_state = sep_step({n: jnp.asarray(x) for n, x in unstack(grads, axes).items()},
                                          sep_state, sep_params)
        sep_params = optax.apply_updates(sep_params, sep_updates)
        want.append({n: np.asarray(x) for n, x in sep_updates.items()})
    return got, want


def test_stacked_fused_updates_equal_each_matrix_updated_on_its_own():
    rng = np.random.default_rng(8)
    params = model_tree(SMALL, rng)
    # Each matrix its own scale, so per-matrix and whole-array statistics disagree everywhere.
    for name in FUSED_KERNELS:
        params["layers"][name] *= np.array([[1.0, 30.0], [1e-5, 3.0]], np.float32).reshape(
            (2, 1, 2) + (1,) * (params["layers"][name].ndim - 3))
    grads = [model_tree(SMALL, rng, s) for s in (0.01, 5.0, 1.0)]
    got, want = stacked_vs_separate(params, grads, OptimizerConfig(),
                                    ScheduleConfig(peak_learning_rate=1e-2, constant_steps=2))
    assert got[0].keys() == want[0].keys() and "layers/key_value[2=0][0=1]" in got[0]
    assert len(got[0]) == 7 * 2 + 2 + 2  # per layer 3 kernels + 2 fused of 2; 2 layer norms; embedding, final norm
    for k, (g, w) in enumerate(zip(got, want)):
        for n in w:
            np.testing.assert_allclose(g[n], w[n], rtol=1e-6, atol=1e-6 * np.max(np.abs(w[n])),
                                       err_msg=f"step {k + 1}, {n}")


@pytest.mark.slow
def test_one_large_matrix_does_not_rescale_the_others():
    """Layer 1's value matrix 1000x the others' RMS: per matrix, the key's and layer 0's updates are what
    they would be without it; over the whole array (or per layer only, both slots together) they are not."""
    rng = np.random.default_rng(9)
    params = model_tree(SMALL, rng)
    params["layers"]["key_value"][1, :, 1] *= 1000.0
    grads = [model_tree(SMALL, rng, 0.1) for _ in range(2)]
    # PaLM's settings but the weight decay, so step 1's update is exactly lr·(1 - β1)·RMS(param)·sign(g).
    opt = OptimizerConfig(weight_decay_lr_power=None)
    schedule = ScheduleConfig(peak_learning_rate=1e-2, constant_steps=2)

    def kv_updates(axes_for_kv):
        axes = matrix_axes(abstract_params(SMALL))
        axes["layers"]["key_value"] = axes_for_kv
        tx = adafactor(opt, schedule, axes)
        p = jax.tree.map(jnp.asarray, params)
        state, out = tx.init(p), []
        for g in grads:
            u, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
            p = optax.apply_updates(p, u)
            out.append(np.asarray(u["layers"]["key_value"]))
        return out

    per_matrix, whole, per_layer = kv_updates((0, 2)), kv_updates(()), kv_updates((0,))
    rms = np.asarray(per_matrix_rms(jnp.asarray(params["layers"]["key_value"]), (0, 2))).ravel()
    assert rms[3] > 500 * max(rms[:3])  # layer 1's value matrix
    # The small matrices' scaling follows their own RMS (about 1/sqrt(d_model)), not the large one's.
    first = per_matrix[0]
    for layer, slot in ((0, 0), (0, 1), (1, 0)):
        want = 1e-2 * (1 - 0.9) * rms[2 * layer + slot]  # lr · (1 - β1) · RMS(param) times sign(g), step 1
        np.testing.assert_allclose(np.sqrt(np.mean(first[layer, :, slot] ** 2)), want, rtol=1e-5)
        assert np.max(np.abs(whole[0][layer, :, slot])) > 10 * np.max(np.abs(first[layer, :, slot]))
    assert np.max(np.abs(per_layer[0][1, :, 0])) > 10 * np.max(np.abs(first[1, :, 0]))
