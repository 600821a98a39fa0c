"""KV-cache decoding (palm.core.model) and the evaluation harness (palm.core.lm) on a small random model.

Every check compares against an independent computation: the model's plain training forward pass
(`PaLM.__call__` on whole sequences, no cache) and log-softmax read off at the positions worked out here,
so a cache written at the wrong slot, a padding slot left visible, an off-by-one in the START-token
convention or a mis-cut rolling window all show up as mismatches.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM

from palm.spec.config import ModelConfig
from palm.base.errors import PalmError
from palm.core.lm import LanguageModel, load_language_model, rolling_windows, sample_tokens
from palm.core.model import KVCache, PaLM, init_cache
from palm.tokenizer import Tokenizer, train_tokenizer
from palm.core.model import START_TOKEN

SMALL = ModelConfig(num_layers=2, d_model=64, num_heads=4, head_dim=16, vocab_size=512, seq_len=64,
                    dtype="float32", remat="none")
ATOL = 1e-4


def init_params(config: ModelConfig, seed: int = 0):
    return nn.unbox(jax.jit(PaLM(config).init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def corpus(lines: int = 3000) -> list[str]:
    """Sentences of made-up words, enough for a 512-piece SentencePiece vocabulary."""
    rng = np.random.default_rng(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "gu", "fi", "ho", "ze", "by", "wa"]
    words = sorted({"".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(400)})
    return [" ".join(rng.choice(words, rng.integers(4, 12))) + str(rng.choice([".", ",", "!", "?", ""]))
            for _ in range(lines)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    lines = corpus()
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    return train_tokenizer(["\n".join(lines[i:i + 20]) for i in range(0, len(lines), 20)], path,
                           vocab_size=SMALL.vocab_size)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def params():
    """A random model whose predictions depend on the context, not just on the last token.

    At initialisation the residual stream is dominated by the input token's embedding, which the tied
    output layer maps back to that token: greedy decoding repeats the last token, so generation tests
    could not tell a wrong position or a stale cache slot from a right one. Shrinking the embedding 20x
    lets the attention and MLP outputs dominate; the final LayerNorm's scale grows 20x so the logits
    keep their spread (the top two logits differ by far more than float32 noise)."""
    params = init_params(SMALL)
    return dict(params, embedding=params["embedding"] * 0.05,
                final_norm={"scale": params["final_norm"]["scale"] * 20.0})


@pytest.fixture(scope="module")
def lm(params, tokenizer):
    return LanguageModel(params, SMALL, tokenizer, batch_size=4)


@pytest.fixture(scope="module")
def full_logits(params):
    """Reference: the training forward pass on one whole sequence (no cache) -> logits [length, vocab].

    The sequence is right-padded to seq_len so that one compile serves every length (causal attention:
    the padding cannot change the logits of the real positions)."""
    model = PaLM(SMALL)
    apply = jax.jit(lambda p, tokens: model.apply({"params": p}, tokens))

    def run(tokens):
        tokens = list(tokens)
        padded = np.zeros((1, SMALL.seq_len), np.int32)
        padded[0, :len(tokens)] = tokens
        return np.asarray(apply(params, padded))[0, :len(tokens)]

    return run


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


TEXT = " ".join(corpus(60))


# 1. The KV cache ---------------------------------------------------------------------------------

def variant_params(variant: str, params):
    """(config, params) of SMALL (scanned, multi-query), unrolled, or with two kv heads (grouped-query).

    Derived from one initialisation (initialising a scanned model is the slow part on CPU)."""
    if variant == "scanned":
        return SMALL, params
    if variant == "unrolled":
        unrolled = {k: v for k, v in params.items() if k != "layers"}
        for i in range(SMALL.num_layers):
            unrolled[f"layer_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
        return dataclasses.replace(SMALL, scan_layers=False), unrolled
    layers = dict(params["layers"])
    kv = layers["key_value"]  # [layers, d_model, 2, kv_heads, head_dim]: add a second, different kv head
    layers["key_value"] = jnp.concatenate([kv, jax.random.normal(jax.random.key(5), kv.shape) * kv.std()], axis=3)
    return dataclasses.replace(SMALL, num_kv_heads=2), dict(params, layers=layers)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["scanned", "unrolled", "grouped_kv"])
def test_cached_decode_matches_full_recompute(variant, params):
    # Cost: three compiles per variant (prefill, decode step, full forward) of a 2-layer model; each variant is
    # another code path (scanned, unrolled, grouped-query).
    config, params = variant_params(variant, params)
    model = PaLM(config)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]))
    lengths = np.array([3, 12, 7])  # prompts of different lengths, right-padded to 16
    batch, padded, steps, max_len = len(lengths), 16, 10, 32
    sequences = np.asarray(jax.random.randint(jax.random.key(2), (batch, 12 + steps), 0, config.vocab_size))
    prompt = np.full((batch, padded), 7, np.int32)  # padding ids: whatever, they must never be seen
    for row, n in enumerate(lengths):
        prompt[row, :n] = sequences[row, :n]

    cached = jax.jit(lambda p, tokens, positions, cache: model.apply({"params": p}, tokens, positions,
                                                                      cache=cache))
    cache = init_cache(config, batch, max_len)
    assert isinstance(cache, KVCache)
    # Multi-query: one key and one value head per layer, however many query heads.
    assert cache.key.shape == (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    logits, cache = cached(params, prompt, np.broadcast_to(np.arange(padded), prompt.shape), cache)
    assert cache.key.shape == (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)

    full = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, sequences))
    for row, n in enumerate(lengths):  # prefill: every real prompt position
        np.testing.assert_allclose(np.asarray(logits)[row, :n], full[row, :n], atol=ATOL, rtol=0)

    positions = lengths.copy()
    for _ in range(steps):  # decode: one token per row at the row's own next position
        tokens = sequences[np.arange(batch), positions][:, None]
        logits, cache = cached(params, tokens, positions[:, None], cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[np.arange(batch), positions], atol=ATOL, rtol=0)
        positions = positions + 1


def test_training_call_is_unchanged(params):
    """Without a cache the call returns logits only, from the same parameter tree."""
    model = PaLM(SMALL)
    fresh = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, params)
    tokens = jnp.zeros((2, 8), jnp.int32)
    out = jax.eval_shape(lambda p: model.apply({"params": p}, tokens), params)
    assert isinstance(out, jax.ShapeDtypeStruct) and out.shape == (2, 8, SMALL.vocab_size)
    assert out.dtype == jnp.float32
    with pytest.raises(PalmError, match="KV cache"):
        jax.eval_shape(lambda p: model.apply({"params": p}, tokens, cache=init_cache(SMALL, 3, 16)), params)


# 2. Generation -----------------------------------------------------------------------------------

PROMPTS = ["kalo mine rusa", "ti", "", "vo pe da gu fi ho ze by wa ka lo mi ne ru sa ti vo", "sa"]


def greedy_by_recompute(full_logits, tokenizer, prompt: str, n: int) -> list[int]:
    ids = [START_TOKEN, *tokenizer.encode(prompt)]
    out = []
    for _ in range(n):
        token = int(np.argmax(full_logits(ids)[-1]))
        if token == tokenizer.eos_id:
            break
        out.append(token)
        ids.append(token)
    return out


@pytest.mark.slow
def test_greedy_generate_matches_argmax_by_recompute(lm, full_logits, tokenizer):
    # Five prompts with batch_size 4: two batches, the second padded with three dummy rows.
    texts = lm.generate(PROMPTS, max_new_tokens=12)
    for prompt, text in zip(PROMPTS, texts):
        assert text == tokenizer.decode(greedy_by_recompute(full_logits, tokenizer, prompt, 12)), prompt
    # max_new_tokens honoured: a shorter run is the same continuation cut at 3 tokens.
    short = lm.generate(PROMPTS[:2], max_new_tokens=3)
    for prompt, text in zip(PROMPTS[:2], short):
        assert text == tokenizer.decode(greedy_by_recompute(full_logits, tokenizer, prompt, 3))
    assert lm._decode._cache_size() == 1  # one decode step for every prompt length and batch


def test_greedy_ids_match_argmax_by_recompute(lm, full_logits):
    """Memorization's greedy continuation of token ids (prefill + cached decode, eos not special) is the
    argmax of a full forward pass over each longer buffer; five rows with batch_size 4: one padded batch."""
    rng = np.random.default_rng(3)
    rows = np.concatenate([np.full((5, 1), START_TOKEN), rng.integers(3, SMALL.vocab_size, (5, 9))], axis=1)
    got = lm.greedy_ids(rows, 6)
    for row, ids in zip(rows, got):
        buffer = list(row)
        for _ in range(6):
            buffer.append(int(np.argmax(full_logits(buffer)[-1])))
        assert list(ids) == buffer[len(row):]
    with pytest.raises(PalmError, match="length \\+ steps"):
        lm.greedy_ids(rows, SMALL.seq_len)


def cut_at_stop(tokenizer, ids: list[int], stops: list[str]) -> str:
    """The rule, independently: the first prefix whose text holds a stop ends generation, cut before it."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        found = [text.find(s) for s in stops if s in text]
        if found:
            return text[:min(found)]
    return tokenizer.decode(ids)


