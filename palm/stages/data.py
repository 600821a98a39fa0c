"""The data stage: clean, deduplicate and mix the corpus (Beam), sampling by the quality classifier."""

from __future__ import annotations

from typing import Any, Callable

from palm.data.pipeline import run_data_stage


def build(spec: Any, inputs: dict[str, Any], hooks: Any) -> Callable[[Any], dict[str, Any]]:
    quality = inputs.get("quality")
    return lambda out: run_data_stage(spec.data, out, worker_image=spec.infra.launcher.image,
                                      classifier=quality.path if quality is not None else None,
                                      classifier_key=quality.key if quality is not None else None,
                                      placement=spec.infra.dataflow_options(spec.data.beam))
