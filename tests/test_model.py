"""Properties of the PaLM decoder in palm.core.model that the paper's architecture promises.

Small float32 configs keep every test on CPU in seconds; each check is written so that a plausible
mistake (a leaky mask, absolute positions, per-head keys, untied or unscaled logits, a wrong fan-in,
a remat policy that changes numerics) makes it fail.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palm.spec.config import ModelConfig
from palm.base.errors import PalmError
from palm.core.model import PaLM, attention_implementation, count_params, describe_params, rope

SMALL = ModelConfig(num_layers=2, d_model=64, num_heads=4, head_dim=16, vocab_size=512, seq_len=64,
                    dtype="float32", remat="none")
BATCH, LENGTH = 2, 16


def init_params(config: ModelConfig, seed: int = 0, length: int = LENGTH):
    tokens = jnp.zeros((1, length), jnp.int32)
    # Jitted: eager init dispatches the scanned initialisers op by op and is several times slower.
    return nn.unbox(jax.jit(PaLM(config).init)(jax.random.key(seed), tokens)["params"])


def abstract_params(config: ModelConfig):
    """Shapes and dtypes of `init_params(config)` without running the initialisers."""
    return jax.eval_shape(lambda: init_params(config))


def make_apply(config: ModelConfig):
    model = PaLM(config)
    return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))


def random_tokens(seed: int, shape=(BATCH, LENGTH), high: int | None = None) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, high or SMALL.vocab_size, jnp.int32)


@pytest.fixture(scope="module")
def small_params():
    return init_params(SMALL)


@pytest.fixture(scope="module")
def small_apply():
    return make_apply(SMALL)


@pytest.fixture(scope="module")
def small_apply_with_hidden():
    """(logits, the final LayerNorm's output) for SMALL, the latter read from Flax's intermediates."""
    model = PaLM(SMALL)

    def run(params, tokens):
        logits, state = model.apply({"params": params}, tokens,
                                    capture_intermediates=lambda mdl, _: mdl.name == "final_norm")
        return logits, state["intermediates"]["final_norm"]["__call__"][0]

    return jax.jit(run)


# 1. Causality -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("j", [1, 5, 10, LENGTH - 1])
def test_future_tokens_do_not_leak_into_earlier_logits(small_params, small_apply, j):
    tokens = random_tokens(1)
    # Shift every sequence's token at j to a different id, so both batch rows are perturbed.
    changed = tokens.at[:, j].set((tokens[:, j] + 1 + SMALL.vocab_size // 2) % SMALL.vocab_size)
    before = np.asarray(small_apply(small_params, tokens))
    after = np.asarray(small_apply(small_params, changed))

    np.testing.assert_allclose(after[:, :j], before[:, :j], rtol=0, atol=1e-6)
    # Position j sees its own token, so a mask that is off by one (strictly-past only) would show here.
    assert np.abs(after[:, j] - before[:, j]).max(axis=-1).min() > 1e-2


# 2. RoPE ----------------------------------------------------------------------------------------

def _rope_at(vec: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The same head vector rotated to each of `positions`: [len(positions), head_dim]."""
    x = jnp.broadcast_to(jnp.asarray(vec), (1, len(positions), 1, vec.shape[-1]))
    return np.asarray(rope(x, jnp.asarray(positions)[None, :], SMALL.rope_max_wavelength))[0, :, 0]


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(0)
    head_dim = 32
    pairs = [(0, 0), (3, 0), (0, 3), (7, 2), (20, 31), (50, 5)]
    shifts = [1, 4, 17, 100, 513]
    for trial in range(3):
        q, k = rng.standard_normal((2, head_dim)).astype(np.float32)
        for m, n in pairs:
            ms = np.array([m] + [m + s for s in shifts])
            ns = np.array([n] + [n + s for s in shifts])
            scores = np.einsum("ph,ph->p", _rope_at(q, ms), _rope_at(k, ns))
            # float32 angles grow with absolute position, so allow a small absolute slack.
            np.testing.assert_allclose(scores[1:], scores[0], rtol=1e-4, atol=2e-4,
                                       err_msg=f"trial {trial}, (m, n) = {(m, n)}")

    # The identity map is trivially shift-invariant; make sure the score really moves with m - n.
    q, k = rng.standard_normal((2, head_dim)).astype(np.float32)
    offsets = np.arange(8)
    scores = np.einsum("ph,ph->p", _rope_at(q, offsets), _rope_at(k, np.zeros_like(offsets)))
    assert np.ptp(scores) > 0.1


def test_rope_is_a_rotation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 3, 16)).astype(np.float32)
    positions = rng.integers(0, 5000, size=(2, 9))
    out = np.asarray(rope(jnp.asarray(x), jnp.asarray(positions), 10_000.0))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    # Position 0 is the zero angle, so it must leave vectors untouched.
    zero = np.asarray(rope(jnp.asarray(x), jnp.zeros((2, 9), jnp.int32), 10_000.0))
    np.testing.assert_allclose(zero, x, rtol=0, atol=1e-6)



