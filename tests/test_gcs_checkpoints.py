"""`gs://` checkpoints against a GCS emulator on loopback: preemption, exact resume, corruption.

Orbax writes through TensorStore (the arrays, OCDBT) and gcsfs (everything else); both, and the gcsfs
client these tests inspect the bucket with, reach the emulator through palm.base.storage.gcs_settings.
"""

from __future__ import annotations

import dataclasses

import pytest

from palm.core.checkpoint import Checkpoints, params_digest
from palm.core.train import Preempted, RunResult, Trainer, run_training
from tests.test_checkpoint import MODEL, StopAt, Stream, config

CFG = config(steps=12)  # a checkpoint every 4 steps
DIRECTORY = "gs://bucket/run/checkpoints"


def bucket_fs():
    """A fresh gcsfs client without cached listings (TensorStore writes behind gcsfs's back)."""
    import gcsfs.core

    return gcsfs.core.GCSFileSystem(token="anon", skip_instance_cache=True, use_listings_cache=False)


def steps_on_bucket(fs, prefix: str) -> list[int]:
    return sorted(int(p.rsplit("/", 1)[1]) for p in fs.ls(prefix) if p.rsplit("/", 1)[1].isdigit())


@dataclasses.dataclass
class GcsRun:
    trainer: Trainer
    expected_digest: str  # the same run, uninterrupted, with local checkpoints
    preempted_at: int
    listed_after_preemption: list[int]
    committed_after_preemption: list[int]
    arrays_after_preemption: list[str]
    result: RunResult


@pytest.fixture(scope="module")
def gcs_run(gcs_emulator, tmp_path_factory) -> GcsRun:
    """One run preempted at step 10 with its checkpoints on gs://, then resumed from there to step 12."""
    trainer = Trainer(MODEL, CFG)  # one trainer (one compilation) for every run here
    local = Checkpoints(tmp_path_factory.mktemp("local") / "checkpoints", CFG.checkpoint)
    expected = params_digest(run_training(trainer, Stream(), checkpoints=local).state.params)
    local.close()

    stopper = StopAt(10)
    ckpts = Checkpoints(DIRECTORY, CFG.checkpoint)
    with pytest.raises(Preempted) as preempted:
        run_training(trainer, Stream(), checkpoints=ckpts, on_step=stopper, stop=stopper.event)
    ckpts.close()
    fs = bucket_fs()
    listed = steps_on_bucket(fs, "bucket/run/checkpoints")
    # On GCS Orbax commits a step by writing a marker object (there is no atomic rename).
    committed = [s for s in listed if fs.exists(f"bucket/run/checkpoints/{s}/commit_success.txt")]
    arrays = fs.find("bucket/run/checkpoints/10/state")

    ckpts = Checkpoints(DIRECTORY, CFG.checkpoint)
    result = run_training(trainer, Stream(), checkpoints=ckpts)
    ckpts.close()
    return GcsRun(trainer, expected, preempted.value.step, listed, committed, arrays, result)


@pytest.mark.slow
def test_preempted_gs_run_resumes_to_the_uninterrupted_digest(gcs_run):
    assert gcs_run.preempted_at == 10
    assert gcs_run.listed_after_preemption == [0, 4, 8, 10]
    assert gcs_run.committed_after_preemption == [0, 4, 8, 10]
    assert any("/ocdbt.process_0/d/" in p for p in gcs_run.arrays_after_preemption)  # TensorStore's OCDBT data
    assert gcs_run.result.resumed_from == 10 and gcs_run.result.corrupt_checkpoints == []
    assert params_digest(gcs_run.result.state.params) == gcs_run.expected_digest
    assert int(gcs_run.result.state.step) == 12


@pytest.mark.slow
def test_restore_latest_valid_skips_a_truncated_object_on_gs(gcs_run):
    fs = bucket_fs()
    assert steps_on_bucket(fs, "bucket/run/checkpoints")[-1] == 12
    # Truncate the biggest object of the newest checkpoint, as an interrupted upload would leave it.
    sizes = {path: info["size"] for path, info in fs.find("bucket/run/checkpoints/12", detail=True).items()}
    victim = max(sizes, key=sizes.get)
    fs.pipe_file(victim, fs.cat_file(victim)[: sizes[victim] // 3])
    assert bucket_fs().size(victim) == sizes[victim] // 3

    ckpts = Checkpoints(DIRECTORY, CFG.checkpoint)
    restored = ckpts.restore_latest_valid(gcs_run.trainer.abstract_state())
    ckpts.close()
    assert restored is not None and restored.step == 10
    assert [c["step"] for c in ckpts.corrupt] == [12]
    assert params_digest(restored.state.params) == restored.meta["digest"]
    assert restored.data == {"position": 40}  # 10 steps of 4 sequences

    fs = bucket_fs()
    assert steps_on_bucket(fs, "bucket/run/checkpoints") == [0, 4, 8, 10]
    assert fs.find("bucket/run/corrupt/12")  # moved aside on the bucket, kept for inspection
    assert fs.cat_file("bucket/run/corrupt/12.reason.txt").decode().strip()
    assert Checkpoints(DIRECTORY, CFG.checkpoint, read_only=True).steps() == [0, 4, 8, 10]
