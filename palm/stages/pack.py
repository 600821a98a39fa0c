"""The pack stage: tokenize and pack fixed-length sequences (Beam -> files of rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from palm.data.pack import run_pack_stage


def build(spec: Any, inputs: dict[str, Any], hooks: Any) -> Callable[[Path], dict[str, Any]]:
    return lambda out: run_pack_stage(spec.data, spec.pack.num_shards, spec.model.seq_len,
                                      inputs["data"].path, inputs["tokenizer"].path, out,
                                      worker_image=spec.infra.launcher.image,
                                      placement=spec.infra.dataflow_options(spec.data.beam))