def _concatenated_rope(x, positions, max_wavelength):
    """RoPE as palm.core.model.rope computed it until 2026-12-06: the two rotated halves concatenated."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (max_wavelength ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@pytest.mark.slow
def test_rope_without_a_concatenation_equals_the_concatenated_formula():
    """The rotated halves padded to the whole head_dim and added: the same products and sums as the
    concatenated form plus zeros, so the same numbers: equal bit for bit op by op, and within float32
    rounding when XLA fuses each form its own way (measured on CPU, jitted: equal, float32 and bf16)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 64, 4, 32)).astype(np.float32) * 5
    positions = jnp.asarray(rng.integers(0, 20_000, (2, 64)))
    for dtype in (jnp.float32, jnp.bfloat16):
        xd = jnp.asarray(x, dtype)
        eager = rope(xd, positions, 10_000.0), _concatenated_rope(xd, positions, 10_000.0)
        np.testing.assert_array_equal(np.asarray(eager[0], np.float32), np.asarray(eager[1], np.float32))
        both = jax.jit(lambda a: (rope(a, positions, 10_000.0), _concatenated_rope(a, positions, 10_000.0)))
        new, old = (np.asarray(a, np.float32) for a in both(xd))
        if dtype == jnp.bfloat16:  # were a float32 ulp ever apart, it could land across a bf16 rounding
            assert (np.abs(new - old) <= 2.0**-7 * np.abs(old)).all() and (new != old).mean() < 1e-3
        else:
            np.testing.assert_allclose(new, old, rtol=0, atol=4e-6 * np.abs(old).max())
        new, old = (np.asarray(a) for a in both(xd.astype(jnp.float32)))
        np.testing.assert_allclose(new, old, rtol=0, atol=4e-6 * np.abs(old).max(), err_msg=str(dtype))
    # and the gradient (the backward pass of attention's inputs)
    grads = [jax.grad(lambda a, f=f: (f(a, positions, 10_000.0) * jnp.asarray(x[::-1])).sum())(jnp.asarray(x))
             for f in (rope, _concatenated_rope)]
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(grads[1]), rtol=0,
                               atol=4e-6 * float(np.abs(grads[1]).max()))
    jaxpr = str(jax.make_jaxpr(lambda a: rope(a, positions, 10_000.0))(jnp.asarray(x)))
    assert "concatenate" not in jaxpr and "pad" in jaxpr


@pytest.mark.slow
def test_the_models_logits_are_unchanged_by_the_rope_rewrite(small_params, small_apply, monkeypatch):
    """Same parameters (names and shapes: checkpoints stay compatible) and the same logits as with the
    concatenated RoPE, in float32 and in bf16 compute (measured on CPU: equal in both)."""
    import palm.core.model as model_module

    tokens = random_tokens(11)
    for config in (SMALL, dataclasses.replace(SMALL, dtype="bfloat16")):
        new = np.asarray(make_apply(config)(small_params, tokens))
        with monkeypatch.context() as patch:
            patch.setattr(model_module, "rope", _concatenated_rope)
            old = np.asarray(make_apply(config)(small_params, tokens))
            old_params = describe_params(config)
        assert describe_params(config) == old_params
        np.testing.assert_allclose(new, old, rtol=0, atol=1e-5 * np.abs(old).max(), err_msg=config.dtype)


# 3. Multi-query attention -----------------------------------------------------------------------

def test_one_key_and_one_value_projection_per_layer():
    c = SMALL
    params = {p.path: p for p in describe_params(c)}
    kv = params["layers/key_value"]
    assert kv.shape == (c.num_layers, c.d_model, 2, 1, c.head_dim)
    assert kv.axes[0] == "layers"
    kv_like = [p for p in params if any(word in p.split("/")[-1] for word in ("key", "value", "kv"))]
    assert kv_like == ["layers/key_value"]

    query = params["layers/query"]
    assert query.shape == (c.num_layers, c.d_model, c.num_heads, c.head_dim)
    assert query.axes[2] == "heads"


# 4. Tied embeddings, no biases ------------------------------------------------------------------

