"""Running a spec's workflow graph in this process: each node's content-addressed output, reused when complete.

The stage types are palm.dag.table's rows; the graph is palm.dag.workflow's; a node's output directory,
key and manifest are palm.store.outputs'. `Hooks` is how the caller (the CLI, a Prefect task, a launched
worker) hears from the stages and stops them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from palm.base import storage
from palm.base.errors import PalmError
from palm.dag.table import STAGES, load_builder
from palm.dag.workflow import resolve_workflow
from palm.store import layout
from palm.store.outputs import StageOutput, output_path, read_manifest, run_stage, stage_key


@dataclasses.dataclass
class Hooks:
    """What the caller (the CLI or a Prefect task) wants to hear from the stages, and how to stop them.

    on_stage_start(node name) and on_stage(output) bracket each node; on_step(log, state) and
    on_checkpoint(path, step, record) come from a training node, in the thread that runs it; `stop` (a
    threading.Event) asks training to checkpoint at the current step and raise `palm.base.errors.Preempted`.
    """

    on_stage_start: Callable[[str], None] | None = None
    on_stage: Callable[[StageOutput], None] | None = None
    on_step: Callable[..., None] | None = None
    on_checkpoint: Callable[..., None] | None = None
    stop: Any = None

    def __add__(self, other: "Hooks") -> "Hooks":
        """Both sets of callbacks, self's first; the first stop event given."""
        def both(a: Callable[..., None] | None, b: Callable[..., None] | None) -> Callable[..., None] | None:
            if a is None or b is None:
                return a or b
            return lambda *args: (a(*args), b(*args))[-1]

        return Hooks(**{f.name: both(getattr(self, f.name), getattr(other, f.name))
                        for f in dataclasses.fields(self) if f.name != "stop"},
                     stop=self.stop if self.stop is not None else other.stop)


_attached: list[Hooks] = []
_attached_lock = threading.Lock()


@contextlib.contextmanager
def attach(hooks: Hooks) -> Iterator[Hooks]:
    """Make `hooks` heard by every stage run in this process (any thread) while the block runs.

    This is how `palm run` sees inside the Prefect flow it starts (progress display, SIGTERM): the flow and
    its tasks run in this process and add `attached()` to their own hooks.
    """
    with _attached_lock:
        _attached.append(hooks)
    try:
        yield hooks
    finally:
        with _attached_lock:
            _attached.remove(hooks)


def attached() -> Hooks:
    """The hooks attached in this process (all of them, combined), or empty hooks."""
    combined = Hooks()
    with _attached_lock:
        for hooks in _attached:
            combined = combined + hooks
    return combined


def stage_key_of(node: Any, inputs: dict[str, StageOutput]) -> str:
    """The key a workflow node's output has with these inputs."""
    stage = STAGES[node.stage]
    return stage_key(node.stage, stage.config(node.spec), inputs, stage.version)


# ---------------------------------------------------------------------------------------- running

def existing_output(node: Any, root: str | Path, inputs: dict[str, StageOutput]) -> StageOutput:
    """The complete output a node would have with these inputs, or a PalmError saying to run it first."""
    key = stage_key_of(node, inputs)
    path = output_path(root, node.name, key)
    manifest = read_manifest(path)
    if manifest is None:
        raise PalmError(f"stage {node.name!r} has no complete output for this spec under {root}; "
                        f"run it first (e.g. --stages {node.name},...)")
    return StageOutput(node.stage, key, path, manifest, cached=True, node="" if node.name == node.stage else node.name)


def run_node(node: Any, root: str | Path, inputs: dict[str, StageOutput], force: bool = False,
             hooks: Hooks | None = None) -> StageOutput:
    """Run (or reuse) one node's content-addressed output, in this process (once its preparation, if
    `prepare` started one, has ended)."""
    stage = STAGES[node.stage]
    if (preparing := _prepared.get((node.stage, node.spec.digest()))) is not None:
        preparing.wait()
    build = stage.build(node.spec, inputs, hooks or Hooks())  # imports the stage's builder module
    return run_stage(node.stage, stage.config(node.spec), inputs, root, build, force, resumable=stage.resumable,
                     in_place=stage.writes_remotely(node.spec), node=node.name, version=stage.version)


