"""The lossless SentencePiece tokenizer: round trips, digits, byte fallback, determinism, memory, stage."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import textwrap as textwrap_module
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import palm.tokenizer as tokenizer_module
from palm.cli import main
from palm.base.errors import PalmError
from palm.tokenizer import (
    MAX_SENTENCE_BYTES, META, Tokenizer, check_fits_memory, available_memory, estimate_training_memory,
    train_tokenizer, training_sentences,
)
from tests.conftest import ROOT, SPECS

TINY = str(SPECS / "tiny.yaml")
VOCAB = 1024

#: Deterministic property tests: the same examples on every run and machine, nothing written to disk.
PROPERTY = settings(max_examples=300, derandomize=True, deadline=None, database=None)

#: Lines the training corpus holds a few times, so some CJK, Hangul and emoji become pieces of their own.
MULTILINGUAL = [
    "東京は日本の首都です。人口は約千四百万人です。",
    "我们今天去公园散步，天气很好。",
    "大規模言語モデルの事前学習には多くのデータが必要です。",
    "안녕하세요, 만나서 반갑습니다. 오늘 날씨가 좋네요.",
    "한국어 텍스트도 손실 없이 토큰화되어야 합니다.",
    "Привет, мир! Это проверка кириллицы.",
    "Γειά σου κόσμε — ελληνικά.",
    "café naïve résumé coöperate façade",
    "I ❤️ tokenizers 👍🏽 👩‍💻 🎉🎉 🇯🇵",
    "family: 👨‍👩‍👧‍👦 thumbs: 👍🏻👍🏿 flag: 🏳️‍🌈",
]


def _stdlib_source() -> str:
    import argparse
    import json as json_module

    paths = [Path(argparse.__file__), Path(textwrap_module.__file__),
             *sorted(Path(json_module.__file__).parent.glob("*.py"))]
    return "\n".join(p.read_text(encoding="utf-8") for p in paths)


def _corpus(shared_data: Path) -> list[str]:
    shakespeare = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:300_000]
    docs = [d for d in shakespeare.split("\n\n") if d.strip()]
    docs.append(_stdlib_source())
    docs.extend(MULTILINGUAL * 20)
    return docs


@pytest.fixture(scope="module")
def corpus(shared_data) -> list[str]:
    return _corpus(shared_data)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=VOCAB, seed=0)


@pytest.fixture(scope="module")
def tok(trained) -> Tokenizer:
    return Tokenizer(trained)


def _assert_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text, [tok.id_to_piece(i) for i in ids]
    assert tok.unk_id not in ids


# --------------------------------------------------------------------------------- the vocabulary


def test_special_ids_and_size(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == VOCAB
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "</s>", "<s>", "<unk>"]
    assert tok.has_byte_fallback
    assert tok.decode([tok.pad_id, tok.eos_id, tok.bos_id]) == ""


def test_whitespace_runs_are_pieces(tok):
    pieces = {tok.id_to_piece(i) for i in range(tok.vocab_size)}
    assert "\u2581" * 4 in pieces and "\u2581" * 8 in pieces  # code indentation
    assert "\n" in pieces  # newlines are learnt, not only byte pieces
    ids = tok.encode("        return x\n")
    assert tok.id_to_piece(ids[0]).strip("\u2581") == ""


def test_loads_from_bytes_and_path_and_pickles(tok, trained):
    text = "def f(x):\n\treturn x ▁ 42  # 日本 👍🏽\r\n"
    from_bytes = Tokenizer(trained.read_bytes())
    assert from_bytes.encode(text) == tok.encode(text)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == tok.encode(text) and clone.model_bytes == trained.read_bytes()
    assert tok.encode_batch([text, "", "a"]) == [tok.encode(text), [], tok.encode("a")]
    ids = np.asarray(tok.encode(text), np.int32)
    assert tok.decode(ids) == text and tok.decode_batch([ids, []]) == [text, ""]


# ------------------------------------------------------------------------------ lossless round trip


@PROPERTY
@given(st.text())
def test_round_trip_any_unicode(tok, text):
    _assert_round_trip(tok, text)


_CJK = st.text(st.one_of(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
                         st.characters(min_codepoint=0x3040, max_codepoint=0x30FF),
                         st.sampled_from(list("，。「」、！？ \n")),
                         st.characters(min_codepoint=0x20000, max_codepoint=0x2A6DF)))
_HANGUL = st.text(st.one_of(st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3),
                            st.characters(min_codepoint=0x1100, max_codepoint=0x11FF),
                            st.characters(min_codepoint=0x3130, max_codepoint=0x318F), st.just(" ")))
_EMOJI_BASE = st.one_of(st.sampled_from(["👩", "👨", "👧", "👦", "👍", "🏳", "🌈", "❤", "🧑", "💻", "🤝", "⬛"]),
                        st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF))
_EMOJI_UNIT = st.tuples(_EMOJI_BASE, st.sampled_from(["", "\U0001F3FB", "\U0001F3FC", "\U0001F3FD",
                                                      "\U0001F3FE", "\U0001F3FF"]),
                        st.sampled_from(["", "\ufe0f"])).map("".join)
_EMOJI = st.lists(st.one_of(
    st.lists(_EMOJI_UNIT, min_size=1, max_size=4).map("\u200d".join),  # ZWJ sequences
    st.lists(st.characters(min_codepoint=0x1F1E6, max_codepoint=0x1F1FF), min_size=2, max_size=2).map("".join),
    st.sampled_from([" ", "\n", "a", "\u200d", "\ufe0f"])), max_size=20).map("".join)
_COMBINING = st.text(st.one_of(st.characters(categories=("Mn", "Mc", "Me")),
                               st.characters(categories=("Ll", "Lu", "Lo")), st.just(" ")))
_CONTROL = st.lists(st.one_of(st.characters(categories=("Cc", "Cf", "Co", "Cn", "Zs", "Zl", "Zp")),
                              st.sampled_from(["\x00", "\r", "\r\n", "\t", "\x7f", "\x85", "\ufeff", "a"]))
                    ).map("".join)
_WHITESPACE = st.lists(st.sampled_from([" ", "  ", "    ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c",
                                        "\u3000", "\u00a0", "\u2028", "x"])).map("".join)
_SOURCE_LINES = Path(textwrap_module.__file__).read_text(encoding="utf-8").split("\n")
_CODE_TOKENS = ["def ", "class ", "    ", "\t", "\n", "\r\n", "(", "):", "self", ".", "=", " == ", "0x1F", "1234",
                "'''", '"', "#", " ", "\\", "{", "}", "[", "]", "lambda", "▁", "<s>", "</s>", "<unk>", "<0x41>"]
_CODE = st.one_of(st.lists(st.sampled_from(_CODE_TOKENS), max_size=40).map("".join),
                  st.lists(st.sampled_from(_SOURCE_LINES), max_size=12).map("\n".join))
_META = st.lists(st.sampled_from([META, META * 3, " ", "a", "\n", "\t", "日", "<0xE2>", "▁▁ ▁"])).map("".join)
_MIXED = st.lists(st.one_of(_CJK, _HANGUL, _EMOJI, _COMBINING, _CONTROL, _WHITESPACE, _CODE, _META,
                            st.text()), max_size=6).map("".join)


@pytest.mark.parametrize("strategy", [_CJK, _HANGUL, _EMOJI, _COMBINING, _CONTROL, _WHITESPACE, _CODE, _META,
                                      _MIXED],
                         ids=["cjk", "hangul", "emoji", "combining", "control", "whitespace", "code", "meta",
                              "mixed"])
def test_round_trip_targeted(tok, strategy):
    @PROPERTY
    @given(strategy)
    def check(text):
        _assert_round_trip(tok, text)

    check()


@pytest.mark.slow
def test_round_trip_every_code_point(tok):
    """Every code point at the start, before a letter and after a space (the search that found "▁")."""
    texts = [f"{c}a {c}" for c in map(chr, range(0x110000)) if not "\ud800" <= c <= "\udfff"]
    bad = [t for t, ids in zip(texts, tok.encode_batch(texts)) if tok.decode(ids) != t]
    assert not bad, bad[:10]


def test_literal_meta_symbol_goes_through_byte_pieces(tok):
    ids = tok.encode("a▁b")
    pieces = [tok.id_to_piece(i) for i in ids]
    assert "<0xE2>" in pieces and "<0x96>" in pieces and "<0x81>" in pieces
    assert tok.decode(ids) == "a▁b"
    # Decoding the bytes alone gives the character back, not a space.
    assert tok.decode([tok.piece_to_id(p) for p in ("<0xE2>", "<0x96>", "<0x81>")]) == "▁"
    assert tok.decode(tok.encode(" ▁ ")) == " ▁ " and tok.encode(" ") != tok.encode("▁")


def test_control_characters_and_long_lines(tok):
    for text in ("\x00", "a\x00b", "\r\n\r\n", "\t\t\tx", "<s>hi</s><pad><unk><0x41>", "\ufeffBOM",
                 "x" * 1_000_000, ("word " * 200_000).rstrip(), "日本語" * 50_000):
        _assert_round_trip(tok, text)


def test_lone_surrogate_is_a_clear_error(tok):
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at index 1"):
        tok.encode("a\ud800b")
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ digits and bytes


@PROPERTY
@given(st.text("0123456789", min_size=1, max_size=40), st.sampled_from(["{}", " {}", "x={}.", "v{} ", "{}\n{}"]))
def test_every_digit_is_its_own_piece(tok, digits, template):
    text = template.format(digits, digits[::-1])
    ids = tok.encode(text)
    for i in ids:
        assert sum(ch in "0123456789" for ch in tok.id_to_piece(i)) <= 1, tok.id_to_piece(i)
    if template == "{}":
        assert len(ids) == len(digits)
        assert [tok.id_to_piece(i) for i in ids] == list(digits)


def test_no_piece_in_the_vocabulary_holds_two_digits(tok):
    for i in range(tok.vocab_size):
        if not tok.is_byte(i):  # "<0x00>" is one byte, not two digits
            assert sum(ch in "0123456789" for ch in tok.id_to_piece(i)) <= 1, tok.id_to_piece(i)


@pytest.mark.parametrize("char", ["𪚥", "🦩", "鬱", "\U000E0041"])
def test_character_outside_the_vocabulary_becomes_bytes(tok, corpus, char):
    assert not any(char in doc for doc in corpus)
    assert tok.piece_to_id(char) == tok.unk_id  # not a piece
    ids = tok.encode(char)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert all(re.fullmatch(r"<0x[0-9A-F]{2}>", p) for p in pieces), pieces
    assert bytes(int(p[3:5], 16) for p in pieces) == char.encode("utf-8")
    _assert_round_trip(tok, f"x {char}{char} y")


# -------------------------------------------------------------------------------------- training


def test_training_is_deterministic(corpus, trained, tmp_path):
    again = train_tokenizer(corpus, tmp_path / "again.model", vocab_size=VOCAB, seed=0)
    assert again.read_bytes() == trained.read_bytes()


def test_training_sentences_cut_long_lines_and_lose_no_text():
    long_line = "lorem ipsum " * 5_000 + "ж" * 10_000
    texts = ["short\nlines\n", long_line, "a▁b", "\n".join(["x" * 3000] * 10)]
    sentences = list(training_sentences(texts))
    assert all(len(s.encode("utf-8")) <= MAX_SENTENCE_BYTES for s in sentences)
    assert not any(META in s for s in sentences)
    joined = "".join(sentences).replace("\n", "")
    assert joined == "".join(t.replace("\n", "").replace(META, "") for t in texts)


def test_long_lines_are_trained_on_not_dropped(corpus, tmp_path):
    # "ж" appears only inside one 60,000-character line, far over SentencePiece's max_sentence_length.
    long_line = " ".join(["жжж"] * 15_000)
    path = train_tokenizer([*corpus[:400], long_line], tmp_path / "long.model", vocab_size=512,
                           character_coverage=1.0)
    tok = Tokenizer(path)
    assert tok.piece_to_id("ж") != tok.unk_id
    assert not tok.is_byte(tok.encode("ж")[0])


def test_bpe_is_lossless_too(corpus, tmp_path):
    tok = Tokenizer(train_tokenizer(corpus, tmp_path / "bpe.model", vocab_size=VOCAB, model_type="bpe"))
    assert tok.vocab_size == VOCAB

    @PROPERTY
    @given(_MIXED)
    def check(text):
        _assert_round_trip(tok, text)

    check()
    assert [tok.id_to_piece(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_vocab_size_too_large_for_the_sample_is_a_palm_error(tmp_path):
    with pytest.raises(PalmError, match=r"tokenizer\.vocab_size=5000"):
        train_tokenizer(["a small sample of text.", "and another line"] * 10, tmp_path / "x.model", vocab_size=5000)


# ---------------------------------------------------------------------------------------- memory


def test_memory_estimate_and_check():
    assert estimate_training_memory(2_000_000) < estimate_training_memory(20_000_000)
    assert estimate_training_memory(10_000_000) < 2 << 30  # the default sample trains on a laptop
    check_fits_memory(2_000_000, 8 << 30)
    assert available_memory() > 0
    with pytest.raises(PalmError, match=r"tokenizer\.sample_chars=10000000000000 needs ~\d+.* GiB .* has "
                                        r"[\d.]+ GiB; lower tokenizer\.sample_chars"):
        check_fits_memory(10**13, available_memory())


# ----------------------------------------------------------------------------------------- stage


@pytest.fixture(scope="module")
def tiny_run(prefect_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-run")
    capture = {}
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        capture["rc"] = main(["run", TINY, "--stages", "data,tokenizer", "--output", str(root), "--json"])
    capture.update(root=root, out=out.getvalue(), err=err.getvalue())
    return capture


@pytest.mark.slow
def test_stage_builds_a_lossless_tokenizer_from_the_data_stage(tiny_run):
    from palm.dag.workflow import load_spec

    assert tiny_run["rc"] == 0, tiny_run["err"][-2000:]
    payload = json.loads(tiny_run["out"])
    out = Path(payload["stages"]["tokenizer"]["output"])
    manifest = json.loads((out / "manifest.json").read_text())
    spec = load_spec(TINY)

    tok = Tokenizer(out / "tokenizer.model")
    assert tok.vocab_size == manifest["vocab_size"] == spec.tokenizer.vocab_size == 1024
    assert manifest["special_ids"] == {"pad": 0, "eos": 1, "bos": 2, "unk": 3}
    assert set(manifest["chars_per_source"]) == {s.name for s in spec.data.sources}
    assert all(v > 0 for v in manifest["chars_per_source"].values())
    assert 0 < manifest["sample_chars"] == sum(manifest["chars_per_source"].values()) \
        <= spec.tokenizer.sample_chars
    data_manifest = json.loads((Path(payload["stages"]["data"]["output"]) / "manifest.json").read_text())
    train_docs = sum(s["kept_by_split"]["train"] for s in data_manifest["sources"].values())
    val_docs = sum(s["kept_by_split"]["validation"] for s in data_manifest["sources"].values())
    assert manifest["sample_docs"] == train_docs  # tiny's corpus is smaller than sample_chars: all of it
    assert manifest["eval_split"] == "validation" and manifest["eval_docs"] == val_docs > 0
    assert manifest["round_trip"] == {"docs_checked": val_docs, "all_exact": True, "mismatched": []}
    assert 2.0 < manifest["bytes_per_token"] < 6.0
    assert manifest["memory_estimate_bytes"] == estimate_training_memory(
        min(spec.tokenizer.sample_chars, sum(s["bytes_kept"] for s in data_manifest["sources"].values())))


@pytest.mark.slow
def test_stage_sample_keeps_the_mixture_proportions(tiny_run):
    from palm.tokenizer import _source_shares, sample_documents

    data_dir = next((tiny_run["root"] / "data").glob("*/manifest.json")).parent
    shares = _source_shares(json.loads((data_dir / "manifest.json").read_text()))
    sample = sample_documents(data_dir, 100_000, shares, seed=0)
    chars: dict[str, int] = {}
    for source, _, text in sample:
        chars[source] = chars.get(source, 0) + len(text)
    for name, share in shares.items():
        assert chars[name] == int(100_000 * share)  # whole documents in hash order, the next one cut
    assert sample == sample_documents(data_dir, 100_000, shares, seed=0)
    assert [d[1] for d in sample] != [d[1] for d in sample_documents(data_dir, 100_000, shares, seed=1)]


@pytest.mark.slow
def test_stage_refuses_a_sample_that_does_not_fit_in_memory(tiny_run, monkeypatch, capsys):
    assert tiny_run["rc"] == 0
    monkeypatch.setattr(tokenizer_module, "available_memory", lambda: 64 << 20)
    rc = main(["run", TINY, "--stages", "data,tokenizer", "--output", str(tiny_run["root"]),
               "--set", "tokenizer.sample_chars=1999999"])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "tokenizer.sample_chars=" in err and "lower tokenizer.sample_chars" in err and "Traceback" not in err


def test_tokenizer_imports_without_pydantic_beam_or_prefect():
    blocker = textwrap_module.dedent("""
        import importlib.abc, sys
        BLOCKED = {"pydantic", "apache_beam", "prefect", "yaml", "grain", "jax"}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in BLOCKED:
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import palm.tokenizer
        print('ok')
    """)
    out = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
