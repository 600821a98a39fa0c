"""Stage types, one table of them, and running a spec's workflow graph in this process.

A stage type is one `Stage` record in `STAGES`: the types of the outputs it reads, the slice of the spec
its key hashes, how it builds, whether it resumes, its version. Nothing else enumerates stages: the spec's
workflow (`palm.dag.workflow`), the CLI, the Prefect flow and its one generic task, the launched workers and
the retry policies all read this table. Adding a stage type is writing its builder and one row here.

The default workflow is the chain

    [compile] -> [quality] -> data -> tokenizer -> pack -> train -> eval

`quality` trains the quality classifier that the data stage samples web documents by (PaLM's and
GLaM's rule); it is in the chain only when a source samples by its score (palm.data.quality).

`compile` is the pre-flight check of TPU specs: the train and evaluation steps compiled ahead of time
for the spec's own pods (palm.analysis.aot), refused with what to change when they do not fit. It gates the
train stage (which waits for it) without being one of its inputs, so the train stage's key, and its
checkpoints, do not depend on the hardware it runs on. It starts with the run, beside the data branch
(whose outputs do not depend on the hardware either, so they stay reusable whatever it finds): a spec
that cannot fit fails in minutes, before any chip-hour.

Each node's output is content-addressed (`palm.store.outputs`): its key hashes the node's slice of its spec,
its inputs' keys and the stage type's version, so re-running a spec skips complete nodes and changing
one node's config re-runs it and everything downstream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from palm.base import storage
from palm.base.errors import PalmError
from palm.store.outputs import StageOutput, output_path, read_manifest, run_stage, stage_key

#: The train stage's per-step metrics, one JSON object per line.
METRICS = "metrics.jsonl"
#: The resolved spec a run root was started with.
SPEC_RECORD = "spec.json"


@dataclasses.dataclass
class Hooks:
    """What the caller (the CLI or a Prefect task) wants to hear from the stages, and how to stop them.

    on_stage_start(node name) and on_stage(output) bracket each node; on_step(log, state) and
    on_checkpoint(path, step, record) come from a training node, in the thread that runs it; `stop` (a
    threading.Event) asks training to checkpoint at the current step and raise `palm.core.train.Preempted`.
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


# ------------------------------------------------------------------------------------------- builders
# A builder takes (the node's spec, its inputs by type (collected ones by node name), hooks) and returns
# build(dir) -> the manifest's fields.

Builder = Callable[[Any, dict[str, StageOutput], Hooks], Callable[[Any], dict[str, Any]]]


def _build_compile(spec: Any, inputs: dict[str, StageOutput], hooks: Hooks) -> Callable[[Path], dict[str, Any]]:
    from palm.analysis.aot import compile_spec, gib, largest_misfit

    def build(out: Path) -> dict[str, Any]:
        compiled = compile_spec(spec)
        (out / "compiled.json").write_text(json.dumps(compiled, indent=2))
        misfit = largest_misfit(compiled)
        if misfit is not None:  # no manifest: a spec that does not fit is never taken as checked
            hbm = compiled["hbm_bytes_per_device"]
            raise PalmError(f"the {misfit['kind']} step at global batch {misfit['global_batch']} needs "
                            f"{gib(misfit['memory_per_device_bytes'])} per chip, "
                            f"{gib(misfit['memory_per_device_bytes'] - hbm)} more than a chip's {gib(hbm)}; "
                            "shard wider (infra.mesh), lower the batch, or use more chips "
                            "(palm plan SPEC --compile shows every step)")
        return compiled

    return build


def _build_quality(spec: Any, inputs: dict[str, StageOutput], hooks: Hooks) -> Callable[[Path], dict[str, Any]]:
    from palm.data.quality import train_quality_stage

    return lambda out: train_quality_stage(spec.data, out)


def _build_data(spec: Any, inputs: dict[str, StageOutput], hooks: Hooks) -> Callable[[Any], dict[str, Any]]:
    from palm.data.pipeline import run_data_stage

    quality = inputs.get("quality")
    return lambda out: run_data_stage(spec.data, out, worker_image=spec.infra.launcher.image,
                                      classifier=quality.path if quality is not None else None,
                                      classifier_key=quality.key if quality is not None else None)