def test_generate_stops_at_stop_sequences(lm, full_logits, tokenizer):
    ids = [greedy_by_recompute(full_logits, tokenizer, prompt, 12) for prompt in PROMPTS[:2]]
    whole = tokenizer.decode(ids[0])
    assert len(whole) >= 4, whole
    stops = ["\x00never", whole[2:4]]
    out = lm.generate(PROMPTS[:2], max_new_tokens=12, stop=stops)
    assert out[0] == cut_at_stop(tokenizer, ids[0], stops) and stops[1] not in out[0]
    assert len(out[0]) < len(whole)
    assert out[1] == cut_at_stop(tokenizer, ids[1], stops)


def test_generate_truncates_long_prompts_from_the_left(lm, full_logits, tokenizer):
    ids = tokenizer.encode(TEXT)
    assert len(ids) > SMALL.seq_len
    out = lm.generate([TEXT], max_new_tokens=5)[0]
    context = [START_TOKEN, *ids][-(SMALL.seq_len - 5):]
    expected = []
    for _ in range(5):
        token = int(np.argmax(full_logits(context)[-1]))
        if token == tokenizer.eos_id:
            break
        expected.append(token)
        context.append(token)
    assert out == tokenizer.decode(expected)
    with pytest.raises(PalmError, match="max_new_tokens"):
        lm.generate(["x"], max_new_tokens=SMALL.seq_len)


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(lm):
    prompts = PROMPTS[:3]
    first = lm.generate(prompts, max_new_tokens=10, temperature=1.0, seed=3)
    assert lm.generate(prompts, max_new_tokens=10, temperature=1.0, seed=3) == first
    assert lm.generate(prompts, max_new_tokens=10, temperature=1.0, seed=4) != first
    greedy = lm.generate(prompts, max_new_tokens=10)
    assert first != greedy  # a random model's distributions are broad: sampling must not be argmax
    assert lm.generate(prompts, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=3) == greedy
    # Per-prompt keys: the same prompt at the same index samples the same text in a smaller batch list.
    assert lm.generate(prompts[:2], max_new_tokens=10, temperature=1.0, seed=3) == first[:2]


