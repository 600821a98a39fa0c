"""The PaLM decoder (Chowdhery et al. 2022, section 2), in Flax.

    y = x + Attention(LN(x)) + MLP(LN(x))            one LayerNorm per block, both branches in parallel
    MLP(h) = (swish(h W_gate) * (h W_up)) W_down      SwiGLU, d_ff = 4 d_model
    Attention: multi-query (one K and one V of head_dim shared by all heads), RoPE on q and k
    logits = LN(x_L) E^T / sqrt(d_model)              E shared with the input embedding

No biases anywhere (LayerNorm has a scale only). Kernels start N(0, 1/fan_in), the embedding N(0, 1).
Every parameter carries logical axis names (`palm.core.sharding` maps them to the mesh); layers are scanned.

Decoding with a key/value cache: `PaLM(config)(tokens, positions, cache=cache)` with a `KVCache` from
`init_cache` returns (logits, updated cache); without `cache` the call is the training forward pass,
unchanged. The cache holds every layer's rotated keys and values, [layers, batch, max_len, kv_heads,
head_dim] (kv_heads = 1 for multi-query: one key and one value per token and layer, whatever the number
of query heads). Slot s of a row holds that row's token at position s, so one call covers both modes:
prefill passes a prompt [batch, length] at positions 0..length-1, each decode step one token [batch, 1]
at each row's next position. A call first writes its keys/values at their positions, then each query
attends to the slots at or before its own position. Prompts of different lengths are right-padded: the
padding's keys land in slots past the row's real tokens, which no query of that row can see until the
row's own next token has overwritten them (a row's tokens must arrive at consecutive positions).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from palm.spec.config import ModelConfig
from palm.base.errors import PalmError
from palm.core.sharding import MESH_AXES, Sharding

Array = jax.Array
#: Maps an activation and its logical axis names to the same activation with a sharding constraint.
Constrain = Callable[[Array, tuple[str | None, ...]], Array]


#: Token placed before the first token of each packed sequence (the end-of-document id).
START_TOKEN = 1

#: Logical name of the leading axis of parameters scanned over layers (nn.scan's partition name).
LAYERS = "layers"
#: Logical name of the axis that stacks a fused kernel's matrices (multi-query attention's key and value,
#: SwiGLU's gate and up), so one matmul computes both. `palm.core.sharding` has no rule for it (never split).
FUSED = "fused"
#: Axes whose every index is a separate weight matrix, as the optimizer sees them (`matrix_axes`).
MATRIX_INDEX_AXES = (LAYERS, FUSED)


def _no_constraint(x: Array, names: tuple[str | None, ...]) -> Array:
    return x


def fan_in_init(in_axes: tuple[int, ...]):
    """N(0, 1/fan_in), fan_in the product of the dimensions in `in_axes` (the paper's kernel init)."""

    def init(key, shape, dtype=jnp.float32):
        out_axes = tuple(i for i in range(len(shape)) if i not in in_axes)
        return nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=in_axes,
                                                out_axis=out_axes)(key, shape, dtype)

    return init


