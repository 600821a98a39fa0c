"""The training step: loss, z-loss, batch-size ramp, sharding, and learning on real text."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from palm.spec.config import ModelConfig, RampStage, TrainConfig
from palm.dag.workflow import load_spec
from palm.core.train import Trainer, batches, loss_fn, train
from tests.conftest import ROOT, SPECS, XLA_USER_OPTIONS, cpu_devices


class FixedLogits:
    """Stands in for the model: the same logits whatever the inputs. loss_fn takes the model's final hidden
    states and projects them onto the embedding table itself, divided by sqrt(d_model): here the hidden
    states are the logits, the table the identity (FIXED_PARAMS) and d_model 1."""

    config = ModelConfig(num_layers=1, d_model=1, num_heads=1, head_dim=1, vocab_size=3, seq_len=2, dtype="float32")
    vocab_split = False

    def __init__(self, logits):
        self.logits = jnp.asarray(logits, jnp.float32)

    def apply(self, variables, inputs, hidden=False):
        assert hidden
        return self.logits

    @staticmethod
    def constrain(x, names):
        return x


#: The parameters loss_fn reads itself (the tied embedding) for FixedLogits: the identity table.
FIXED_PARAMS = {"embedding": jnp.eye(3, dtype=jnp.float32)}


def test_loss_and_z_loss_on_a_hand_made_example():
    logits = np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]])  # [batch 1, length 2, vocab 3]
    tokens = np.array([[0, 1]])
    weights = np.array([[1.0, 1.0]])
    log_z = np.log(np.exp(logits).sum(-1))  # [[2.1698, 3.1328]]
    ce = (log_z[0, 0] - 2.0 + log_z[0, 1] - 0.5) / 2
    z = 1e-4 * (log_z[0, 0] ** 2 + log_z[0, 1] ** 2) / 2
    total, metrics = loss_fn(FIXED_PARAMS, FixedLogits(logits), jnp.asarray(tokens), jnp.asarray(weights), 1e-4)
    assert float(metrics["loss"]) == pytest.approx(ce, rel=1e-6)
    assert float(metrics["z_loss"]) == pytest.approx(z, rel=1e-5)
    assert float(total) == pytest.approx(ce + z, rel=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(0.5)  # argmax 0 is right, argmax 2 is wrong


def test_masked_targets_do_not_count():
    logits = np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]])
    tokens = np.array([[0, 1]])
    masked = loss_fn(FIXED_PARAMS, FixedLogits(logits), jnp.asarray(tokens), jnp.asarray([[1.0, 0.0]]), 1e-4)[1]
    log_z0 = np.log(np.exp(logits[0, 0]).sum())
    assert float(masked["loss"]) == pytest.approx(log_z0 - 2.0, rel=1e-6)


@pytest.mark.slow
def test_the_chunked_loss_has_the_same_value_and_gradient():
    """Projecting onto the vocabulary a slice of the sequence at a time (what keeps 540B's float32 logits
    off the chips) changes nothing but the order of float32 sums."""
    import jax
    import flax.linen as nn

    from palm.spec.config import ModelConfig
    from palm.core.model import PaLM

    # Cost: a compile of the model's value and gradient (~5 s on CPU) per chunk count, so only 1, 2 and 64.
    config = ModelConfig(num_layers=2, d_model=32, num_heads=4, head_dim=8, vocab_size=300, seq_len=64,
                         dtype="float32", remat="full")
    model = PaLM(config)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, config.seq_len)), jnp.int32)
    weights = jnp.asarray(rng.random((3, config.seq_len)) < 0.9, jnp.float32)
    params = nn.unbox(model.init(jax.random.key(1), tokens)["params"])

    def run(chunks):
        grad_fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, model, tokens, weights, 1e-2, chunks), has_aux=True))
        (total, metrics), grads = grad_fn(params)
        return float(total), jax.tree.map(float, metrics), grads

    total, metrics, grads = run(1)
    for chunks in (2, 64):  # two slices, and one position a slice
        got_total, got_metrics, got_grads = run(chunks)
        assert got_total == pytest.approx(total, rel=1e-6), chunks
        for key in ("loss", "z_loss", "accuracy"):
            assert got_metrics[key] == pytest.approx(metrics[key], rel=1e-6), (chunks, key)
        for path, a, b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads),
                              jax.tree.leaves(got_grads)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-7, err_msg=f"{chunks} {path[0]}")
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))  # the comparison is not vacuous
    with pytest.raises(Exception, match="must divide the sequence length"):
        run(3)



def _plain_target_sums(logits, targets, weights):
    """The loss's statistics as palm.core.train computed them until 2026-12-06, for autodiff to differentiate:
    logsumexp, the target's logit by comparison, argmax, each its own pass over the logits."""
    import jax

    log_z = jax.nn.logsumexp(logits, axis=-1)
    vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
    target_logit = jnp.where(vocab == targets[..., None], logits, 0.0).sum(-1)
    correct = jnp.argmax(logits, -1) == targets
    return ((log_z - target_logit) * weights).sum(), (jnp.square(log_z) * weights).sum(), (correct * weights).sum()