def test_nucleus_sampling_keeps_only_the_nucleus():
    probs = np.array([0.15, 0.5, 0.05, 0.3], np.float32)  # sorted: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (4000, 4))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.jit(sample_tokens)(logits, keys, 1.0, 0.7))
    counts = np.bincount(draws, minlength=4) / len(draws)
    # 0.5 < 0.7, so token 3 is in; 0.5 + 0.3 >= 0.7, so 0 and 2 are out; renormalised 0.625 / 0.375.
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 0.625) < 0.03
    all_tokens = np.bincount(np.asarray(jax.jit(sample_tokens)(logits, keys, 1.0, 1.0)), minlength=4) / 4000
    np.testing.assert_allclose(all_tokens, probs, atol=0.03)
    assert (np.asarray(sample_tokens(logits[:3], keys[:3], 0.0, 1.0)) == 1).all()  # temperature 0: argmax


# 3. Log-likelihoods ------------------------------------------------------------------------------

def reference_loglikelihood(full_logits, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    sequence = [START_TOKEN, *context, *continuation]
    inputs = sequence[:-1][-SMALL.seq_len:]
    targets = sequence[1:][-SMALL.seq_len:]
    logits = full_logits(inputs)
    logp = log_softmax(logits)
    span = range(len(targets) - len(continuation), len(targets))
    total = sum(logp[i, targets[i]] for i in span)
    return float(total), all(int(np.argmax(logits[i])) == targets[i] for i in span)


class HarnessTokens(TemplateLM):
    """lm-eval's own tokenization of loglikelihood requests (TemplateLM.loglikelihood and _encode_pair, as
    its HF backend uses them), over palm's tokenizer with START as the prefix token: what palm must match."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tok = tokenizer

    @property
    def eot_token_id(self):
        return START_TOKEN

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tok.encode(string)

    def _loglikelihood_tokens(self, requests, **kwargs):
        return [(context_enc, continuation_enc) for _, context_enc, continuation_enc in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def encode(self, pairs):
        """[(context, continuation)] -> [(model input before the continuation, continuation ids)]."""
        requests = [Instance("loglikelihood", {}, pair, 0) for pair in pairs]
        return self.loglikelihood(requests, disable_tqdm=True)


def palm_tokens(lm, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """palm's model input before the continuation ([START] + context ids) and the continuation ids."""
    ctx, cont = lm.encode_pair(context, continuation)
    return [START_TOKEN, *ctx], cont


def test_encode_pair_is_the_harness_tokenization(lm, tokenizer):
    """Words split across the context/continuation boundary tokenize as in running text (lm-eval encodes
    context + continuation whole), unlike encoding the two separately."""
    harness = HarnessTokens(tokenizer)
    words = sorted({w for line in corpus(200) for w in line.rstrip(".,!?").split() if len(w) >= 5})
    planted = []
    for word in words:
        for k in range(2, len(word) - 1):
            context, continuation = f"ti {word[:k]}", f"{word[k:]} sa"
            if tokenizer.encode(context) + tokenizer.encode(continuation) != tokenizer.encode(context + continuation):
                planted.append((context, continuation))
    assert len(planted) >= 5, "no word whose split tokenizes differently: the test would prove nothing"
    planted = planted[:20]
    # The HF backend's other cases: trailing whitespace moved to the continuation (several kinds of it), an
    # empty context, a whitespace-only context, an empty continuation.
    cases = planted + [("kalo mine ", "rusa"), ("kalo mine \n\t", "rusa ti"), ("", "kalo mine"), ("  ", "kalo"),
                       ("kalo", ""), (TEXT[:300], TEXT[300:400])]
    want = harness.encode(cases)
    got = [palm_tokens(lm, context, continuation) for context, continuation in cases]
    for case, (ctx, cont), (want_ctx, want_cont) in zip(cases, got, want):
        assert cont == want_cont, case
        # The harness feeds its prefix token only when the context is empty; palm always starts from START
        # (training's document start), as a tokenizer that adds a BOS token does.
        assert ctx == (want_ctx if want_ctx[:1] == [START_TOKEN] else [START_TOKEN, *want_ctx]), case
    # Separate encoding would have given other continuation tokens for every planted case.
    for (context, continuation), (_, cont) in zip(planted, got):
        assert cont != tokenizer.encode(continuation)


def test_loglikelihood_matches_log_softmax_of_recomputed_logits(lm, full_logits, tokenizer):
    requests = [("kalo mine", " rusa ti"), ("", "kalo mine"), ("vo pe da gu", " fi"),
                ("sa ti vo pe da gu fi ho ze by", " wa ka lo"), (TEXT, " mine rusa"), ("a", "b c d e f g"),
                ("kalo mi", "ne rusa")]
    results = lm.loglikelihood_batch(requests)  # seven requests, batch_size 4, lengths up to seq_len
    encoded = HarnessTokens(tokenizer).encode(requests)
    for (context, continuation), (ctx_ids, cont_ids), (total, greedy) in zip(requests, encoded, results):
        ctx_ids = ctx_ids[1:] if ctx_ids[:1] == [START_TOKEN] else ctx_ids  # the reference adds START itself
        want, want_greedy = reference_loglikelihood(full_logits, ctx_ids, cont_ids)
        assert total == pytest.approx(want, abs=1e-3, rel=1e-5), (context[:20], continuation)
        assert greedy == want_greedy
        assert lm.loglikelihood(context, continuation)[0] == pytest.approx(total, abs=1e-4)
    # The context's trailing whitespace belongs to the continuation (as lm-evaluation-harness does).
    assert lm.loglikelihood("kalo mine ", "rusa")[0] == pytest.approx(lm.loglikelihood("kalo mine", " rusa")[0],
                                                                      abs=1e-5)
    assert lm.loglikelihood("kalo", "") == (0.0, True)


def test_is_greedy_on_a_constructed_case(lm, full_logits, tokenizer):
    context = tokenizer.encode("kalo mine rusa")
    greedy, ids = [], [START_TOKEN, *context]
    for _ in range(3):
        greedy.append(int(np.argmax(full_logits(ids)[-1])))
        ids.append(greedy[-1])
    other = greedy[:2] + [(greedy[2] + 1) % SMALL.vocab_size]
    (lp_greedy, is_greedy), (lp_other, is_other) = lm.loglikelihood_tokens([(context, greedy), (context, other)])
    assert is_greedy and not is_other
    assert lp_greedy > lp_other


def test_rank_choices_picks_the_maximum(lm):
    context, choices = "kalo mine", [" rusa", " ti vo pe da gu fi ho", " sa", " zebywa"]
    out = lm.rank_choices(context, choices, gold=2)
    lls = [lm.loglikelihood(context, choice)[0] for choice in choices]
    np.testing.assert_allclose(out["loglikelihoods"], lls, atol=1e-4)
    assert out["pred"] == int(np.argmax(lls))
    assert out["pred_norm"] == int(np.argmax([ll / len(c) for ll, c in zip(lls, choices)]))
    assert out["acc"] == float(out["pred"] == 2) and out["acc_norm"] == float(out["pred_norm"] == 2)


def test_rolling_loglikelihood_sums_disjoint_windows(lm, full_logits, tokenizer):
    ids = tokenizer.encode(TEXT)
    L = SMALL.seq_len
    n = len(ids)
    assert n > 2 * L + 5  # at least three windows, the last one partial
    sequence = [START_TOKEN, *ids]
    # Independently: tokens [start, start + L) are scored in one window ending at their end, which feeds
    # the L inputs before it (fewer in the first window, which starts at START).
    want = 0.0
    for start in range(0, n, L):
        end = min(n, start + L)
        lo = max(0, end - L)
        logp = log_softmax(full_logits(sequence[lo:end]))  # input j - lo predicts sequence[j + 1] = ids[j]
        want += sum(logp[j - lo, ids[j]] for j in range(start, end))
    assert lm.loglikelihood_rolling(TEXT) == pytest.approx(want, rel=1e-5)

    # Overlapping windows (stride 16): after the first window, each token has at least L - 16 of context.
    got = lm.loglikelihood_rolling(TEXT, stride=16)
    want = sum(log_softmax(full_logits(sequence[:L]))[j, ids[j]] for j in range(L))
    for a in range(L, n, 16):
        b = min(n, a + 16)
        logp = log_softmax(full_logits(sequence[b - L:b]))
        want += sum(logp[j - (b - L), ids[j]] for j in range(a, b))
    assert got == pytest.approx(want, rel=1e-5)

    # A text within one window: the rolling log-likelihood is the continuation's after an empty context.
    short = "kalo mine rusa ti"
    assert lm.loglikelihood_rolling(short) == pytest.approx(lm.loglikelihood("", short)[0], abs=1e-4)


def test_rolling_windows_cover_every_token_once():
    for n, stride in [(1, None), (64, None), (65, None), (200, None), (200, 16), (200, 1)]:
        windows = rolling_windows(n, 64, stride)
        scored = [j for _, a, b in windows for j in range(a, b)]
        assert scored == list(range(n))
        assert all(b - lo <= 64 and lo <= a for lo, a, b in windows)
    assert rolling_windows(0, 64) == []


def test_perplexity_and_bits_per_byte_on_a_uniform_model(params, tokenizer):
    # All-zero parameters give all-zero logits: every token has probability exactly 1/512.
    zero = LanguageModel(jax.tree.map(jnp.zeros_like, params), SMALL, tokenizer, batch_size=4)
    texts = [TEXT, "kalo mine", "héllo wörld"]  # more than a window, short, non-ASCII bytes
    tokens = sum(len(tokenizer.encode(t)) for t in texts)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    out = zero.perplexity_and_bits_per_byte(texts)
    assert out["tokens"] == tokens and out["bytes"] == num_bytes
    assert out["loglikelihood"] == pytest.approx(-tokens * math.log(512), rel=1e-5)
    assert out["perplexity"] == pytest.approx(512, rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(tokens * 9 / num_bytes, rel=1e-5)  # log2(512) = 9


# 4. Loading a checkpoint -------------------------------------------------------------------------

def test_load_language_model_from_a_checkpoint(tmp_path, params, lm, tokenizer_path):
    from palm.core.checkpoint import Checkpoints, params_digest
    from palm.spec.config import CheckpointConfig
    from palm.core.train import TrainState

    ckpts = Checkpoints(tmp_path / "train" / "checkpoints", CheckpointConfig(async_save=False))
    state = TrainState(step=jnp.array(7, jnp.int32), params=params, opt_state={"m": jnp.ones(3)})
    ckpts.save(7, state, {"position": 0}, {"digest": params_digest(params)})
    ckpts.close()

    loaded = load_language_model(tmp_path / "train", SMALL, tokenizer_path.parent, batch_size=4)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params), jax.device_get(params))
    assert loaded.loglikelihood("kalo", " mine") == pytest.approx(lm.loglikelihood("kalo", " mine"), abs=1e-6)
    with pytest.raises(PalmError, match="do not fit"):
        load_language_model(tmp_path / "train", dataclasses.replace(SMALL, d_model=32), tokenizer_path)


