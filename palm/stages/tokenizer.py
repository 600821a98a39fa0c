"""The tokenizer stage: a lossless SentencePiece vocabulary trained on the data stage's corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from palm.tokenizer import build_tokenizer_stage


def build(spec: Any, inputs: dict[str, Any], hooks: Any) -> Callable[[Path], dict[str, Any]]:
    return lambda out: build_tokenizer_stage(spec.tokenizer, inputs["data"].path, out)  # streamed, not copied