def _build_tokenizer(spec: Any, inputs: dict[str, StageOutput], hooks: Hooks) -> Callable[[Path], dict[str, Any]]:
    from palm.tokenizer import build_tokenizer_stage

    return lambda out: build_tokenizer_stage(spec.tokenizer, inputs["data"].path, out)  # streamed, not copied


def _build_pack(spec: Any, inputs: dict[str, StageOutput], hooks: Hooks) -> Callable[[Path], dict[str, Any]]:
    from palm.data.pack import run_pack_stage

    return lambda out: run_pack_stage(spec.data, spec.pack.num_shards, spec.model.seq_len,
                                      inputs["data"].path, inputs["tokenizer"].path, out,
                                      worker_image=spec.infra.launcher.image)


def _build_train(spec: Any, inputs: dict[str, StageOutput], hooks: Hooks) -> Callable[[Any], dict[str, Any]]:
    """Train in the stage directory. Under a gs:// root the checkpoints go straight to the bucket (Orbax),
    and the per-step metrics are kept in a local scratch directory, uploaded with each checkpoint (so a
    resume on another machine keeps them) and at the end. On several hosts only host 0 writes metrics.

    With a "train" input (a finetune node) training starts from that run's final parameters."""
    from palm.core.train import run_train_stage

    pack = inputs["pack"]
    base = inputs.get("train")
    init_from = base.manifest["checkpoint"] if base is not None else None

    def build(out: Any) -> dict[str, Any]:
        pack_dir = pack.path  # each host reads its own rows in place (local or gs://), nothing is copied
        if not storage.is_remote(out):
            return run_train_stage(spec, pack_dir, pack.manifest, out, on_step=hooks.on_step,
                                   on_checkpoint=hooks.on_checkpoint, stop=hooks.stop, init_from=init_from)
        import jax

        leader = jax.process_index() == 0
        metrics = storage.join(out, METRICS)
        work = storage.scratch_dir("train-")
        local_metrics = work / METRICS

        def upload_metrics() -> None:
            if leader and local_metrics.exists():
                storage.upload_file(local_metrics, metrics)
            # Event files and traces, beside the metrics: added, never replacing the folder (each writer's
            # files have their own names), so those of attempts before a resume stay.
            for folder in ("tensorboard", "profile"):
                if leader and (work / folder).is_dir():
                    storage.add_files(work / folder, storage.join(out, folder))

        def on_checkpoint(path: str, step: int, record: dict[str, Any]) -> None:
            upload_metrics()
            if hooks.on_checkpoint is not None:
                hooks.on_checkpoint(path, step, record)

        try:
            # The bucket holds the metrics up to the last checkpoint, which is where a resume starts.
            if leader and storage.exists(metrics):
                local_metrics.write_bytes(storage.read_bytes(metrics))
            fields = run_train_stage(spec, pack_dir, pack.manifest, work,
                                     checkpoint_dir=storage.join(out, "checkpoints"), on_step=hooks.on_step,
                                     on_checkpoint=on_checkpoint, stop=hooks.stop, init_from=init_from)
            upload_metrics()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {**fields, "metrics": metrics, "tensorboard": storage.join(out, "tensorboard"),
                "profile": storage.join(out, "profile") if fields.get("profile") else None}

    return build


def _build_eval(spec: Any, inputs: dict[str, StageOutput], hooks: Hooks) -> Callable[[Path], dict[str, Any]]:
    from palm.evaluation.run import evaluate_checkpoint, results_markdown

    def build(out: Path) -> dict[str, Any]:
        from palm.jobs.evaljob import placement

        checkpoint = inputs["train"].manifest["checkpoint"]
        where, why = placement(spec, spec.model)
        if where == "workers":  # too large for this process: a sharded job on the training launcher
            from palm.jobs.evaljob import evaluate_on_workers

            root = storage.parent(storage.parent(inputs["train"].path))
            launched = evaluate_on_workers(spec, storage.join(root, SPEC_RECORD), root, checkpoint,
                                           stop=hooks.stop, log=lambda line: print(line, flush=True))
            result = {"checkpoint": launched["checkpoint"], "step": launched["step"],
                      "results": launched["results"], "evaluated_on": {"where": where, "why": why,
                                                                        "job": launched.get("job")}}
        else:
            result = evaluate_checkpoint(checkpoint, spec.eval, pack=inputs["pack"], tokenizer=inputs["tokenizer"])
        from palm.store.tensorboard import write_eval_results

        write_eval_results(out / "tensorboard", result["step"], result["results"])
        (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "results.md").write_text(results_markdown(result["results"]))
        return result

    return build


