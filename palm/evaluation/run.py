"""Run a spec's evaluation tasks on one checkpoint: PaLM's protocol, plus YAML and lm-eval tasks.

    validation_loss   token loss, perplexity and bits per byte on the data stage's validation split
    memorization      section 7: 50-token prefixes of training sequences, exact match of the next 50 greedy
    gsm8k             8-shot chain of thought (Wei et al. 2022 exemplars), exact match
    humaneval         0-shot, greedy pass@1 (and pass@k with T=0.8, top-p 0.95), sandboxed execution
    mc:<task.yaml>    few-shot multiple choice by rank classification (acc, acc_norm)
    lm_eval:<task>    any lm-evaluation-harness task with local data, through palm.evaluation.lmeval
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from palm.base import safeyaml, storage
from palm.base.errors import PalmError
from palm.core.checkpoint import open_checkpoints
from palm.core.lm import load_language_model, load_sharded_language_model
from palm.data.loader import sequence_dataset
from palm.evaluation import gsm8k as gsm8k_task
from palm.evaluation import humaneval as humaneval_task
from palm.evaluation import read_jsonl
from palm.evaluation.checkpoints import locate_run
from palm.spec.config import ModelConfig
from palm.spec.loading import apply_override, format_validation_error
from palm.spec.schema import BUILTIN_EVAL_TASKS, EvalSpec, is_eval_task
from palm.store import layout
from palm.store.outputs import local_copy


def validation_texts(data_dir: str | Path, limit: int | None) -> list[str]:
    """The validation split's texts (the train split's when it has none), in shard order, streamed from
    the data stage's output (local or gs://) and read only as far as `limit`."""
    texts: list[str] = []
    shards = storage.glob(storage.join(data_dir, "validation-*.jsonl.gz")) \
        or storage.glob(storage.join(data_dir, "train-*.jsonl.gz"))
    for shard in shards:
        with storage.open_read(shard) as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            for line in f:
                if limit and len(texts) >= limit:
                    return texts
                texts.append(json.loads(line)["text"])
    return texts


def validation_loss(lm: Any, data_dir: Path, limit: int | None) -> dict[str, float]:
    texts = validation_texts(data_dir, limit)
    if not texts:
        raise PalmError(f"no validation documents in {data_dir}")
    return {**lm.perplexity_and_bits_per_byte(texts), "documents": len(texts)}


def memorization(lm: Any, pack_dir: Path, pack_manifest: dict[str, Any], prefix: int, continuation: int,
                 limit: int | None, seed: int) -> dict[str, float]:
    """Fraction of training sequences whose next `continuation` tokens the model reproduces greedily."""
    ds = sequence_dataset(pack_dir, pack_manifest, "train", seed=seed)
    n = min(len(ds), limit or 128)
    rows = np.stack([ds[i] for i in range(n)])
    prompts, targets = rows[:, :prefix], rows[:, prefix:prefix + continuation]
    starts = np.full((n, 1), lm.start_token, np.int32)  # each row conditioned on a document start
    generated = lm.greedy_ids(np.concatenate([starts, prompts], axis=1), continuation)
    exact = (generated == targets).all(axis=1)
    return {"exact_match": float(exact.mean()), "token_match": float((generated == targets).mean()),
            "examples": n, "prefix_tokens": prefix, "continuation_tokens": continuation}


