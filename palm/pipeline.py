"""The stage DAG ([compile], data -> tokenizer -> pack -> train -> eval) and running it locally.

`compile` is the pre-flight check of TPU specs: the train and evaluation steps compiled ahead of time
for the spec's own pods (palm.aot), refused with what to change when they do not fit. It gates the
train stage (which waits for it) without being one of its inputs: the train stage's key, and so its
checkpoints, do not depend on the hardware it runs on.

Each stage's output is content-addressed (`palm.stages`): its key hashes the stage's slice of the spec
and its inputs' keys, so re-running a spec skips complete stages and changing one stage's config
re-runs it and everything downstream. The Prefect flow (flows/pretrain.py) runs the same stage
functions as tasks through `run_dag`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from palm import storage
from palm.errors import PalmError
from palm.stages import StageOutput, read_manifest, run_stage, stage_key

#: The train stage's per-step metrics, one JSON object per line.
METRICS = "metrics.jsonl"
#: The resolved spec a run root was started with.
SPEC_RECORD = "spec.json"

#: Each stage and the stages whose outputs it reads.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "compile": (),  # first: a spec that cannot fit its pods fails in minutes, before hours of data processing
    "data": (),
    "tokenizer": ("data",),
    "pack": ("data", "tokenizer"),
    "train": ("pack",),
    "eval": ("train", "pack", "tokenizer"),
}
STAGE_ORDER = tuple(STAGE_INPUTS)
#: Stages that must be complete before a stage starts, though it does not read their outputs.
GATES: dict[str, tuple[str, ...]] = {"train": ("compile",)}


def stage_applies(spec: Any, stage: str) -> bool:
    """Whether the spec's pipeline has this stage: the compile check is for TPU hardware only."""
    if stage == "compile":
        from palm.aot import TPU_GENERATIONS

        return spec.infra.hardware.accelerator in TPU_GENERATIONS
    return True


def stages_for(spec: Any) -> list[str]:
    """The spec's stages in DAG order."""
    return [s for s in STAGE_ORDER if stage_applies(spec, s)]


def stage_config(spec: Any, stage: str) -> dict[str, Any]:
    """The slice of the spec that determines a stage's output (what its key hashes)."""
    dump = spec.model_dump(mode="json")
    return {
        "data": lambda: dump["data"],
        "tokenizer": lambda: dump["tokenizer"],
        "pack": lambda: {"pack": dump["pack"], "seq_len": dump["model"]["seq_len"]},
        "compile": lambda: {"model": dump["model"], "train": dump["train"], "hardware": dump["infra"]["hardware"],
                            "mesh": spec.resolved_mesh()},
        "train": lambda: {"model": dump["model"], "train": dump["train"]},
        "eval": lambda: dump["eval"],
    }[stage]()


