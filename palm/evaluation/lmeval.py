"""lm-evaluation-harness backend: any lm-eval task runs against a palm checkpoint.

Importing this module registers the lm-eval model "palm" (lm-eval 0.4.13 has no plugin entry points:
its model registry knows only what is imported, so something must import palm.evaluation.lmeval first). Three
ways in:

    uv run palm lm-eval --model palm --model_args checkpoint=CKPT,batch_size=8 \\
        --tasks palm_example_mc --include_path examples/lm_eval --limit 20
        # lm-eval's own CLI (every flag of `lm_eval run`), with the model registered

    import palm.evaluation.lmeval, lm_eval
    lm_eval.simple_evaluate(model="palm", model_args="checkpoint=CKPT,batch_size=8,max_length=1024,dtype=bfloat16",
                            tasks=[...], task_manager=lm_eval.tasks.TaskManager(include_path="examples/lm_eval"))

    uv run palm eval CKPT --tasks lm_eval:TASK --set lm_eval_include_path=DIR   # palm's own evaluation

model_args (key=value, comma-separated):
    checkpoint    a step dir, a checkpoints dir or a train stage dir (latest step); local or gs://. The run's
                  model config and tokenizer are found from it (palm.evaluation.checkpoints.locate_run).
    step          the step, when `checkpoint` is not a step dir (default: the latest)
    batch_size    rows per forward pass / decode batch (default 8; lm-eval's --batch_size when model_args
                  has none; an integer, not "auto")
    max_length    the longest input in tokens, START included (default and maximum: the model's seq_len)
    dtype         compute dtype, float32 or bfloat16 (default: the run's; "auto" too)
    max_gen_toks  generation length when a task sets none (default 256, at most max_length // 2)
A bad value is a PalmError with one line; `palm lm-eval` prints it and exits 2.

The request types map onto `palm.core.lm.LanguageModel`, with the conventions of lm-eval's HF backend:
loglikelihood -> loglikelihood_batch (the harness' causal tokenization, `LanguageModel.encode_pair`;
START plays its prefix token), loglikelihood_rolling -> loglikelihood_rolling_batch (disjoint windows of
max_length), generate_until -> generate: requests are grouped by their generation kwargs (normalized
as `lm_eval.models.utils.normalize_gen_kwargs` does: do_sample false means greedy) and each group is
decoded `batch_size` prompts at a time through the KV cache, cut at the first stop sequence (or eos),
results in the requests' order. Task data must be local files (`dataset_path: json` with `data_files`;
examples/lm_eval has examples).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401 - lm-eval's own models; its registry skips them once any model is registered
import lm_eval.tasks
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks._index import TaskIndex
from lm_eval.tasks._index import log as index_log
from tqdm import tqdm as _tqdm

from palm.base.errors import PalmError
from palm.evaluation.checkpoints import load_checkpoint_model

log = logging.getLogger(__name__)


def _index_builtin_tasks_once() -> None:
    """lm-eval indexes its 14,000 built-in task YAMLs whenever a TaskManager is made (6 s on a quiet 2-core
    VM), again for each evaluation of a process that runs several (the flow evaluating every new
    checkpoint, `palm lm-eval` called in-process). The built-in directory is part of the installed package,
    so its index is built once per process; any other path (a user's task YAMLs, which may change) is
    indexed each time. `TaskIndex.build` indexes each path on its own and merges them in order, later paths
    overriding, so building the paths one by one and merging them the same way gives the same index."""
    if getattr(TaskIndex.build, "palm_builtin_once", False):  # installed already (a reload of this module)
        return
    builtin, build, built = Path(lm_eval.tasks.__file__).parent, TaskIndex.build, {}

    def build_with_builtin_once(paths, *, resolve_includes=True):
        index: dict[str, Any] = {}
        for path in paths:
            if Path(path) == builtin:
                if resolve_includes not in built:
                    built[resolve_includes] = build([path], resolve_includes=resolve_includes)
                part = built[resolve_includes]
            else:
                part = build([path], resolve_includes=resolve_includes)
            for name, entry in part.items():
                if name in index:
                    index_log.warning("Task '%s' from %s overrides existing task from %s", name, entry.yaml_path,
                                      index[name].yaml_path)
                index[name] = entry
        return index

    build_with_builtin_once.palm_builtin_once = True
    build_with_builtin_once.lm_eval_build = build  # lm-eval's own, for the test that the two agree
    TaskIndex.build = staticmethod(build_with_builtin_once)


_index_builtin_tasks_once()

#: The model_args PalmLM takes (lm-eval adds batch_size, max_batch_size and device from its own flags).
MODEL_ARGS = ("checkpoint", "step", "batch_size", "max_length", "dtype", "max_gen_toks")
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
#: Generation kwargs that palm's decoder implements; others are refused unless unset (None).
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")


def _int_arg(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PalmError(f"palm model_args: {name} must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise PalmError(f"palm model_args: {name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise PalmError(f"palm model_args: {name} must be at least {minimum}, got {number}")
    return number


def load_checkpoint(checkpoint: str | Path, *, step: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                    max_length: int | None = None, dtype: str | None = None) -> Any:
    """A `palm.core.lm.LanguageModel` from a training run's checkpoint (see the module docstring for the args)."""
    return load_checkpoint_model(checkpoint, step=step, batch_size=batch_size, max_length=max_length, dtype=dtype,
                                 what="palm model_args: ")


@register_model("palm")
class PalmLM(LM):
    """An lm-eval LM over a `palm.core.lm.LanguageModel`: a loaded one (what `palm eval` passes), or one
    loaded from `checkpoint=` (what lm-eval builds from model_args)."""

    def __init__(self, language_model: Any = None, *, checkpoint: str | None = None, step: Any = None,
                 batch_size: Any = None, max_length: Any = None, dtype: str | None = None,
                 max_gen_toks: Any = None, max_batch_size: Any = None, device: str | None = None,
                 **unknown: Any):
        super().__init__()
        if unknown:
            raise PalmError(f"palm model_args: unknown key(s) {', '.join(sorted(unknown))}; "
                            f"expected {', '.join(MODEL_ARGS)}")
        if device is not None:  # lm-eval's CLI always passes one (cuda:0 by default)
            log.debug("palm: device=%s is ignored; JAX picks the device (JAX_PLATFORMS)", device)
        if language_model is not None:
            if checkpoint is not None or any(v is not None for v in (step, batch_size, max_length, dtype)):
                raise PalmError("palm model_args: give a loaded LanguageModel or checkpoint=..., not both")
            self.lm = language_model
        else:
            if not checkpoint:
                raise PalmError("palm model_args: checkpoint=PATH is required (a step dir, a checkpoints dir or "
                                "a train stage dir)")
            if isinstance(batch_size, str) and batch_size.startswith("auto"):
                raise PalmError(f"palm model_args: batch_size must be an integer, got {batch_size!r} "
                                "(palm pads every batch to batch_size rows)")
            self.lm = load_checkpoint(
                str(checkpoint),
                step=None if step is None else _int_arg("step", step, 0),
                batch_size=DEFAULT_BATCH_SIZE if batch_size is None else _int_arg("batch_size", batch_size, 1),
                max_length=None if max_length is None else _int_arg("max_length", max_length, 2),
                dtype=None if dtype is None else str(dtype))
        limit = self.lm.max_length // 2
        self.max_gen_toks = min(DEFAULT_MAX_GEN_TOKS, limit) if max_gen_toks is None \
            else _int_arg("max_gen_toks", max_gen_toks, 1)
        if self.max_gen_toks >= self.lm.max_length:
            raise PalmError(f"palm model_args: max_gen_toks {self.max_gen_toks} leaves no room for a prompt in "
                            f"max_length {self.lm.max_length}")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "PalmLM":
        from lm_eval.utils import simple_parse_args_string

        pairs = [a for a in (arg_string or "").split(",") if a.strip()]
        bad = [a for a in pairs if "=" not in a]
        if bad:
            raise PalmError(f"palm model_args: expected key=value pairs separated by commas, got {bad[0]!r}")
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> "PalmLM":
        # lm-eval passes its own --batch_size (default 1), --max_batch_size and --device here; what model_args
        # says wins (lm-eval's base class would raise "got multiple values" instead).
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # -- requests --------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        results = self.lm.loglikelihood_batch(pairs)
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        results = self.lm.loglikelihood_rolling_batch(texts)
        for text, result in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, float, float]:
        """(stop sequences, max new tokens, temperature, top_p) of one request's generation kwargs."""
        from lm_eval.models.utils import normalize_gen_kwargs

        if not isinstance(gen_kwargs, dict):
            raise PalmError(f"generate_until: generation kwargs must be a mapping, got {gen_kwargs!r}")
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        unsupported = sorted(k for k, v in kwargs.items() if k not in GEN_KWARGS and v is not None)
        if unsupported:
            raise PalmError(f"generate_until: palm does not implement generation kwarg(s) {', '.join(unsupported)} "
                            f"(it takes {', '.join(GEN_KWARGS)})")
        until = [s for s in kwargs["until"] if isinstance(s, str) and s]
        max_new = int(kwargs["max_gen_toks"])
        if max_new >= self.lm.max_length:
            raise PalmError(f"generate_until: max_gen_toks {max_new} leaves no room for a prompt in max_length "
                            f"{self.lm.max_length}; lower it (the task's generation_kwargs, or --gen_kwargs)")
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        top_p = kwargs.get("top_p")
        return until, max_new, temperature, 1.0 if top_p is None else float(top_p)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by generation kwargs, each group decoded in batches of `batch_size` prompts
        (LanguageModel.generate); the results in the requests' order."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            gen_kwargs = r.args[1] if len(r.args) > 1 else {}
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=repr), []).append(i)
        out: list[str] = [""] * len(requests)
        for indices in groups.values():
            first = requests[indices[0]]
            until, max_new, temperature, top_p = self._generation_settings(
                first.args[1] if len(first.args) > 1 else {})
            contexts = [requests[i].args[0] for i in indices]
            texts = self.lm.generate(contexts, max_new, temperature=temperature, top_p=top_p, stop=until)
            for i, context, text in zip(indices, contexts, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", (context, *requests[i].args[1:2]), text)
        return out


def run_lm_eval(language_model: Any, tasks: list[str], include_path: str | Path | None = None,
                limit: int | None = None, num_fewshot: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks (by name; `include_path` adds task YAMLs) and return {task: {metric: value}}."""
    # lm-eval loads task data through Hugging Face `datasets`; keep it from reaching for the hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import lm_eval
    import lm_eval.api.task
    from lm_eval.tasks import TaskManager

    # Quiet: `palm eval` reports each task's progress itself (palm.evaluation.run.EvalProgress), so neither
    # the `datasets` bars ("Generating test split") nor lm-eval's per-task bars of building requests are
    # shown (`palm lm-eval`, lm-eval's own CLI, keeps them).
    datasets.disable_progress_bars()
    lm_eval.api.task.tqdm = functools.partial(_tqdm, disable=True)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise PalmError(f"unknown lm-eval task(s) {unknown}; add their YAML with eval.lm_eval_include_path")
    results = lm_eval.simple_evaluate(model=PalmLM(language_model), tasks=tasks, task_manager=manager,
                                      limit=limit, num_fewshot=num_fewshot, bootstrap_iters=0,
                                      log_samples=False)
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and "stderr" not in k}
    return out


def cli(argv: list[str]) -> int:
    """`palm lm-eval ARGS`: lm-eval's CLI (`lm_eval ARGS`) with the "palm" model registered. lm-eval's own
    complaints about its input (ValueError, e.g. "Tasks not found: ...", FileNotFoundError) become one-line
    PalmErrors, as palm's are."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["palm lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, PalmError):
            raise
        raise PalmError(f"lm-eval: {e}") from None
    finally:
        sys.argv = saved
    return 0