@pytest.mark.slow
def test_matrices_are_cast_to_the_compute_dtype_once_with_the_same_logits(params, tokenizer):
    """LanguageModel keeps the kernels and the table in the compute dtype (a decode step reads half the
    bytes); the model casts them there anyway, so the logits are the same bit for bit, as they are with the
    layers unrolled (what decoding does on a GPU) up to the compiler's rounding."""
    config = dataclasses.replace(SMALL, dtype="bfloat16")
    lm16 = LanguageModel(params, config, tokenizer, batch_size=2)
    dtypes = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.dtype
              for path, leaf in jax.tree_util.tree_flatten_with_path(lm16.params)[0]}
    matrices = {name for name, d in dtypes.items() if d == jnp.bfloat16}
    vectors = {name for name, d in dtypes.items() if d == jnp.float32}
    assert matrices == {"embedding", "layers/query", "layers/key_value", "layers/out", "layers/mlp_in",
                        "layers/mlp_out"}
    assert vectors == {"layers/layer_norm/scale", "final_norm/scale"}  # applied in float32, kept so
    tokens = np.random.default_rng(0).integers(0, SMALL.vocab_size, (2, 24)).astype(np.int32)
    want = np.asarray(jax.jit(lambda p, t: PaLM(config).apply({"params": p}, t))(params, tokens))
    np.testing.assert_array_equal(lm16.logits(tokens), want)
    # Unrolled, the compiler fuses the bf16 arithmetic differently: equal within bf16 rounding (and in float32
    # within float32 rounding).
    for cfg, tol in ((config, 0.05), (SMALL, 1e-5)):
        base = jax.jit(lambda p, t: PaLM(cfg).apply({"params": p}, t))(params, tokens)
        unrolled = jax.jit(lambda p, t: PaLM(cfg, unroll_layers=True).apply({"params": p}, t))(params, tokens)
        np.testing.assert_allclose(np.asarray(unrolled), np.asarray(base), atol=tol, rtol=tol)


