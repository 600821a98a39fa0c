"""The quality stage: the classifier the data stage samples web documents by (scikit-learn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from palm.data.quality import train_quality_stage


def build(spec: Any, inputs: dict[str, Any], hooks: Any) -> Callable[[Path], dict[str, Any]]:
    return lambda out: train_quality_stage(spec.data, out)