EXPECTED_PARAMS = {
    "embedding", "final_norm/scale",
    "layers/query", "layers/key_value", "layers/out", "layers/mlp_in", "layers/mlp_out",
    "layers/layer_norm/scale",
}


def test_parameter_names_have_no_biases_and_one_vocab_table():
    infos = describe_params(SMALL)
    assert {p.path for p in infos} == EXPECTED_PARAMS
    assert len(infos) == len(EXPECTED_PARAMS)
    with_vocab_axis = [p.path for p in infos if "vocab" in p.axes]
    with_vocab_size = [p.path for p in infos if SMALL.vocab_size in p.shape]
    assert with_vocab_axis == with_vocab_size == ["embedding"]


def test_logits_are_final_hidden_times_embedding_t_over_sqrt_d(small_params, small_apply_with_hidden):
    tokens = random_tokens(2)
    logits, hidden = small_apply_with_hidden(small_params, tokens)
    expected = jnp.einsum("btd,vd->btv", hidden, small_params["embedding"]) / math.sqrt(SMALL.d_model)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_output_projection_shares_the_embedding_rows(small_params, small_apply,
                                                     small_apply_with_hidden):
    # Inputs drawn from the lower half of the vocabulary, so token `absent` never enters the residual
    # stream: editing its row can only reach the logits through the tied output projection.
    tokens = random_tokens(3, high=SMALL.vocab_size // 2)
    absent = SMALL.vocab_size - 7
    delta = jax.random.normal(jax.random.key(4), (SMALL.d_model,))
    perturbed = dict(small_params, embedding=small_params["embedding"].at[absent].add(delta))

    before = np.asarray(small_apply(small_params, tokens))
    after = np.asarray(small_apply(perturbed, tokens))
    others = np.arange(SMALL.vocab_size) != absent
    np.testing.assert_array_equal(after[..., others], before[..., others])

    hidden = np.asarray(small_apply_with_hidden(small_params, tokens)[1])
    expected_shift = hidden @ np.asarray(delta) / math.sqrt(SMALL.d_model)
    np.testing.assert_allclose(after[..., absent] - before[..., absent], expected_shift,
                               rtol=1e-4, atol=1e-5)


# 5. Initialisation ------------------------------------------------------------------------------

@pytest.mark.slow
def test_initialisation_statistics():
    c = ModelConfig(num_layers=2, d_model=256, num_heads=4, head_dim=64, vocab_size=1024, seq_len=64,
                    dtype="float32", remat="none")
    params = init_params(c, seed=5, length=8)
    layers = params["layers"]
    fan_in = {
        "query": c.d_model,
        "key_value": c.d_model,
        "out": c.num_heads * c.head_dim,
        "mlp_in": c.d_model,
        "mlp_out": c.d_ff,
    }
    assert set(layers) == set(fan_in) | {"layer_norm"}

    emb = np.asarray(params["embedding"])
    assert abs(emb.std() - 1.0) < 0.1
    assert abs(emb.mean()) < 0.05

    for name, n_in in fan_in.items():
        stacked = np.asarray(layers[name])
        assert stacked.shape[0] == c.num_layers
        target = 1.0 / math.sqrt(n_in)
        for i in range(c.num_layers):
            std = stacked[i].std()
            assert abs(std / target - 1.0) < 0.1, f"{name} layer {i}: std {std:.5f}, want {target:.5f}"
            assert abs(stacked[i].mean()) < 0.1 * target
        # Scanned init must draw each layer from its own key, not copy one layer L times.
        assert not np.allclose(stacked[0], stacked[1])

    np.testing.assert_array_equal(np.asarray(layers["layer_norm"]["scale"]), 1.0)
    np.testing.assert_array_equal(np.asarray(params["final_norm"]["scale"]), 1.0)


# 6. Remat and scan are numerically transparent --------------------------------------------------

def _loss_and_grad(config: ModelConfig):
    model = PaLM(config)

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens)
        # Next-token cross entropy, so gradients flow through every layer and the causal mask.
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean(), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.slow
def test_remat_policies_agree(small_params):
    tokens = random_tokens(6)
    results = {}
    for policy in ("none", "full", "save_dots"):
        config = dataclasses.replace(SMALL, remat=policy)
        (_, logits), grads = _loss_and_grad(config)(small_params, tokens)
        results[policy] = (logits, grads)

    ref_logits, ref_grads = results["none"]
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(ref_grads))
    for policy in ("full", "save_dots"):
        logits, grads = results[policy]
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
        assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
        flat = jax.tree_util.tree_flatten_with_path(grads)[0]
        for (path, g), r in zip(flat, jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5,
                                       err_msg=f"remat={policy} {jax.tree_util.keystr(path)}")