def _plain_loss_fn(params, model, tokens, weights, z_loss):
    """loss_fn as it was until 2026-12-06: the model's own (divided) logits, then _plain_target_sums."""
    from palm.core.train import START_TOKEN

    inputs = jnp.concatenate([jnp.full_like(tokens[:, :1], START_TOKEN), tokens[:, :-1]], axis=1)
    ce_sum, z_sum, correct = _plain_target_sums(model.apply({"params": params}, inputs), tokens, weights)
    denom = jnp.maximum(weights.sum(), 1.0)
    ce, z = ce_sum / denom, z_loss * z_sum / denom
    return ce + z, {"loss": ce, "z_loss": z, "accuracy": correct / denom}


def test_the_loss_statistics_in_one_reduction_match_the_separate_passes():
    """palm.core.train._logit_statistics (max, sum of exponentials, target logit and argmax in one variadic
    reduce) against logsumexp, the comparison sum and argmax: large logits (no overflow), ties (the first
    index, as jnp.argmax), a vocabulary of one."""
    import jax

    from palm.core.train import _logit_statistics

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, 7, 1001)).astype(np.float32) * 30
    logits[0, 0, :] = 0.0  # every index ties
    logits[0, 1, [5, 900]] = 500.0  # two tie at the top, far beyond exp's float32 range
    logits[1, 0, :] = -500.0
    targets = rng.integers(0, 1001, (4, 7)).astype(np.int32)
    log_z, target_logit, argmax = jax.jit(_logit_statistics)(jnp.asarray(logits), jnp.asarray(targets))
    want = np.asarray(jax.nn.logsumexp(jnp.asarray(logits), axis=-1))
    np.testing.assert_allclose(np.asarray(log_z), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(target_logit), np.take_along_axis(logits, targets[..., None], -1)[..., 0])
    np.testing.assert_array_equal(np.asarray(argmax), np.argmax(logits, -1))
    assert int(argmax[0, 0]) == 0 and int(argmax[0, 1]) == 5
    one = _logit_statistics(jnp.full((2, 1), 3.0), jnp.zeros((2,), jnp.int32))
    np.testing.assert_allclose(np.asarray(one[0]), [3.0, 3.0], rtol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_fused_loss_has_the_value_and_gradient_of_autodiff(dtype):
    """loss_fn (the statistics in one pass, a hand-written backward pass over the undivided logits) against
    autodiff of the plain formulas on the model's own logits, whole and in slices of the sequence. Measured
    on CPU: the same loss bit for bit, gradients within 2e-6 of the largest (float32) and 1e-7 (bf16, where
    both round the logits' gradient to bf16 before the projection's matmuls)."""
    import jax
    import flax.linen as nn

    from palm.core.model import PaLM

    # Cost: three compiles of the model's value and gradient (~5 s each on CPU) per dtype: autodiff's reference,
    # the fused loss whole and in slices; the shapes are already tiny.
    config = ModelConfig(num_layers=2, d_model=32, num_heads=4, head_dim=8, vocab_size=300, seq_len=64,
                         dtype=dtype, remat="full")
    model = PaLM(config)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, config.seq_len)), jnp.int32)
    weights = jnp.asarray(rng.random((3, config.seq_len)) < 0.9, jnp.float32)
    params = nn.unbox(model.init(jax.random.key(1), tokens)["params"])
    params = jax.tree.map(lambda p: 3 * p, params)  # logits of order 10, a z-loss that matters

    def run(f):  # compiled as a user's run compiles (the suite's cheaper settings round bf16 elsewhere)
        step = jax.jit(jax.value_and_grad(f, has_aux=True)).lower(params).compile(compiler_options=XLA_USER_OPTIONS)
        (total, metrics), grads = step(params)
        return float(total), jax.tree.map(float, metrics), grads

    total, metrics, grads = run(lambda p: _plain_loss_fn(p, model, tokens, weights, 1e-2))
    assert metrics["z_loss"] > 0.1 * metrics["loss"]
    for chunks in (1, 4):
        got_total, got_metrics, got_grads = run(lambda p: loss_fn(p, model, tokens, weights, 1e-2, chunks))
        assert got_total == pytest.approx(total, rel=1e-6), chunks
        for key in ("loss", "z_loss", "accuracy"):
            assert got_metrics[key] == pytest.approx(metrics[key], rel=1e-6), (chunks, key)
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(got_grads)):
            a, b = np.asarray(a), np.asarray(b)
            assert np.abs(a).max() > 0
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max(), err_msg=f"{chunks} {path}")