def _build_scaling(spec: Any, inputs: dict[str, StageOutput], hooks: Hooks) -> Callable[[Path], dict[str, Any]]:
    from palm.analysis.scaling import scaling_report

    return lambda out: scaling_report(inputs, out)


# ---------------------------------------------------------------------------------------- stage table

#: Settings that change how fast a stage runs, never what it computes (beyond the order of float sums):
#: left out of its key, so that tuning them reuses the outputs already made. (The compile gate keeps
#: them: they change the memory a step needs.)
SPEED_ONLY = {"train": ("loss_chunk_mib", "profile_steps")}


def _dump(spec: Any, speed: bool = False) -> dict[str, Any]:
    dumped = spec.model_dump(mode="json")
    for section, keys in ({} if speed else SPEED_ONLY).items():
        for key in keys:
            dumped[section].pop(key, None)
    return dumped


def eval_config(spec: Any) -> dict[str, Any]:
    """The eval settings that decide the results (the eval stage's key; what a launched evaluation job's
    result is checked against): all but `launch`, which only says where they are computed."""
    return {k: v for k, v in _dump(spec)["eval"].items() if k != "launch"}


def _always(spec: Any) -> bool:
    return True


def _on_tpu(spec: Any) -> bool:
    from palm.analysis.aot import TPU_GENERATIONS

    return spec.infra.hardware.accelerator in TPU_GENERATIONS


def _uses_classifier(spec: Any) -> bool:
    from palm.data.quality import uses_classifier

    return uses_classifier(spec.data)


def _quality_config(spec: Any) -> dict[str, Any]:
    from palm.data.quality import classifier_config

    return classifier_config(spec.data)


def _beam_remote(spec: Any) -> bool:
    from palm.data.beam import LOCAL_RUNNERS

    return spec.data.beam.runner not in LOCAL_RUNNERS


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage type."""

    name: str
    build: Builder
    #: The slice of a node's spec that its output's key hashes.
    config: Callable[[Any], Any]
    #: The types of the outputs it reads, one node each.
    inputs: tuple[str, ...] = ()
    #: Types it reads where the spec asks for them (the data stage reads a quality classifier only when a
    #: source samples by its score).
    optional_inputs: Callable[[Any], tuple[str, ...]] = lambda spec: ()
    #: Types it reads any number of (the nodes its `needs` name).
    collects: tuple[str, ...] = ()
    #: Types that must be complete before it starts, though it does not read them.
    gates: tuple[str, ...] = ()
    #: Input types whose place its output can take (a fine-tuned model is a trained model).
    provides: tuple[str, ...] = ()
    #: Bumped when the output's format or meaning changes, so old outputs are not reused.
    version: int = 1
    #: Builds in its final directory and resumes from what a failed attempt left there.
    resumable: bool = False
    #: Part of the default workflow (when the spec declares none) for specs it applies to.
    default: bool = True
    applies: Callable[[Any], bool] = _always
    #: Whether its builder writes a gs:// output itself (Beam on remote workers).
    writes_remotely: Callable[[Any], bool] = lambda spec: False
    #: Trains a model (its runs are launched on workers, announce checkpoints, show progress).
    trains: bool = False
    summary: str = ""

    def inputs_for(self, spec: Any) -> tuple[str, ...]:
        """The input types a node of this stage reads under its spec."""
        return (*self.inputs, *self.optional_inputs(spec))

    def kinds(self) -> tuple[str, ...]:
        """The input types an output of this stage can stand for: its own and what it provides."""
        return (self.name, *self.provides)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("compile", _build_compile, lambda spec: {**{k: _dump(spec, speed=True)[k] for k in ("model", "train")},
                                                     "hardware": _dump(spec)["infra"]["hardware"],
                                                     "mesh": spec.resolved_mesh()},
          applies=_on_tpu, summary="the train and evaluation steps compiled for the spec's TPU pods (pre-flight)"),
    Stage("quality", _build_quality, _quality_config, applies=_uses_classifier,
          summary="train the quality classifier (curated vs. quality-sampled sources; scikit-learn)"),
    Stage("data", _build_data, lambda spec: _dump(spec)["data"], writes_remotely=_beam_remote,
          optional_inputs=lambda spec: ("quality",) if _uses_classifier(spec) else (),
          summary="clean, deduplicate and mix the corpus (Beam)"),
    Stage("tokenizer", _build_tokenizer, lambda spec: _dump(spec)["tokenizer"], inputs=("data",),
          summary="a lossless SentencePiece vocabulary"),
    Stage("pack", _build_pack, lambda spec: {"pack": _dump(spec)["pack"], "seq_len": _dump(spec)["model"]["seq_len"]},
          inputs=("data", "tokenizer"), version=2, writes_remotely=_beam_remote,
          summary="tokenize and pack fixed-length sequences (Beam -> files of rows)"),
    # Version 3: Adafactor's RMS statistics per weight matrix (per fused slot too), another model for one spec.
    Stage("train", _build_train, lambda spec: {k: _dump(spec)[k] for k in ("model", "train")}, inputs=("pack",),
          gates=("compile",), version=3, resumable=True, trains=True,
          summary="train the model, with checkpoints (JAX)"),
    Stage("finetune", _build_train, lambda spec: {k: _dump(spec)[k] for k in ("model", "train")},
          inputs=("pack", "train"), gates=("compile",), provides=("train",), version=3, resumable=True,
          default=False, trains=True,
          summary="continue from a trained model's final parameters on its own data and schedule (fresh optimizer)"),
    Stage("eval", _build_eval, lambda spec: eval_config(spec), inputs=("train", "pack", "tokenizer"),
          summary="evaluate the final checkpoint"),
    Stage("scaling", _build_scaling, lambda spec: {}, collects=("train", "eval"), default=False,
          summary="loss against parameters and training FLOPs over several models, with a fitted power law"),
)}


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
    """Run (or reuse) one node's content-addressed output, in this process."""
    stage = STAGES[node.stage]
    build = stage.build(node.spec, inputs, hooks or Hooks())
    return run_stage(node.stage, stage.config(node.spec), inputs, root, build, force, resumable=stage.resumable,
                     in_place=stage.writes_remotely(node.spec), node=node.name, version=stage.version)