def node_inputs(node: Any, outputs: dict[str, StageOutput]) -> dict[str, StageOutput]:
    """A node's inputs from the outputs of the nodes it reads: by type, collected ones by node name."""
    inputs = {kind: outputs[name] for kind, name in node.inputs.items()}
    inputs.update({name: outputs[name] for name in node.collected})
    return inputs


def upstream_outputs(workflow: Any, root: str | Path, name: str) -> dict[str, StageOutput]:
    """The complete outputs of every node `name` reads from, transitively (PalmError if one is missing)."""
    return complete_outputs(workflow, root, workflow.upstream([name]) - {name})


def complete_outputs(workflow: Any, root: str | Path, names: Any) -> dict[str, StageOutput]:
    """The complete outputs of the named nodes and of every node they read from, transitively, by node
    name in the graph's order; a PalmError names the first that has none. Reads manifests only: no stage's
    engine is imported."""
    outputs: dict[str, StageOutput] = {}
    wanted = workflow.upstream(names)
    for node in workflow.nodes.values():
        if node.name in wanted:
            outputs[node.name] = existing_output(node, root, node_inputs(node, outputs))
    return outputs


def nodes_to_build(workflow: Any, root: str | Path, selected: Any, force: Any = ()) -> list[Any]:
    """The selected nodes a run of them would build, in the graph's order: those forced or without a complete
    output, and every selected node downstream of one. Reads manifests only: no stage's engine is imported."""
    outputs: dict[str, StageOutput] = {}
    todo, needed = [], workflow.upstream(selected)
    for node in workflow.nodes.values():
        if node.name not in needed:
            continue
        try:
            if node.name in force:
                raise PalmError(f"--force {node.name}")
            outputs[node.name] = existing_output(node, root, node_inputs(node, outputs))
        except (PalmError, KeyError):  # KeyError: an input that is itself to be built
            if node.name in selected:
                todo.append(node)
    return todo


#: Preparations started by `prepare`, by (stage type, spec digest): set when done.
_prepared: dict[tuple[str, str], threading.Event] = {}