def _logit_buffers(hlo: str, elements: int) -> dict[str, list[str]]:
    """The float32 arrays of `elements` elements that a compiled (optimized) HLO module writes, each with the
    instructions that read it: every computation but the bodies of fusions, a bitcast followed to its
    readers (the same buffer)."""
    import re

    comps: dict[str, list[str]] = {}
    lines = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            lines = comps.setdefault(head.group(1), [])
        elif line.startswith("}"):
            lines = None
        elif lines is not None:
            lines.append(line)
    fused = set(re.findall(r"calls=%([\w.\-]+)", hlo))
    inst = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\(")
    found = {}
    for name, body in comps.items():
        if name in fused:
            continue
        defs = {m.group(1): m for m in map(inst.match, body) if m}

        def readers(value: str) -> list[str]:
            out = []
            for line in body:
                m = inst.match(line) or re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = ", line)
                if m and m.group(1) != value and re.search(rf"%{re.escape(value)}[,)]", line):
                    reader = m.group(1)
                    is_bitcast = reader in defs and defs[reader].group(4) == "bitcast"
                    out += readers(reader) if is_bitcast else [reader]
            return out

        for value, m in defs.items():
            dims = [int(d) for d in m.group(3).split(",") if d]
            if m.group(2) == "f32" and dims and math.prod(dims) == elements and m.group(4) != "bitcast":
                found[value] = readers(value)
    return found


@pytest.mark.slow
def test_the_compiled_loss_writes_float32_logits_once_and_reads_them_once_per_pass():
    """The compiled CPU program of the evaluation and training loss (bf16 compute, as on a GPU): the only
    float32 [batch, length, vocab] array is the projection's output, read by one fusion in the forward
    pass (all four statistics) and by one more in the backward pass (the gradient, written in bf16). The
    plain formulas compile to three such arrays here (the divided logits, the exponentials, the target
    mask), which the H100 profile showed as five float32 passes and a convert (docs/benchmarks.md)."""
    import jax
    import flax.linen as nn

    from palm.core.model import PaLM

    batch, length, vocab = 2, 8, 1000  # batch x length x vocab (16,000) unlike any parameter's size
    config = ModelConfig(num_layers=1, d_model=32, num_heads=2, head_dim=16, vocab_size=vocab, seq_len=length,
                         dtype="bfloat16", remat="none")
    model = PaLM(config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, length)), jnp.int32)
    weights = jnp.ones((batch, length), jnp.float32)
    params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])

    def compiled(f):
        return jax.jit(f).lower(params).compile().as_text()

    def buffers(loss):
        evaluation = compiled(lambda p: loss(p, model, tokens, weights, 1e-4))
        training = compiled(jax.value_and_grad(lambda p: loss(p, model, tokens, weights, 1e-4), has_aux=True))
        return (_logit_buffers(evaluation, batch * length * vocab), _logit_buffers(training, batch * length * vocab),
                training)

    evaluation, training, hlo = buffers(loss_fn)
    assert [len(r) for r in evaluation.values()] == [1], evaluation
    assert [len(r) for r in training.values()] == [2], training
    (logits, readers), = training.items()
    assert re.search(rf"%{re.escape(logits)} = f32\S* (dot|fusion|custom-call)\(", hlo)
    # the backward pass writes the logits' gradient in bf16, not float32 then a convert
    assert re.search(rf"= bf16\[{batch},{length},{vocab}\]\S* fusion\([^)]*%{re.escape(logits)}[,)]", hlo) or \
        re.search(rf"= bf16\[{batch * length},{vocab}\]\S* fusion\([^)]*%{re.escape(logits)}[,)]", hlo), readers
    plain_evaluation, plain_training, _ = buffers(_plain_loss_fn)
    assert len(plain_training) > 1 and sum(map(len, plain_training.values())) > 2, plain_training  # the count sees them