def node_inputs(node: Any, outputs: dict[str, StageOutput]) -> dict[str, StageOutput]:
    """A node's inputs from the outputs of the nodes it reads: by type, collected ones by node name."""
    inputs = {kind: outputs[name] for kind, name in node.inputs.items()}
    inputs.update({name: outputs[name] for name in node.collected})
    return inputs


def upstream_outputs(workflow: Any, root: str | Path, name: str) -> dict[str, StageOutput]:
    """The complete outputs of every node `name` reads from, transitively (PalmError if one is missing)."""
    outputs: dict[str, StageOutput] = {}
    wanted = workflow.upstream([name]) - {name}
    for node in workflow.nodes.values():
        if node.name in wanted:
            outputs[node.name] = existing_output(node, root, node_inputs(node, outputs))
    return outputs


def run_dag(spec: Any, root: str | Path, stages: list[str] | None = None, force: frozenset[str] = frozenset(),
            run: Callable[[Any, dict[str, StageOutput], bool], StageOutput] | None = None,
            hooks: Hooks | None = None) -> dict[str, StageOutput]:
    """Run the selected nodes of the spec's workflow in order, one at a time, reusing complete upstream
    outputs; returns every output by node name. `run(node, inputs, force)` runs one node (default: in
    process). Unselected upstream nodes must already have a complete output. (The Prefect flow runs
    independent branches concurrently instead: flows/pretrain.py.)"""
    from palm.dag.workflow import resolve_workflow

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


def record_spec(spec: Any, root: str | Path) -> None:
    """Keep the resolved spec beside a run's outputs, for evaluations triggered by its events.

    First in every run, so a storage root that cannot be used (no bucket, no credentials, no emulator)
    fails here with what to change, before any stage starts.
    """
    storage.check_root(root)
    storage.write_text_atomic(storage.join(root, SPEC_RECORD), spec.model_dump_json(indent=2))


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
        summary.update(final_step=m["final_step"], final_loss=m["final_loss"], checkpoint=m["checkpoint"])
    evaluated = [o for o in outputs.values() if o.stage == "eval"]
    if evaluated:
        summary["eval"] = evaluated[-1].manifest.get("results")
    return summary
