"""The Pallas splash attention path of palm.core.model, checked against XLA attention on CPU.

The TPU kernel runs here in the Pallas interpreter (implementation PALLAS_INTERPRET), which executes
the same kernel body, block-sparsity tables and custom VJP as on a TPU, so a wrong scale, a leaky
causal mask, a misrouted multi-query key or a wrong gradient shows up as a mismatch with
jax.nn.dot_product_attention(is_causal=True).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palm.spec.config import ModelConfig
from palm.base.errors import PalmError
from palm.core.model import PALLAS_INTERPRET, PaLM, _splash_block, attention_implementation, causal_attention
from tests.conftest import ROOT, cpu_devices
TOL = dict(atol=2e-5, rtol=2e-5)


def qkv(batch: int, length: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (batch, length, heads, head_dim), jnp.float32),
            jax.random.normal(kk, (batch, length, kv_heads, head_dim), jnp.float32),
            jax.random.normal(kv, (batch, length, kv_heads, head_dim), jnp.float32))


def reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def splash(q, k, v):
    return causal_attention(q, k, v, PALLAS_INTERPRET)


def value_and_grads(attention, q, k, v):
    """Attention output and d<out, w>/d(q, k, v) for a fixed random cotangent w."""
    w = jax.random.normal(jax.random.key(42), q.shape, jnp.float32)
    loss = lambda q, k, v: jnp.sum(attention(q, k, v) * w)
    out = jax.jit(attention)(q, k, v)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    return out, grads


@pytest.mark.parametrize("batch, length, kv_heads", [
    (2, 256, 1),  # multi-query (PaLM): make_splash_mqa, one 256-token block
    (1, 384, 1),  # three 128-token blocks: full, diagonal and skipped blocks of the causal mask
    (1, 128, 4),  # multi-head (kv_heads == heads): make_splash_mha
    (1, 128, 2),  # grouped-query: make_splash_mha, two query heads per key/value head
    (1, 200, 1),  # not a multiple of 128: zero-padded to 256, exact for causal attention
])
@pytest.mark.slow
def test_splash_matches_xla_values_and_gradients(batch, length, kv_heads):
    q, k, v = qkv(batch, length, 4, kv_heads, 64)
    out, grads = value_and_grads(splash, q, k, v)
    ref_out, ref_grads = value_and_grads(reference, q, k, v)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, **TOL)
    for name, g, ref in zip("qkv", grads, ref_grads):
        assert g.shape == ref.shape, name
        np.testing.assert_allclose(g, ref, atol=5e-5, rtol=5e-5, err_msg=f"d/d{name}")


def test_splash_is_causal():
    """Changing the last position's key and value moves only the last position's output."""
    q, k, v = qkv(1, 128, 4, 1, 64)
    out = splash(q, k, v)
    out2 = splash(q, k.at[:, -1].add(3.0), v.at[:, -1].add(3.0))
    np.testing.assert_array_equal(out[:, :-1], out2[:, :-1])
    assert not np.allclose(out[:, -1], out2[:, -1])


def test_splash_bfloat16_close_to_xla():
    q, k, v = (a.astype(jnp.bfloat16) for a in qkv(1, 128, 4, 1, 64))
    out = jax.jit(splash)(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = reference(*(a.astype(jnp.float32) for a in (q, k, v)))
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)


def test_block_sizes_divide_the_padded_length():
    assert [_splash_block(n) for n in (128, 256, 384, 512, 640, 1024, 1536, 2048)] == \
        [128, 256, 128, 512, 128, 512, 512, 512]


def test_auto_picks_pallas_on_tpu_only():
    assert attention_implementation("auto", "tpu") == "pallas"
    assert attention_implementation("auto", "gpu") == "cudnn"
    assert attention_implementation("auto", "cpu") == "xla"
    assert attention_implementation("pallas", "tpu") == "pallas"
    for platform in ("cpu", "gpu"):
        with pytest.raises(PalmError, match="needs a TPU"):
            attention_implementation("pallas", platform)
    # The interpreter is a test path, explicitly named, on any backend.
    assert attention_implementation(PALLAS_INTERPRET, "cpu") == PALLAS_INTERPRET
    with pytest.raises(PalmError, match="unknown model.attention"):
        attention_implementation("flash", "tpu")


def test_unsupported_configurations_raise_palm_error():
    q, k, v = qkv(1, 128, 4, 3, 64)
    with pytest.raises(PalmError, match="kv_heads"):
        splash(q, k, v)
    q, k, v = qkv(1, 128, 4, 1, 64)
    with pytest.raises(PalmError, match="shaped"):
        splash(q, k[:, :64], v[:, :64])  # keys shorter than queries: not self-attention
    with pytest.raises(PalmError, match="shaped"):
        splash(q, k, v[..., :32])


def test_model_with_splash_matches_model_with_xla():
    """The whole decoder (RoPE, multi-query projections, scanned layers) is unchanged by the kernel."""
    config = ModelConfig(num_layers=2, d_model=64, num_heads=4, head_dim=16, vocab_size=128, seq_len=128,
                         dtype="float32", remat="none", attention="xla")
    tokens = jax.random.randint(jax.random.key(1), (1, 128), 0, config.vocab_size)
    params = jax.jit(PaLM(config).init)(jax.random.key(0), tokens)
    splash_config = dataclasses.replace(config, attention=PALLAS_INTERPRET)
    logits = jax.jit(PaLM(splash_config).apply)(params, tokens)
    ref = jax.jit(PaLM(config).apply)(params, tokens)
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)


MULTI_DEVICE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from palm.base.errors import PalmError
from palm.core.model import PALLAS_INTERPRET, causal_attention
from palm.core.sharding import make_mesh

assert jax.device_count() == 4
mesh = make_mesh({"data": 1, "fsdp": 2, "model": 2})
for kv_heads in (1, 2):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, 128, 4, 64))
    k, v = (jax.random.normal(key, (2, 128, kv_heads, 64)) for key in keys[1:3])
    w = jax.random.normal(keys[3], q.shape)
    qs = NamedSharding(mesh, P("fsdp", None, "model", None))
    kvs = NamedSharding(mesh, P("fsdp", None, "model" if kv_heads > 1 else None, None))
    q, k, v = jax.device_put(q, qs), jax.device_put(k, kvs), jax.device_put(v, kvs)

    def loss(impl):
        return lambda q, k, v: jnp.sum(causal_attention(q, k, v, impl) * w)

    with jax.set_mesh(mesh):
        f = jax.jit(jax.value_and_grad(loss(PALLAS_INTERPRET), argnums=(0, 1, 2)))
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v)), "the kernel must run per shard"
        got = f(q, k, v)
    want = jax.jit(jax.value_and_grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)

# The compiled TPU kernel with several devices and no mesh to shard over: a clear error, not a
# lowering failure. (Raised while tracing, before any TPU-only code, so it is checkable on CPU.)
try:
    causal_attention(q, k, v, "pallas")
except PalmError as e:
    assert "jax.set_mesh" in str(e), e
else:
    raise AssertionError("pallas on 4 devices without a mesh must raise PalmError")
print("MULTI_DEVICE_OK")
"""


@pytest.mark.slow
def test_splash_runs_per_shard_on_a_multi_device_mesh():
    env = dict(os.environ, XLA_FLAGS=cpu_devices(4), JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(MULTI_DEVICE)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "MULTI_DEVICE_OK" in result.stdout, result.stderr[-4000:]