def rope(x: Array, positions: Array, max_wavelength: float) -> Array:
    """Rotary position embedding on the last axis of x [batch, length, heads, head_dim].

    Rotate-half RoPE: the pair (x1[i], x2[i]) of the two halves is rotated by positions·inv_freq[i],
    out = [x1 cos - x2 sin, x2 cos + x1 sin]. The two rotated halves are placed by padding each with zeros
    to the whole head_dim and adding, not by a concatenation: pads and an add are elementwise producers
    the compiler fuses into one pass with the rotation (the concatenation was a pass of its own, 10 ms per
    step on an H100 over palm-1b-gpu's 16 layers). Adding zeros changes no value (only a -0 becomes +0),
    so the numbers are those of the concatenated form (tests/test_model.py). A form that views the last
    axis as [2, half] and swaps the halves with a reverse does the same arithmetic, but on a TPU an axis
    of 2 second to last is padded to 8 in memory: 8B's train step at batch 512, compiled ahead of time,
    took 2.834 GiB per chip against 2.641 (this form: 2.641; docs/benchmarks.md)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (max_wavelength ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    lead = [(0, 0)] * (x.ndim - 1)
    out = jnp.pad(x1 * cos - x2 * sin, lead + [(0, half)]) + jnp.pad(x2 * cos + x1 * sin, lead + [(half, 0)])
    return out.astype(x.dtype)


#: Test-only implementation name: the Pallas splash kernel run by the Pallas interpreter, on any backend.
#: It is deliberately not in `palm.spec.config.Attention` (a spec cannot ask for it); tests pass it explicitly.
PALLAS_INTERPRET = "pallas_interpret"

#: Splash attention tiles the sequence in blocks of 128 (TPU vector lanes) up to this size.
_SPLASH_LANES = 128
_SPLASH_MAX_BLOCK = 512


def attention_implementation(requested: str, platform: str) -> str:
    """The attention kernel for a backend: cuDNN flash on NVIDIA GPUs, Pallas splash on TPUs, XLA elsewhere."""
    if requested == "auto":
        return {"gpu": "cudnn", "tpu": "pallas"}.get(platform, "xla")
    if requested == "cudnn" and platform != "gpu":
        raise PalmError(f"model.attention=cudnn needs an NVIDIA GPU, this backend is {platform}; use auto or xla")
    if requested == "pallas" and platform != "tpu":
        raise PalmError(f"model.attention=pallas (TPU splash attention) needs a TPU, this backend is {platform}; "
                        "use auto or xla")
    if requested not in ("xla", "cudnn", "pallas", PALLAS_INTERPRET):
        raise PalmError(f"unknown model.attention {requested!r}; expected auto, xla, cudnn or pallas")
    return requested


def causal_attention(q: Array, k: Array, v: Array, implementation: str) -> Array:
    """Causal softmax attention, q [b, t, heads, h], k and v [b, t, kv_heads, h] (kv_heads divides heads).

    `implementation` is "xla", "cudnn", "pallas" (TPU splash attention) or PALLAS_INTERPRET (the same
    splash kernel in the Pallas interpreter, for tests on CPU). Logits are scaled by 1/sqrt(h) in all.
    """
    if implementation in ("pallas", PALLAS_INTERPRET):
        return _splash_attention(q, k, v, interpret=implementation == PALLAS_INTERPRET)
    if implementation == "cudnn" and q.dtype == jnp.float32:
        q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))  # cuDNN flash needs 16-bit inputs
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return out.astype(v.dtype)


def _splash_block(length: int) -> int:
    """The largest of 512, 256, 128 dividing `length` (itself a multiple of 128)."""
    block = _SPLASH_MAX_BLOCK
    while length % block:
        block //= 2
    return block


def _splash_kernel(heads: int, length: int, mqa: bool, interpret: bool):
    """A splash attention kernel for one example: q [heads, length, h]; k, v [length, h] (MQA) or
    [kv_heads, length, h] (MHA/GQA).

    Called while tracing: the kernel's block-sparsity tables (numpy work per shape, seconds at 32k tokens,
    cached by JAX's mask processing) are lifted into the current trace as constants. They are never made
    concrete device arrays, so the step also lowers ahead of time for devices this host does not have
    (`palm.analysis.aot`: a TPU pod's abstract topology on a CPU host), and no tracer outlives its trace."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    # What the kernel requires, here as well as on a TPU (all checked in Python before any lowering, so
    # the Pallas interpreter enforces them too): q and kv blocks divide the length (mask processing), and
    # kv blocks, including the compute sub-blocks of the forward and dkv kernels and the dq kernel's kv
    # block, are multiples of 128 ("bkv_compute=64 must be a multiple of 128"). On a TPU the q blocks
    # also lie along the 128 vector lanes in the dkv kernel, which the interpreter does not check; so
    # every block here is a multiple of 128 (lengths are padded to one), the largest of 512/256/128.
    block = _splash_block(length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(heads)])
    make = splash.make_splash_mqa_single_device if mqa else splash.make_splash_mha_single_device
    return make(mask, block_sizes=sizes, interpret=interpret)