@pytest.mark.slow
def test_the_evaluation_step_is_the_training_loss_without_an_update():
    import jax

    from palm.spec.config import ModelConfig

    config = ModelConfig(num_layers=1, d_model=32, num_heads=2, head_dim=16, vocab_size=128, seq_len=16,
                         dtype="float32", remat="none")
    trainer = Trainer(config, TrainConfig(steps=1, batch_ramp=(RampStage(0, 4),)))
    state = trainer.init()
    tokens = np.random.default_rng(0).integers(0, 128, (4, 16)).astype(np.int32)
    got = trainer.evaluate(state.params, tokens)
    _, want = jax.jit(lambda p: loss_fn(p, trainer.model, jnp.asarray(tokens), jnp.ones((4, 16)), 1e-4))(state.params)
    for key in ("loss", "z_loss", "accuracy"):
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-6), key
    _, metrics = trainer.step(state, tokens)
    assert float(metrics["loss"]) == pytest.approx(float(got["loss"]), rel=1e-6)  # the step's loss, before its update


def test_loss_chunks_keep_each_slice_of_logits_under_the_budget():
    from palm.core.train import LOGITS_CHUNK_BYTES, loss_chunks

    assert loss_chunks(8, 128, 256) == 1  # tiny: whole logits
    # 62B on 64-way FSDP x 8-way model at batch 1024: 16 sequences x 2048 tokens x 32,000 of the vocabulary.
    chunks = loss_chunks(16, 2048, 32_000)
    assert 2048 % chunks == 0 and 16 * (2048 // chunks) * 32_000 * 4 <= LOGITS_CHUNK_BYTES
    assert 16 * (2048 // (chunks // 2)) * 32_000 * 4 > LOGITS_CHUNK_BYTES  # and no more slices than that


@pytest.mark.slow
def test_batch_ramp_keeps_token_order_and_compiles_once_per_size():
    ramp = TrainConfig(steps=6, batch_ramp=(RampStage(0, 2), RampStage(3, 4)))
    flat = TrainConfig(steps=4, batch_ramp=(RampStage(0, 4),))
    stream = [np.full(8, i, np.int32) for i in range(100)]
    got = [b for _, b in batches(iter(stream), ramp)]
    assert [b.shape[0] for b in got] == [2, 2, 2, 4, 4, 4]
    ramped_order = np.concatenate(got)[:, 0]
    flat_order = np.concatenate([b for _, b in batches(iter(stream), flat)])[:, 0]
    assert list(ramped_order) == list(range(18))
    assert list(ramped_order[:16]) == list(flat_order)

    spec = load_spec(SPECS / "tiny.yaml", ["train.steps=4", "model.seq_len=16", "eval.tasks=[validation_loss]",
                                           "train.batch_ramp=[{from_step: 0, global_batch: 2}, "
                                           "{from_step: 2, global_batch: 4}]"])
    trainer = Trainer(spec.model, spec.train, spec.resolved_mesh())
    state, logs = train(trainer, iter(np.zeros((100, 16), np.int32)))
    assert [log.global_batch for log in logs] == [2, 2, 4, 4]
    assert trainer.compiled_batch_sizes() == 2
    assert int(state.step) == 4
    # What `palm run` compiles ahead (Trainer.precompile) is what the run reaches: a stage of the ramp that
    # starts at or after the last step is left out.
    assert trainer.step_shapes() == [(2, 1), (4, 1)]
    for steps, shapes in ((2, [(2, 1)]), (3, [(2, 1), (4, 1)])):
        short = Trainer(spec.model, dataclasses.replace(spec.train, steps=steps), spec.resolved_mesh())
        assert short.step_shapes() == shapes, steps


def test_running_out_of_data_is_a_clear_error():
    from palm.base.errors import PalmError

    cfg = TrainConfig(steps=3, batch_ramp=(RampStage(0, 4),))
    with pytest.raises(PalmError, match="ran out at step 1"):
        list(batches(iter(np.zeros((5, 8), np.int32)), cfg))


@pytest.mark.slow
def test_tiny_model_learns_real_text_far_below_unigram_entropy(shared_data):
    """The tiny spec's model and optimizer on tinyshakespeare (bytes as tokens)."""
    # Cost: 100 steps of the tiny spec's model at its first batch size (8); the point is learning real text
    # (2.37 nats per byte against the bound's 2.48), and the learning-rate assertion needs the 1/sqrt(k)
    # phase, which begins after 50 constant steps here (100 in the spec, whose 150 steps cost twice this).
    text = (shared_data / "tinyshakespeare" / "input.txt").read_bytes()
    ids = np.frombuffer(text, np.uint8).astype(np.int32)
    counts = np.bincount(ids, minlength=256)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())  # nats per byte, about 3.3

    spec = load_spec(SPECS / "tiny.yaml", ["train.steps=100", "train.schedule.constant_steps=50"])
    seq_len = spec.model.seq_len
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(ids) - seq_len, 10**5)
    trainer = Trainer(spec.model, spec.train, spec.resolved_mesh())
    _, logs = train(trainer, (ids[s:s + seq_len] for s in starts))
    final = float(np.mean([log.loss for log in logs[-10:]]))
    assert all(math.isfinite(log.loss) for log in logs)
    assert final < 0.75 * unigram_entropy, (final, unigram_entropy)
    assert logs[-1].learning_rate < logs[40].learning_rate  # the 1/sqrt(k) phase began at step 50


