"""`palm bench decode`: decode steps of the tiny spec against the bandwidth roofline (structure, not timings)."""

from __future__ import annotations

import json
import math

import pytest

from palm.cli import main

from .conftest import SPECS

# specs/tiny.yaml's model, written out so the byte counts below are computed independently of palm.
LAYERS, D, HEADS, HEAD_DIM, KV_HEADS, FF, VOCAB = 2, 128, 4, 32, 1, 4 * 128, 1024
ITEMSIZE = 4  # param_dtype and dtype are both float32


def tiny_param_bytes() -> int:
    per_layer = (D * HEADS * HEAD_DIM          # query
                 + D * 2 * KV_HEADS * HEAD_DIM  # key_value
                 + HEADS * HEAD_DIM * D         # out
                 + D * 2 * FF + FF * D          # mlp_in (gate, up), mlp_out
                 + D)                           # layer_norm scale
    return (VOCAB * D + LAYERS * per_layer + D) * ITEMSIZE  # tied embedding, final_norm


@pytest.mark.slow
def test_bench_decode_tiny_json(capsys):
    steps, prompt_len, warmup = 8, 128, 2
    rc = main(["bench", "decode", str(SPECS / "tiny.yaml"), "--batches", "1,4", "--steps", str(steps), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "bench decode:" in captured.err and "Traceback" not in captured.err
    r = json.loads(captured.out)  # stdout is exactly one JSON object

    assert r["spec"] == "tiny" and r["platform"] == "cpu" and r["device"]
    assert r["steps"] == steps and r["prompt_len"] == prompt_len and r["warmup_steps"] == warmup
    assert r["params"] * ITEMSIZE == tiny_param_bytes()
    assert r["param_dtypes_read"] == ["float32"] and r["compute_dtype"] == "float32"
    kv_len_mean = prompt_len + warmup + (steps + 1) / 2
    assert r["kv_cache"] == {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
                             "slots": prompt_len + warmup + steps, "kv_len_mean": kv_len_mean}
    bw = r["bandwidth"]
    assert bw["bytes"] == 256 << 20 and bw["seconds"] > 0 and bw["bytes_per_s"] > 0

    assert [b["batch"] for b in r["batches"]] == [1, 4]
    for b in r["batches"]:
        batch = b["batch"]
        kv_bytes = LAYERS * batch * kv_len_mean * KV_HEADS * HEAD_DIM * 2 * ITEMSIZE
        assert b["param_bytes"] == tiny_param_bytes()
        assert b["kv_cache_bytes"] == kv_bytes
        assert b["bytes_per_step"] == tiny_param_bytes() + kv_bytes
        for key in ("step_seconds", "tokens_per_s", "roofline_step_seconds", "roofline_tokens_per_s",
                    "fraction_of_roofline", "achieved_bytes_per_s", "prefill_seconds_with_compile"):
            assert b[key] > 0 and math.isfinite(b[key]), key
        assert b["step_seconds_min"] <= b["step_seconds"] <= b["step_seconds_max"]
        assert math.isclose(b["tokens_per_s"], batch / b["step_seconds"])
        assert math.isclose(b["roofline_tokens_per_s"], batch * bw["bytes_per_s"] / b["bytes_per_step"])
        assert math.isclose(b["fraction_of_roofline"], b["tokens_per_s"] / b["roofline_tokens_per_s"])


def test_bench_decode_bad_batches_exit_2(capsys):
    rc = main(["bench", "decode", str(SPECS / "tiny.yaml"), "--batches", "1,x", "--json"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "" and "--batches" in captured.err
