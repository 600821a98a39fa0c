"""`palm bench data`: palm's data stage and datatrove on the same real documents (structure, not timings)."""

from __future__ import annotations

import json
import sys

import pytest

from palm.app.bench.corpus import BOOKS_SPLIT, WIKI_SPLIT, split_text
from palm.app.bench.data import render_data
from palm.cli import main

SYSTEMS = ("palm", "datatrove")


@pytest.mark.slow
def test_bench_data_compares_both_systems_on_the_same_documents(shared_data, capsys):
    # Cost: both data systems (palm and datatrove) on the same 4 MB of real documents, whose sizes the test checks.
    rc = main(["bench", "data", "--data-dir", str(shared_data), "--repeat", "1", "--target-mb", "4",
               "--pairs-per-band", "20", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    r = json.loads(out)  # stdout is exactly one JSON object; progress went to stderr
    assert "bench data:" in err and "Traceback" not in err

    inp = r["input"]
    assert set(inp["sources"]) == {"books", "wikipedia"}
    assert inp["docs"] == sum(s["docs"] for s in inp["sources"].values())
    assert inp["sources"]["books"]["original_docs"] > 250 and inp["sources"]["wikipedia"]["original_docs"] > 2000
    assert inp["sources"]["books"]["recombined_docs"] > 0 and inp["sources"]["wikipedia"]["planted_docs"] == 80
    assert inp["planted"] == {"exact": 20, "0.80-0.90": 20, "0.70-0.80": 20, "0.50-0.70": 20}
    assert inp["bytes"] == sum(s["bytes"] for s in inp["sources"].values()) > 4_000_000
    assert abs(inp["mb"] - inp["bytes"] / 1e6) < 1e-9
    assert r["repeat"] == 1 and r["minhash"]["bands"] * r["minhash"]["rows"] <= 128

    for name in SYSTEMS:
        s = r[name]
        assert s["cores"] == 1
        assert s["seconds"] > 0 and len(s["seconds_all"]) == 1
        assert s["mb_per_s"] > 0 and s["mb_per_s_per_core"] > 0
        assert abs(s["mb_per_s"] - inp["mb"] / s["seconds"]) < 1e-9
        assert s["docs_in"] == inp["docs"]  # both saw every materialized document
        assert 0 < s["docs_out"] <= s["docs_in"]
        assert s["docs_in"] == s["docs_out"] + sum(s["dropped"].values())  # every loss has a reason
    assert r["palm"]["docs_in"] == r["datatrove"]["docs_in"]
    # palm finds every planted exact and [0.8, 0.9] pair that reached deduplication, and none below 0.8.
    det = r["palm"]["planted_detection"]
    for band in ("exact", "0.80-0.90"):
        assert det[band]["pairs"] >= 10 and det[band]["found"] == det[band]["pairs"], band
    for band in ("0.70-0.80", "0.50-0.70"):
        assert det[band]["pairs"] >= 10 and det[band]["found"] == 0, band
    assert set(r["datatrove"]["planted_detection"]) == set(det)
    assert any(k.startswith("repetition.") for k in r["datatrove"]["dropped"])  # its repetition filter ran
    q = r["quality_classifier"]
    assert q["held_out_auc"] > 0.98
    assert q["scores"]["fluent spam (unseen)"]["median_classifier"] < 0.2 < \
        q["scores"]["prose (unseen WikiText-2 paragraphs)"]["median_classifier"]
    assert "planted pairs found" in render_data(r) and "quality classifier: held-out AUC" in render_data(r)
    assert r["ratio_palm_over_datatrove_mb_per_s_per_core"] > 0
    assert "exact dedup" in r["note"]


def test_bench_data_without_datatrove_times_palm_alone(shared_data, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datatrove", None)  # as if the bench group were not installed
    rc = main(["bench", "data", "--data-dir", str(shared_data), "--repeat", "1", "--no-datatrove",
               "--max-docs", "40", "--target-mb", "0", "--pairs-per-band", "0", "--no-classifier"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "palm" in out and "skipped: --no-datatrove" in out and "note: palm's data stage does more" in out
    assert "input: 80 documents" in out


def test_bench_data_without_the_bench_group_says_how_to_install_it(shared_data, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datatrove", None)
    rc = main(["bench", "data", "--data-dir", str(shared_data), "--json"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert "uv sync --group bench" in err and "datatrove" in err and "--no-datatrove" in err
    assert "Traceback" not in err


def test_bench_data_missing_data_dir_is_bad_input(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    rc = main(["bench", "data", "--data-dir", str(missing), "--no-datatrove"])
    err = capsys.readouterr().err
    assert rc == 2 and str(missing) in err and "Traceback" not in err


def test_split_patterns_cut_speeches_and_articles():
    speeches = split_text("First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\nYou are "
                          "all resolved.\n", BOOKS_SPLIT)
    assert len(speeches) == 3 and speeches[0].startswith("First Citizen:")
    assert speeches[1].startswith("\n\nAll:")  # the blank line stays with the next speech, as in the data stage
    articles = split_text(" \n = Valkyria = \n text\n = = Gameplay = = \n more\n = Tower Building = \n x\n",
                          WIKI_SPLIT)
    assert len(articles) == 2 and "Gameplay" in articles[0] and articles[1].startswith(" = Tower Building =")