# 5. max_length and the lm-eval backend -----------------------------------------------------------

@pytest.mark.slow
def test_max_length_caps_every_input(params, lm, full_logits, tokenizer):
    short = LanguageModel(params, SMALL, tokenizer, batch_size=4, max_length=24)
    ids = tokenizer.encode(TEXT)
    # Scoring: [START] + context + continuation cut from the left to 24 inputs.
    continuation = tokenizer.encode(" mine rusa")
    sequence = [START_TOKEN, *ids, *continuation]
    inputs, targets = sequence[:-1][-24:], sequence[1:][-24:]
    logp = log_softmax(full_logits(inputs))
    want = sum(logp[i, targets[i]] for i in range(24 - len(continuation), 24))
    assert short.loglikelihood_tokens([(ids, continuation)])[0][0] == pytest.approx(want, rel=1e-5)
    assert short.loglikelihood_tokens([(ids, continuation)])[0][0] != pytest.approx(
        lm.loglikelihood_tokens([(ids, continuation)])[0][0], rel=1e-3)
    # Rolling: disjoint windows of 24.
    seq = [START_TOKEN, *ids]
    want = 0.0
    for start in range(0, len(ids), 24):
        end = min(len(ids), start + 24)
        lo = max(0, end - 24)
        logp = log_softmax(full_logits(seq[lo:end]))
        want += sum(logp[j - lo, ids[j]] for j in range(start, end))
    assert short.loglikelihood_rolling(TEXT) == pytest.approx(want, rel=1e-5)
    # Generation: the prompt keeps max_length - max_new_tokens tokens.
    context = [START_TOKEN, *ids][-(24 - 4):]
    expected = []
    for _ in range(4):
        token = int(np.argmax(full_logits(context)[-1]))
        if token == tokenizer.eos_id:
            break
        expected.append(token)
        context.append(token)
    assert short.generate([TEXT], max_new_tokens=4) == [tokenizer.decode(expected)]
    with pytest.raises(PalmError, match="max_new_tokens 24 leaves no room"):
        short.generate(["x"], max_new_tokens=24)
    for bad in (1, SMALL.seq_len + 1):
        with pytest.raises(PalmError, match="max_length must be between 2 and the model's seq_len 64"):
            LanguageModel(params, SMALL, tokenizer, max_length=bad)


