"""The eval stage: the spec's evaluation tasks on a training node's final checkpoint, in this process or,
for a model too large for it, as a sharded job on the training launcher (palm.jobs.evaljob)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from palm.evaluation.run import evaluate_checkpoint, results_markdown
from palm.jobs.evaljob import evaluate_on_workers, placement
from palm.store import layout
from palm.store.tensorboard import write_eval_results


def build(spec: Any, inputs: dict[str, Any], hooks: Any) -> Callable[[Path], dict[str, Any]]:
    def build(out: Path) -> dict[str, Any]:
        checkpoint = inputs["train"].manifest["checkpoint"]
        where, why = placement(spec, spec.model)
        if where == "workers":  # too large for this process: a sharded job on the training launcher
            root = layout.run_root(inputs["train"].path)
            launched = evaluate_on_workers(spec, layout.spec_record(root), root, checkpoint,
                                           stop=hooks.stop, log=lambda line: print(line, flush=True))
            result = {"checkpoint": launched["checkpoint"], "step": launched["step"],
                      "results": launched["results"], "evaluated_on": {"where": where, "why": why,
                                                                        "job": launched.get("job")}}
        else:
            result = evaluate_checkpoint(checkpoint, spec.eval, pack=inputs["pack"], tokenizer=inputs["tokenizer"])
        write_eval_results(layout.tensorboard_dir(out), result["step"], result["results"])
        (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "results.md").write_text(results_markdown(result["results"]))
        return result

    return build
