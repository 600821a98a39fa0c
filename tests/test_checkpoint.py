"""Checkpoints, exact resume, corruption, loss spikes and preemption, in process."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest

from palm.core.checkpoint import Checkpoints, params_digest
from palm.spec.config import CheckpointConfig, LossSpikeConfig, ModelConfig, RampStage, ScheduleConfig, TrainConfig
from palm.core.train import Preempted, Trainer, run_training
from tests.conftest import cpu_devices

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


@pytest.mark.slow
def test_preempted_runs_resume_bitwise_identically(tmp_path):
    # Cost: seven in-process trainings of a tiny model, each with a fresh Trainer (and so its own compiles) as a
    # restarted process would have; each stop covers another case (interval, ramp, on a checkpoint, after it).
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


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    # Cost: three in-process trainings of 12 tiny steps (the reference, the one cut short, the resume), each with
    # a fresh Trainer as a restarted process would have.
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_poisoned_batches_trigger_rollback_and_skip(tmp_path):
    # Without restart points and with no margin, a spike rolls back to the latest checkpoint before it.
    spike = LossSpikeConfig(enabled=True, threshold=1.5, window=20, skip_batches=3, restart_every=None,
                            rollback_steps=0, onset_steps=0)
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
    assert event["restart_from"] == "checkpoint" and event["start"] == 30
    # Step 28 starts at position 48 + 16 * 8 = 176; 3 batches of 8 skipped, the poisoned 192..199 among them.
    assert event["skipped_sequences"] == [176, 200]
    assert int(result.state.step) == 40 and np.isfinite(result.logs[-1].loss)
    # The event travels with the checkpoints, so a resumed run's summary still has it.
    meta = Checkpoints(tmp_path / "run", cfg.checkpoint, read_only=True).meta(40)
    assert meta["spikes"] == result.spikes


class Recording(Trainer):
    """A Trainer that records which stream positions each step call was fed (the rows just drawn)."""

    def __init__(self, *args, stream: Stream, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream, self.fed = stream, []

    def step(self, state, tokens, weights=None, global_batch=None, **kwargs):
        self.fed.append(range(self.stream.position - len(tokens), self.stream.position))
        return super().step(state, tokens, weights, global_batch, **kwargs)


@pytest.mark.slow
def test_spike_rolls_back_to_a_restart_point_before_its_start_and_skips_the_batches(tmp_path):
    """The paper's rollback, scaled down: restart points every 5 steps, back 20 steps before the spike's
    start, which is looked for up to 5 steps before its detection: at s, a point in [s - 29, s - 20]
    (the defaults' 25 / 100 / 25 give [s - 149, s - 100]; see the test below)."""
    spike = LossSpikeConfig(enabled=True, threshold=3.0, window=20, skip_batches=25, restart_every=5,
                            rollback_steps=20, onset_steps=5)
    cfg = TrainConfig(steps=50, batch_ramp=(RampStage(0, 4),), seed=3,
                      schedule=ScheduleConfig(peak_learning_rate=5e-2, constant_steps=8),
                      checkpoint=CheckpointConfig(every_steps=5, keep_last=30, async_save=True), loss_spike=spike)
    stream = Stream(poison=range(160, 164))  # step 40's batch
    trainer = Recording(MODEL, cfg, stream=stream)
    ckpts = Checkpoints(tmp_path / "run", cfg.checkpoint)
    records = []
    result = run_training(trainer, stream, checkpoints=ckpts, on_checkpoint=lambda step, r: records.append(r))
    ckpts.close()
    assert len(result.spikes) == 1
    event = result.spikes[0]
    s, start, back = event["step"], event["start"], event["rolled_back_to"]
    assert s == 40 and s - 5 <= start <= s and event["target"] == start - 20
    assert event["restart_from"] == "restart_point" and back == event["target"] // 5 * 5
    assert s - 29 <= back <= s - 20
    # Skipped: 25 batches from the restart point, which include every batch from there through the spike.
    assert event["skipped_batches"] == 25 and event["skipped_sequences"] == [4 * back, 4 * back + 100]
    first, stop = event["skipped_sequences"]
    assert first <= 160 and 164 <= stop
    # Fed to the step: steps 0..40 in order (the last one discarded), then from the restart point on the
    # sequences after the skipped ones; the skipped batches are never trained on again.
    fed = [list(r) for r in trainer.fed]
    assert fed[:41] == [list(range(4 * k, 4 * k + 4)) for k in range(41)]
    after = [p for r in fed[41:] for p in r]
    assert after == list(range(stop, stop + 4 * (50 - back)))
    assert int(result.state.step) == 50 and [log.step for log in result.logs][-(50 - back):] == list(range(back, 50))
    assert np.isfinite(result.logs[-1].loss)
    # The restart point held the very state of step `back` (a host copy, unharmed by the step's donation):
    # checkpointed before the spike and again after the rollback, with the same parameters; the whole-state
    # digests differ only by the data position they include (before the skip, then after it).
    at_back = [r for r in records if r["step"] == back]
    assert len(at_back) == 2 and at_back[0]["digest"] == at_back[1]["digest"]
    assert at_back[0]["state_digest"] != at_back[1]["state_digest"]
    assert (at_back[0]["data_position"], at_back[1]["data_position"]) == (4 * back, stop)
    # The checkpoints of the abandoned trajectory were replaced; the restart step's checkpoint resumes after
    # the skip, and every later one carries the event.
    reader = Checkpoints(tmp_path / "run", cfg.checkpoint, read_only=True)
    assert reader.steps() == list(range(0, 51, 5))
    for later in range(back, 51, 5):
        meta = reader.meta(later)
        assert meta["spikes"] == result.spikes and meta["data_position"] == stop + 4 * (later - back)
    assert reader.meta(back - 5)["spikes"] == [] and reader.meta(back - 5)["data_position"] == 4 * (back - 5)
    _, data, _ = reader.restore(back, trainer.abstract_state())
    assert data == {"position": stop}
    reader.close()


def test_default_restart_points_cover_the_papers_window():
    """With the defaults (a point every 25 steps, back 100 steps from a start up to 25 steps before the
    detection), a spike detected at any step s rolls back to a kept point in [s - 150, s - 50], while at
    most max_restart_points() copies are kept."""
    import jax.numpy as jnp

    from palm.core.train import RestartPoints, restart_target

    ls = LossSpikeConfig()
    assert (ls.restart_every, ls.rollback_steps, ls.onset_steps) == (25, 100, 25)
    points = RestartPoints(ls.restart_every, ls.rollback_steps + ls.onset_steps)
    most = 0
    for step in range(0, 401):
        if points.due(step):
            points.add(step, {"w": jnp.float32(step)}, {"position": step}, step)
        most = max(most, len(points.points))
        if step < 150:
            continue
        for start in range(step - ls.onset_steps, step + 1):
            back = points.latest_at_or_before(restart_target(start, ls.rollback_steps))
            assert back is not None and step - 150 <= back <= step - 50, (step, start, back)
            assert step - 149 <= back <= step - 100
    assert most <= ls.max_restart_points() == 7
    # A restored point is the state it copied, on the device again.
    p = points.restore(375)
    assert float(p.state["w"]) == 375.0 and p.data == {"position": 375} and p.position == 375


def test_a_spikes_start_is_the_rise_just_before_its_detection():
    from palm.core.train import spike_start

    flat = [(k, 1.0) for k in range(80, 100)]
    # Threshold 3: the loss is "rising" above (1 + 3) / 2 = 2x the median.
    assert spike_start(100, flat, 1.0, 3.0, 25) == 100
    rising = flat[:-3] + [(97, 2.5), (98, 2.2), (99, 2.9)]
    assert spike_start(100, rising, 1.0, 3.0, 25) == 97
    assert spike_start(100, rising, 1.0, 3.0, 2) == 98  # looked for at most onset_steps back
    broken = flat[:-3] + [(97, 2.5), (98, 1.5), (99, 2.9)]
    assert spike_start(100, broken, 1.0, 3.0, 25) == 99  # an unbroken run only
    gap = [(k, 2.5) for k in range(90, 97)] + [(99, 2.5)]  # steps missing (rolled back): the run stops
    assert spike_start(100, gap, 1.0, 3.0, 25) == 99
    assert spike_start(100, [], None, 3.0, 25) == 100


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_flipped_byte_anywhere_in_a_checkpoint_is_detected_and_never_resumed_from(tmp_path):
    from palm.core.checkpoint import SEAL_PREFIX, verify_checkpoints

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


@pytest.mark.slow
def test_an_unsealed_step_is_sealed_when_resumed_from(tmp_path):
    from palm.core.checkpoint import SEAL_PREFIX, check_seals

    cfg, directory = _trained(tmp_path)
    for seal in (directory / "8").glob(f"{SEAL_PREFIX}*"):
        seal.unlink()  # as if the process died between Orbax's commit and the seal
    assert check_seals(directory / "8") == (False, "")
    ckpts = Checkpoints(directory, cfg.checkpoint)
    result = run_training(Trainer(MODEL, config(steps=8)), Stream(), checkpoints=ckpts)
    ckpts.close()
    assert result.resumed_from == 8
    assert check_seals(directory / "8") == (True, "")


@pytest.mark.slow
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
    assert "4 is unusable: its meta is unreadable" in err and "good steps: 0, 8" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["checkpoint", "verify", str(tmp_path / "train"), "--json"]) == 1
    verdict = {r["step"]: r["ok"] for r in json.loads(capfd.readouterr().out)["checkpoints"]}
    assert verdict == {0: True, 4: False, 8: True}