def _splash_local(q: Array, k: Array, v: Array, interpret: bool) -> Array:
    """Splash attention on arrays local to one device: [b, t, heads, h] in, [b, t, heads, h] out."""
    b, t, heads, h = q.shape
    kv_heads = k.shape[2]
    # The kernel takes unscaled logits (q k^T): apply jax.nn.dot_product_attention's 1/sqrt(h) to q.
    q = (q.astype(jnp.float32) * (1.0 / math.sqrt(h))).astype(q.dtype)
    # The kernel needs the length to be a multiple of 128 (see _splash_kernel). Zero-padding the end is
    # exact for causal attention: no real query sees a padded key, and padded queries are sliced off.
    padded = -(-t // _SPLASH_LANES) * _SPLASH_LANES
    if padded != t:
        q, k, v = (jnp.pad(a, ((0, 0), (0, padded - t), (0, 0), (0, 0))) for a in (q, k, v))
    kernel = _splash_kernel(heads, padded, kv_heads == 1, interpret)
    q = jnp.swapaxes(q, 1, 2)  # [b, heads, t, h]
    if kv_heads == 1:
        k, v = k[:, :, 0], v[:, :, 0]  # [b, t, h]: one key and value for all heads
    else:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [b, kv_heads, t, h]
    out = jax.vmap(kernel)(q, k, v)  # the kernel works per example
    return jnp.swapaxes(out, 1, 2)[:, :t]


def _splash_attention(q: Array, k: Array, v: Array, interpret: bool) -> Array:
    """Splash attention; over a multi-device mesh it runs per shard inside shard_map.

    A Pallas (Mosaic) call cannot be partitioned automatically by jit, so with several devices the
    kernel runs on each device's shard: batch over (data, fsdp) and heads over model, by the rules
    `palm.core.sharding` applies to these activations. The mesh must be given explicitly, as the context
    mesh (`with jax.set_mesh(mesh):` around tracing): the model's `constrain` callback does not expose
    one. Without a context mesh the kernel is called directly, which is right on one device; on a TPU
    host with several devices that is refused with a PalmError rather than failing at lowering.
    """
    b, t, heads, h = q.shape
    kv_heads = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h:
        raise PalmError(f"splash attention needs k and v shaped [batch, length, kv_heads, head_dim] like q "
                        f"{q.shape}; got k {k.shape}, v {v.shape}")
    if heads % kv_heads:
        raise PalmError(f"splash attention needs kv_heads ({kv_heads}) to divide heads ({heads})")
    mesh = jax.sharding.get_abstract_mesh()
    manual = set(mesh.manual_axes)
    if mesh.empty:
        if not interpret and jax.device_count() > 1:
            raise PalmError(
                f"model.attention=pallas with {jax.device_count()} devices needs the mesh: trace the model "
                "under `with jax.set_mesh(mesh):` so the kernel runs per shard in shard_map (a Pallas call "
                "cannot be partitioned automatically); for a one-device run set a one-device mesh, or use xla")
        return _splash_local(q, k, v, interpret)
    if math.prod(dict(mesh.shape).values()) == 1 or set(mesh.axis_names) <= manual:
        return _splash_local(q, k, v, interpret)  # one device, or already inside a shard_map
    if set(mesh.axis_names) != set(MESH_AXES) or manual:
        raise PalmError(f"splash attention shards over a {'/'.join(MESH_AXES)} mesh; this one has axes "
                        f"{mesh.axis_names} (manual: {sorted(manual)})")
    rules = Sharding(tuple((a, int(mesh.shape[a])) for a in MESH_AXES))
    q_spec = rules.spec(("batch", "length", "heads_act", None), q.shape)
    q_spec = tuple(q_spec) + (None,) * (4 - len(q_spec))
    heads_axis = q_spec[2]
    if kv_heads == 1 or heads_axis is None:
        kv_spec = (q_spec[0], None, None, None)  # the shared key/value is replicated over model
    elif kv_heads % rules.axis_sizes[heads_axis] == 0:
        kv_spec = (q_spec[0], None, heads_axis, None)  # each model shard keeps its heads' kv groups
    else:
        raise PalmError(f"splash attention with {kv_heads} kv heads cannot follow {heads} query heads split "
                        f"{rules.axis_sizes[heads_axis]} ways over {heads_axis!r}; use kv_heads 1 or a "
                        "multiple of that")
    P = jax.sharding.PartitionSpec
    local = functools.partial(_splash_local, interpret=interpret)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(*q_spec), P(*kv_spec), P(*kv_spec)),
                         out_specs=P(*q_spec), check_vma=False)(q, k, v)