@dataclasses.dataclass
class Hooks:
    """What the caller (the CLI or a Prefect task) wants to hear from the stages, and how to stop them.

    on_stage_start(stage) and on_stage(output) bracket each stage; on_step(log, state) and
    on_checkpoint(path, step, record) come from the train stage; `stop` (a threading.Event) asks the
    train stage to checkpoint at the current step and raise `palm.train.Preempted`.
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


@contextlib.contextmanager
def attach(hooks: Hooks) -> Iterator[Hooks]:
    """Make `hooks` heard by every stage run in this process while the block runs.

    This is how `palm run` sees inside the Prefect flow it starts (progress bar, SIGTERM): the flow and
    its tasks run in this process and add `attached()` to their own hooks. Deployments attach nothing.
    """
    _attached.append(hooks)
    try:
        yield hooks
    finally:
        _attached.remove(hooks)


def attached() -> Hooks:
    """The hooks attached in this process (all of them, combined), or empty hooks."""
    combined = Hooks()
    for hooks in _attached:
        combined = combined + hooks
    return combined


def _build_data(spec: Any, inputs: dict[str, StageOutput], hooks: Hooks) -> Callable[[Any], dict[str, Any]]:
    from palm.data.pipeline import run_data_stage

    return lambda out: run_data_stage(spec.data, out)


def _build_tokenizer(spec: Any, inputs: dict[str, StageOutput], hooks: Hooks) -> Callable[[Path], dict[str, Any]]:
    from palm.tokenizer import build_tokenizer_stage

    return lambda out: build_tokenizer_stage(spec.tokenizer, inputs["data"].local(), out)


def _build_pack(spec: Any, inputs: dict[str, StageOutput], hooks: Hooks) -> Callable[[Path], dict[str, Any]]:
    from palm.data.pack import run_pack_stage

    return lambda out: run_pack_stage(spec.data, spec.pack.num_shards, spec.model.seq_len,
                                      inputs["data"].local(), inputs["tokenizer"].local(), out)


def _build_train(spec: Any, inputs: dict[str, StageOutput], hooks: Hooks) -> Callable[[Any], dict[str, Any]]:
    """Train in the stage directory. Under a gs:// root the checkpoints go straight to the bucket (Orbax),
    and the per-step metrics are kept in a local scratch directory, uploaded with each checkpoint (so a
    resume on another machine keeps them) and at the end. On several hosts only host 0 writes metrics."""
    from palm.train import run_train_stage

    pack = inputs["pack"]

    def build(out: Any) -> dict[str, Any]:
        pack_dir = pack.local()  # ArrayRecord and Grain read local files
        if not storage.is_remote(out):
            return run_train_stage(spec, pack_dir, pack.manifest, out, on_step=hooks.on_step,
                                   on_checkpoint=hooks.on_checkpoint, stop=hooks.stop)
        import jax

        leader = jax.process_index() == 0
        metrics = storage.join(out, METRICS)
        work = storage.scratch_dir("train-")
        local_metrics = work / METRICS

        def upload_metrics() -> None:
            if leader and local_metrics.exists():
                storage.upload_file(local_metrics, metrics)

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
                                     on_checkpoint=on_checkpoint, stop=hooks.stop)
            upload_metrics()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {**fields, "metrics": metrics}

    return build


def _build_eval(spec: Any, inputs: dict[str, StageOutput], hooks: Hooks) -> Callable[[Path], dict[str, Any]]:
    from palm.evaltasks.run import evaluate_checkpoint, results_markdown

    def build(out: Path) -> dict[str, Any]:
        result = evaluate_checkpoint(inputs["train"].manifest["checkpoint"], spec.eval)
        (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "results.md").write_text(results_markdown(result["results"]))
        return result

    return build


def _build_compile(spec: Any, inputs: dict[str, StageOutput], hooks: Hooks) -> Callable[[Path], dict[str, Any]]:
    from palm.aot import compile_spec, gib, largest_misfit

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


#: Stages that build in their final directory and resume from what a failed attempt left there.
RESUMABLE = frozenset({"train"})

#: One builder per stage of the DAG.
BUILDERS: dict[str, Callable[[Any, dict[str, StageOutput], Hooks], Callable[[Any], dict[str, Any]]]] = {
    "data": _build_data,
    "tokenizer": _build_tokenizer,
    "pack": _build_pack,
    "compile": _build_compile,
    "train": _build_train,
    "eval": _build_eval,
}
BUILT = frozenset(BUILDERS)


def stage_graph(spec: Any) -> list[dict[str, Any]]:
    """The spec's DAG as a list in run order, each stage with its inputs, its gates and whether it is built."""
    stages = stages_for(spec)
    return [{"name": s, "inputs": list(STAGE_INPUTS[s]), "after": [g for g in GATES.get(s, ()) if g in stages],
             "built": s in BUILT} for s in stages]


def select_stages(spec: Any, requested: str | None) -> list[str]:
    """The spec's stages to run for `--stages a,b` (all when None), in DAG order."""
    available = stages_for(spec)
    if not requested:
        return available
    names = [s.strip() for s in requested.split(",") if s.strip()]
    unknown = [s for s in names if s not in available]
    if unknown:
        raise PalmError(f"--stages: unknown stage(s) {unknown} for this spec; choose from {', '.join(available)}")
    return [s for s in available if s in names]


