"""The stage table: one row of declarations per stage type, and nothing else enumerates stages.

A row says what a stage type reads and waits for, the slice of the spec its output's key hashes, its
version, whether it resumes, and which spec it applies to; it names its builder by import path
(`palm.stages.<type>:build`) and imports none of them. So the spec's workflow (palm.dag.workflow), the
CLI, the Prefect flow and its one generic task, the launched workers and the retry policies all read
this table without loading an engine; the runner (palm.dag.runner) imports a builder when a node of its
type runs. Adding a stage type is writing its builder module and one row here.

The default workflow is the chain

    [compile] -> [quality] -> data -> tokenizer -> pack -> train -> eval

`quality` trains the quality classifier that the data stage samples web documents by (PaLM's and
GLaM's rule); it is in the chain only when a source samples by its score.

`compile` is the pre-flight check of TPU specs: the train and evaluation steps compiled ahead of time
for the spec's own pods (palm.analysis.aot), refused with what to change when they do not fit. It gates
the train stage (which waits for it) without being one of its inputs, so the train stage's key, and its
checkpoints, do not depend on the hardware it runs on. It starts with the run, beside the data branch
(whose outputs do not depend on the hardware either, so they stay reusable whatever it finds): a spec
that cannot fit fails in minutes, before any chip-hour.

Each node's output is content-addressed (palm.store.outputs): its key hashes the node's slice of its
spec, its inputs' keys and the stage type's version, so re-running a spec skips complete nodes and
changing one node's config re-runs it and everything downstream.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable

from palm.base.errors import PalmError
from palm.spec.schema import LOCAL_RUNNERS

#: Settings that change how fast a stage runs, never what it computes (beyond the order of float sums):
#: left out of its key, so that tuning them reuses the outputs already made. (The compile gate keeps
#: them: they change the memory a step needs.)
SPEED_ONLY = {"train": ("loss_chunk_mib", "profile_steps", "microbatches")}


#: Settings added after keys were first made: left out of every key while at their default, so that the
#: specs that do not set them keep their keys (and their outputs).
NEWER_DEFAULTS = {"train": {"microbatches": 1}}

#: Floors that only accept or refuse a stage's output, never change what it holds: left out of every key
#: (a spec that sets them builds the same outputs), and checked again where a reused output is read.
#: data.quality.min_auc: palm.data.quality.check_auc (the quality stage, and the data stage on its input).
ACCEPT_ONLY = (("data", "quality", "min_auc"),)


def _dump(spec: Any, speed: bool = False) -> dict[str, Any]:
    dumped = spec.model_dump(mode="json")
    for section, defaults in NEWER_DEFAULTS.items():
        for key, default in defaults.items():
            if dumped[section].get(key) == default:
                dumped[section].pop(key)
    for section, keys in ({} if speed else SPEED_ONLY).items():
        for key in keys:
            dumped[section].pop(key, None)
    for *parents, key in ACCEPT_ONLY:
        node = dumped
        for part in parents:
            node = node.get(part, {})
        node.pop(key, None)
    return dumped


def eval_config(spec: Any) -> dict[str, Any]:
    """The eval settings that decide the results (the eval stage's key; what a launched evaluation job's
    result is checked against): all but `launch`, which only says where they are computed."""
    return {k: v for k, v in _dump(spec)["eval"].items() if k != "launch"}


def _always(spec: Any) -> bool:
    return True


def _on_tpu(spec: Any) -> bool:
    return spec.infra.hardware.is_tpu


def _uses_classifier(spec: Any) -> bool:
    return spec.data.uses_classifier()


def _beam_remote(spec: Any) -> bool:
    return spec.data.beam.runner not in LOCAL_RUNNERS


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage type."""

    name: str
    #: Its builder, "module:function": (the node's spec, its inputs by type (collected ones by node name),
    #: hooks) -> build(dir) -> the manifest's fields.
    builder: str
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
    #: Optional "module:function" taking a node's spec: work done ahead of a run that makes the node's build
    #: faster, never needed for it (compiling its programs into JAX's persistent compilation cache). `palm
    #: run` calls it, with the builder's module imported, while Prefect's ephemeral server starts
    #: (palm.dag.runner.prepare).
    prepare: str = ""
    summary: str = ""

    def inputs_for(self, spec: Any) -> tuple[str, ...]:
        """The input types a node of this stage reads under its spec."""
        return (*self.inputs, *self.optional_inputs(spec))

    def kinds(self) -> tuple[str, ...]:
        """The input types an output of this stage can stand for: its own and what it provides."""
        return (self.name, *self.provides)

    def build(self, spec: Any, inputs: dict[str, Any], hooks: Any) -> Callable[[Any], dict[str, Any]]:
        """The builder's build(dir) for a node with this spec and these inputs (imports the builder)."""
        return load_builder(self.builder)(spec, inputs, hooks)


@functools.cache
def load_builder(path: str) -> Callable[..., Any]:
    """The function an import path "module:function" names."""
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise PalmError(f"stage builder {path!r} cannot be imported: {e}") from None


def _train_config(spec: Any) -> dict[str, Any]:
    return {k: _dump(spec)[k] for k in ("model", "train")}


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("compile", "palm.stages.compile:build",
          lambda spec: {**{k: _dump(spec, speed=True)[k] for k in ("model", "train")},
                        "hardware": _dump(spec)["infra"]["hardware"], "mesh": spec.resolved_mesh()},
          applies=_on_tpu, summary="the train and evaluation steps compiled for the spec's TPU pods (pre-flight)"),
    Stage("quality", "palm.stages.quality:build", lambda spec: spec.data.classifier_config(), applies=_uses_classifier,
          summary="train the quality classifier (curated vs. quality-sampled sources; scikit-learn)"),
    Stage("data", "palm.stages.data:build", lambda spec: _dump(spec)["data"], writes_remotely=_beam_remote,
          optional_inputs=lambda spec: ("quality",) if _uses_classifier(spec) else (),
          summary="clean, deduplicate and mix the corpus (Beam)"),
    Stage("tokenizer", "palm.stages.tokenizer:build", lambda spec: _dump(spec)["tokenizer"], inputs=("data",),
          summary="a lossless SentencePiece vocabulary"),
    Stage("pack", "palm.stages.pack:build",
          lambda spec: {"pack": _dump(spec)["pack"], "seq_len": _dump(spec)["model"]["seq_len"]},
          inputs=("data", "tokenizer"), version=2, writes_remotely=_beam_remote,
          summary="tokenize and pack fixed-length sequences (Beam -> files of rows)"),
    # Version 3: Adafactor's RMS statistics per weight matrix (per fused slot too), another model for one spec.
    Stage("train", "palm.stages.train:build", _train_config, inputs=("pack",),
          gates=("compile",), version=3, resumable=True, trains=True, prepare="palm.stages.train:prepare",
          summary="train the model, with checkpoints (JAX)"),
    Stage("finetune", "palm.stages.train:build", _train_config,
          inputs=("pack", "train"), gates=("compile",), provides=("train",), version=3, resumable=True,
          default=False, trains=True, prepare="palm.stages.train:prepare",
          summary="continue from a trained model's final parameters on its own data and schedule (fresh optimizer)"),
    Stage("eval", "palm.stages.eval:build", eval_config, inputs=("train", "pack", "tokenizer"),
          summary="evaluate the final checkpoint"),
    Stage("scaling", "palm.stages.scaling:build", lambda spec: {}, collects=("train", "eval"), default=False,
          summary="loss against parameters and training FLOPs over several models, with a fitted power law"),
)}
