"""The palm commands infra/README.md gives an operator, run here: every plan and every dry run in it exits
0 (what the launch dry runs print is pinned by tests/golden and tests/test_launch.py). The gcloud and
kubectl commands around them create cloud resources and are not run."""

from __future__ import annotations

import re
import shlex

import pytest

from palm.cli import main
from tests.conftest import ROOT

README = ROOT / "infra" / "README.md"
PLACEHOLDERS = {"<key>": "0123456789abcdef", "<step>": "255000"}


def readme_variables() -> dict[str, str]:
    """The shell variables infra/README.md sets on a line of their own, e.g. GKE="--set …" (used as $GKE)."""
    return dict(re.findall(r'^(\w+)="([^"]*)"$', README.read_text(), re.M))


def doc_commands() -> list[str]:
    text = README.read_text()
    variables = readme_variables()
    commands = []
    for line in text.splitlines():
        line = line.strip().split(" # ", 1)[0].strip()
        if not line.startswith("uv run palm ") or not ("--dry-run" in line or line.startswith(("uv run palm plan ",
                                                                                             "uv run palm data options "))):
            continue
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        for placeholder, value in PLACEHOLDERS.items():
            line = line.replace(placeholder, value)
        commands.append(line)
    return commands


def test_the_readme_has_its_dry_runs():
    commands = doc_commands()
    assert len(commands) >= 8, commands
    assert any("launch" in c and "infra.launcher.kind=gke" in c for c in commands)
    assert any("--eval-checkpoint" in c for c in commands) and any("palm image" in c for c in commands)


@pytest.mark.parametrize("command", doc_commands())
def test_every_plan_and_dry_run_in_infra_readme_succeeds(command, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = shlex.split(command)[3:]  # after `uv run palm`
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out and "Traceback" not in err