RESTART_POINT_ON_A_MESH = """
import jax, numpy as np
from palm.core.checkpoint import state_digest
from palm.spec.config import ModelConfig, TrainConfig
from palm.core.train import Trainer, to_devices, to_host
model = ModelConfig(num_layers=2, d_model=32, num_heads=2, head_dim=16, vocab_size=64, seq_len=16,
                    dtype="float32", remat="none")
trainer = Trainer(model, TrainConfig(), {"data": 2, "fsdp": 2, "model": 2})
state = trainer.init()
host = to_host(state)
back = to_devices(host)
assert state_digest(back) == state_digest(state)
assert all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)))
# Each distinct shard is copied once: the step counter (replicated on 8 devices) once, the query kernel
# (fsdp x model, replicated over data) 4 times, each put back on its 2 devices.
assert len(host.step.shards) == 1 and len(host.step.shards[0][1]) == 8
query = host.params["layers"]["query"]
assert len(query.shards) == 4 and all(len(devices) == 2 for _, devices in query.shards)
print("ok")
"""


@pytest.mark.slow
def test_restart_points_copy_each_shard_once_and_restore_the_layout():
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS=cpu_devices(8), JAX_PLATFORMS="cpu",
               PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", RESTART_POINT_ON_A_MESH], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ------------------------------------------------ a step bound to its identity (issue 27.2)