class KVCache(NamedTuple):
    """Keys (after RoPE) and values of every layer: each [layers, batch, max_len, kv_heads, head_dim].

    Slot s of a row holds the key/value of that row's token at position s (see the module docstring).
    """

    key: Array
    value: Array

    @property
    def max_len(self) -> int:
        return self.key.shape[2]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` positions, in the compute dtype by default."""
    c = config
    shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
    dtype = jnp.dtype(c.dtype if dtype is None else dtype)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def write_cache(cache: Array, new: Array, positions: Array) -> Array:
    """cache [b, max_len, kv, h] with new [b, t, kv, h] written at slots positions [b, t] (each row its own).

    Positions at or past max_len are dropped (their keys could never be attended to correctly anyway)."""
    rows = jnp.arange(cache.shape[0])[:, None]
    return cache.at[rows, positions].set(new.astype(cache.dtype), mode="drop")


def cached_attention(q: Array, k: Array, v: Array, positions: Array) -> Array:
    """Softmax attention of q [b, t, heads, h] at `positions` [b, t] over cached k, v [b, max_len, kv, h].

    A query at position p sees slots 0..p (the causal mask in cache coordinates); later slots are either
    unused or hold right-padding. Query heads are grouped over the kv heads as in
    jax.nn.dot_product_attention (head i uses kv head i // (heads / kv_heads)); logits scaled by 1/sqrt(h),
    softmax in float32.
    """
    b, t, heads, h = q.shape
    max_len, kv_heads = k.shape[1], k.shape[2]
    q = q.reshape(b, t, kv_heads, heads // kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(1.0 / math.sqrt(h))
    visible = jnp.arange(max_len)[None, None, :] <= positions[:, :, None]  # [b, t, max_len]
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v)
    return out.reshape(b, t, heads, h)


class LayerNorm(nn.Module):
    """LayerNorm with a learned scale and no bias, computed in float32."""

    epsilon: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        return (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)


class Block(nn.Module):
    """One PaLM layer: parallel multi-query attention and SwiGLU MLP over a shared LayerNorm."""

    config: ModelConfig
    constrain: Constrain = _no_constraint
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: Array, positions: Array,
                 cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
        """x [b, t, d] at `positions` [b, t]; with `cache` (this layer's, [b, max_len, kv, h] each) the
        new keys/values are written into it and attention reads it; the updated cache is returned."""
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)

        def kernel(name, shape, axes, in_axes):
            w = self.param(name, nn.with_logical_partitioning(fan_in_init(in_axes), axes), shape, pdtype)
            return w.astype(dtype)

        d, n, kv, h, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.d_ff
        w_q = kernel("query", (d, n, h), ("embed", "heads", "head_dim"), (0,))
        # One key and one value projection (multi-query), stacked so one matmul computes both.
        w_kv = kernel("key_value", (d, 2, kv, h), ("embed", FUSED, "kv_heads", "head_dim"), (0,))
        w_o = kernel("out", (n, h, d), ("heads", "head_dim", "embed"), (0, 1))
        # SwiGLU's gate and up projections, stacked likewise.
        w_in = kernel("mlp_in", (d, 2, f), ("embed", FUSED, "mlp"), (0,))
        w_down = kernel("mlp_out", (f, d), ("mlp", "embed"), (0,))

        y = LayerNorm(c.layer_norm_epsilon, pdtype, name="layer_norm")(x).astype(dtype)
        y = self.constrain(y, ("batch", "length", "embed_act"))

        q = jnp.einsum("btd,dnh->btnh", y, w_q)
        key, value = jnp.einsum("btd,dskh->sbtkh", y, w_kv)
        q = rope(self.constrain(q, ("batch", "length", "heads_act", None)), positions, c.rope_max_wavelength)
        key = rope(key, positions, c.rope_max_wavelength)
        if cache is None:
            att = causal_attention(q, key, value, self.attention)
        else:
            cache = KVCache(write_cache(cache.key, key, positions), write_cache(cache.value, value, positions))
            att = cached_attention(q, cache.key, cache.value, positions)
        att = self.constrain(att, ("batch", "length", "heads_act", None))
        att_out = jnp.einsum("btnh,nhd->btd", att, w_o)

        gate, up = jnp.einsum("btd,dsf->sbtf", y, w_in)
        hidden = self.constrain(nn.swish(gate) * up, ("batch", "length", "mlp_act"))
        mlp_out = jnp.einsum("btf,fd->btd", hidden, w_down)

        out = x + (att_out + mlp_out).astype(x.dtype)
        return self.constrain(out, ("batch", "length", "embed_act")), cache


REMAT_POLICIES = {
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "save_dots": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": lambda: jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class PaLM(nn.Module):
    """tokens [batch, length] -> logits [batch, length, vocab] (float32).

    With `cache` (a KVCache, see `init_cache`) it returns (logits, updated cache) instead: keys and values
    of `tokens` are written at `positions` and attention reads the whole cache (prefill and decoding; see
    the module docstring). The parameters are the same in both modes. With `hidden=True` (training, no
    cache) it returns the final LayerNorm's output [batch, length, d_model] instead of logits, for a loss
    that projects onto the vocabulary a chunk at a time (`output_logits`, `palm.core.train.loss_fn`).
    """

    config: ModelConfig
    constrain: Constrain = _no_constraint
    platform: str = "cpu"
    #: Whether the vocabulary divides over the `model` mesh axis (see output_logits).
    vocab_split: bool = False
    #: Unroll the scanned layers (decoding on GPUs: a loop on the device costs a round trip to the host
    #: per layer, which a one-token step cannot hide). Same parameters; the same results up to the
    #: compiler's rounding in the compute dtype (it fuses the unrolled arithmetic differently).
    unroll_layers: bool = False

    @nn.compact
    def __call__(self, tokens: Array, positions: Array | None = None,
                 cache: KVCache | None = None, hidden: bool = False) -> Array | tuple[Array, KVCache]:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (c.vocab_size, c.d_model), jnp.dtype(c.param_dtype))

        x = jnp.take(embedding, tokens, axis=0).astype(dtype)
        x = self.constrain(x, ("batch", "length", "embed_act"))

        block = Block
        if c.remat != "none" and cache is None:  # nothing to rematerialize without a backward pass
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat](), prevent_cse=not c.scan_layers)
        kwargs = dict(config=c, constrain=self.constrain,
                      attention=attention_implementation(c.attention, self.platform))
        if cache is not None and cache.key.shape[:2] != (c.num_layers, tokens.shape[0]):
            raise PalmError(f"a KV cache shaped {cache.key.shape} does not fit {c.num_layers} layers and a batch "
                            f"of {tokens.shape[0]}; make it with init_cache(config, batch, max_len)")
        if c.scan_layers:
            # The cache (when given) is scanned over its leading layers axis and restacked on the way out.
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=nn.broadcast if cache is None else (nn.broadcast, 0), length=c.num_layers,
                            metadata_params={nn.PARTITION_NAME: LAYERS},
                            unroll=c.num_layers if self.unroll_layers else 1)
            layers = stack(**kwargs, name="layers")
            x, cache = layers(x, positions) if cache is None else layers(x, positions, cache)
        else:
            per_layer = []
            for i in range(c.num_layers):
                layer = block(**kwargs, name=f"layer_{i}")
                if cache is None:
                    x, _ = layer(x, positions)
                else:
                    x, layer_cache = layer(x, positions, jax.tree.map(lambda a: a[i], cache))
                    per_layer.append(layer_cache)
            if cache is not None:
                cache = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)

        x = LayerNorm(c.layer_norm_epsilon, jnp.dtype(c.param_dtype), name="final_norm")(x).astype(dtype)
        if hidden:
            return x
        logits = output_logits(x, embedding, c, self.constrain, self.vocab_split)
        return logits if cache is None else (logits, cache)


def output_logits(x: Array, embedding: Array, config: ModelConfig, constrain: Constrain = _no_constraint,
                  vocab_split: bool = False) -> Array:
    """Float32 logits [b, t, vocab] of final hidden states x [b, t, d]: x E^T / sqrt(d_model), E the tied
    input embedding.

    With `vocab_split` (the vocabulary divides over `model`), each device scores its slice of the
    vocabulary against whole hidden states. Left to itself, the compiler contracts over d_model split
    over `model` (the residual stream's layout), so that every device holds partial sums over the whole
    vocabulary before they are reduce-scattered: 2 GiB of float32 per device for 8B at 8 sequences x 256
    tokens, against 0.25 GiB. Where the vocabulary does not divide (540B: 256,000 over 12) that is the
    layout left, and each device holds the whole vocabulary's logits, which the loss bounds by taking
    fewer tokens at a time (palm.core.train.loss_chunks).
    """
    logits = unscaled_logits(x, embedding, config, constrain, vocab_split)
    return constrain(logits / jnp.float32(logit_divisor(config)), ("batch", "length", "vocab_act"))


def logit_divisor(config: ModelConfig) -> float:
    """sqrt(d_model) rounded to float32 (the logits' divisor, see output_logits), as a Python float: correctly
    rounded either way, so the same number as XLA's float32 sqrt of d_model."""
    return float(np.sqrt(np.float32(config.d_model)))


def unscaled_logits(x: Array, embedding: Array, config: ModelConfig, constrain: Constrain = _no_constraint,
                    vocab_split: bool = False) -> Array:
    """x E^T [b, t, vocab] in float32, before the division by sqrt(d_model): output_logits without its last
    step. The loss (`palm.core.train._target_sums`) takes these and divides inside its own fused pass, so
    that the only float32 [b, t, vocab] array written is the matmul's output."""
    dtype = jnp.dtype(config.dtype)
    if vocab_split:
        x = constrain(x, ("batch", "length", None))
        embedding = constrain(embedding, ("vocab_act", None))
    return constrain(project_to_vocab(x.astype(dtype), embedding), ("batch", "length", "vocab_act"))


@jax.custom_vjp
def project_to_vocab(x: Array, embedding: Array) -> Array:
    """Float32 x E^T [b, t, vocab] of x [b, t, d] (compute dtype) and the table E [vocab, d] (param dtype),
    the table cast to x's dtype and the products summed in float32.

    Differentiated by hand: left to autodiff, the float32 cotangent of the float32 logits turns both
    backward matmuls into float32 (TF32) ones, the slowest of the step on an H100. Here the cotangent is
    cast to x's dtype first, as every other matmul of the mixed-precision step is, and E's gradient is
    summed in float32 and returned in E's own dtype (no rounding to 16 bits on the way)."""
    return jnp.einsum("btd,vd->btv", x, embedding.astype(x.dtype), preferred_element_type=jnp.float32)


def _project_fwd(x: Array, embedding: Array):
    return project_to_vocab(x, embedding), (x, embedding)


def _project_bwd(residuals, g: Array):
    x, embedding = residuals
    g = g.astype(x.dtype)
    dx = jnp.einsum("btv,vd->btd", g, embedding.astype(x.dtype), preferred_element_type=jnp.float32)
    dtable = jnp.einsum("btv,btd->vd", g, x, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dtable.astype(embedding.dtype)


project_to_vocab.defvjp(_project_fwd, _project_bwd)


def abstract_params(config: ModelConfig) -> Any:
    """Parameter shapes and logical axes (nn.Partitioned boxes of ShapeDtypeStruct), allocating nothing.

    Each call returns its own tree (the containers are new, the leaves immutable), so a caller may edit it;
    the model is traced once per configuration and process (`_traced_params`)."""
    return jax.tree.map(lambda leaf: leaf, _traced_params(config))


@functools.lru_cache(maxsize=32)
def _traced_params(config: ModelConfig) -> Any:
    # Tracing the model's init is the cost (a second or more on a small CPU, whatever the model's size): the
    # plan, the memory estimate for each batch and microbatch count, the trainer and the evaluation's LM
    # all ask for the same shapes.
    model = PaLM(config)
    tokens = jax.ShapeDtypeStruct((1, min(8, config.seq_len)), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


def count_params(config: ModelConfig) -> int:
    """Exact parameter count, from the model's own abstract shapes."""
    leaves = jax.tree.leaves(nn.unbox(_traced_params(config)))
    return sum(int(x.size) for x in leaves)


def model_flops_per_token(config: ModelConfig, num_params: int | None = None) -> float:
    """Model FLOPs per token as the paper defines them (appendix B): 6N + 12·L·H·Q·T.

    N counts every parameter (the tied embedding once), H heads, Q head size, T sequence length;
    rematerialization is deliberately not counted (that is hardware FLOPs, not model FLOPs).
    """
    n = count_params(config) if num_params is None else num_params
    c = config
    return 6.0 * n + 12.0 * c.num_layers * c.num_heads * c.head_dim * c.seq_len


def hardware_flops_per_token(config: ModelConfig, num_params: int | None = None) -> float:
    """FLOPs per token actually executed: model FLOPs plus the forward work that remat recomputes.

    Full remat recomputes each layer's forward pass (everything but the tied output projection);
    save_dots and offload keep the weight matmuls and recompute only attention's QK^T and AV.
    """
    n = count_params(config) if num_params is None else num_params
    c = config
    attention_fwd = 4.0 * c.num_layers * c.num_heads * c.head_dim * c.seq_len
    layers_fwd = 2.0 * (n - c.vocab_size * c.d_model) + attention_fwd
    recompute = {"none": 0.0, "save_dots": attention_fwd, "offload": attention_fwd, "full": layers_fwd}
    return model_flops_per_token(c, n) + recompute[c.remat]


def matrix_axes(boxed: Any) -> Any:
    """For each parameter of a tree of nn.Partitioned boxes (`abstract_params`), the tuple of its axes
    that index separate weight matrices: the layer axis of scanned parameters and the slot axis of fused
    kernels (logical names in MATRIX_INDEX_AXES). key_value scanned, [layers, d_model, 2, kv_heads,
    head_dim], gives (0, 2): one matrix per layer and per key/value. Read from the names the model gives
    its axes, never from shapes."""

    def axes(p: nn.Partitioned) -> tuple[int, ...]:
        return tuple(i for i, name in enumerate(p.names) if name in MATRIX_INDEX_AXES)

    return jax.tree.map(axes, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    path: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]


def describe_params(config: ModelConfig) -> list[ParamInfo]:
    """Every parameter with its shape and logical axis names, in a stable order."""
    out = []
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(config),
                                                is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in flat:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        out.append(ParamInfo(name, tuple(leaf.value.shape), tuple(leaf.names)))
    return out
