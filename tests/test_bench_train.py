"""`palm bench train --reference`: the reference runs first, in its own process, and its result is read
strictly (a row without tokens/s is an error, not a missing ratio)."""

from __future__ import annotations

import json

import pytest

from palm.cli import main
from palm.errors import PalmError
from tests.conftest import SPECS

FAKE = """import json, os, sys
print(json.dumps({"impl": "xla", "remat": "dots", %s}))
"""


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
    from palm.bench import run_reference
    from palm.spec import load_spec

    ref = tmp_path / "reference_step.py"
    ref.write_text(FAKE % '"error": "out of memory"')
    with pytest.raises(PalmError, match=r"reference run reported no tokens/s: .*out of memory"):
        run_reference(str(ref), load_spec(SPECS / "tiny.yaml"))