def gsm8k(lm: Any, data_dir: Path, limit: int | None, max_new_tokens: int) -> dict[str, float]:
    task = gsm8k_task
    problems = task.load_problems(Path(data_dir) / "gsm8k" / "test.jsonl")[: limit or None]
    prompts = [task.build_prompt(p["question"]) for p in problems]
    completions = lm.generate(prompts, min(max_new_tokens, lm.seq_len // 2), stop=list(task.STOP))
    samples = [{"question": p["question"], "completion": c} for p, c in zip(problems, completions)]
    return task.score_samples(samples, problems)


def humaneval(lm: Any, data_dir: Path, limit: int | None, max_new_tokens: int, samples: int,
              seed: int) -> dict[str, float]:
    task = humaneval_task
    by_id = task.load_problems(Path(data_dir) / "humaneval" / "HumanEval.jsonl.gz")
    problems = list(by_id.values())[: limit or None]
    stop = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
    new = min(max_new_tokens, lm.seq_len // 2)
    rows = []
    if samples == 1:
        completions = lm.generate([p["prompt"] for p in problems], new, stop=stop)
        rows = [{"task_id": p["task_id"], "completion": c} for p, c in zip(problems, completions)]
    else:
        for k in range(samples):
            completions = lm.generate([p["prompt"] for p in problems], new, temperature=0.8, top_p=0.95,
                                      stop=stop, seed=seed + k)
            rows += [{"task_id": p["task_id"], "completion": c} for p, c in zip(problems, completions)]
    return task.score_samples(rows, {p["task_id"]: p for p in problems})


#: Keys of a multiple-choice task YAML (docs/evaluation.md): key -> (type, default, meaning).
MC_KEYS: dict[str, tuple[type, Any, str]] = {
    "data": (str, None, "JSONL file of examples, relative to the YAML file (required)"),
    "question": (str, "question", "field holding the question text"),
    "choices": (str, "choices", "field holding the list of choice strings"),
    "answer": (str, "answer", "field holding the index of the right choice"),
    "num_shots": (int, 0, "the first N examples (with their right answers) prefix every question"),
    "answer_prefix": (str, " ", "text between a question and a choice"),
    "description": (str, "", "text before the shots and the question"),
    "separator": (str, "\n\n", "text after each shot"),
}


def load_mc_task(task_file: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A multiple-choice task YAML and its examples, validated: (settings, docs). Any problem is one
    PalmError naming the file, the key or the line."""
    path = Path(task_file)
    try:
        task = safeyaml.safe_load(safeyaml.read_text(path))
    except FileNotFoundError:
        raise PalmError(f"multiple-choice task {path}: file not found") from None
    except safeyaml.NotReadable as e:
        raise PalmError(f"multiple-choice task {path}: {e.reason}") from None
    except UnicodeDecodeError as e:
        raise PalmError(f"multiple-choice task {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise PalmError(f"multiple-choice task {path}: cannot read it: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise PalmError(f"multiple-choice task {path}: invalid YAML: {safeyaml.error_text(e)}") from None
    if not isinstance(task, dict):
        raise PalmError(f"multiple-choice task {path}: expected a mapping of {', '.join(MC_KEYS)}")
    unknown = sorted(set(task) - set(MC_KEYS))
    if unknown:
        raise PalmError(f"multiple-choice task {path}: unknown key(s) {unknown} (known: {', '.join(MC_KEYS)})")
    settings: dict[str, Any] = {}
    for key, (kind, default, _) in MC_KEYS.items():
        value = task.get(key, default)
        if value is None or not isinstance(value, kind) or isinstance(value, bool):
            raise PalmError(f"multiple-choice task {path}: {key} must be a {kind.__name__}"
                            + (", and is required" if default is None else f", got {value!r}"))
        settings[key] = value
    if settings["num_shots"] < 0:
        raise PalmError(f"multiple-choice task {path}: num_shots must be >= 0, got {settings['num_shots']}")

    q, c, a = settings["question"], settings["choices"], settings["answer"]

    def check(doc: dict[str, Any]) -> str | None:
        if not isinstance(doc.get(q), str):
            return f"{q!r} must be a string"
        choices = doc.get(c)
        if not isinstance(choices, list) or not choices or not all(isinstance(x, str) for x in choices):
            return f"{c!r} must be a non-empty list of strings"
        gold = doc.get(a)
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            return f"{a!r} must be an index into {c!r} (0 to {len(choices) - 1}), got {gold!r}"
        return None

    docs = read_jsonl(path.parent / settings["data"], what=f"multiple-choice examples of {path}", validate=check)
    if len(docs) <= settings["num_shots"]:
        raise PalmError(f"multiple-choice task {path}: {len(docs)} examples leave none after the "
                        f"{settings['num_shots']} shots")
    return settings, docs


def multiple_choice(lm: Any, task_file: str | Path, limit: int | None) -> dict[str, float]:
    """A few-shot multiple-choice task defined in YAML (format: docs/evaluation.md), scored by rank
    classification: acc (the most likely choice) and acc_norm (per character, as lm-eval's acc_norm)."""
    t, docs = load_mc_task(task_file)
    q, c, a, prefix = t["question"], t["choices"], t["answer"], t["answer_prefix"]
    shots = t["num_shots"]
    context_shots = t["description"] + "".join(f"{d[q]}{prefix}{d[c][d[a]]}{t['separator']}" for d in docs[:shots])
    acc, acc_norm = [], []
    for doc in docs[shots:][: limit or None]:
        ranked = lm.rank_choices(context_shots + doc[q], [prefix + x for x in doc[c]], gold=doc[a])
        acc.append(ranked["acc"])
        acc_norm.append(ranked["acc_norm"])
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "examples": len(acc)}


#: Keys of a task's results that count its examples, first found wins.
EXAMPLE_KEYS = ("examples", "documents", "n")


class EvalProgress:
    """Progress of `palm eval` on a stream, per task: a line as it starts, one at most every `every` seconds
    while it runs (the sequences scored or generated so far, from the model's `on_rows`), and one as it
    ends with its examples and examples/s."""

    def __init__(self, stream: Any, every: float = 10.0):
        self.stream, self.every = stream, every
        self.task, self.started, self.rows, self.last = "", 0.0, 0, 0.0

    def _say(self, text: str) -> None:
        print(f"eval {self.task}: {text}", file=self.stream, flush=True)

    def start(self, task: str) -> None:
        self.task, self.started, self.rows = task, time.monotonic(), 0
        self.last = self.started
        self._say("started")

    def on_rows(self, n: int) -> None:
        self.rows += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._say(f"{self.rows:,} sequences so far, {self.rows / (now - self.started):.1f}/s")

    def done(self, result: dict[str, Any] | None) -> None:
        seconds = max(time.monotonic() - self.started, 1e-9)
        examples = next((result[k] for k in EXAMPLE_KEYS if isinstance((result or {}).get(k), int)), None)
        self._say(f"{examples:,} examples in {seconds:.1f} s ({examples / seconds:.2f} examples/s)"
                  if examples is not None else f"done in {seconds:.1f} s")


def run_tasks(lm: Any, eval_spec: Any, *, data_dir: Path | None = None, pack_dir: Path | None = None,
              pack_manifest: dict[str, Any] | None = None,
              progress: EvalProgress | None = None) -> dict[str, dict[str, float]]:
    """Every task of `eval_spec.tasks` on one loaded model: {task: {metric: value}}; `progress` reports
    each task as it runs."""
    if progress is None:
        return _run_tasks(lm, eval_spec, data_dir, pack_dir, pack_manifest, None)
    lm.on_rows = progress.on_rows
    try:
        return _run_tasks(lm, eval_spec, data_dir, pack_dir, pack_manifest, progress)
    finally:
        lm.on_rows = None


def _run_tasks(lm: Any, eval_spec: Any, data_dir: Path | None, pack_dir: Path | None,
               pack_manifest: dict[str, Any] | None, progress: EvalProgress | None) -> dict[str, dict[str, float]]:
    e = eval_spec
    results: dict[str, dict[str, float]] = {}
    lm_eval_tasks = []
    for task in e.tasks:
        if progress is not None and not task.startswith("lm_eval:"):
            progress.start(task)
        if task == "validation_loss":
            if data_dir is None:
                raise PalmError("validation_loss needs the data stage's output")
            results[task] = validation_loss(lm, data_dir, e.max_examples)
        elif task == "memorization":
            if pack_dir is None:
                raise PalmError("memorization needs the pack stage's output")
            results[task] = memorization(lm, pack_dir, pack_manifest, e.memorization_prefix,
                                         e.memorization_continuation, e.max_examples, e.seed)
        elif task == "gsm8k":
            results[task] = gsm8k(lm, Path(e.data_dir), e.max_examples, e.max_new_tokens)
        elif task == "humaneval":
            results[task] = humaneval(lm, Path(e.data_dir), e.max_examples, e.max_new_tokens, e.humaneval_samples,
                                      e.seed)
        elif task.startswith("mc:"):
            results[task] = multiple_choice(lm, task[3:], e.max_examples)
        elif task.startswith("lm_eval:"):
            lm_eval_tasks.append(task[len("lm_eval:"):])
        else:
            raise PalmError(f"unknown evaluation task {task!r}")
        if progress is not None and not task.startswith("lm_eval:"):
            progress.done(results[task])
    if lm_eval_tasks:
        from palm.evaluation.lmeval import run_lm_eval  # lm-evaluation-harness: loaded only for its tasks

        if progress is not None:
            progress.start("lm_eval:" + ",".join(lm_eval_tasks))
        for name, metrics in run_lm_eval(lm, lm_eval_tasks, e.lm_eval_include_path, e.max_examples).items():
            results[f"lm_eval:{name}"] = metrics
        if progress is not None:
            progress.done(None)
    return results


def check_task_names(tasks: list[str], where: str = "eval.tasks") -> None:

    for task in tasks:
        if not is_eval_task(task):
            raise PalmError(f"{where}: unknown task {task!r} (known: {', '.join(BUILTIN_EVAL_TASKS)}, "
                            f"mc:<task.yaml>, lm_eval:<task>)")


def eval_settings(checkpoint: str | Path, spec: Any = None, tasks: list[str] | None = None,
                  overrides: list[str] | tuple[str, ...] = (), spec_path: str | Path | None = None) -> tuple[Any, str]:
    """The eval section `palm eval` runs with, and where its defaults came from.

    Defaults: the `eval` section of `spec` (a loaded Spec, read from `spec_path`) when given, else of the spec the checkpoint's run recorded
    (`<run root>/spec.json`, written by `palm run`), else EvalSpec's own defaults. Then `tasks` (from
    --tasks) and `overrides` (`eval.KEY=VALUE`, the `--set` form of every other command, read as YAML).
    """
    if spec is not None:
        base, source = spec.eval.model_dump(), str(spec_path)
    else:
        train_dir = locate_run(checkpoint)["train_dir"]
        record = layout.spec_record(layout.run_root(train_dir))
        try:
            recorded = json.loads(storage.read_text(record))
        except FileNotFoundError:
            base, source = {}, "defaults (the run recorded no spec.json)"
        except ValueError as e:
            raise PalmError(f"{record}: not a readable spec record ({e}); pass --spec SPEC") from None
        else:
            base = recorded.get("eval", {}) if isinstance(recorded, dict) else {}
            source = record
    tree: dict[str, Any] = {"eval": base}
    for assignment in overrides:
        key = assignment.partition("=")[0].strip()
        if not key.startswith("eval."):
            raise PalmError(f"--set {assignment!r}: palm eval takes keys of the spec's eval section, written "
                            f"as everywhere else: eval.KEY=VALUE (e.g. eval.max_examples=50)")
        tree = apply_override(tree, assignment)
    if tasks is not None:
        tree["eval"] = {**tree["eval"], "tasks": tasks}
    try:
        settings = EvalSpec.model_validate(tree["eval"])
    except ValidationError as e:
        error = format_validation_error(e, "--set" if overrides else source)
        raise PalmError(f"{error.file}: eval.{error.key}: {error.detail}") from None
    if not settings.tasks:
        raise PalmError("no tasks to evaluate: pass --tasks or set eval.tasks")
    check_task_names(settings.tasks, "--tasks" if tasks is not None else "eval.tasks")
    return settings, source


def evaluate_checkpoint(checkpoint: str | Path, eval_spec: Any, step: int | None = None,
                        pack: Any = None, tokenizer: Any = None,
                        mesh_shape: dict[str, int] | None = None,
                        progress: EvalProgress | None = None) -> dict[str, Any]:
    """Load one checkpoint of a training run (local or gs://) and run `eval_spec`'s tasks on it.

    The tokenizer and the packed (and validation) data are the run's own, unless `pack` and `tokenizer`
    (StageOutputs) name others: a workflow's eval node reads the ones it was given (a base model on the
    fine-tuning mixture's validation split, say).

    With `mesh_shape` the parameters are restored sharded over that mesh of every device of the job
    (palm.core.lm.load_sharded_language_model), as the hosts of a launched evaluation job do (`palm worker
    --eval-checkpoint`, palm.jobs.evaljob): every host runs this with the same arguments and gets the same
    result."""
    run = locate_run(checkpoint)
    if pack is not None:
        run.update(pack_dir=pack.path, pack_manifest=pack.manifest, data_dir=pack.manifest["inputs"]["data"]["path"])
    if tokenizer is not None:
        run.update(tokenizer_dir=tokenizer.path)
    step = run["step"] if step is None else step
    if step is None:
        ckpts = open_checkpoints(run["train_dir"])
        step = ckpts.steps()[-1]
        ckpts.close()
    # SentencePiece reads a local file (a copy of a gs:// tokenizer); the validation shards are streamed
    # and the packed rows read in place.
    tokenizer = local_copy(run["tokenizer_dir"]) / "tokenizer.model"
    if mesh_shape is None:
        lm = load_language_model(run["train_dir"], ModelConfig(**run["model"]), tokenizer, step=step,
                                 batch_size=eval_spec.batch_size)
    else:
        lm = load_sharded_language_model(layout.checkpoint_dir(run["train_dir"], step), ModelConfig(**run["model"]),
                                         tokenizer, mesh_shape, batch_size=eval_spec.batch_size)
    data_dir = run["data_dir"] if "validation_loss" in eval_spec.tasks else None
    pack_dir = run["pack_dir"] if "memorization" in eval_spec.tasks else None
    results = run_tasks(lm, eval_spec, data_dir=data_dir, pack_dir=pack_dir, pack_manifest=run["pack_manifest"],
                        progress=progress)
    return {"checkpoint": layout.checkpoint_dir(run["train_dir"], step), "step": step, "results": results}


def results_markdown(results: dict[str, dict[str, float]]) -> str:
    lines = ["| task | metric | value |", "| --- | --- | --- |"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            lines.append(f"| {task} | {metric} | {value:.4g} |" if isinstance(value, float)
                         else f"| {task} | {metric} | {value} |")
    return "\n".join(lines) + "\n"
