"""From a checkpoint path to what evaluating it needs: the run it belongs to (model config, tokenizer, data)
and its language model. Shared by the evaluation tasks (palm.evaluation.run), the lm-eval backend and
`palm generate`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from palm.base import storage
from palm.base.errors import PalmError
from palm.core.lm import load_language_model
from palm.spec.config import ModelConfig
from palm.store.layout import CONTEXT
from palm.store.outputs import local_copy, read_manifest


def locate_run(checkpoint: str | Path) -> dict[str, Any]:
    """From a checkpoint path (a step dir, the checkpoints dir or the train stage dir; local or gs://) to
    everything evaluation needs: the train stage dir, the model config, and the tokenizer, data and pack
    stage outputs (where they are stored: `local_copy` them before reading their files)."""
    path = str(checkpoint).rstrip("/") if storage.is_remote(checkpoint) else str(Path(checkpoint).resolve())
    name = storage.name(path)
    step = int(name) if name.isdigit() else None
    candidates = [path]
    for _ in range(3):
        candidates.append(storage.parent(candidates[-1]))
    for train_dir in candidates:
        try:
            context = json.loads(storage.read_text(storage.join(train_dir, CONTEXT)))
            break
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):  # look further up
            continue
    else:
        raise PalmError(f"{checkpoint} is not inside a train stage directory (no {CONTEXT} above it)")
    pack_dir = context["inputs"]["pack"]["path"]
    pack = read_manifest(pack_dir)
    if pack is None:
        raise PalmError(f"the pack stage output {pack_dir} that trained {train_dir} is missing or incomplete")
    return {"train_dir": train_dir, "step": step, "model": context["config"]["model"], "pack_dir": pack_dir,
            "pack_manifest": pack, "tokenizer_dir": pack["inputs"]["tokenizer"]["path"],
            "data_dir": pack["inputs"]["data"]["path"]}


#: Compute dtypes a checkpoint may be loaded in for evaluation and generation.
DTYPES = ("float32", "bfloat16")


def load_checkpoint_model(checkpoint: str | Path, *, step: int | None = None, batch_size: int = 8,
                          max_length: int | None = None, dtype: str | None = None, what: str = "") -> Any:
    """A `palm.core.lm.LanguageModel` from a training run's checkpoint (a step, checkpoints or train
    directory; the latest step unless the path or `step` names one), with the run's tokenizer. `dtype`
    overrides the model's compute dtype ("auto"/None: the run's); `what` prefixes error messages."""
    run = locate_run(checkpoint)
    if run["step"] is not None and step is not None and run["step"] != step:
        raise PalmError(f"{what}checkpoint {checkpoint} is step {run['step']}, but step={step}")
    step = run["step"] if step is None else step
    config = ModelConfig(**run["model"])
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise PalmError(f"{what}dtype must be one of {', '.join(DTYPES)} or auto, got {dtype!r}")
        config = dataclasses.replace(config, dtype=dtype)
    if max_length is not None and max_length > config.seq_len:
        raise PalmError(f"{what}max_length {max_length} exceeds the model's seq_len {config.seq_len}")
    tokenizer = local_copy(run["tokenizer_dir"]) / "tokenizer.model"
    return load_language_model(run["train_dir"], config, tokenizer, step=step, batch_size=batch_size,
                               max_length=max_length)
