"""`palm bench input`: tokenize-and-pack and the loader on the real shared corpora (structure, not timings)."""

from __future__ import annotations

import json
import math

import pytest

from palm.cli import main


@pytest.fixture(scope="module")
def result(shared_data):
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        # 200 sequences per batch make the 30 batches (10 warm-up + 20 timed) outrun one epoch of the
        # ~4,600 sequences of 256 tokens, so the loader's repeat is exercised too.
        rc = main(["bench", "input", "--data-dir", str(shared_data), "--vocab-size", "4000", "--seq-len", "256",
                   "--batch", "200", "--batches", "20", "--json"])
    assert rc == 0, err.getvalue()
    return json.loads(out.getvalue()), err.getvalue()  # stdout is exactly one JSON object


@pytest.mark.slow
def test_progress_goes_to_stderr(result):
    _, err = result
    assert "bench input:" in err and "tokenize-and-pack:" in err and "Traceback" not in err


@pytest.mark.slow
def test_input_is_the_shared_corpora_split_into_documents(result):
    r, _ = result
    i = r["input"]
    assert set(i["sources"]) == {"books", "wikipedia"}
    assert i["docs"] == sum(s["docs"] for s in i["sources"].values())
    assert i["bytes"] == sum(s["bytes"] for s in i["sources"].values()) > 3_000_000
    assert r["host"]["cores"] >= 1 and r["host"]["cpu"]


@pytest.mark.slow
def test_tokenizer_encode_and_pack_account_for_every_token(result):
    r, _ = result
    t, e, p = r["tokenizer"], r["encode"], r["pack"]
    assert t["vocab_size"] == 4000 and t["train_seconds"] > 0 and t["bytes_per_token"] > 1
    assert e["docs"] == p["docs"] == r["input"]["docs"]
    assert e["tokens"] > 0 and e["tokens_per_s"] > 0
    # One end-of-document token per document; the partial last sequence of each shard is dropped.
    assert p["tokens"] == e["tokens"] + e["docs"]
    assert p["packed_tokens"] == p["sequences"] * 256 == e["tokens"] + e["docs"] - p["tokens_dropped"]
    assert 0 <= p["tokens_dropped"] < 2 * 256  # one pack shard per source, fewer than seq_len left in each
    assert p["cores"] == 1 and p["seq_len"] == 256
    assert p["tokens_per_s"] > 0 and p["tokens_per_s_per_core"] == p["tokens_per_s"] and p["tokens_per_cpu_s"] > 0
    assert p["encode_over_pack"] > 0


@pytest.mark.slow
def test_loader_batches_and_headroom_against_one_h100(result):
    r, _ = result
    ld, h = r["loader"], r["h100"]
    assert (ld["batch"], ld["seq_len"], ld["batches"]) == (200, 256, 20)
    needed = (ld["warmup_batches"] + ld["batches"]) * ld["batch"]
    assert ld["epochs"] == math.ceil(needed / ld["sequences_in_dataset"]) >= 2
    assert ld["batches_per_s"] > 0 and ld["seconds"] > 0
    assert ld["tokens_per_s"] == pytest.approx(ld["batches_per_s"] * 200 * 256)

    assert h["spec"] == "palm-1b-gpu" and (h["batch"], h["seq_len"]) == (8, 2048)
    assert h["reference_step"]["tokens_per_s"] == 49_200
    goal = h["mfu_goal"]
    assert goal["mfu"] == 0.55 and goal["peak_flops"] == 989.4e12
    assert goal["tokens_per_s"] == pytest.approx(0.55 * 989.4e12 / goal["model_flops_per_token"])
    assert 40_000 < goal["tokens_per_s"] < 80_000  # ~1.5B parameters: about 9.7 GFLOPs per token
    for name in ("reference_step", "mfu_goal"):
        needed_tps = h[name]["tokens_per_s"]
        assert r["headroom"][name] == pytest.approx(ld["tokens_per_s"] / needed_tps)
        assert r["pack_cores_per_h100"][name] == pytest.approx(needed_tps / r["pack"]["tokens_per_s_per_core"])


@pytest.mark.slow
def test_text_output_names_the_comparison(result):
    from palm.app.bench.input import render_input

    text = render_input(result[0])
    assert "tokens/s per core" in text and "batches/s" in text
    assert "reference step 49,200 tokens/s" in text and "55% MFU goal" in text and "loader headroom:" in text


def test_bad_settings_are_bad_input(shared_data, capsys):
    rc = main(["bench", "input", "--data-dir", str(shared_data), "--vocab-size", "0"])
    captured = capsys.readouterr()
    assert rc == 2 and "--vocab-size must be at least 1" in captured.err and captured.out == ""


def test_a_vocabulary_the_corpus_cannot_hold_is_bad_input(shared_data, capsys, monkeypatch):
    import palm.app.bench.input
    import palm.tokenizer

    real = palm.tokenizer.train_tokenizer

    def on_a_few_documents(texts, path, **kwargs):  # the real trainer, on a sample small enough to fail fast
        return real(list(texts)[:50], path, **kwargs)

    monkeypatch.setattr(palm.app.bench.input, "train_tokenizer", on_a_few_documents)
    rc = main(["bench", "input", "--data-dir", str(shared_data), "--vocab-size", "5000", "--batches", "1"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert "--vocab-size 5000 is more pieces than" in captured.err and "lower --vocab-size" in captured.err
    assert "Traceback" not in captured.err


def test_missing_data_dir_is_bad_input(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    rc = main(["bench", "input", "--data-dir", str(missing), "--batches", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and str(missing) in err and "Traceback" not in err