def generate_request(context: str, gen_kwargs: dict):
    return Instance("generate_until", {}, (context, gen_kwargs), 0)


@pytest.mark.slow
def test_palm_lm_generate_until_batches_by_kwargs_like_one_at_a_time(params, lm, full_logits, tokenizer):
    from palm.evaluation.lmeval import PalmLM

    stop_a = tokenizer.decode(greedy_by_recompute(full_logits, tokenizer, PROMPTS[0], 12))[2:4]
    kwargs_a = {"until": ["\x00never", stop_a], "max_gen_toks": 12, "do_sample": False}
    kwargs_b = {"until": "\n", "max_gen_toks": 5}
    kwargs_c = {"until": [], "max_gen_toks": 7, "do_sample": False, "temperature": 0.7}  # greedy, as in lm-eval
    prompts = PROMPTS + ["kalo mine rusa ti vo", "ze by wa"]
    requests = [generate_request(p, kwargs_a) for p in prompts] + \
        [generate_request(p, kwargs_b if i % 2 else kwargs_c) for i, p in enumerate(prompts)]
    rng = np.random.default_rng(0)
    requests = [requests[i] for i in rng.permutation(len(requests))]

    # Independently: greedy argmax by recomputation, cut at the first stop sequence.
    def expected(request):
        context, kw = request.args
        until = [kw["until"]] if isinstance(kw["until"], str) else kw["until"]
        ids = greedy_by_recompute(full_logits, tokenizer, context, kw["max_gen_toks"])
        return cut_at_stop(tokenizer, ids, until) if until else tokenizer.decode(ids)

    calls = []
    batched_lm = LanguageModel(params, SMALL, tokenizer, batch_size=4)
    original = batched_lm._generate_batch
    batched_lm._generate_batch = lambda prompts, *a: calls.append(len(prompts)) or original(prompts, *a)
    batched = PalmLM(batched_lm).generate_until(requests)
    single = PalmLM(LanguageModel(params, SMALL, tokenizer, batch_size=1))
    one_by_one = [single.generate_until([r])[0] for r in requests]
    assert batched == one_by_one == [expected(r) for r in requests]
    assert any(stop_a in tokenizer.decode(greedy_by_recompute(full_logits, tokenizer, r.args[0], 12))
               for r in requests if r.args[1] is kwargs_a)  # the stop sequence does cut something
    # Three groups of kwargs, each decoded in batches of up to 4 prompts: far fewer batches than requests.
    groups = {str(r.args[1]) for r in requests}
    sizes = [sum(str(r.args[1]) == g for r in requests) for g in groups]
    assert len(groups) == 3 and sorted(calls) == sorted(
        [min(4, n - k) for n in sizes for k in range(0, n, 4)])
    assert len(calls) < len(requests)