def _unstack_layers(params, num_layers: int):
    """Scanned params ({"layers": leaves with a leading layer axis}) -> {"layer_0": ..., ...}."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layer_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    return out


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_and_unrolled_layers_agree(small_params, small_apply, remat):
    unrolled = dataclasses.replace(SMALL, scan_layers=False, remat=remat)
    # The unrolled model's own init fixes the layout the restacked params must match.
    fresh = abstract_params(unrolled)
    restacked = _unstack_layers(small_params, SMALL.num_layers)
    assert jax.tree.structure(restacked) == jax.tree.structure(fresh)
    assert jax.tree.map(jnp.shape, restacked) == jax.tree.map(jnp.shape, fresh)

    tokens = random_tokens(7)
    scanned_logits = small_apply(small_params, tokens)
    apply_unrolled = make_apply(unrolled)
    unrolled_logits = apply_unrolled(restacked, tokens)
    np.testing.assert_allclose(np.asarray(unrolled_logits), np.asarray(scanned_logits),
                               rtol=1e-5, atol=1e-5)
    # Layer order matters: swapping the two layers must give a different function.
    swapped = dict(restacked, layer_0=restacked["layer_1"], layer_1=restacked["layer_0"])
    swapped_logits = np.asarray(apply_unrolled(swapped, tokens))
    assert np.abs(swapped_logits - np.asarray(scanned_logits)).max() > 1e-3


# 7. Parameter count -----------------------------------------------------------------------------

def _hand_count(L: int, d: int, H: int, h: int, V: int) -> int:
    per_layer = (d * H * h * 2      # query and output projections
                 + 2 * d * h        # the single shared key and value
                 + 3 * d * 4 * d    # SwiGLU gate, up and down
                 + d)               # LayerNorm scale
    return L * per_layer + V * d + d  # tied embedding counted once, final LayerNorm scale


@pytest.mark.parametrize("layers, d_model, heads, expected", [
    (32, 4096, 16, 8_632_012_800),
    (64, 8192, 32, 62_495_662_080),
    (118, 18432, 48, 540_356_474_880),
])
def test_paper_parameter_counts(layers, d_model, heads, expected):
    config = ModelConfig(num_layers=layers, d_model=d_model, num_heads=heads, head_dim=256,
                         vocab_size=256_000)
    assert _hand_count(layers, d_model, heads, 256, 256_000) == expected
    assert count_params(config) == expected


def test_count_params_matches_materialised_small_model(small_params):
    assert count_params(SMALL) == sum(x.size for x in jax.tree.leaves(small_params))
    assert count_params(SMALL) == _hand_count(SMALL.num_layers, SMALL.d_model, SMALL.num_heads,
                                              SMALL.head_dim, SMALL.vocab_size)


# 8. Attention kernel selection ------------------------------------------------------------------

def test_attention_implementation_selection():
    assert attention_implementation("auto", "cpu") == "xla"
    assert attention_implementation("auto", "gpu") == "cudnn"
    # cuDNN exists only on NVIDIA GPUs; TPUs must never be routed to it.
    assert attention_implementation("auto", "tpu") != "cudnn"
    assert attention_implementation("cudnn", "gpu") == "cudnn"
    assert attention_implementation("xla", "gpu") == "xla"
    assert attention_implementation("xla", "cpu") == "xla"
    with pytest.raises(PalmError, match="cudnn"):
        attention_implementation("cudnn", "cpu")


def test_model_refuses_cudnn_on_cpu():
    config = dataclasses.replace(SMALL, attention="cudnn")
    with pytest.raises(PalmError):
        PaLM(config, platform="cpu").init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


# 9. bfloat16 compute ----------------------------------------------------------------------------

def test_bfloat16_compute_tracks_float32(small_params, small_apply):
    bf16 = dataclasses.replace(SMALL, dtype="bfloat16")
    # Master weights stay float32, so the same params must fit the bf16 model.
    dtypes = lambda tree: jax.tree.map(lambda x: x.dtype, tree)  # noqa: E731
    assert dtypes(abstract_params(bf16)) == dtypes(small_params)

    tokens = random_tokens(8)
    ref = np.asarray(small_apply(small_params, tokens))
    logits = make_apply(bf16)(small_params, tokens)
    assert logits.dtype == jnp.float32
    out = np.asarray(logits)
    assert np.isfinite(out).all()
    # bf16 has an 8-bit mantissa; a few layers of rounding give errors of order 1e-2 relative.
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < 0.05, rel
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