def existing_output(spec: Any, stage: str, root: str | Path, inputs: dict[str, StageOutput]) -> StageOutput:
    """The complete output a stage would have for this spec, or a PalmError saying to run it first."""
    key = stage_key(stage, stage_config(spec, stage), inputs)
    path = storage.join(root, stage, key)
    manifest = read_manifest(path)
    if manifest is None:
        raise PalmError(f"stage {stage!r} has no complete output for this spec under {root}; "
                        f"run it first (e.g. --stages {stage},...)")
    return StageOutput(stage, key, path, manifest, cached=True)


def _writes_remotely(spec: Any, stage: str) -> bool:
    """Whether the stage's builder writes its gs:// output itself: Beam on remote workers (Dataflow)."""
    if stage != "data":
        return False
    from palm.data.pipeline import LOCAL_RUNNERS

    return spec.data.beam.runner not in LOCAL_RUNNERS


def run_stage_named(spec: Any, stage: str, root: str | Path, inputs: dict[str, StageOutput],
                    force: bool = False, hooks: Hooks | None = None) -> StageOutput:
    """Run (or reuse) one stage's content-addressed output."""
    build = BUILDERS[stage](spec, inputs, hooks or Hooks())
    return run_stage(stage, stage_config(spec, stage), inputs, root, build, force, resumable=stage in RESUMABLE,
                     in_place=_writes_remotely(spec, stage))


def needed_stages(spec: Any, stages: list[str]) -> set[str]:
    """The selected stages and every stage they read from or wait for, transitively."""
    needed: set[str] = set()

    def need(stage: str) -> None:
        if stage not in needed and stage_applies(spec, stage):
            needed.add(stage)
            for dep in STAGE_INPUTS[stage] + GATES.get(stage, ()):
                need(dep)

    for stage in stages:
        need(stage)
    return needed


def run_dag(spec: Any, root: str | Path, stages: list[str], force: frozenset[str] = frozenset(),
            run: Callable[[str, dict[str, StageOutput], bool], StageOutput] | None = None,
            hooks: Hooks | None = None) -> dict[str, StageOutput]:
    """Run the selected stages in DAG order, reusing complete upstream outputs; returns every output.

    `run(stage, inputs, force)` runs one stage: the Prefect flow passes its retryable tasks; the
    default runs the stage in process. Unselected ancestors must already have a complete output.
    """
    hooks = hooks or Hooks()
    run = run or (lambda stage, inputs, forced: run_stage_named(spec, stage, root, inputs, forced, hooks))
    needed = needed_stages(spec, stages)
    outputs: dict[str, StageOutput] = {}
    for stage in STAGE_ORDER:  # ancestors come first, so every input is in `outputs` by now
        if stage not in needed:
            continue
        inputs = {dep: outputs[dep] for dep in STAGE_INPUTS[stage]}
        if stage in stages:
            if hooks.on_stage_start is not None:
                hooks.on_stage_start(stage)
            outputs[stage] = run(stage, inputs, stage in force)
        else:
            outputs[stage] = existing_output(spec, stage, root, inputs)
        if hooks.on_stage is not None:
            hooks.on_stage(outputs[stage])
    return outputs


def record_spec(spec: Any, root: str | Path) -> None:
    """Keep the resolved spec beside a run's outputs, for evaluations triggered by its events.

    First in every run, so a storage root that cannot be used (no bucket, no credentials, no emulator)
    fails here with what to change, before any stage starts.
    """
    storage.check_root(root)
    storage.write_text_atomic(storage.join(root, SPEC_RECORD), spec.model_dump_json(indent=2))


def run_summary(root: str | Path, report: str | Path, outputs: dict[str, StageOutput]) -> dict[str, Any]:
    """What `palm run --json` prints and the pretrain flow returns."""
    summary: dict[str, Any] = {
        "status": "completed", "root": str(root), "report": str(report),
        "stages": {s: {"output": o.path, "cached": o.cached, "key": o.key} for s, o in outputs.items()}}
    if "train" in outputs:
        m = outputs["train"].manifest
        summary.update(final_step=m["final_step"], final_loss=m["final_loss"], checkpoint=m["checkpoint"])
    if "eval" in outputs:
        summary["eval"] = outputs["eval"].manifest.get("results")
    return summary
