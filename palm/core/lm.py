"""Evaluating and sampling a trained PaLM: log-likelihoods, perplexity, rank classification, generation.

`LanguageModel` wraps parameters, the `ModelConfig` and the `Tokenizer`, with the conventions of
training (`palm.core.train.loss_fn`): the model's first input is START_TOKEN (the end-of-document id), so
every scored text is conditioned on "a document just started", and logits are float32.

- `loglikelihood(context, continuation)` -> (sum of log p of the continuation's tokens, whether greedy
  decoding would have produced exactly them). Tokenized as lm-evaluation-harness' causal models do
  (`TemplateLM._encode_pair`): trailing whitespace of the context moves to the start of the
  continuation, then context + continuation is encoded whole and the continuation's tokens are the
  whole's tokens after the first len(encode(context)) (so a word that the boundary splits is tokenized
  as in running text); an empty context gives just encode(continuation). The input [START] + context +
  continuation is truncated from the left to `max_length` (START plays the harness' prefix token).
- `loglikelihood_rolling(text)` -> sum of log p over every token of a text, in windows of at most
  max_length inputs: the first window scores its first max_length tokens from START; each later window
  scores the next `stride` tokens (default max_length: disjoint windows as in lm-evaluation-harness),
  with the inputs reaching back max_length tokens, so each token has up to max_length - 1 tokens of
  context (at least max_length - stride).
- `perplexity_and_bits_per_byte(texts)`: token-level perplexity and bits per UTF-8 byte.
- `rank_choices(context, choices)`: multiple-choice rank classification, raw and per-character
  normalized log-likelihood (lm-evaluation-harness' acc and acc_norm).
- `generate(prompts, ...)`: batched prefill of the right-padded prompts into a KV cache (see palm.core.model),
  then one jitted decode step per token, greedy or temperature + nucleus sampling; each row stops at
  eos, at a stop sequence or at max_new_tokens.

`max_length` (default: the model's seq_len, never more) caps every input as lm-evaluation-harness'
max_length does: scored sequences are cut from the left to it, and a prompt to max_length -
max_new_tokens tokens.

Shapes are fixed so that jit compiles little: batches are padded to `batch_size` rows, sequence lengths
to a power of two (at most seq_len), and the decode step's cache always has seq_len slots, so the
decode step compiles once per LanguageModel.

A model too large for one device (or one host) is evaluated sharded: `load_sharded_language_model`
restores the parameters straight onto a mesh with training's layout (palm.core.sharding), and the
LanguageModel runs the same code on every host of a multi-host job (each host feeds the same token ids;
the values read back to the host are replicated, so every host sees the same numbers).

Imports only jax, flax, numpy and palm's JAX core at module level; the tokenizer (sentencepiece) and
checkpoints (orbax) are imported where used.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from palm.spec.config import ModelConfig
from palm.base.errors import PalmError
from palm.core.checkpoint import check_params_digest, open_checkpoints, restore_params_onto, usable_step
from palm.core.model import START_TOKEN, PaLM, abstract_params, init_cache
from palm.core.sharding import Sharding, make_mesh

if TYPE_CHECKING:
    from palm.tokenizer import Tokenizer  # sentencepiece: not on the accelerator images that run the core

#: Sequence lengths are padded to a power of two, at least this, so jit compiles a few shapes only.
MIN_BUCKET = 16


def bucket_length(n: int, seq_len: int) -> int:
    """The padded length for n tokens: the next power of two (at least MIN_BUCKET), at most seq_len."""
    if n > seq_len:
        raise PalmError(f"{n} tokens do not fit seq_len {seq_len}")
    return min(seq_len, max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()))


def rolling_windows(num_tokens: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows (lo, a, b) covering tokens [0, num_tokens) of a text, scored disjointly.

    With s = [START] + tokens, window (lo, a, b) feeds inputs s[lo:b] (at most seq_len of them), whose
    targets are tokens[lo:b], and scores only tokens[a:b]. The first window scores tokens [0, seq_len)
    from START; each later one the next `stride` tokens with inputs reaching back seq_len tokens.
    """
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise PalmError(f"stride {stride} must be between 1 and seq_len {seq_len}")
    windows = []
    a = 0
    while a < num_tokens:
        b = min(num_tokens, seq_len if a == 0 else a + stride)
        windows.append((max(0, b - seq_len), a, b))
        a = b
    return windows


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next tokens [batch] from logits [batch, vocab]: argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the nucleus, the most likely tokens whose probabilities
    first reach top_p (always at least the most likely one; top_p >= 1 keeps every token). keys [batch]:
    one PRNG key per row."""
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    logits = logits.astype(jnp.float32)

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        scaled = logits / temperature
        order = jnp.argsort(-scaled, axis=-1, stable=True)  # ties: the lower id first, as argmax
        ranked = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = (mass_before < top_p) | (top_p >= 1.0)
        ranked = jnp.where(keep, ranked, -jnp.inf)
        choice = jax.vmap(jax.random.categorical)(keys, ranked)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, None)


def compute_params(params: Any, config: ModelConfig) -> Any:
    """The parameters as the forward pass uses them: every matrix (kernels, the embedding table) cast to
    the compute dtype once, the LayerNorm scales (vectors, applied in float32) as they are.

    The model casts each kernel and the table to the compute dtype where it uses them, so this gives the
    same logits bit for bit; a decode step then reads 2 bytes per parameter instead of 4 (and no cast)."""
    return _cast_matrices(params, jnp.dtype(config.dtype).name)


@functools.partial(jax.jit, static_argnames="dtype")
def _cast_matrices(params: Any, dtype: str) -> Any:
    """compute_params's cast, one jitted function for the process (a model loaded again reuses its program)."""
    def cast(path, x):
        name = getattr(path[-1], "key", None) if path else None
        return x if name == "scale" or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def _move_trailing_whitespace(context: str, continuation: str) -> tuple[str, str]:
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