def prepare(nodes: list[Any]) -> None:
    """Ahead of a run of these nodes: import each one's stage builder (Beam, Orbax, ...), and start calling
    its stage's `prepare` with its spec (palm.dag.table.Stage.prepare) on a thread, once per stage type and
    spec; returns when the builders are imported. `palm run` does this while Prefect's ephemeral server
    starts in another process. A node's build in this process (run_node) first waits for its own
    preparation to end, so nothing is compiled twice. It only saves time: what fails here is left to the
    node's own build, which meets it again and reports it (the failure is logged at debug level)."""
    todo = {(node.stage, node.spec.digest()): (node.name, STAGES[node.stage], node.spec) for node in nodes}
    ahead = [(key, *rest) for key, rest in todo.items() if rest[1].prepare and key not in _prepared]
    for key, *_ in ahead:
        _prepared[key] = threading.Event()

    def attempt(name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - see the docstring
            logging.getLogger(__name__).debug("preparing %s failed; its build will meet it", name, exc_info=True)

    def compile_ahead() -> None:  # compiling releases the interpreter: the imports below go on meanwhile
        for key, name, stage, spec in ahead:
            try:
                attempt(name, lambda: load_builder(stage.prepare)(spec))
            finally:
                _prepared[key].set()

    threading.Thread(target=compile_ahead, name="palm-prepare", daemon=True).start()
    for name, stage, _ in todo.values():
        attempt(name, lambda: load_builder(stage.builder))


def run_dag(spec: Any, root: str | Path, stages: list[str] | None = None, force: frozenset[str] = frozenset(),
            run: Callable[[Any, dict[str, StageOutput], bool], StageOutput] | None = None,
            hooks: Hooks | None = None) -> dict[str, StageOutput]:
    """Run the selected nodes of the spec's workflow in order, one at a time, reusing complete upstream
    outputs; returns every output by node name. `run(node, inputs, force)` runs one node (default: in
    process). Unselected upstream nodes must already have a complete output. (The Prefect flow runs
    independent branches concurrently instead: flows/pretrain.py.)"""
    workflow = resolve_workflow(spec)
    hooks = hooks or Hooks()
    run = run or (lambda node, inputs, forced: run_node(node, root, inputs, forced, hooks))
    selected = workflow.select(stages)
    needed = workflow.upstream(selected)
    outputs: dict[str, StageOutput] = {}
    for node in workflow.nodes.values():  # in order: every input is in `outputs` by now
        if node.name not in needed:
            continue
        inputs = node_inputs(node, outputs)
        if node.name in selected:
            if hooks.on_stage_start is not None:
                hooks.on_stage_start(node.name)
            outputs[node.name] = run(node, inputs, node.name in force)
        else:
            outputs[node.name] = existing_output(node, root, inputs)
        if hooks.on_stage is not None:
            hooks.on_stage(outputs[node.name])
    return outputs


def check_run_root(spec: Any, root: str | Path) -> None:
    """A run root belongs to one spec: the one named in its spec.json. Another spec's run there (which
    used to overwrite spec.json and report.md, so that `palm eval` of the first run's checkpoints took the
    second spec's settings) is refused in one line before anything is written. Runs of the same spec (with
    other --set values) share the root and its cache, and the record is their latest."""
    record = layout.spec_record(root)
    try:
        if storage.size(record) > MAX_RECORD_BYTES:
            raise PalmError(f"{record}: larger than {MAX_RECORD_BYTES // 2**20} MiB, not a spec record of palm; "
                            "use another --output")
        recorded = json.loads(storage.read_text(record))
    except FileNotFoundError:
        return
    except (ValueError, UnicodeDecodeError):
        raise PalmError(f"{record}: not a spec record of palm (not JSON); this directory is not a run root "
                        "of this spec: use another --output") from None
    name = recorded.get("name") if isinstance(recorded, dict) else None
    if name != spec.name:
        raise PalmError(f"{root} is the run root of spec {name!r} (its {layout.SPEC_RECORD}), not of {spec.name!r}: "
                        "a run root belongs to one spec, and nothing of that run is overwritten; give this run "
                        "another --output (or infra.storage_root)")


#: The largest spec record read back (specs themselves are at most 4 MiB of YAML).
MAX_RECORD_BYTES = 16 * 2**20


def record_spec(spec: Any, root: str | Path) -> None:
    """Keep the resolved spec beside a run's outputs, for evaluations triggered by its events.

    First in every run, so a storage root that cannot be used (no bucket, no credentials, no emulator)
    fails here with what to change, before any stage starts; a root of another spec is refused
    (check_run_root).
    """
    storage.check_root(root)
    check_run_root(spec, root)
    storage.write_text_atomic(layout.spec_record(root), spec.model_dump_json(indent=2))


def run_summary(root: str | Path, report: str | Path, outputs: dict[str, StageOutput]) -> dict[str, Any]:
    """What `palm run --json` prints and the pretrain flow returns: every node's output, and the last
    training and evaluation nodes' results."""
    summary: dict[str, Any] = {
        "status": "completed", "root": str(root), "report": str(report),
        "stages": {name: {"stage": o.stage, "path": o.path, "output": o.path, "cached": o.cached, "key": o.key}
                   for name, o in outputs.items()}}
    trained = [o for o in outputs.values() if STAGES[o.stage].trains]
    if trained:
        m = trained[-1].manifest
        summary.update(final_step=m["final_step"], final_loss=m["final_loss"], checkpoint=m["checkpoint"],
                       microbatches=m.get("microbatches"))
    evaluated = [o for o in outputs.values() if o.stage == "eval"]
    if evaluated:
        summary["eval"] = evaluated[-1].manifest.get("results")
    return summary
