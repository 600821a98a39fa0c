"""Shared fixtures. Tests run against the real data in ../shared/data, read in place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Tests never touch the user's ~/.prefect: one private Prefect home for the whole session.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="palm-test-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
SHARED_DATA = Path(os.environ.get("PALM_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a loud failure (never a skip) when it is missing."""
    if not (SHARED_DATA / "tinyshakespeare" / "input.txt").is_file():
        pytest.fail(f"the shared test data is missing: expected {SHARED_DATA} (set PALM_SHARED_DATA to its "
                    "location); tests that read real corpora cannot run without it")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_server():
    """One ephemeral Prefect server (SQLite) shared by the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