@dataclasses.dataclass
class _Row:
    """One scoring row: targets[i] is predicted from inputs[:i + 1]; the last `scored` targets count."""

    inputs: list[int]
    targets: list[int]
    scored: int


class _Programs:
    """A LanguageModel's model and jitted programs for one configuration, platform and mesh (`_programs`)."""

    def __init__(self, config: ModelConfig, platform: str, sharding: "Sharding | None"):
        self.config, self.seq_len, self.sharding = config, config.seq_len, sharding
        # On a GPU the layer loop is unrolled: each trip of a device loop waits on the host, which a decode
        # step of one token per row cannot hide (palm.core.model.PaLM.unroll_layers).
        unroll = platform == "gpu"
        if sharding is None:
            self.model = PaLM(config, platform=platform, unroll_layers=unroll)
        else:
            ways = sharding.axis_sizes["model"]
            self.model = PaLM(config, constrain=sharding.constrain, platform=platform,
                              vocab_split=ways > 1 and config.vocab_size % ways == 0, unroll_layers=unroll)
        self.logits = jax.jit(self._logits_fn)
        self.score = jax.jit(self._score_fn)
        self.prefill = jax.jit(self._prefill_fn)
        # The cache is updated in place where the backend can reuse donated buffers (not on CPU).
        self.decode = jax.jit(self._decode_fn, donate_argnums=(1,) if platform != "cpu" else ())

    def _host(self, x):
        """What a jitted body returns to the host: replicated over the mesh when sharded, so that every
        process holds all of it."""
        return x if self.sharding is None else jax.lax.with_sharding_constraint(x, self.sharding.replicated)

    def _logits_fn(self, params, tokens):
        return self._host(self.model.apply({"params": params}, tokens))

    def _score_fn(self, params, inputs, targets, mask):
        logits = self.model.apply({"params": params}, inputs)
        logp = jax.nn.log_softmax(logits, axis=-1)
        target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        total = jnp.sum(jnp.where(mask, target_logp, 0.0), axis=-1)
        greedy = jnp.all((jnp.argmax(logits, axis=-1) == targets) | ~mask, axis=-1)
        return self._host(total), self._host(greedy)

    def _prefill_fn(self, params, tokens, lengths, keys, temperature, top_p):
        batch, length = tokens.shape
        cache = init_cache(self.config, batch, self.seq_len)
        positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
        logits, cache = self.model.apply({"params": params}, tokens, positions, cache=cache)
        last = logits[jnp.arange(batch), lengths - 1]
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 0)
        return self._host(sample_tokens(last, step_keys, temperature, top_p)), cache

    def _decode_fn(self, params, cache, tokens, positions, keys, step, temperature, top_p):
        logits, cache = self.model.apply({"params": params}, tokens[:, None], positions[:, None], cache=cache)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
        return self._host(sample_tokens(logits[:, 0], step_keys, temperature, top_p)), cache


