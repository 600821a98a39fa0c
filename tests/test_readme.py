"""README.md's commands give what README.md shows: `palm plan`'s output block, what each launch dry run's
comment says it prints, and every figure of a run that no test reproduces is stated as measured, with the
date and the command (infra/README.md's commands: tests/test_infra_docs.py; section 5: test_deployment.py)."""

from __future__ import annotations

import re
import shlex

import pytest

from palm.cli import main
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_the_plan_block_is_what_palm_plan_prints(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    block = re.search(r"uv run palm plan specs/palm-540b.yaml\n```\n\n```\n(spec .*?)```", README, re.S)
    assert block, "README section 1 shows `palm plan specs/palm-540b.yaml` and its output"
    assert main(["plan", "specs/palm-540b.yaml"]) == 0
    assert capsys.readouterr().out == block.group(1)


def commented_dry_runs() -> list[tuple[str, str]]:
    found = []
    for line in README.splitlines():
        if line.startswith("uv run palm ") and "--dry-run" in line and " # " in line:
            command, comment = line.split(" # ", 1)
            found.append((command.strip(), comment.strip()))
    return found


def test_the_readme_has_its_commented_dry_runs():
    comments = [c for _, c in commented_dry_runs()]
    assert any("GKE JobSet" in c for c in comments) and any("gcloud" in c for c in comments)


@pytest.mark.parametrize("command,comment", commented_dry_runs())
def test_each_dry_run_prints_what_its_comment_says(command, comment, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(shlex.split(command)[3:]) == 0
    out = capsys.readouterr().out
    if "GKE JobSet" in comment:
        assert "kind: JobSet" in out and "gcloud compute tpus" not in out
    if "gcloud" in comment:
        assert "gcloud compute tpus queued-resources create" in out and "kind: JobSet" not in out
    if "worker image" in comment:
        assert "docker build" in out


def test_figures_no_test_reproduces_say_where_they_were_measured():
    """The declared graphs' figures take minutes of training on full-size steps (the suite runs them with
    fewer steps), so the README states them as measured: date and command beside each."""
    for spec, figure in (("tiny-scaling", "5.657 · N^-0.0254"), ("tiny-coder", "4.086 → 3.892")):
        row = next(line for line in README.splitlines() if line.startswith(f"| `specs/{spec}.yaml`"))
        assert figure in row and f"measured 2026-12-06, `uv run palm run specs/{spec}.yaml`" in row, row
