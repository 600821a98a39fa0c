"""The stage DAG: data -> tokenizer -> pack -> train -> eval, and which stages are built."""

from __future__ import annotations

from typing import Any

#: Each stage and the stages whose outputs it reads.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "data": (),
    "tokenizer": ("data",),
    "pack": ("data", "tokenizer"),
    "train": ("pack",),
    "eval": ("train", "pack", "tokenizer"),
}
STAGE_ORDER = tuple(STAGE_INPUTS)

#: Stages with an implementation in this version, and the issue that builds the others.
BUILT: frozenset[str] = frozenset()
PLANNED_BY = {"data": "#4", "tokenizer": "#5", "pack": "#5", "train": "#6 and #8", "eval": "#7"}


def stage_graph() -> list[dict[str, Any]]:
    """The DAG as a list in run order, each stage with its inputs and whether it is built."""
    return [{"name": s, "inputs": list(STAGE_INPUTS[s]), "built": s in BUILT} for s in STAGE_ORDER]


def select_stages(requested: str | None) -> list[str]:
    """Stages to run for `--stages a,b` (all when None), in DAG order."""
    from palm.errors import PalmError

    if not requested:
        return list(STAGE_ORDER)
    names = [s.strip() for s in requested.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGE_INPUTS]
    if unknown:
        raise PalmError(f"--stages: unknown stage(s) {unknown}; choose from {', '.join(STAGE_ORDER)}")
    return [s for s in STAGE_ORDER if s in names]
