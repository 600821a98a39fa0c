"""The scaling stage: loss against parameters and training FLOPs over several trained models."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from palm.analysis.scaling import scaling_report


def build(spec: Any, inputs: dict[str, Any], hooks: Any) -> Callable[[Path], dict[str, Any]]:
    return lambda out: scaling_report(inputs, out)
