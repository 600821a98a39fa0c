"""Stage tasks under a real (ephemeral) Prefect server: retries from the spec, artifacts."""

from __future__ import annotations

import asyncio

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from palm.spec import load_spec
from tasks.common import with_retry_policy
from tasks.data import data_task
from tests.conftest import SPECS


async def _artifacts(key: str):
    async with get_client() as client:
        return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_data_task_publishes_the_accounting_table(prefect_server, tmp_path):
    spec = load_spec(SPECS / "tiny.yaml")

    @flow(name="data-only")
    def data_only():
        return data_task(spec, str(tmp_path))

    out = data_only()
    assert out.manifest["complete"] is True
    table = asyncio.run(_artifacts("tiny-data-accounting"))
    assert table and table[0].type == "table"
    rows = table[0].data if isinstance(table[0].data, list) else __import__("json").loads(table[0].data)
    assert {r["source"] for r in rows} == {"stdlib-docs", "stdlib-code", "planted"}
    for row in rows:
        src = out.manifest["sources"][row["source"]]
        assert row["docs_in"] == src["docs_in"] and row["docs_kept"] == src["docs_kept"]
    assert asyncio.run(_artifacts("tiny-data-summary"))


def test_retry_policy_comes_from_the_spec():
    spec = load_spec(SPECS / "tiny.yaml", ["retries.data.retries=3", "retries.data.delay_seconds=2",
                                            "retries.data.backoff=3"])
    task = with_retry_policy(data_task, spec, "data")
    assert task.retries == 3
    assert task.retry_delay_seconds == [2.0, 6.0, 18.0]