MESHES = [
    {"data": 1, "fsdp": 8, "model": 1},
    {"data": 2, "fsdp": 2, "model": 2},
    {"data": 1, "fsdp": 2, "model": 4},
    {"data": 8, "fsdp": 1, "model": 1},
]


@pytest.mark.slow
def test_sharded_training_matches_one_device():
    # Cost: one subprocess with 8 host devices training 20 tiny steps on one device and on each mesh; enough steps
    # for the loss to fall, so that a layout bug would show.
    env = dict(os.environ, XLA_FLAGS=cpu_devices(8), JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    meshes = [{"data": 1, "fsdp": 1, "model": 1}, *MESHES]
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_losses.py"), json.dumps(meshes), "20"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    single, *sharded = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert single["devices"] == 1 and len(sharded) == len(MESHES)
    assert single["losses"][-1] < single["losses"][0] - 0.5  # it learns, so a layout bug would show
    for got in sharded:
        mesh = got["mesh"]
        assert got["devices"] == 8
        np.testing.assert_allclose(got["losses"], single["losses"], rtol=2e-4, atol=2e-4, err_msg=str(mesh))
        if mesh["model"] > 1:
            assert "model" in got["layout"]["layers/query"], got["layout"]
        if mesh["fsdp"] > 1:
            assert "fsdp" in got["layout"]["layers/mlp_out"], got["layout"]


def test_the_vocabulary_projection_differentiates_in_the_compute_dtype():
    """palm.core.model.project_to_vocab's hand-written gradient: the float32 cotangent is cast to bf16 before both
    matmuls (no float32 GEMMs), the table's gradient summed in float32; against autodiff of the same
    mixed-precision computation written out by hand."""
    import jax

    from palm.core.model import project_to_vocab

    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (2, 8, 64)).astype(jnp.bfloat16)
    table = jax.random.normal(k[1], (500, 64))
    g = jax.random.normal(k[2], (2, 8, 500))

    def by_hand(x, table):  # what the custom rule computes, for autodiff to differentiate
        logits = jnp.einsum("btd,vd->btv", x, table.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return logits

    got = jax.vjp(project_to_vocab, x, table)
    want = jax.vjp(by_hand, x, table)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))  # forward: the same product
    dx, dtable = got[1](g)
    assert dx.dtype == jnp.bfloat16 and dtable.dtype == jnp.float32
    g16 = g.astype(jnp.bfloat16).astype(jnp.float32)  # the cotangent as the rule rounds it
    want_dx = np.einsum("btv,vd->btd", np.asarray(g16), np.asarray(table.astype(jnp.bfloat16).astype(jnp.float32)))
    want_dtable = np.einsum("btv,btd->vd", np.asarray(g16), np.asarray(x.astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(dx.astype(jnp.float32)), want_dx, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dtable), want_dtable, rtol=1e-4, atol=1e-4)
    # and it is close to the float32 gradient autodiff would give, within bf16 rounding of the cotangent
    auto_dx, auto_dtable = want[1](g)
    np.testing.assert_allclose(np.asarray(dtable), np.asarray(auto_dtable), rtol=0.02, atol=0.05)
    # In float32 (the CPU specs) the rule is exactly autodiff's.
    x32 = x.astype(jnp.float32)
    a = jax.vjp(project_to_vocab, x32, table)[1](g)
    b = jax.vjp(lambda x, t: jnp.einsum("btd,vd->btv", x, t), x32, table)[1](g)
    for u, v in zip(a, b):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-5)


