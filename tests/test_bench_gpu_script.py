"""bench/gpu.sh, the one prepared device run (issue 31), checked on CPU without running a model: every palm
command it would run parses with palm's own CLI, and every spec it names loads with its --set overrides, so
the device call cannot fail on a typo. The whole script on CPU (tiny spec, the wheels installed into a
Python without pydantic as on the device) is `bash bench/gpu-prepare.sh --check`, about 70 s on 2 cores:
too slow for the suite, documented in docs/benchmarks.md."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from palm.cli import build_parser
from palm.dag.workflow import load_spec
from tests.conftest import ROOT

RECORDER = """#!/usr/bin/env bash
printf '%s\\n' "$(printf '%q ' "$@")" >> "$CALLS"
"""


def _recorded_calls(tmp_path, **env) -> list[list[str]]:
    """The interpreter calls bench/gpu.sh makes, with a recorder standing in for the interpreter."""
    recorder = tmp_path / "py"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    calls = tmp_path / "calls.txt"
    # python3 is this interpreter (it has pydantic, so gpu.sh installs no wheels here)
    path = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, check=True, timeout=60,
                   env={**os.environ, "PATH": path, "OUT": str(out), "PY": str(recorder), "CALLS": str(calls), **env})
    assert (out / "log.txt").read_text().rstrip().endswith("done")
    return [shlex.split(line) for line in calls.read_text().splitlines()]


@pytest.mark.parametrize("spec", [None, "specs/tiny.yaml"])
def test_every_command_of_the_device_script_parses(tmp_path, spec):
    calls = _recorded_calls(tmp_path, **({"SPEC": spec, "STEPS": "2"} if spec else {}))
    commands = [call[2:] for call in calls if call[:2] == ["-m", "palm.cli"]]
    assert [c[:2] for c in commands] == [["bench", "train"], ["bench", "decode"], ["bench", "train"],
                                         ["bench", "train"]], calls
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.json, argv
        assert load_spec(ROOT / args.spec, args.overrides), argv  # every --set key exists and validates
    assert commands[0][commands[0].index("--profile") + 1]
    if spec is None:
        assert commands[0][2] == "specs/palm-1b-gpu.yaml"


def test_the_prepare_script_resolves_the_wheels_from_the_lock():
    """The packages bench/gpu-prepare.sh downloads: pydantic's and PyYAML's trees in uv.lock for CPython 3.12
    (its first step, which needs no network)."""
    script = (ROOT / "bench" / "gpu-prepare.sh").read_text()
    start = script.index("packages=()")
    resolve = script[start:script.index('echo "gpu-prepare: ${pins[*]}"')]
    got = subprocess.run(["bash", "-c", f"set -euo pipefail; ROOTS='pydantic pyyaml'; {resolve}\n"
                          "printf '%s\\n' \"${pins[@]}\""], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if got.returncode and "uv" in got.stderr and "not found" in got.stderr:
        pytest.skip("uv is not on PATH")
    assert got.returncode == 0, got.stderr
    names = {line.split("==")[0] for line in got.stdout.split()}
    assert {"pydantic", "pydantic-core", "annotated-types", "typing-extensions", "typing-inspection",
            "pyyaml"} <= names, got.stdout
    assert not names & {"jax", "jaxlib", "numpy", "flax", "prefect", "apache-beam"}, got.stdout