def _borrow(directory: Path, src: int, dst: int) -> None:
    """Put step `src`'s files (seals included: they still check) in step `dst`'s directory."""
    import shutil

    shutil.rmtree(directory / str(dst))
    shutil.copytree(directory / str(src), directory / str(dst))


@pytest.mark.slow
def test_a_step_holding_another_steps_files_is_refused_and_training_resumes_from_a_good_one(tmp_path, capfd):
    import json

    from palm.cli import main
    from palm.core.lm import restore_params
    from palm.core.checkpoint import restore_params_onto
    from palm.base.errors import PalmError

    cfg, directory = _trained(tmp_path, steps=12)
    _borrow(directory, 8, 12)
    capfd.readouterr()
    # verify: it used to say "step 12: ok"
    assert main(["checkpoint", "verify", str(tmp_path / "train"), "--json"]) == 1
    rows = {r["step"]: r for r in json.loads(capfd.readouterr().out)["checkpoints"]}
    assert {s: r["ok"] for s, r in rows.items()} == {0: True, 4: True, 8: True, 12: False}
    assert "its meta records step 8" in rows[12]["error"]
    # list: not complete; inspect: one line naming the good steps (it used to show step 8's digest under 12)
    assert main(["checkpoint", "list", str(tmp_path / "train"), "--json"]) == 0
    rows = {r["step"]: r for r in json.loads(capfd.readouterr().out)["checkpoints"]}
    assert rows[8]["complete"] and not rows[12]["complete"] and "records step 8" in rows[12]["error"]
    assert main(["checkpoint", "inspect", str(directory / "12")]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{directory}/12 is unusable: its meta records step 8" in err and "good steps: 0, 4, 8" in err
    # generate and eval load parameters through these two: never the borrowed step
    for load in (lambda: restore_params(directory, MODEL, step=12),
                 lambda: restore_params_onto(directory / "12", Trainer(MODEL, cfg).abstract_state().params)):
        with pytest.raises(PalmError, match=r"12 is unusable: its meta records step 8.*good steps: 0, 4, 8"):
            load()
    # training: moved to corrupt/ with the reason, resumed from step 8, and finishes (it used to fail with
    # Orbax's StepAlreadyExistsError on every retry)
    longer = config(steps=16)
    ckpts = Checkpoints(directory, longer.checkpoint)
    result = run_training(Trainer(MODEL, longer), Stream(), checkpoints=ckpts)
    ckpts.close()
    assert result.resumed_from == 8 and [c["step"] for c in result.corrupt_checkpoints] == [12]
    assert "its meta records step 8" in (directory.parent / "corrupt" / "12.reason.txt").read_text()
    assert Checkpoints(directory, longer.checkpoint, read_only=True).steps()[-2:] == [12, 16]
    assert main(["checkpoint", "verify", str(tmp_path / "train"), "--json"]) == 0
    capfd.readouterr()


@pytest.mark.slow
def test_a_step_of_another_model_is_refused(tmp_path):
    import dataclasses
    import shutil

    from palm.core.checkpoint import model_digest, verify_checkpoints

    cfg, directory = _trained(tmp_path)
    wider = dataclasses.replace(MODEL, d_model=48)
    other = Checkpoints(tmp_path / "other", cfg.checkpoint)
    run_training(Trainer(wider, cfg), Stream(), checkpoints=other)
    other.close()
    shutil.rmtree(directory / "8")
    shutil.copytree(tmp_path / "other" / "8", directory / "8")  # same step, another run's model
    trainer = Trainer(MODEL, cfg)
    mine = model_digest(trainer.abstract_state().params)
    verdict = {r["step"]: r for r in verify_checkpoints(Checkpoints(directory, cfg.checkpoint, read_only=True),
                                                         expected_model=mine)}
    assert verdict[4]["ok"] and not verdict[8]["ok"] and "another model's" in verdict[8]["error"]
    restored = Checkpoints(directory, cfg.checkpoint).restore_latest_valid(trainer.abstract_state())
    assert restored.step == 4
    assert "another model's" in (directory.parent / "corrupt" / "8.reason.txt").read_text()


@pytest.mark.slow
def test_a_step_missing_an_array_file_is_not_listed_complete(tmp_path, capfd):
    import json

    from palm.cli import main

    _, directory = _trained(tmp_path)
    victim = max((p for p in (directory / "4" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.unlink()
    capfd.readouterr()
    assert main(["checkpoint", "list", str(tmp_path / "train"), "--json"]) == 0
    rows = {r["step"]: r for r in json.loads(capfd.readouterr().out)["checkpoints"]}
    assert rows[0]["complete"] and rows[8]["complete"] and not rows[4]["complete"]
    assert f"{victim.relative_to(directory / '4')} is missing" in rows[4]["error"]
    assert main(["checkpoint", "inspect", str(directory / "4")]) == 2
    assert "good steps: 0, 8" in capfd.readouterr().err


def test_checkpoints_without_a_recorded_identity_still_load_and_their_step_is_checked(tmp_path):
    """Checkpoints written before `model_digest` was recorded load as before; the restored state's own
    step counter must still be the directory's."""
    from palm.base.errors import PalmError
    from palm.core.lm import restore_params

    cfg = config(steps=4)
    trainer = Trainer(MODEL, cfg)
    state = trainer.init()
    ckpts = Checkpoints(tmp_path / "legacy", cfg.checkpoint)
    for step in (0, 4):  # the state after step 0 saved as 0 and (wrongly) as 4; no identity in meta
        ckpts.save(step, state, {"position": 0}, {"digest": params_digest(state.params)})
    ckpts.close()
    ckpts = Checkpoints(tmp_path / "legacy", cfg.checkpoint)
    restored, _, _ = ckpts.restore(0, trainer.abstract_state())
    assert params_digest(restored.params) == params_digest(state.params)
    assert restore_params(tmp_path / "legacy", MODEL, step=0)[1] == 0
    with pytest.raises(PalmError, match=r"legacy/4: its train state is the one after step 0, not 4"):
        ckpts.restore(4, trainer.abstract_state())
    ckpts.close()
