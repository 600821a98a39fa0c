"""`palm bench train --reference`: the reference runs first, in its own process, and its result is read
strictly (a row without tokens/s is an error, not a missing ratio)."""

from __future__ import annotations

import json

import pytest

from palm.cli import main
from palm.base.errors import PalmError
from tests.conftest import SPECS

FAKE = """import json, os, sys
print(json.dumps({"impl": "xla", "remat": "dots", %s}))
"""


@pytest.mark.slow
def test_reference_ratio_is_reported(tmp_path, capsys):
    ref = tmp_path / "reference_step.py"
    ref.write_text(FAKE % '"tok_s": 1000.0, "mfu": 0.5')
    assert main(["bench", "train", str(SPECS / "tiny.yaml"), "--steps", "2", "--warmup", "0",
                 "--reference", str(ref), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"]["tok_s"] == 1000.0
    assert result["speedup_vs_reference"] == pytest.approx(result["tokens_per_second"] / 1000.0)
    assert main(["bench", "train", str(SPECS / "tiny.yaml"), "--steps", "2", "--warmup", "0",
                 "--reference", str(ref)]) == 0
    assert "reference: 1,000 tokens/s, MFU 50.0%; speedup" in capsys.readouterr().out


def test_a_reference_without_tokens_per_second_is_an_error(tmp_path):
    from palm.app.bench.train import run_reference
    from palm.dag.workflow import load_spec

    ref = tmp_path / "reference_step.py"
    ref.write_text(FAKE % '"error": "out of memory"')
    with pytest.raises(PalmError, match=r"reference run reported no tokens/s: .*out of memory"):
        run_reference(str(ref), load_spec(SPECS / "tiny.yaml"))


@pytest.mark.slow
def test_profile_traces_the_steps_and_names_the_busiest_operations(tmp_path, capsys):
    profile = tmp_path / "profile"
    assert main(["bench", "train", str(SPECS / "tiny.yaml"), "--steps", "1", "--warmup", "0",
                 "--profile", str(profile), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["profile"]
    assert list(profile.rglob("perfetto_trace.json.gz")) and list(profile.rglob("*.xplane.pb"))
    # On CPU the trace may or may not carry a "/device:CPU" line; either way the summary names its scope.
    assert result["steps"] == 3 and result["scope"] in ("device", "host (no device in the trace)",
                                                        "host (the device line is empty)")
    top = result["top"]
    assert top and all(row["seconds_per_step"] > 0 and 0 < row["share"] <= 1 for row in top)
    assert [row["seconds_per_step"] for row in top] == sorted((row["seconds_per_step"] for row in top), reverse=True)
    for line, busy in result["busy_seconds_per_step"].items():  # no line's operations add up past its busy time
        assert sum(r["seconds_per_step"] for r in top if r["line"] == line) <= busy * (1 + 1e-9)


def test_summarize_trace_sums_device_lines_apart(tmp_path):
    import gzip

    from palm.app.bench.train import summarize_trace

    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
              {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 1, "tid": 7, "name": "gemm", "dur": 3000.0},
              {"ph": "X", "pid": 1, "tid": 7, "name": "gemm", "dur": 3000.0},
              {"ph": "X", "pid": 1, "tid": 7, "name": "fusion", "dur": 2000.0},
              {"ph": "X", "pid": 1, "tid": 8, "name": "dot", "dur": 6000.0},
              {"ph": "X", "pid": 2, "tid": 1, "name": "host work", "dur": 1e6}]
    (tmp_path / "a").mkdir()
    with gzip.open(tmp_path / "a" / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    r = summarize_trace(tmp_path, steps=2)
    assert r["scope"] == "device"
    assert r["busy_seconds_per_step"] == {"/device:GPU:0 Stream #7": 0.004, "/device:GPU:0 XLA Ops": 0.003}
    gemm = next(row for row in r["top"] if row["name"] == "gemm")
    assert gemm == {"line": "/device:GPU:0 Stream #7", "name": "gemm", "seconds_per_step": 0.003,
                    "calls_per_step": 1.0, "share": 0.75}
    assert all(row["name"] != "host work" for row in r["top"])
    with pytest.raises(PalmError, match="no perfetto_trace.json.gz"):
        summarize_trace(tmp_path / "a" / "missing")
