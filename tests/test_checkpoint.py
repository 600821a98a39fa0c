"""Checkpoints, exact resume, corruption, loss spikes and preemption, in process."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest

from palm.checkpoint import Checkpoints, params_digest
from palm.config import CheckpointConfig, LossSpikeConfig, ModelConfig, RampStage, ScheduleConfig, TrainConfig
from palm.train import Preempted, Trainer, run_training

MODEL = ModelConfig(num_layers=2, d_model=32, num_heads=2, head_dim=16, vocab_size=64, seq_len=16,
                    dtype="float32", remat="none")


def config(steps=24, every=4, spike=LossSpikeConfig(enabled=False), keep_last=10) -> TrainConfig:
    return TrainConfig(steps=steps, batch_ramp=(RampStage(0, 4), RampStage(12, 8)), seed=3,
                       schedule=ScheduleConfig(peak_learning_rate=5e-2, constant_steps=8),
                       checkpoint=CheckpointConfig(every_steps=every, keep_last=keep_last, async_save=True),
                       loss_spike=spike)


class Stream:
    """A deterministic, learnable sequence stream with a saveable position (like the Grain iterator)."""

    def __init__(self, poison: range = range(0)):
        self.position, self.poison = 0, poison
        table = np.random.default_rng(0).integers(0, MODEL.vocab_size, MODEL.vocab_size)
        self.table = table

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng(self.position)
        if self.position in self.poison:  # garbage: uniformly random tokens, unlike anything learned
            seq = rng.integers(0, MODEL.vocab_size, MODEL.seq_len)
        else:
            seq = np.empty(MODEL.seq_len, np.int64)
            seq[0] = rng.integers(MODEL.vocab_size)
            for i in range(1, MODEL.seq_len):
                seq[i] = self.table[seq[i - 1]]
        self.position += 1
        return seq.astype(np.int32)

    def state(self):
        return {"position": self.position}

    def restore(self, state):
        self.position = state["position"]


def uninterrupted(tmp_path: Path, cfg: TrainConfig) -> str:
    ckpts = Checkpoints(tmp_path / "straight", cfg.checkpoint)
    result = run_training(Trainer(MODEL, cfg), Stream(), checkpoints=ckpts)
    ckpts.close()
    return params_digest(result.state.params)


class StopAt:
    """Set the stop flag once training reaches a given step (stands in for SIGTERM)."""

    def __init__(self, step):
        self.step, self.event = step, threading.Event()

    def __call__(self, log, state):
        if log.step + 1 >= self.step:
            self.event.set()


def test_preempted_runs_resume_bitwise_identically(tmp_path):
    cfg = config()
    expected = uninterrupted(tmp_path, cfg)
    directory = tmp_path / "interrupted"
    # Inside a checkpoint interval, at the ramp, on a scheduled checkpoint (nothing new to save), after it.
    for stop_at in (5, 11, 16, 19):
        stopper = StopAt(stop_at)
        ckpts = Checkpoints(directory, cfg.checkpoint)
        with pytest.raises(Preempted) as e:
            run_training(Trainer(MODEL, cfg), Stream(), checkpoints=ckpts, on_step=stopper, stop=stopper.event)
        ckpts.close()
        assert e.value.step == stop_at and e.value.exit_code == 75
        assert stop_at in Checkpoints(directory, cfg.checkpoint, read_only=True).steps()  # saved at that step
    already = threading.Event()
    already.set()  # stopped again as soon as it resumed: step 19 is saved already
    ckpts = Checkpoints(directory, cfg.checkpoint)
    with pytest.raises(Preempted) as e:
        run_training(Trainer(MODEL, cfg), Stream(), checkpoints=ckpts, stop=already)
    ckpts.close()
    assert e.value.step == 19
    ckpts = Checkpoints(directory, cfg.checkpoint)
    result = run_training(Trainer(MODEL, cfg), Stream(), checkpoints=ckpts)
    ckpts.close()
    assert result.resumed_from == 19
    assert params_digest(result.state.params) == expected


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    cfg = config(steps=12)
    expected = uninterrupted(tmp_path, cfg)
    directory = tmp_path / "run"
    stopper = StopAt(10)
    ckpts = Checkpoints(directory, cfg.checkpoint)
    with pytest.raises(Preempted):
        run_training(Trainer(MODEL, cfg), Stream(), checkpoints=ckpts, on_step=stopper, stop=stopper.event)
    ckpts.close()
    # Truncate the biggest file of the newest checkpoint (step 10), as a crash mid-copy would.
    victim = max((p for p in (directory / "10").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    ckpts = Checkpoints(directory, cfg.checkpoint)
    result = run_training(Trainer(MODEL, cfg), Stream(), checkpoints=ckpts)
    ckpts.close()
    assert result.resumed_from == 8
    assert [c["step"] for c in result.corrupt_checkpoints] == [10]
    assert (directory.parent / "corrupt" / "10").is_dir()
    assert params_digest(result.state.params) == expected  # determinism makes the redo exact


def test_missing_files_are_detected_too(tmp_path):
    cfg = config(steps=8)
    ckpts = Checkpoints(tmp_path / "run", cfg.checkpoint)
    trainer = Trainer(MODEL, cfg)
    run_training(trainer, Stream(), checkpoints=ckpts)
    ckpts.close()
    for p in sorted((tmp_path / "run" / "8" / "state").rglob("*")):
        if p.is_file() and p.name != "_METADATA":
            p.unlink()
    restored = Checkpoints(tmp_path / "run", cfg.checkpoint).restore_latest_valid(trainer.abstract_state())
    assert restored is not None and restored.step == 4


def test_poisoned_batches_trigger_rollback_and_skip(tmp_path):
    spike = LossSpikeConfig(enabled=True, threshold=1.5, window=20, skip_batches=3)
    cfg = config(steps=40, every=4, spike=spike)
    # Steps 0-11 take 4 sequences each (48), then 8 each: step 30 reads positions 192..199.
    stream = Stream(poison=range(192, 200))
    ckpts = Checkpoints(tmp_path / "run", cfg.checkpoint)
    result = run_training(Trainer(MODEL, cfg), stream, checkpoints=ckpts)
    ckpts.close()
    assert len(result.spikes) == 1
    event = result.spikes[0]
    assert event["step"] == 30 and event["rolled_back_to"] == 28
    assert event["skipped_batches"] == 3 and event["loss"] > 1.5 * event["median"]
    assert int(result.state.step) == 40 and np.isfinite(result.logs[-1].loss)
    # The event travels with the checkpoints, so a resumed run's summary still has it.
    meta = Checkpoints(tmp_path / "run", cfg.checkpoint, read_only=True).meta(40)
    assert meta["spikes"] == result.spikes


def test_checkpoint_meta_and_retention(tmp_path):
    cfg = TrainConfig(**{**config(steps=20, every=2).__dict__,
                         "checkpoint": CheckpointConfig(every_steps=2, keep_last=2, keep_every=8)})
    ckpts = Checkpoints(tmp_path / "run", cfg.checkpoint)
    seen = []
    result = run_training(Trainer(MODEL, cfg), Stream(), checkpoints=ckpts, meta={"spec_digest": "abc"},
                          on_checkpoint=lambda step, record: seen.append(step))
    ckpts.close()
    kept = Checkpoints(tmp_path / "run", cfg.checkpoint, read_only=True)
    assert kept.steps() == [0, 8, 16, 18, 20]  # the last two, plus every 8th permanently (and step 0)
    assert seen == list(range(0, 21, 2))
    meta = kept.meta(20)
    assert meta["spec_digest"] == "abc" and meta["step"] == 20 and meta["seed"] == 3
    assert meta["digest"] == params_digest(result.state.params)
    assert meta["metrics"]["loss"] == pytest.approx(result.logs[-1].loss)


def test_palm_checkpoint_list_inspect_verify(tmp_path, capsys):
    import json

    from palm.cli import main

    cfg = config(steps=8)
    ckpts = Checkpoints(tmp_path / "train" / "checkpoints", cfg.checkpoint)
    result = run_training(Trainer(MODEL, cfg), Stream(), checkpoints=ckpts)
    ckpts.close()
    digest = params_digest(result.state.params)

    assert main(["checkpoint", "list", str(tmp_path / "train"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [r["step"] for r in listed] == [0, 4, 8]
    assert listed[-1]["digest"] == digest and listed[-1]["bytes"] > 0
    assert listed[-1]["loss"] == pytest.approx(result.logs[-1].loss)

    assert main(["checkpoint", "inspect", str(tmp_path / "train" / "checkpoints"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 8 and info["digest"] == digest
    assert info["num_params"] == Trainer(MODEL, cfg).num_params

    assert main(["checkpoint", "verify", str(tmp_path / "train"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True

    victim = max((p for p in (tmp_path / "train" / "checkpoints" / "4").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(b"\0" * victim.stat().st_size)  # same size, wrong bytes: only the digest can tell
    assert main(["checkpoint", "verify", str(tmp_path / "train"), "--json"]) == 1
    verdict = {r["step"]: r["ok"] for r in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert verdict == {0: True, 4: False, 8: True}

    assert main(["checkpoint", "list", str(tmp_path / "nothing")]) == 2
    assert "no checkpoints" in capsys.readouterr().err


def _trained(tmp_path: Path, steps: int = 8) -> tuple[TrainConfig, Path]:
    cfg = config(steps=steps)
    ckpts = Checkpoints(tmp_path / "train" / "checkpoints", cfg.checkpoint)
    run_training(Trainer(MODEL, cfg), Stream(), checkpoints=ckpts)
    ckpts.close()
    return cfg, tmp_path / "train" / "checkpoints"


def test_a_flipped_byte_anywhere_in_a_checkpoint_is_detected_and_never_resumed_from(tmp_path):
    from palm.checkpoint import SEAL_PREFIX, verify_checkpoints

    cfg, directory = _trained(tmp_path)
    step_dir = directory / "8"
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    assert any(p.name.startswith(SEAL_PREFIX) for p in files)  # sealed once committed
    kinds = {p.relative_to(step_dir).parts[0] for p in files}
    assert {"state", "data", "meta"} <= kinds
    reader = Checkpoints(directory, cfg.checkpoint, read_only=True)
    assert [r["ok"] and r["sealed"] for r in verify_checkpoints(reader)] == [True, True, True]
    missed = []
    for path in files:
        original = path.read_bytes()
        for pos in sorted({0, len(original) // 2, len(original) - 1}):
            damaged = bytearray(original)
            damaged[pos] ^= 0x10
            path.write_bytes(bytes(damaged))
            if verify_checkpoints(reader, 8)[0]["ok"]:
                missed.append(f"{path.relative_to(step_dir)}@{pos}")
        path.write_bytes(original)
    assert missed == []
    # A file added after sealing is refused too.
    (step_dir / "state" / "extra").write_bytes(b"x")
    assert "not listed in any seal" in verify_checkpoints(reader, 8)[0]["error"]
    (step_dir / "state" / "extra").unlink()
    assert verify_checkpoints(reader, 8)[0]["ok"]

    # The data iterator's state is in the whole-state digest: with the seals gone, a changed position
    # (valid JSON, same size) is still refused, and training resumes from step 4 instead.
    for seal in step_dir.glob(f"{SEAL_PREFIX}*"):
        seal.unlink()
    data_file = next(p for p in (step_dir / "data").rglob("*") if p.is_file() and b"position" in p.read_bytes())
    text = data_file.read_bytes()
    changed = re.sub(rb'("position": ?)(\d+)', lambda m: m.group(1) + str(int(m.group(2)) + 1).encode(), text)
    assert changed != text and len(changed) == len(text)
    data_file.write_bytes(changed)
    row = verify_checkpoints(reader, 8)[0]
    assert not row["ok"] and not row["sealed"] and "train state digest" in row["error"], row
    reader.close()
    ckpts = Checkpoints(directory, cfg.checkpoint)
    result = run_training(Trainer(MODEL, config(steps=10)), Stream(), checkpoints=ckpts)
    ckpts.close()
    assert result.resumed_from == 4 and [c["step"] for c in result.corrupt_checkpoints] == [8]


def test_an_unsealed_step_is_sealed_when_resumed_from(tmp_path):
    from palm.checkpoint import SEAL_PREFIX, check_seals

    cfg, directory = _trained(tmp_path)
    for seal in (directory / "8").glob(f"{SEAL_PREFIX}*"):
        seal.unlink()  # as if the process died between Orbax's commit and the seal
    assert check_seals(directory / "8") == (False, "")
    ckpts = Checkpoints(directory, cfg.checkpoint)
    result = run_training(Trainer(MODEL, config(steps=8)), Stream(), checkpoints=ckpts)
    ckpts.close()
    assert result.resumed_from == 8
    assert check_seals(directory / "8") == (True, "")


def test_checkpoint_commands_take_the_step_path_palm_run_prints(tmp_path, capfd):
    import json

    from palm.cli import main

    cfg, directory = _trained(tmp_path)
    capfd.readouterr()
    assert main(["checkpoint", "inspect", str(directory / "4"), "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["step"] == 4
    assert "read only" not in err and "WARNING" not in err, err  # Orbax's absl chatter stays off the console
    assert main(["checkpoint", "verify", str(directory / "4"), "--json"]) == 0
    assert [r["step"] for r in json.loads(capfd.readouterr().out)["checkpoints"]] == [4]

    # A step missing a file: listed as incomplete (no traceback); inspecting it is one clear line.
    (directory / "4" / "meta" / "metadata").unlink()
    assert main(["checkpoint", "list", str(tmp_path / "train"), "--json"]) == 0
    rows = {r["step"]: r for r in json.loads(capfd.readouterr().out)["checkpoints"]}
    assert rows[8]["complete"] and not rows[4]["complete"] and "incomplete" in rows[4]["error"]
    assert main(["checkpoint", "inspect", str(directory / "4")]) == 2
    err = capfd.readouterr().err
    assert "is incomplete or damaged" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["checkpoint", "verify", str(tmp_path / "train"), "--json"]) == 1
    verdict = {r["step"]: r["ok"] for r in json.loads(capfd.readouterr().out)["checkpoints"]}
    assert verdict == {0: True, 4: False, 8: True}
