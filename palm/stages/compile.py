"""The compile stage: the train and evaluation steps compiled ahead of time for the spec's TPU pods."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from palm.analysis.aot import compile_spec, largest_misfit
from palm.base.errors import PalmError
from palm.base.units import gib


def build(spec: Any, inputs: dict[str, Any], hooks: Any) -> Callable[[Path], dict[str, Any]]:
    def build(out: Path) -> dict[str, Any]:
        compiled = compile_spec(spec)
        (out / "compiled.json").write_text(json.dumps(compiled, indent=2))
        misfit = largest_misfit(compiled)
        if misfit is not None:  # no manifest: a spec that does not fit is never taken as checked
            hbm = compiled["hbm_bytes_per_device"]
            raise PalmError(f"the {misfit['kind']} step at global batch {misfit['global_batch']} needs "
                            f"{gib(misfit['memory_per_device_bytes'])} per chip, "
                            f"{gib(misfit['memory_per_device_bytes'] - hbm)} more than a chip's {gib(hbm)}; "
                            "shard wider (infra.mesh), lower the batch, or use more chips "
                            "(palm plan SPEC --compile shows every step)")
        return compiled

    return build