_PROGRAMS: "collections.OrderedDict[tuple[Any, ...], _Programs]" = collections.OrderedDict()
_PROGRAMS_LOCK = threading.Lock()


def _programs(config: ModelConfig, platform: str, sharding: "Sharding | None") -> _Programs:
    """One _Programs per configuration, platform and mesh, the 16 most recently used kept (a Sharding on an
    equal mesh lays out and constrains the same way, so the mesh is the key)."""
    key = (config, platform, None if sharding is None else sharding.mesh)
    with _PROGRAMS_LOCK:  # evaluations may load models on several threads at once
        if key not in _PROGRAMS:
            _PROGRAMS[key] = _Programs(config, platform, sharding)
            while len(_PROGRAMS) > 16:
                _PROGRAMS.popitem(last=False)
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]


class LanguageModel:
    """A PaLM with its parameters and tokenizer, for scoring and generating text.

    params: the unboxed parameter tree (as in a checkpoint's state["params"]); host or device arrays.
    batch_size: rows per forward pass (batches are padded to it, so shapes and compiles stay fixed).
    sharding: a `palm.core.sharding.Sharding` with a live mesh: `params` are already laid out on it (see
    `load_sharded_language_model`), activations are constrained as in training, and everything read back
    to the host is replicated first, so that every process of a multi-host job can read it.
    max_length: the longest input (tokens, START included) scoring and generation use; at most seq_len,
    which is the default.
    """

    #: Called after each batch scored or generated with its number of rows (progress reports); None: nothing.
    on_rows: Any = None

    def __init__(self, params: Any, config: ModelConfig, tokenizer: "Tokenizer", *, batch_size: int = 8,
                 platform: str | None = None, sharding: "Sharding | None" = None, max_length: int | None = None):
        if batch_size < 1:
            raise PalmError(f"batch_size must be positive, got {batch_size}")
        max_length = config.seq_len if max_length is None else max_length
        if not 2 <= max_length <= config.seq_len:
            raise PalmError(f"max_length must be between 2 and the model's seq_len {config.seq_len}, got {max_length}")
        if tokenizer.vocab_size > config.vocab_size:
            raise PalmError(f"the tokenizer has {tokenizer.vocab_size} pieces, more than the model's vocab_size "
                            f"{config.vocab_size}")
        # Remat only matters for a backward pass; the parameters are the same with or without it.
        self.config = dataclasses.replace(config, remat="none")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seq_len = config.seq_len
        self.max_length = max_length
        self.start_token = START_TOKEN
        self.eos_id = tokenizer.eos_id
        self.pad_id = max(tokenizer.pad_id, 0)
        platform = platform or jax.default_backend()
        self.sharding = sharding
        # The model and its jitted programs, shared with every LanguageModel of the same configuration, platform
        # and mesh in this process: a checkpoint loaded again (each `palm eval`, each new checkpoint the
        # evaluation flow scores) traces and compiles nothing again.
        programs = _programs(self.config, platform, sharding)
        self.model = programs.model
        if sharding is None:
            params = jax.device_put(params)
        # (sharded: already on the mesh; the cast below keeps each array's sharding)
        self.params = compute_params(params, self.config)
        self._logits, self._score = programs.logits, programs.score
        self._prefill, self._decode = programs.prefill, programs.decode

    def _on_mesh(self):
        """The mesh around every call when sharded (Pallas kernels read it to shard_map themselves)."""
        return contextlib.nullcontext() if self.sharding is None else jax.set_mesh(self.sharding.mesh)

    # -- logits and scoring ----------------------------------------------------------------------

    def logits(self, tokens: Any) -> np.ndarray:
        """Float32 logits [batch, length, vocab] of the model on input ids [batch, length] (or [length]).

        The ids are the model's inputs as given: prepend `start_token` to condition on a document start.
        """
        tokens = np.asarray(tokens, np.int32)
        squeeze = tokens.ndim == 1
        tokens = tokens[None] if squeeze else tokens
        if tokens.ndim != 2 or tokens.shape[1] > self.seq_len:
            raise PalmError(f"logits takes token ids [batch, length <= {self.seq_len}], got shape {tokens.shape}")
        with self._on_mesh():
            out = np.asarray(self._logits(self.params, tokens))
        return out[0] if squeeze else out

    def _score_rows(self, rows: Sequence[_Row]) -> list[tuple[float, bool]]:
        """(sum of log p over each row's scored targets, whether each is the argmax), batched by length."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        order = sorted((i for i, r in enumerate(rows) if r.scored > 0), key=lambda i: -len(rows[i].inputs))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            length = bucket_length(max(len(rows[i].inputs) for i in chunk), self.seq_len)
            inputs = np.full((self.batch_size, length), self.pad_id, np.int32)
            targets = np.full((self.batch_size, length), self.pad_id, np.int32)
            mask = np.zeros((self.batch_size, length), bool)
            for j, i in enumerate(chunk):
                row = rows[i]
                n = len(row.inputs)
                inputs[j, :n], targets[j, :n] = row.inputs, row.targets
                mask[j, n - row.scored:n] = True
            with self._on_mesh():
                total, greedy = jax.device_get(self._score(self.params, inputs, targets, mask))
            for j, i in enumerate(chunk):
                results[i] = (float(total[j]), bool(greedy[j]))
            if self.on_rows is not None:
                self.on_rows(len(chunk))
        return results

    def _continuation_row(self, context: Sequence[int], continuation: Sequence[int]) -> _Row:
        if len(continuation) > self.max_length:
            raise PalmError(f"a continuation of {len(continuation)} tokens is longer than max_length {self.max_length}")
        sequence = [self.start_token, *context, *continuation]
        return _Row(sequence[:-1][-self.max_length:], sequence[1:][-self.max_length:], len(continuation))

    def loglikelihood_tokens(self, requests: Iterable[tuple[Sequence[int], Sequence[int]]]) \
            -> list[tuple[float, bool]]:
        """loglikelihood_batch on token ids: [(context ids, continuation ids)] -> [(logprob_sum, is_greedy)]."""
        return self._score_rows([self._continuation_row(c, x) for c, x in requests])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation as lm-evaluation-harness' causal models split them
        (`TemplateLM._encode_pair`, lm-eval 0.4.13): the context's trailing whitespace moved to the
        continuation, context + continuation encoded whole, the continuation being the whole's tokens after
        the first len(encode(context)). An empty context (after the move) gives ([], encode(continuation)),
        as the harness' empty-context case does before putting its prefix token (here START) in front."""
        context, continuation = _move_trailing_whitespace(context, continuation)
        if not context:
            return [], self.tokenizer.encode(continuation)
        whole, ctx = self.tokenizer.encode_batch([context + continuation, context])
        return ctx, whole[len(ctx):]

    def loglikelihood_batch(self, requests: Iterable[tuple[str, str]]) -> list[tuple[float, bool]]:
        """[(context, continuation)] -> [(sum of log p(continuation | START + context), is_greedy)].

        An empty continuation gives (0.0, True)."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        return self.loglikelihood_batch([(context, continuation)])[0]

    # -- whole texts -----------------------------------------------------------------------------

    def _rolling_rows(self, ids: Sequence[int], stride: int | None) -> list[_Row]:
        sequence = [self.start_token, *ids]
        return [_Row(sequence[lo:b], list(ids[lo:b]), b - a)
                for lo, a, b in rolling_windows(len(ids), self.max_length, stride)]

    def loglikelihood_rolling_tokens(self, texts_ids: Sequence[Sequence[int]],
                                     stride: int | None = None) -> list[float]:
        rows, owners = [], []
        for n, ids in enumerate(texts_ids):
            windows = self._rolling_rows(ids, stride)
            rows.extend(windows)
            owners.extend([n] * len(windows))
        totals = [0.0] * len(texts_ids)
        for owner, (logprob, _) in zip(owners, self._score_rows(rows)):
            totals[owner] += logprob
        return totals

    def loglikelihood_rolling_batch(self, texts: Sequence[str], stride: int | None = None) -> list[float]:
        """Sum of log p over all tokens of each text (from START; see the module docstring for windows)."""
        return self.loglikelihood_rolling_tokens(self.tokenizer.encode_batch(list(texts)), stride)

    def loglikelihood_rolling(self, text: str, stride: int | None = None) -> float:
        return self.loglikelihood_rolling_batch([text], stride)[0]

    def perplexity_and_bits_per_byte(self, texts: Sequence[str], stride: int | None = None) -> dict[str, float]:
        """Token perplexity exp(-sum log p / tokens) and bits per byte -sum log2 p / UTF-8 bytes, over texts."""
        texts = list(texts)
        encoded = self.tokenizer.encode_batch(texts)
        tokens = sum(len(ids) for ids in encoded)
        num_bytes = sum(len(t.encode("utf-8")) for t in texts)
        if tokens == 0:
            raise PalmError("perplexity needs at least one token of text")
        loglikelihood = sum(self.loglikelihood_rolling_tokens(encoded, stride))
        return {"documents": len(texts), "tokens": tokens, "bytes": num_bytes, "loglikelihood": loglikelihood,
                "nll_per_token": -loglikelihood / tokens, "perplexity": math.exp(-loglikelihood / tokens),
                "bits_per_byte": -loglikelihood / (num_bytes * math.log(2)), "bytes_per_token": num_bytes / tokens}

    # -- multiple choice -------------------------------------------------------------------------

    def rank_choices(self, context: str, choices: Sequence[str], gold: int | None = None) -> dict[str, Any]:
        """Rank classification: log p(choice | context) for each choice, raw and divided by the choice's
        length in characters (lm-evaluation-harness' acc_norm); the argmax of each, and with `gold` (the
        index of the right choice) acc and acc_norm."""
        if not choices:
            raise PalmError("rank_choices needs at least one choice")
        results = self.loglikelihood_batch([(context, choice) for choice in choices])
        loglikelihoods = [r[0] for r in results]
        normalized = [ll / max(1, len(choice)) for ll, choice in zip(loglikelihoods, choices)]
        out: dict[str, Any] = {
            "loglikelihoods": loglikelihoods, "normalized": normalized, "is_greedy": [r[1] for r in results],
            "pred": int(np.argmax(loglikelihoods)), "pred_norm": int(np.argmax(normalized))}
        if gold is not None:
            out["acc"] = float(out["pred"] == gold)
            out["acc_norm"] = float(out["pred_norm"] == gold)
        return out

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int = 0) -> list[str]:
        """The continuation of each prompt (without the stop sequence that ended it, or eos).

        Greedy when temperature == 0, else temperature + nucleus (top_p) sampling; prompt i draws from
        PRNG keys fold_in(fold_in(key(seed), i), k) for its k-th token, so results do not depend on how
        prompts are batched. Prompts ([START] + their tokens) are truncated from the left to
        max_length - max_new_tokens tokens. All prompts are decoded together, `batch_size` rows at a time
        (longest first), and results come back in the prompts' order.
        """
        prompts = list(prompts)
        if temperature < 0 or not 0 < top_p <= 1:
            raise PalmError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        if max_new_tokens <= 0 or not prompts:
            return [""] * len(prompts)
        if max_new_tokens >= self.max_length:
            raise PalmError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in max_length "
                            f"{self.max_length}")
        stop = [s for s in (stop or []) if s]
        keep = self.max_length - max_new_tokens
        encoded = [[self.start_token, *ids][-keep:] for ids in self.tokenizer.encode_batch(prompts)]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        out = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            texts = self._generate_batch([encoded[i] for i in chunk], chunk, max_new_tokens, temperature,
                                         top_p, stop, seed)
            for i, text in zip(chunk, texts):
                out[i] = text
            if self.on_rows is not None:
                self.on_rows(len(chunk))
        return out

    def greedy_ids(self, prompts: Any, steps: int) -> np.ndarray:
        """The `steps` greedy next ids [n, steps] after each row of input ids [n, length], the rows taken as
        given (prepend `start_token` to condition on a document start; eos is an id like any other).

        A prefill and then one cached decode step per id, `batch_size` rows at a time: the greedy decoding
        `generate` does, the same ids as taking the argmax of a full forward pass over each longer buffer."""
        prompts = np.asarray(prompts, np.int32)
        if prompts.ndim != 2 or prompts.shape[1] + steps > self.seq_len or steps < 1:
            raise PalmError(f"greedy_ids takes input ids [rows, length] and steps >= 1 with length + steps <= "
                            f"{self.seq_len}, got shape {prompts.shape} and {steps} steps")
        n, length = prompts.shape
        out = np.zeros((n, steps), np.int32)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), np.arange(self.batch_size))
        greedy, top_p = np.float32(0.0), np.float32(1.0)
        for start in range(0, n, self.batch_size):
            rows = prompts[start:start + self.batch_size]
            tokens = np.full((self.batch_size, bucket_length(length, self.seq_len)), self.pad_id, np.int32)
            tokens[:, :length] = rows[0]  # padding rows repeat the first row; their ids are dropped
            tokens[:len(rows), :length] = rows
            positions = np.full(self.batch_size, length, np.int32)
            with self._on_mesh():
                token, cache = self._prefill(self.params, tokens, positions, keys, greedy, top_p)
            for k in range(steps):
                out[start:start + len(rows), k] = np.asarray(token)[:len(rows)]
                if k < steps - 1:
                    with self._on_mesh():
                        token, cache = self._decode(self.params, cache, token, positions, keys, np.int32(k + 1),
                                                    greedy, top_p)
                    positions = positions + 1
        return out

    def _generate_batch(self, prompts: list[list[int]], indices: list[int], max_new_tokens: int,
                        temperature: float, top_p: float, stop: list[str], seed: int) -> list[str]:
        rows = len(prompts)
        length = bucket_length(max(len(p) for p in prompts), self.seq_len)
        tokens = np.full((self.batch_size, length), self.pad_id, np.int32)
        lengths = np.ones(self.batch_size, np.int32)
        tokens[:, 0] = self.start_token  # padding rows: a lone START, ignored
        for j, ids in enumerate(prompts):
            tokens[j, :len(ids)] = ids
            lengths[j] = len(ids)
        row_ids = np.zeros(self.batch_size, np.int32)
        row_ids[:rows] = indices
        keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), row_ids)
        temperature_, top_p_ = np.float32(temperature), np.float32(top_p)

        generated: list[list[int]] = [[] for _ in range(rows)]
        texts: list[str | None] = [None] * rows
        with self._on_mesh():
            token, cache = self._prefill(self.params, tokens, lengths, keys, temperature_, top_p_)
        positions = lengths.copy()  # where each row's newest token goes
        for k in range(max_new_tokens):
            host = np.asarray(token)
            for j in range(rows):
                if texts[j] is not None:
                    continue
                if int(host[j]) == self.eos_id:
                    texts[j] = self.tokenizer.decode(generated[j])
                    continue
                generated[j].append(int(host[j]))
                if stop:
                    text = self.tokenizer.decode(generated[j])
                    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                    if cut >= 0:
                        texts[j] = text[:cut]
            if all(t is not None for t in texts) or k == max_new_tokens - 1:
                break
            with self._on_mesh():
                token, cache = self._decode(self.params, cache, token, positions, keys, np.int32(k + 1),
                                            temperature_, top_p_)
            positions = positions + 1
        return [t if t is not None else self.tokenizer.decode(g) for t, g in zip(texts, generated)]


# ------------------------------------------------------------------------------------- loading


def _param_table(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {jax.tree_util.keystr(path): (tuple(int(n) for n in leaf.shape), np.dtype(leaf.dtype).name)
            for path, leaf in flat}


def restore_params(checkpoint_dir: str | Path, model_config: ModelConfig, step: int | None = None,
                   verify: bool = True) -> tuple[Any, int]:
    """(parameter tree as host numpy arrays, step) of a checkpoint written by palm.core.checkpoint.Checkpoints.

    `checkpoint_dir` is the checkpoints directory or the train stage directory holding `checkpoints/`;
    the latest step by default. Only the parameters are read (not the optimizer state, about twice their
    size), after checking their recorded shapes against `model_config`; with `verify` their digest is
    checked against the one recorded at save time.
    """
    ckpts = open_checkpoints(checkpoint_dir)
    try:
        steps = ckpts.steps()
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise PalmError(f"no checkpoint at step {step} in {ckpts.directory}; steps: {steps}")
        abstract = nn.unbox(abstract_params(model_config))
        usable_step(ckpts, step)  # never a damaged step or another step's; another model's: the shapes below
        want = _param_table(abstract)
        try:  # an empty step directory (KeyError), an emptied meta/metadata (JSONDecodeError), ...
            got = _param_table(ckpts.manager.item_metadata(step)["state"].tree["params"])
            recorded = ckpts.meta(step).get("digest") if verify else None
        except Exception as e:  # noqa: BLE001 - whatever Orbax meets in a damaged step: one line naming it
            others = [s for s in steps if s != step]
            raise PalmError(f"checkpoint {ckpts.directory}/{step} is incomplete or damaged ({type(e).__name__}: "
                            f"{str(e)[:200]}); other steps: {others or 'none'} "
                            "(`palm checkpoint verify` checks every step)") from None
        if want != got:
            diff = sorted(set(want.items()) ^ set(got.items()))[:6]
            raise PalmError(f"checkpoint {ckpts.directory}/{step}: its parameters do not fit the model config "
                            f"(another architecture?); differences (path, (shape, dtype)): {diff}")
        # The train state is the "state" item of an Orbax CheckpointManager step; restore its params only.
        host = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
        with ocp.PyTreeCheckpointer() as reader:
            params = reader.restore(f"{ckpts.directory}/{step}/state", args=ocp.args.PyTreeRestore(
                item={"params": abstract}, restore_args={"params": host}, partial_restore=True))["params"]
        if verify:
            if recorded is not None:  # checkpoints written before digests were recorded have none
                check_params_digest(params, recorded, f"checkpoint {ckpts.directory}/{step}")
    finally:
        ckpts.close()
    return params, step


def _tokenizer(tokenizer_path: str | Path) -> "Tokenizer":
    from palm.tokenizer import Tokenizer

    path = Path(tokenizer_path)
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise PalmError(f"no tokenizer model at {path}")
    return Tokenizer(path)


def load_language_model(checkpoint_dir: str | Path, model_config: ModelConfig, tokenizer_path: str | Path,
                        step: int | None = None, *, batch_size: int = 8, verify: bool = True,
                        max_length: int | None = None) -> LanguageModel:
    """A LanguageModel from a training run's checkpoint (latest step by default) and its tokenizer.

    tokenizer_path: the SentencePiece model file, or the tokenizer stage directory holding tokenizer.model.
    """
    params, _ = restore_params(checkpoint_dir, model_config, step, verify=verify)
    return LanguageModel(params, model_config, _tokenizer(tokenizer_path), batch_size=batch_size,
                         max_length=max_length)


def load_sharded_language_model(step_dir: str | Path, model_config: ModelConfig, tokenizer_path: str | Path,
                                mesh_shape: dict[str, int], *, batch_size: int = 8) -> LanguageModel:
    """A LanguageModel whose parameters are restored from one checkpoint (a step directory, local or
    gs://) straight onto a mesh of every device of the job, laid out as training lays them out: each host
    reads only its shards (Orbax), and no host ever holds the whole model. Their recorded digest is
    checked. With several processes every host calls this, and then runs the same evaluation."""

    sharding = Sharding.on(make_mesh(mesh_shape))
    boxed = abstract_params(model_config)
    shardings = sharding.for_params(boxed)
    abstract = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.value.shape, p.value.dtype, sharding=s), boxed,
                            shardings, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    params = restore_params_onto(step_dir, abstract)
    return LanguageModel(params, model_config, _tokenizer(tokenizer_path), batch_size=batch_size,
                         sharding=sharding)
