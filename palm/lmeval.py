"""lm-evaluation-harness backend: any lm-eval task runs against a palm checkpoint.

Registered as model "palm". lm-eval's three request types map onto `palm.eval.LanguageModel`:
loglikelihood -> loglikelihood_batch, loglikelihood_rolling -> loglikelihood_rolling_batch,
generate_until -> generate. Task data must be local files (`dataset_path: json` with `data_files`);
nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from palm.errors import PalmError


@register_model("palm")
class PalmLM(LM):
    """An lm-eval LM over a loaded `palm.eval.LanguageModel`."""

    def __init__(self, language_model: Any = None, **kwargs: Any):
        super().__init__()
        if language_model is None:
            raise PalmError("the palm lm-eval backend is constructed with a loaded LanguageModel "
                            "(palm eval CHECKPOINT --tasks lm_eval:TASK builds it)")
        self.lm = language_model

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.lm.loglikelihood_batch([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.lm.loglikelihood_rolling_batch([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            max_new = min(max_new, self.lm.seq_len - 1)
            temperature = float(kwargs.get("temperature", 0.0) or 0.0)
            top_p = float(kwargs.get("top_p", 1.0) or 1.0)
            out += self.lm.generate([context], max_new, temperature=temperature, top_p=top_p, stop=until)
        return out


def run_lm_eval(language_model: Any, tasks: list[str], include_path: str | Path | None = None,
                limit: int | None = None, num_fewshot: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks (by name; `include_path` adds task YAMLs) and return {task: {metric: value}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    # lm-eval loads task data through Hugging Face `datasets`; keep it from reaching for the hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
