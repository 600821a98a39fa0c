"""The one spec type: a validated description of a whole pretraining pipeline (pydantic, nothing else).

Every field is validated (`extra="forbid"` everywhere) and `check_consistency` checks the values against
each other. Reading a spec from YAML (`extends`, `--set`) is palm.spec.loading's; its workflow graph is
checked against the stage declarations in palm.dag.workflow.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from palm.spec.config import LossSpikeConfig, ModelConfig, TrainConfig
from palm.base.errors import PalmError, SpecError
from palm.base.hardware import MESH_AXES, PEAK_FLOPS, dataflow_machine_problem, mesh_fits_topology, nearest_mesh, parse_topology



class _Strict(BaseModel):
    # allow_inf_nan=False: every float field of the spec is a finite number (`.nan`, `.inf`, "nan" are
    # refused by name), as `x <= 0` style checks are all false for NaN.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)


# ----------------------------------------------------------------------------------------- data


#: An n-gram size for the n-gram repetition rules.
NgramSize = Annotated[int, Field(ge=1)]


class QualityFilters(_Strict):
    """Gopher/C4-style document heuristics; a threshold of null disables that check.

    The defaults are Gopher's (Rae et al. 2021, appendix A, Table A1); `palm.data.filters` defines each
    measure. A source of kind "code" gets `CODE_FILTER_DEFAULTS` instead of the prose-only ones."""

    min_words: int | None = 50
    """Fewest words a document may have."""
    max_words: int | None = 100_000
    """Most words a document may have."""
    min_mean_word_length: float | None = 3.0
    """Smallest mean word length (characters)."""
    max_mean_word_length: float | None = 10.0
    """Largest mean word length (characters)."""
    max_hash_to_word_ratio: float | None = 0.1
    """"#" per word and "..."/"…" per word, each on its own (Gopher applies them separately)."""
    max_ellipsis_to_word_ratio: float | None = 0.1
    """"..." and "…" per word, at most."""
    max_fraction_lines_ending_ellipsis: float | None = 0.3
    """Share of lines ending in an ellipsis, at most."""
    min_fraction_words_with_alpha: float | None = 0.8
    """Share of words with an alphabetic character, at least."""
    min_stop_words: int | None = 2
    """Distinct words of {the, be, to, of, and, that, have, with} a document needs."""
    max_fraction_duplicate_lines: float | None = 0.3
    """Gopher's repetition removal. Lines (paragraphs) that repeat an earlier one: their share of the
    non-empty lines (paragraphs), and their characters' share of the document's."""
    max_fraction_duplicate_line_chars: float | None = 0.2
    """Characters of repeated lines, as a share of the document's, at most."""
    max_fraction_duplicate_paragraphs: float | None = 0.3
    """Paragraphs that repeat an earlier one, as a share of the non-empty paragraphs, at most."""
    max_fraction_duplicate_paragraph_chars: float | None = 0.2
    """Characters of repeated paragraphs, as a share of the document's, at most."""
    max_fraction_top_ngram_chars: dict[NgramSize, float] | None = {2: 0.20, 3: 0.18, 4: 0.16}
    """n -> the most the top word n-gram's characters (count times length) may be of the document's.
    A mapping given here replaces the whole default (leave an n out to skip it); null: no check."""
    max_fraction_duplicate_ngram_chars: dict[NgramSize, float] | None = {
        5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    """n -> the most the characters in word n-grams that repeat an earlier one may be of the document's."""
    quality_sampling: bool = False
    """Sample documents with probability proportional to a quality score (PaLM did for webpages)."""


#: The filters a source of kind "code" gets unless its `filters` set them: off, the rules that measure
#: prose (word lengths, symbols per word, alphabetic words, stop words) and the repetition rules, which
#: ordinary source files fail (closing brackets, `return None`, `self.x = x`: 14 of the standard library's
#: 167 top-level modules, bisect.py and contextlib.py among them). Short and huge documents, and lines
#: ending in ellipses, are still dropped.
CODE_FILTER_DEFAULTS: dict[str, Any] = {
    "min_mean_word_length": None,
    "max_mean_word_length": None,
    "max_hash_to_word_ratio": None,
    "max_ellipsis_to_word_ratio": None,
    "min_fraction_words_with_alpha": None,
    "min_stop_words": None,
    "max_fraction_duplicate_lines": None,
    "max_fraction_duplicate_line_chars": None,
    "max_fraction_duplicate_paragraphs": None,
    "max_fraction_duplicate_paragraph_chars": None,
    "max_fraction_top_ngram_chars": None,
    "max_fraction_duplicate_ngram_chars": None,
}


class Source(_Strict):
    """One corpus in the mixture."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """The source's name in reports and the mixture (letters, digits, _ . -)."""
    paths: list[str] = Field(min_length=1)
    """Globs, local or gs://; for format "builtin", the names of corpora generated on the machine."""
    format: Literal["jsonl", "jsonl.gz", "jsonl.zst", "txt", "parquet", "builtin"]
    """File format; "builtin": corpora generated on the machine (see `paths`)."""
    text_field: str = "text"
    """Field holding the text in jsonl and parquet records."""
    weight: float = Field(gt=0, le=1)
    """Share of the mixture's tokens."""
    kind: Literal["web", "conversations", "books", "code", "wikipedia", "news", "other"] = "other"
    """Code sources also get near-duplicate removal tuned for code files, and `CODE_FILTER_DEFAULTS`."""
    filters: QualityFilters = QualityFilters()
    """For kind "code", the fields not given here take `CODE_FILTER_DEFAULTS`; given ones win."""
    split_pattern: str | None = None
    """For format "txt": a regex (multiline) at each match of which a new document starts; null: one per file."""
    max_docs: int | None = Field(None, gt=0)
    """Read at most this many documents from the source (in file order); null: all."""

    @model_validator(mode="before")
    @classmethod
    def _kind_filter_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("kind") != "code":
            return data
        given = data.get("filters", {})
        if isinstance(given, QualityFilters):  # built in Python: the fields it was given
            given = {name: getattr(given, name) for name in given.model_fields_set}
        if not isinstance(given, dict):
            return data  # validation says what is wrong with it
        return {**data, "filters": {**CODE_FILTER_DEFAULTS, **given}}


class NearDedup(_Strict):
    """MinHash LSH near-duplicate removal."""

    enabled: bool = True
    """Remove near-duplicates at all."""
    ngram: int = Field(5, ge=1)
    """Word n-gram size of the shingles compared."""
    num_perm: int = Field(128, ge=8)
    """MinHash permutations per signature."""
    threshold: float = Field(0.8, gt=0, lt=1)
    """Jaccard similarity of shingle sets at or above which two documents are near-duplicates."""
    candidate_margin: float = Field(0.15, ge=0, lt=1)
    """Candidate pairs come from LSH buckets tuned to `threshold - candidate_margin` and pass a
    signature pre-check at that level; each is then verified by the exact Jaccard similarity of the
    two documents' shingle sets against `threshold`. The margin (4 standard deviations of the
    signature estimate at 128 permutations) keeps pairs just above the threshold from being lost to
    the estimate's noise; verification keeps pairs below it from being dropped."""
    bands: int | None = None
    """Bands × rows must equal num_perm; null chooses them for threshold - candidate_margin."""
    rows: int | None = None
    """Rows per LSH band; null chooses them with `bands`."""
    recall_weight: float = Field(0.9, gt=0, lt=1)
    """Weight of false negatives against false positives when choosing bands × rows. Candidate pairs
    are verified exactly, so a false positive costs only a comparison."""


class Dedup(_Strict):
    """Duplicate removal: exact, then near-duplicates."""

    exact: bool = True
    """Drop documents whose text is an exact duplicate of an earlier one."""
    near: NearDedup = NearDedup()
    """Near-duplicate removal (MinHash LSH, each candidate pair verified exactly)."""


#: Beam runners that run in this process's machine (the others run on remote workers and write gs:// outputs).
LOCAL_RUNNERS = ("in_process", "multi_process")


class BeamRunner(_Strict):
    """Where the Beam pipelines run: in process locally, Dataflow (or Flink/Spark) at scale."""

    runner: Literal["in_process", "multi_process", "dataflow", "flink", "spark"] = "in_process"
    """Beam runner: "in_process" or "multi_process" on this machine; "dataflow", "flink" or "spark" on remote workers (gs:// outputs)."""
    num_workers: int = Field(2, ge=1)
    """Worker processes for multi_process; initial workers on Dataflow."""
    project: str | None = None
    """GCP project of the Dataflow job (dataflow)."""
    region: str | None = None
    """GCP region of the Dataflow job (dataflow)."""
    temp_location: str | None = None
    """gs:// path for the Dataflow job's temporary and staged files (dataflow)."""
    machine_type: str | None = None
    """Compute Engine machine type of the Dataflow workers (dataflow); null: Dataflow's default."""
    max_num_workers: int | None = Field(None, ge=1)
    """Most workers Dataflow's autoscaling may use (dataflow); null: Dataflow's default."""
    master_url: str | None = None
    """Flink or Spark master (host:port, spark://host:port) for the portable runners."""
    packaging: Literal["image", "wheel"] = "image"
    """How remote workers (dataflow, flink, spark) get palm-pipeline and its locked dependencies.
    "image": they run an SDK container image that has them installed (`sdk_container_image`, by default
    `infra.launcher.image`, the image `palm image` builds from infra/Dockerfile); nothing is installed
    when a worker starts. "wheel": palm's wheel and pinned requirements are staged with the job and
    pip-installed on every worker at start-up (`extra_packages` and `requirements_file`; palm builds
    both from this checkout and uv.lock when they are unset)."""
    sdk_container_image: str | None = None
    """The workers' SDK container image; default `infra.launcher.image` (packaging: image)."""
    extra_packages: list[str] = []
    """packaging: wheel only."""
    requirements_file: str | None = None
    """packaging: wheel only; pinned requirements installed on every worker (null: built from uv.lock)."""


class QualityClassifierSpec(_Strict):
    """How the sources with `filters.quality_sampling` are scored (palm.data.quality).

    "classifier" (PaLM and GLaM): a linear classifier of hashed word n-grams, trained by the `quality`
    stage to tell the curated sources from the sampled ones. "heuristic": palm.data.filters.quality_score,
    a hand-written score of prose-likeness that needs no training (a stand-in, chosen explicitly)."""

    scorer: Literal["classifier", "heuristic"] = "classifier"
    """How documents are scored: "classifier" (trained by the quality stage) or "heuristic" (no training)."""
    positive_sources: list[str] | None = None
    """The curated sources (positives); null: those of `positive_kinds`."""
    positive_kinds: list[Literal["web", "conversations", "books", "code", "wikipedia", "news", "other"]] = \
        ["wikipedia", "books"]
    """Source kinds whose sources are the positives when `positive_sources` is null."""
    max_docs_per_class: int = Field(20_000, ge=2)
    """Documents sampled per class (split evenly over that class's sources)."""
    held_out_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the sampled documents held out to measure the classifier."""
    ngram: int = Field(2, ge=1, le=5)
    """Word 1..ngram-grams, hashed into num_features columns (a power of two)."""
    num_features: int = Field(2**20, ge=2**10, le=2**24)
    """Hashed feature columns (a power of two)."""
    regularization: float = Field(1.0, gt=0)
    """Inverse L2 regularization strength (scikit-learn's C)."""
    alpha: float = Field(9.0, gt=0)
    """Shape of the Pareto rule that keeps a document when Pareto(alpha) > 1 - score (GLaM: 9)."""
    min_auc: float = Field(0.7, ge=0, le=1)
    """The least held-out ROC AUC a classifier needs to be used: one that tells the classes apart no better
    than this is refused (exit 2), never used to drop documents. It only accepts or refuses an output, never
    changes one, so it is left out of the quality and data stages' keys (`classifier_config`,
    palm.dag.table.ACCEPT_ONLY); the data stage checks it again on a reused classifier, so raising it
    refuses one built under a lower floor."""


class DataSpec(_Strict):
    """The data stage: sources, quality filtering, deduplication, mixture and split (Beam)."""

    sources: list[Source] = Field(min_length=1)
    """The corpora of the mixture, each with its share of the tokens."""
    quality: QualityClassifierSpec = QualityClassifierSpec()
    """How sources with `filters.quality_sampling` are scored (classifier or heuristic)."""
    invalid_utf8: Literal["repair", "drop"] = "repair"
    """Bytes that are not valid UTF-8: repair them (U+FFFD) or drop the document; either is counted."""
    normalize: Literal["none", "nfc"] = "none"
    """Text normalization; "none" is lossless (whitespace kept exactly)."""
    dedup: Dedup = Dedup()
    """Exact and near-duplicate (MinHash) removal."""
    token_budget: int | None = Field(None, gt=0)
    """Tokens the mixture should supply; null takes every document once."""
    validation_fraction: float = Field(0.001, ge=0, lt=1)
    """Share of documents held out as the validation split."""
    bytes_per_token: float = Field(4.0, gt=0)
    """Tokens are estimated as UTF-8 bytes / bytes_per_token until the tokenizer exists."""
    num_shards: int = Field(8, ge=1)
    """Output files the data stage writes per split."""
    seed: int = 0
    """Seed of the data stage's sampling and the split."""
    beam: BeamRunner = BeamRunner()
    """Where the Beam pipelines run."""

    def uses_classifier(self) -> bool:
        """Whether the data stage needs a trained quality classifier: a source samples by quality, and the
        spec chose the classifier (the default) rather than the heuristic."""
        return self.quality.scorer == "classifier" and any(s.filters.quality_sampling for s in self.sources)

    def positive_sources(self) -> list[Source]:
        """The curated sources the quality classifier learns as positives."""
        q = self.quality
        if q.positive_sources is not None:
            names = set(q.positive_sources)
            return [s for s in self.sources if s.name in names]
        return [s for s in self.sources if s.kind in q.positive_kinds]

    def negative_sources(self) -> list[Source]:
        """The quality-sampled sources, the classifier's negatives."""
        return [s for s in self.sources if s.filters.quality_sampling]

    def classifier_config(self) -> dict[str, Any]:
        """What the quality stage's output depends on (its key): how the two classes' documents are read
        and filtered, and the classifier's settings; not the mixture weights, dedup or sharding."""
        dumped = self.model_dump(mode="json")
        read = ("name", "paths", "format", "text_field", "kind", "filters", "split_pattern", "max_docs")
        used = {s.name for s in self.positive_sources() + self.negative_sources()}
        quality = {k: v for k, v in dumped["quality"].items() if k != "min_auc"}  # accepts, never changes
        return {"sources": [{k: s[k] for k in read} for s in dumped["sources"] if s["name"] in used],
                "invalid_utf8": dumped["invalid_utf8"], "normalize": dumped["normalize"], "seed": dumped["seed"],
                "quality": quality}


# ------------------------------------------------------------------------------------ tokenizer


class TokenizerSpec(_Strict):
    """SentencePiece with PaLM's lossless settings."""

    vocab_size: int = Field(256_000, ge=16)
    """Pieces in the SentencePiece vocabulary (PaLM: 256k)."""
    model_type: Literal["unigram", "bpe"] = "unigram"
    """SentencePiece algorithm (PaLM: unigram)."""
    byte_fallback: bool = True
    """Spell characters outside the vocabulary as UTF-8 bytes (lossless)."""
    split_digits: bool = True
    """One piece per digit, as PaLM does for numbers."""
    normalization: Literal["identity"] = "identity"
    """"identity" keeps every character and whitespace run as it is."""
    character_coverage: float = Field(0.99995, gt=0, le=1)
    """Share of the training characters the vocabulary covers directly."""
    sample_chars: int = Field(10_000_000, gt=0)
    """Characters of text drawn (by mixture weight) to train the vocabulary."""
    seed: int = 0
    """Seed of the text sample the vocabulary is trained on."""


class PackSpec(_Strict):
    """Token ids, one end-of-document token per document, cut into sequences of model.seq_len."""

    format: Literal["rows"] = "rows"
    """Files of fixed-size rows (n × seq_len little-endian int32): each training host reads its own rows
    in place, one positioned or ranged read per row, local or gs:// (palm.data.pack)."""
    num_shards: int = Field(8, ge=1)
    """Files of packed rows the pack stage writes per split."""


# ----------------------------------------------------------------------------------------- eval


#: Evaluation tasks by name; besides these, mc:<task.yaml> and lm_eval:<task>.
BUILTIN_EVAL_TASKS = ("validation_loss", "memorization", "gsm8k", "humaneval")


def is_eval_task(task: str) -> bool:
    """Whether `task` names an evaluation task (eval.tasks, `palm eval --tasks`)."""
    kind, _, arg = task.partition(":")
    return task in BUILTIN_EVAL_TASKS or (kind in ("mc", "lm_eval") and bool(arg))


class EvalSpec(_Strict):
    """What to evaluate on each checkpoint. Task names: validation_loss, memorization, gsm8k, humaneval,
    mc:<path to a multiple-choice task YAML>, lm_eval:<lm-eval task name>."""

    tasks: list[str] = ["validation_loss"]
    """Evaluation tasks: validation_loss, memorization, gsm8k, humaneval, mc:<task.yaml>, lm_eval:<task>."""
    max_examples: int | None = Field(None, gt=0)
    """Cap on examples per task (null: all)."""
    max_new_tokens: int = Field(256, gt=0)
    """Most tokens generated per example by the generative tasks (gsm8k, humaneval)."""
    batch_size: int = Field(8, gt=0)
    """Examples evaluated at once."""
    seed: int = 0
    """Seed of sampling and example selection."""
    data_dir: str = "../shared/data"
    """Where gsm8k/ and humaneval/ live (local path)."""
    humaneval_samples: int = Field(1, ge=1)
    """HumanEval samples per problem: 1 is greedy pass@1; more adds pass@k with T=0.8, top-p 0.95."""
    memorization_prefix: int = Field(50, gt=0)
    """Memorization (section 7): prefix and continuation lengths in tokens."""
    memorization_continuation: int = Field(50, gt=0)
    """Tokens of the continuation compared with the training text (memorization)."""
    lm_eval_include_path: str | None = None
    """Extra lm-eval task YAMLs (local data files only)."""
    launch: Literal["auto", "local", "workers"] = "auto"
    """Where the eval-new-checkpoints flow evaluates a checkpoint (palm/jobs/evaljob.py): "local" in its own
    process; "workers" as a sharded job on the launcher's workers (infra.launcher, on infra.mesh, as
    training runs); "auto" on workers when twice the parameters' bytes exceed what the flow's process
    holds (its accelerators' memory, or the host's RAM on CPU). Not part of the eval stage's key: where
    it runs does not change the results."""


# ---------------------------------------------------------------------------------------- infra

class Hardware(_Strict):
    """The chips the job runs on."""

    accelerator: Literal["cpu", "h100", "h200", "a100", "tpu-v4", "tpu-v5p"] = "cpu"
    """The chip type (sets the peak FLOPs for MFU and, for TPUs, the compile and launch path)."""
    num_devices: int = Field(1, gt=0)
    """Chips in the whole job, over all slices."""
    num_slices: int = Field(1, gt=0)
    """TPU slices (pods) joined over the data-center network; the `data` mesh axis spans them."""
    devices_per_host: int = Field(1, gt=0)
    """Chips per host (TPU v4: 4); num_devices must be a multiple of it."""
    topology: str | None = None
    """Physical TPU topology of one slice, e.g. "16x16x12"."""
    memory_bytes: int | None = Field(None, gt=0)
    """Device memory per chip, bytes (for the plan's fit check)."""

    @property
    def peak_flops(self) -> float | None:
        return PEAK_FLOPS[self.accelerator]

    @property
    def is_tpu(self) -> bool:
        """A TPU generation (compiled ahead of time for its pods, launched on TPU VMs or GKE)."""
        return self.accelerator.startswith("tpu-")


class Launcher(_Strict):
    """How the train stage runs (palm/jobs/launch.py): in this process, as local worker processes, on TPU
    VMs (gcloud) or as a JobSet on GKE. Cross-field checks happen when launching (`palm launch`)."""

    kind: Literal["local", "tpu-vm", "gke"] = "local"
    """Launcher: "local" (this machine), "tpu-vm" (gcloud TPU VMs) or "gke" (a JobSet on GKE)."""
    project: str | None = None
    """GCP project and zone of the TPU VMs (tpu-vm)."""
    zone: str | None = None
    """GCP zone of the TPU VMs (tpu-vm)."""
    runtime_version: str | None = None
    """TPU VM software version (tpu-vm), e.g. tpu-ubuntu2204-base."""
    image: str | None = None
    """Container image with this repository at its working directory and `palm` on PATH (tpu-vm, gke);
    also the SDK container of remote Beam workers (data.beam.packaging: image) unless
    data.beam.sdk_container_image names another."""
    namespace: str | None = None
    """Kubernetes namespace of the JobSet (gke; default "default")."""
    processes: int = Field(1, ge=1)
    """local: worker processes on this machine (jax.distributed over loopback). With 1 the train task
    trains in its own process; `palm launch` starts one worker."""
    coordinator_port: int = Field(0, ge=0, le=65535)
    """local: the coordinator's port on 127.0.0.1; 0 picks a free one when launching."""
    max_restarts: int = Field(3, ge=0)
    """gke: whole-JobSet restarts (every slice at once) before the job counts as preempted."""
    spot: bool = False
    """tpu-vm: Spot TPUs (cheaper, preemptible)."""
    startup_timeout_s: int | None = Field(None, ge=60)
    """Seconds every host waits for all the others in jax.distributed's start-up (its
    `initialization_timeout`); null sizes it for the job's host count (palm.jobs.launching.startup_timeout)."""
    poll_seconds: float = Field(15.0, gt=0)
    """Seconds between status checks while following a launched job."""


class Identities(_Strict):
    """Who runs as whom (palm.base.iam lists the roles each needs and why): service account emails. Every
    launch and submission passes them explicitly; none of them is part of any stage's key."""

    submitter: str | None = None
    """The account that launches the jobs and submits Dataflow's (the Prefect worker's VM account)."""
    workers: str | None = None
    """The TPU VMs (queued resource --service-account) and GKE's TPU node pools (--service-account)."""
    dataflow_workers: str | None = None
    """The Dataflow workers (--service_account_email)."""


class DataflowPlacement(_Strict):
    """Where the Dataflow jobs run and stage. Each field set here is used instead of data.beam's (which
    stays in the data stage's key; where a job runs and stages does not change what it computes)."""

    region: str | None = None
    """The Dataflow region the data and pack jobs run in (checked against what Dataflow offers)."""
    temp_location: str | None = None
    """gs:// folder for Dataflow's temporary files: in a bucket the submitter may write."""
    staging_location: str | None = None
    """Where Beam stages the pipeline (default: temp_location)."""


class InfraSpec(_Strict):
    """Where the pipeline runs: hardware, mesh, storage, launcher."""

    hardware: Hardware = Hardware()
    """The chips: accelerator, how many, slices, hosts, topology."""
    mesh: dict[Literal["data", "fsdp", "model"], int] = {"data": 1, "fsdp": -1, "model": 1}
    """Axis name -> size over data, fsdp, model; -1 means "the rest of the devices"."""
    storage_root: str = "runs"
    """Where every stage writes its outputs: a local path or gs://bucket/prefix."""
    launcher: Launcher = Launcher()
    """How the train stage runs: in process, local workers, TPU VMs or GKE."""
    work_pool: str = "local-process"
    """Prefect work pool the deployments target."""
    identities: Identities = Identities()
    """Who runs as whom: the submitter, the TPU or GKE workers and the Dataflow workers (service accounts)."""
    dataflow: DataflowPlacement = DataflowPlacement()
    """Where the Dataflow jobs run and stage, in place of data.beam's settings of the same names."""

    def dataflow_setting(self, beam: "BeamRunner", key: str) -> tuple[str | None, str]:
        """(value, spec key) of a Dataflow placement setting: infra.dataflow's, else data.beam's."""
        mine = getattr(self.dataflow, key)
        if mine is not None or key == "staging_location":
            return mine, f"infra.dataflow.{key}"
        return getattr(beam, key), f"data.beam.{key}"

    def dataflow_options(self, beam: "BeamRunner") -> dict[str, str]:
        """Dataflow's options for where the job runs, stages and as whom (palm.data.beam.pipeline_options)."""
        out = {key: value for key in ("region", "temp_location", "staging_location")
               if (value := self.dataflow_setting(beam, key)[0]) is not None}
        if self.identities.dataflow_workers:
            out["service_account_email"] = self.identities.dataflow_workers
        return out


class RetryPolicy(_Strict):
    """How a stage's task is retried after a failure."""

    retries: int = Field(2, ge=0)
    """Retries after a failure (bad input is never retried)."""
    delay_seconds: float = Field(10.0, ge=0)
    """Seconds before the first retry."""
    backoff: float = Field(2.0, ge=1)
    """Each retry waits `backoff` times longer than the one before."""


# ------------------------------------------------------------------------------------- workflow


class WorkflowNode(_Strict):
    """One node of a declared workflow graph (palm.dag.workflow)."""

    stage: str | None = None
    """The stage type it runs (compile, data, tokenizer, pack, train, finetune, eval, scaling); default:
    the node's own name."""
    needs: list[str] = []
    """The nodes whose outputs it reads."""
    set: dict[str, Any] = {}
    """Spec overrides for this node alone: dotted keys (as with --set) to values."""


# ----------------------------------------------------------------------------------------- spec


class Spec(_Strict):
    """A whole pretraining pipeline: data, tokenizer, pack, train, eval, and where it runs."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    """The run's name (lowercase letters, digits, -): names its directory and artifacts."""
    description: str = ""
    """Free text shown by `palm plan`."""
    model: ModelConfig
    """The model's architecture."""
    data: DataSpec
    """The data mixture and how it is cleaned."""
    tokenizer: TokenizerSpec = TokenizerSpec()
    """The SentencePiece tokenizer."""
    pack: PackSpec = PackSpec()
    """How tokens are packed into training rows."""
    train: TrainConfig = TrainConfig()
    """The training loop."""
    eval: EvalSpec = EvalSpec()
    """What is evaluated on the trained model."""
    infra: InfraSpec = InfraSpec()
    """Hardware, mesh, storage and launcher."""
    retries: dict[str, RetryPolicy] = {}
    """Retry policy per stage type."""
    workflow: dict[str, WorkflowNode] | None = None
    """The workflow graph, node name -> node; without it, the default chain of stages (palm.dag.workflow)."""

    def resolved_mesh(self) -> dict[str, int]:
        """The mesh with -1 filled in, every axis present, in (data, fsdp, model) order."""
        return resolve_mesh(self.infra.mesh, self.infra.hardware.num_devices)

    def retry_policy(self, stage: str) -> RetryPolicy:
        return self.retries.get(stage, RetryPolicy())

    def digest(self) -> str:
        """Hash of the validated spec's content (not of its file's formatting)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def resolve_mesh(mesh: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fill in the -1 axis (at most one) so that the product is `num_devices`."""
    sizes = {axis: mesh.get(axis, 1) for axis in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise SpecError(f"only one axis may be -1, got {free}", key="infra.mesh")
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise SpecError(f"axis size must be positive or -1, got {size}", key=f"infra.mesh.{axis}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise SpecError(
                f"the fixed axes multiply to {fixed}, which does not divide the "
                f"{num_devices} devices (infra.hardware.num_devices)",
                key="infra.mesh",
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise SpecError(
            f"mesh {sizes} has {fixed} devices but infra.hardware.num_devices is {num_devices}",
            key="infra.mesh",
        )
    return sizes


# --------------------------------------------------------------------------------------- checks


def _bucket(path: str) -> str | None:
    return path[len("gs://"):].split("/", 1)[0] if path.startswith("gs://") else None


def _check_dataflow(spec: Spec) -> None:
    """What can be checked of a Dataflow submission before anything is paid for: its fields, its region
    (palm.base.hardware.DATAFLOW_REGIONS; the machine type is not checked), the workers' identity, and that the temp and
    staging locations are in the bucket the submitter may write (palm.base.iam: the run bucket, the one of
    infra.storage_root; the sources' buckets it only reads)."""
    beam, infra = spec.data.beam, spec.infra
    if not beam.project:
        raise SpecError("the Dataflow runner needs it", key="data.beam.project")
    for name in ("region", "temp_location"):
        value, key = infra.dataflow_setting(beam, name)
        if not value:
            raise SpecError("the Dataflow runner needs it", key=f"infra.dataflow.{name}")
    for name in ("temp_location", "staging_location"):
        value, key = infra.dataflow_setting(beam, name)
        if value is not None and _bucket(value) is None:
            raise SpecError("Dataflow stages through Cloud Storage: use a gs:// path", key=key)
    region, region_key = infra.dataflow_setting(beam, "region")
    problem = dataflow_machine_problem(region, beam.machine_type)
    if problem:
        raise SpecError(problem, key=region_key)
    if not infra.identities.dataflow_workers:
        raise SpecError("the service account the Dataflow workers run as (passed as --service_account_email; "
                        "without it they run as the project's Compute Engine default account): see palm.base.iam",
                        key="infra.identities.dataflow_workers")
    writable = _bucket(infra.storage_root)
    read_only = {_bucket(p) for src in spec.data.sources for p in src.paths} - {None, writable}
    for name in ("temp_location", "staging_location"):
        value, key = infra.dataflow_setting(beam, name)
        if value is None:
            continue
        bucket = _bucket(value)
        if bucket != writable:
            why = ("a bucket the submitter only reads (a source's)" if bucket in read_only
                   else "a bucket the submitter has no grant on")
            where = f"gs://{writable}/dataflow-tmp" if writable else "a gs:// infra.storage_root's bucket"
            raise SpecError(f"gs://{bucket} is {why}; the submitter writes only the run bucket "
                            f"(infra.storage_root, palm.base.iam): use {where}", key=key)


def check_consistency(spec: Spec) -> None:
    """Cross-field checks that single fields cannot express. Raises SpecError with the key path."""
    m, t = spec.model, spec.train

    for key in ("num_layers", "d_model", "num_heads", "head_dim", "num_kv_heads", "ffw_multiplier",
                "vocab_size", "seq_len"):
        if getattr(m, key) <= 0:
            raise SpecError(f"must be a positive integer, got {getattr(m, key)}", key=f"model.{key}")
    if m.head_dim % 2:
        raise SpecError(f"RoPE rotates pairs of dimensions, so head_dim must be even, got {m.head_dim}",
                        key="model.head_dim")
    if m.num_heads % m.num_kv_heads:
        raise SpecError(f"num_kv_heads ({m.num_kv_heads}) must divide num_heads ({m.num_heads})",
                        key="model.num_kv_heads")
    if m.rope_max_wavelength <= 1 or m.layer_norm_epsilon <= 0:
        raise SpecError("rope_max_wavelength must exceed 1 and layer_norm_epsilon be positive", key="model")

    mesh = spec.resolved_mesh()
    dp = mesh["data"] * mesh["fsdp"]
    hw = spec.infra.hardware
    if hw.num_devices % hw.num_slices:
        raise SpecError(f"{hw.num_devices} devices do not split evenly over {hw.num_slices} slices",
                        key="infra.hardware.num_slices")
    if hw.num_slices > 1 and mesh["data"] % hw.num_slices:
        raise SpecError(f"the data axis ({mesh['data']}) must be a multiple of num_slices "
                        f"({hw.num_slices}): only data parallelism crosses slices", key="infra.mesh.data")
    if hw.topology is not None:
        try:
            dims = parse_topology(hw.topology)
        except PalmError as e:
            raise SpecError(str(e), key="infra.hardware.topology") from None
        if math.prod(dims) * hw.num_slices != hw.num_devices:
            raise SpecError(f"{hw.num_slices} slice(s) of {hw.topology} are {math.prod(dims) * hw.num_slices} chips, "
                            f"but num_devices is {hw.num_devices}", key="infra.hardware.topology")
        if hw.accelerator.startswith("tpu") and not mesh_fits_topology(mesh, dims, hw.num_slices):
            near = nearest_mesh(mesh, dims, hw.num_slices, heads=m.num_heads,
                                batches=[s.global_batch for s in spec.train.batch_ramp])
            hint = f"; the nearest that does: {{{', '.join(f'{a}: {v}' for a, v in near.items())}}}" if near else ""
            raise SpecError(f"mesh {', '.join(f'{a}={v}' for a, v in mesh.items())} does not lay out on "
                            f"{hw.num_slices} slice(s) of {hw.topology}: within a slice each axis must span whole "
                            f"physical axes of the slice (sizes that are products of {', '.join(map(str, dims))}), and data must be "
                            f"a multiple of the slices{hint}", key="infra.mesh")
    if hw.num_devices % hw.devices_per_host:
        raise SpecError(f"{hw.num_devices} devices do not split evenly into hosts of {hw.devices_per_host}",
                        key="infra.hardware.devices_per_host")
    if m.num_heads % mesh["model"]:
        raise SpecError(f"model-parallel size {mesh['model']} must divide num_heads ({m.num_heads})",
                        key="infra.mesh.model")
    if m.d_ff % mesh["model"]:
        raise SpecError(f"model-parallel size {mesh['model']} must divide d_ff ({m.d_ff})",
                        key="infra.mesh.model")
    for axis_size, dim, what in ((mesh["fsdp"], m.d_model, "model.d_model"),
                                 (mesh["fsdp"], m.vocab_size, "model.vocab_size")):
        if dim % axis_size:
            raise SpecError(f"{dim} is not divisible by the fsdp axis ({axis_size}), which shards it",
                            key=what)
    if m.d_model % mesh["model"]:
        raise SpecError(f"model-parallel size {mesh['model']} must divide d_model ({m.d_model}), "
                        "which shards the embedding table", key="model.d_model")

    if t.steps <= 0:
        raise SpecError(f"must be positive, got {t.steps}", key="train.steps")
    if not t.batch_ramp:
        raise SpecError("needs at least one stage", key="train.batch_ramp")
    if t.batch_ramp[0].from_step != 0:
        raise SpecError("the first stage must start at from_step 0", key="train.batch_ramp.0.from_step")
    for i, stage in enumerate(t.batch_ramp):
        if i and stage.from_step <= t.batch_ramp[i - 1].from_step:
            raise SpecError("from_step must increase from stage to stage",
                            key=f"train.batch_ramp.{i}.from_step")
        if stage.global_batch <= 0 or stage.global_batch % dp:
            raise SpecError(f"global_batch {stage.global_batch} must be a positive multiple of the "
                            f"data-parallel size {dp} (mesh data × fsdp)",
                            key=f"train.batch_ramp.{i}.global_batch")
    o, s = t.optimizer, t.schedule
    for key, value in (("beta1", o.beta1),):
        if not 0 <= value < 1:
            raise SpecError(f"must be in [0, 1), got {value}", key=f"train.optimizer.{key}")
    for key in ("decay_exponent", "update_clip", "gradient_clip", "min_parameter_scale", "epsilon"):
        if getattr(o, key) <= 0:
            raise SpecError(f"must be positive, got {getattr(o, key)}", key=f"train.optimizer.{key}")
    if s.peak_learning_rate <= 0:
        raise SpecError(f"must be positive, got {s.peak_learning_rate}",
                        key="train.schedule.peak_learning_rate")
    if s.constant_steps < 1 or not 0 <= s.warmup_steps <= s.constant_steps:
        raise SpecError("need constant_steps >= 1 and 0 <= warmup_steps <= constant_steps",
                        key="train.schedule")
    if t.z_loss < 0:
        raise SpecError(f"must be non-negative, got {t.z_loss}", key="train.z_loss")
    c = t.checkpoint
    if c.every_steps <= 0 or c.keep_last <= 0 or (c.keep_every is not None and c.keep_every <= 0):
        raise SpecError("every_steps, keep_last and keep_every must be positive", key="train.checkpoint")
    _check_loss_spike(t.loss_spike)
    if t.log_every <= 0:
        raise SpecError(f"must be positive, got {t.log_every}", key="train.log_every")
    if t.loss_chunk_mib <= 0:
        raise SpecError(f"must be a positive number of MiB, got {t.loss_chunk_mib}", key="train.loss_chunk_mib")
    if t.profile_steps is not None and not 0 <= t.profile_steps[0] < t.profile_steps[1] <= t.steps:
        raise SpecError(f"need [first, last) with 0 <= first < last <= train.steps ({t.steps}), got "
                        f"{list(t.profile_steps)}", key="train.profile_steps")
    counts = t.microbatch_counts()
    if counts is not None:
        if len(counts) != len(t.batch_ramp):
            raise SpecError(f"needs one count per batch_ramp stage ({len(t.batch_ramp)}), got {len(counts)}",
                            key="train.microbatches")
        for i, (count, stage) in enumerate(zip(counts, t.batch_ramp)):
            if isinstance(count, bool) or count < 1:
                raise SpecError(f"must be an integer >= 1 or auto, got {count}", key="train.microbatches")
            if stage.global_batch % count:
                raise SpecError(f"{count} microbatches do not divide batch_ramp stage {i}'s {stage.global_batch} "
                                "sequences", key="train.microbatches")

    total = sum(src.weight for src in spec.data.sources)
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise SpecError(f"mixture weights sum to {total:g}, expected 1", key="data.sources")
    for i, src in enumerate(spec.data.sources):
        if src.split_pattern is not None:
            if src.format != "txt":
                raise SpecError("split_pattern applies to format txt only", key=f"data.sources.{i}.split_pattern")
            try:
                re.compile(src.split_pattern)
            except re.error as e:
                raise SpecError(f"not a valid regular expression: {e}", key=f"data.sources.{i}.split_pattern") from None
    names = [src.name for src in spec.data.sources]
    if len(set(names)) != len(names):
        raise SpecError(f"source names must be unique, got {names}", key="data.sources")
    _check_quality(spec.data)
    near = spec.data.dedup.near
    if (near.bands is None) != (near.rows is None):
        raise SpecError("set both bands and rows, or neither", key="data.dedup.near")
    if near.bands is not None and near.bands * near.rows != near.num_perm:
        raise SpecError(f"bands × rows = {near.bands * near.rows} must equal num_perm ({near.num_perm})",
                        key="data.dedup.near")
    if spec.tokenizer.vocab_size > m.vocab_size:
        raise SpecError(f"tokenizer.vocab_size ({spec.tokenizer.vocab_size}) exceeds the model's "
                        f"embedding table (model.vocab_size {m.vocab_size})", key="tokenizer.vocab_size")
    if spec.data.beam.runner == "dataflow":
        _check_dataflow(spec)
    launcher = spec.infra.launcher.kind
    if launcher != "local" and spec.infra.storage_root.startswith("gs://") and not spec.infra.identities.workers:
        raise SpecError(f"the service account the {launcher} workers run as (the TPU VMs' or node pools' "
                        "--service-account; without it they run as the project's Compute Engine default account): "
                        "see palm.base.iam", key="infra.identities.workers")
    if spec.data.beam.runner in ("flink", "spark") and not spec.data.beam.master_url:
        raise SpecError(f"the {spec.data.beam.runner} runner needs its master's address",
                        key="data.beam.master_url")
    beam = spec.data.beam
    if beam.runner in ("dataflow", "flink", "spark") and beam.packaging == "image":
        if beam.extra_packages or beam.requirements_file:
            key = "extra_packages" if beam.extra_packages else "requirements_file"
            raise SpecError("only data.beam.packaging: wheel stages packages with the job; the image already "
                            "holds them: remove it, or set data.beam.packaging: wheel", key=f"data.beam.{key}")
        if not beam.sdk_container_image and not spec.infra.launcher.image:
            raise SpecError(f"the {beam.runner} workers run palm from a container image: set infra.launcher.image "
                            "(the image `palm image` builds and pushes) or data.beam.sdk_container_image, or set "
                            "data.beam.packaging: wheel to pip-install palm on every worker at start-up",
                            key="data.beam.sdk_container_image")
    for i, task in enumerate(spec.eval.tasks):
        if not is_eval_task(task):
            raise SpecError(f"unknown task {task!r}; use validation_loss, memorization, gsm8k, humaneval, "
                            "mc:<task.yaml> or lm_eval:<task>", key=f"eval.tasks.{i}")
    e = spec.eval
    if "memorization" in e.tasks and e.memorization_prefix + e.memorization_continuation >= m.seq_len:
        raise SpecError(f"memorization needs prefix + continuation < model.seq_len ({m.seq_len})",
                        key="eval.memorization_prefix")
    if spec.infra.launcher.kind != "local" and spec.infra.hardware.accelerator == "cpu":
        raise SpecError(f"launcher {spec.infra.launcher.kind!r} needs an accelerator, not cpu",
                        key="infra.hardware.accelerator")


# -------------------------------------------------------------------------------------- loading


def _check_loss_spike(ls: LossSpikeConfig) -> None:
    """train.loss_spike's values, each error naming its key."""
    if not ls.threshold > 1:
        raise SpecError(f"must be above 1 (a multiple of the median loss), got {ls.threshold}",
                        key="train.loss_spike.threshold")
    for key in ("window", "restart_every"):
        value = getattr(ls, key)
        if value is not None and value <= 0:
            raise SpecError(f"must be a positive number of steps{' or null' if key == 'restart_every' else ''}, "
                            f"got {value}", key=f"train.loss_spike.{key}")
    for key in ("skip_batches", "rollback_steps", "onset_steps"):
        if getattr(ls, key) < 0:
            raise SpecError(f"must be 0 or more, got {getattr(ls, key)}", key=f"train.loss_spike.{key}")


def _check_quality(data: DataSpec) -> None:
    """The quality classifier's classes: named sources that exist, at least one positive where a source
    samples by classifier score, and no source on both sides."""
    q = data.quality
    names = [s.name for s in data.sources]
    for name in q.positive_sources or []:
        if name not in names:
            raise SpecError(f"{name!r} is not a source; the sources are {', '.join(names)}",
                            key="data.quality.positive_sources")
    sampled = [s.name for s in data.sources if s.filters.quality_sampling]
    if q.scorer != "classifier" or not sampled:
        return
    positives = (set(q.positive_sources) if q.positive_sources is not None
                 else {s.name for s in data.sources if s.kind in q.positive_kinds})
    if not positives:
        raise SpecError(f"{', '.join(sampled)} sample(s) by the quality classifier's score, which learns curated "
                        f"text from sources of kind {', '.join(q.positive_kinds)}; this spec has none: name "
                        "curated sources in data.quality.positive_sources, or set data.quality.scorer: heuristic",
                        key="data.quality.positive_sources")
    both = sorted(positives & set(sampled))
    if both:
        raise SpecError(f"{', '.join(both)} would be both curated (positive) and quality-sampled (negative) for "
                        "the quality classifier; drop it from one side", key="data.quality.positive_sources")


def spec_schema() -> dict[str, Any]:
    """JSON Schema of the spec, for editor completion."""
    schema = Spec.model_json_schema()
    schema["properties"]["extends"] = {"type": "string", "description": "Parent spec, deep-merged under this one."}
    # A spec that extends another may leave out what its parent gives (palm.spec.loading merges them, then
    # validates the whole): the top level's required keys only without `extends`, and `data` may be partial.
    schema["anyOf"] = [{"required": ["extends"]}, {"required": schema.pop("required")}]
    schema["$defs"]["DataSpec"].pop("required", None)
    return schema