def test_loss_chunk_budget_is_a_spec_setting_outside_the_train_stage_key():
    from palm.base.errors import SpecError
    from palm.dag.table import STAGES

    spec = load_spec(SPECS / "tiny.yaml")
    wide = load_spec(SPECS / "tiny.yaml", ["train.loss_chunk_mib=4096"])
    assert wide.train.loss_chunk_mib == 4096
    assert STAGES["train"].config(spec) == STAGES["train"].config(wide)  # tuning reuses trained outputs
    assert STAGES["compile"].config(spec) != STAGES["compile"].config(wide)  # but the memory check reruns
    trainer = Trainer(wide.model, wide.train, wide.resolved_mesh())
    assert trainer.loss_chunks(8) == 1
    with pytest.raises(SpecError, match="train.loss_chunk_mib"):
        load_spec(SPECS / "tiny.yaml", ["train.loss_chunk_mib=0"])


def _eight_devices() -> dict:
    return dict(os.environ, XLA_FLAGS=cpu_devices(8), JAX_PLATFORMS="cpu",
                PYTHONPATH=str(ROOT))


@pytest.mark.slow
def test_microbatches_give_the_same_losses_and_gradients():
    """train.microbatches: 1, 2 and 4 microbatches of specs/tiny.yaml on data 2 x fsdp 2 x model 2 give the
    same losses over 6 steps and the same gradient (float32: the order of sums only)."""
    # Cost: one subprocess with 8 host devices, compiling the tiny spec's step for 1, 2 and 4 microbatches, 6 steps
    # each.
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "microbatch_losses.py"),
                          json.dumps({"data": 2, "fsdp": 2, "model": 2}), "[1, 2, 4]", "6"],
                         capture_output=True, text=True, env=_eight_devices(), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    one, *more = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["microbatches"] for r in more] == [2, 4] and len(one["losses"]) == 6
    assert one["losses"][-1] < one["losses"][0]  # it moves, so a wrong normalization would show
    for got in more:
        assert got["logged"] == [got["microbatches"]] * 6
        np.testing.assert_allclose(got["losses"], one["losses"], rtol=1e-4, atol=0, err_msg=str(got["microbatches"]))
        assert got["grad_max_rel_diff"] <= 1e-4, got
        assert got["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)


def test_microbatches_are_a_spec_setting_outside_the_train_stage_key():
    from palm.base.errors import SpecError
    from palm.dag.table import STAGES

    spec = load_spec(SPECS / "tiny.yaml")
    split = load_spec(SPECS / "tiny.yaml", ["train.microbatches=[2, 4]"])
    auto = load_spec(SPECS / "tiny.yaml", ["train.microbatches=auto"])
    assert split.train.microbatch_counts() == (2, 4) and auto.train.microbatch_counts() is None
    assert spec.train.microbatch_counts() == (1, 1)
    assert STAGES["train"].config(spec) == STAGES["train"].config(split) == STAGES["train"].config(auto)
    assert STAGES["compile"].config(spec) != STAGES["compile"].config(split)
    for bad in ("3", "0", "[2]"):
        with pytest.raises(SpecError, match="train.microbatches"):
            load_spec(SPECS / "tiny.yaml", [f"train.microbatches={bad}"])


@pytest.mark.slow
def test_a_run_resumes_on_fewer_devices_with_microbatches(tmp_path):
    """10 steps on 8 devices (data 2 x fsdp 2 x model 2), resumed to step 20 on 4 devices (fsdp 2 x model 2,
    2 microbatches: the same global batch): the checkpoint is resharded onto the smaller mesh, the data
    continues at the same sequence, and steps 11-20 match the uninterrupted 8-device run."""
    # Cost: three subprocesses (device counts are fixed when JAX starts: 8, 8, then 4 devices) of 20, 10 and 10
    # tiny steps; moving a checkpoint to a smaller mesh is the point.
    def run(directory, mesh, steps, microbatches, devices):
        env = dict(os.environ, XLA_FLAGS=cpu_devices(devices), JAX_PLATFORMS="cpu",
                   PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, str(ROOT / "tests" / "resume_other_mesh.py"), str(directory),
                              json.dumps(mesh), str(steps), str(microbatches)],
                             capture_output=True, text=True, env=env, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])

    eight, four = {"data": 2, "fsdp": 2, "model": 2}, {"data": 1, "fsdp": 2, "model": 2}
    straight = run(tmp_path / "straight", eight, 20, 1, 8)
    first = run(tmp_path / "moved", eight, 10, 1, 8)
    resumed = run(tmp_path / "moved", four, 20, 2, 4)
    assert first["losses"] == {k: v for k, v in straight["losses"].items() if int(k) < 10}  # same mesh: bitwise
    assert resumed["resumed_from"] == 10 and sorted(map(int, resumed["losses"])) == list(range(10, 20))
    assert resumed["microbatches"] == [2] * 10
    for step in range(10, 20):
        assert resumed["read"][str(step)] == straight["read"][str(step)], step  # the same sequences
        assert resumed["losses"][str(step)] == pytest.approx(straight["losses"][str(step)], rel=1e-4), step
    assert straight["losses"]["19"] < straight["losses"]["0"]
