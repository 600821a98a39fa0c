"""The data stage: clean, deduplicate and mix the corpus (Beam), sampling by the quality classifier."""

from __future__ import annotations

from typing import Any, Callable

from palm.data.pipeline import run_data_stage
from palm.data.quality import check_auc
from palm.data.quality_report import read_report


def build(spec: Any, inputs: dict[str, Any], hooks: Any) -> Callable[[Any], dict[str, Any]]:
    quality = inputs.get("quality")

    def run(out: Any) -> dict[str, Any]:
        if quality is not None:  # a reused classifier built under a lower data.quality.min_auc is refused too
            check_auc(spec.data, read_report(quality.path))
        return run_data_stage(spec.data, out, worker_image=spec.infra.launcher.image,
                              classifier=quality.path if quality is not None else None,
                              classifier_key=quality.key if quality is not None else None,
                              placement=spec.infra.dataflow_options(spec.data.beam))
    return run