def test_palm_lm_refuses_what_it_cannot_do(lm):
    from palm.evaluation.lmeval import PalmLM

    palm_lm = PalmLM(lm)
    with pytest.raises(PalmError, match="does not implement generation kwarg.*top_k"):
        palm_lm.generate_until([generate_request("kalo", {"do_sample": True, "temperature": 1.0, "top_k": 5})])
    with pytest.raises(PalmError, match="max_gen_toks 64 leaves no room for a prompt in max_length 64"):
        palm_lm.generate_until([generate_request("kalo", {"max_gen_toks": 64})])
    assert palm_lm.max_gen_toks == SMALL.seq_len // 2  # the default 256 capped for a short model
    with pytest.raises(PalmError, match="unknown key.*bogus"):
        PalmLM.create_from_arg_string("checkpoint=/x,bogus=1")
    with pytest.raises(PalmError, match="key=value"):
        PalmLM.create_from_arg_string("/some/checkpoint")
    with pytest.raises(PalmError, match="checkpoint=PATH is required"):
        PalmLM.create_from_arg_string("batch_size=4")
    with pytest.raises(PalmError, match="batch_size must be an integer"):
        PalmLM.create_from_arg_string("checkpoint=/x,batch_size=auto")
    with pytest.raises(PalmError, match="not both"):
        PalmLM(lm, checkpoint="/x")


def test_models_of_one_configuration_share_their_programs(params, tokenizer):
    """palm.core.lm._programs: a LanguageModel loaded again (each `palm eval`, each checkpoint the evaluation
    flow scores) reuses the jitted programs of the first, with its own parameters; another configuration has
    its own programs."""
    first = LanguageModel(params, SMALL, tokenizer, batch_size=4)
    other_params = jax.tree.map(lambda x: x * 2 if x.ndim > 1 else x, params)
    again = LanguageModel(other_params, SMALL, tokenizer, batch_size=2)
    assert again._score is first._score and again._decode is first._decode and again.model is first.model
    assert first.loglikelihood_tokens([([5, 6], [7])]) != again.loglikelihood_tokens([([5, 6], [7])])
    bf16 = LanguageModel(params, dataclasses.replace(SMALL, dtype="bfloat16"), tokenizer, batch_size=4)
    assert bf16._score is not first._score
