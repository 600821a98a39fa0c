"""The run layout: every path under a run root, named once.

    <root>/spec.json                          the resolved spec the run was started with (a root belongs to
                                              one spec name: palm.dag.runner.check_run_root)
    <root>/report.md                          the run report (and its PNGs beside it)
    <root>/.palm-run.lock                     one run at a time (palm.store.runlock)
    <root>/<node>/<key>/                      a workflow node's content-addressed output (palm.store.outputs)
        manifest.json, context.json           complete-marker and provenance
    <train>/checkpoints/<step>/               a training node's checkpoints (Orbax), <train> = <root>/<node>/<key>
    <train>/metrics.jsonl                     its per-step metrics
    <train>/tensorboard/, <train>/profile/    event files and traces
    <train>/tensorboard/evals/                evaluation curves across checkpoints
    <train>/evals/                            the evaluation ledger (claims and results, palm.store.ledger)
    <train>/evals/launched/<step>.json        results of evaluation jobs launched on workers

Every function takes and returns paths as strings (local or gs://) through palm.base.storage, so a
local `Path` argument works too.
"""

from __future__ import annotations

import os

from palm.base import storage

SPEC_RECORD = "spec.json"
REPORT = "report.md"
LOCK_FILE = ".palm-run.lock"
MANIFEST = "manifest.json"
CONTEXT = "context.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
PROFILE = "profile"
EVALS = "evals"

Path = str | os.PathLike


def spec_record(root: Path) -> str:
    """The resolved spec a run root was started with."""
    return storage.join(root, SPEC_RECORD)


def report(root: Path) -> str:
    return storage.join(root, REPORT)


def output_dir(root: Path, node: str, key: str) -> str:
    """Where a node's output with this key lives: <root>/<node>/<key>."""
    return storage.join(root, node, key)


def output_contexts(root: Path) -> str:
    """A glob of every stage output's context file under a run root (training nodes write one first)."""
    return storage.join(root, "*", "*", CONTEXT)


def run_root(output: Path) -> str:
    """The run root a stage output lives under."""
    return storage.parent(storage.parent(output))


def node_of(output: Path) -> str:
    """The workflow node a stage output belongs to."""
    return storage.name(storage.parent(output))


def checkpoints_dir(train_dir: Path) -> str:
    return storage.join(train_dir, CHECKPOINTS)


def checkpoint_dir(train_dir: Path, step: int) -> str:
    """One checkpoint step: <train>/checkpoints/<step>."""
    return storage.join(train_dir, CHECKPOINTS, str(int(step)))


def train_dir_of(checkpoint: Path) -> str:
    """The training output a checkpoint step directory belongs to."""
    return storage.parent(storage.parent(checkpoint))


def metrics_file(train_dir: Path) -> str:
    return storage.join(train_dir, METRICS)


def tensorboard_dir(output: Path) -> str:
    return storage.join(output, TENSORBOARD)


def profile_dir(output: Path) -> str:
    return storage.join(output, PROFILE)


def eval_events_dir(train_dir: Path) -> str:
    """Event files of the evaluations across a training node's checkpoints (one curve per metric)."""
    return storage.join(train_dir, TENSORBOARD, EVALS)


def ledger_dir(train_dir: Path) -> str:
    """The evaluation ledger of a training node's checkpoints."""
    return storage.join(train_dir, EVALS)


def launched_eval_result(train_dir: Path, step: int) -> str:
    """What an evaluation job launched on workers writes for one checkpoint step."""
    return storage.join(train_dir, EVALS, "launched", f"{int(step)}.json")
