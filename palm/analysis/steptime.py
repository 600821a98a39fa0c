"""The training run's wall time, stage by stage of the batch ramp: the step's compute at an assumed MFU,
and the FSDP weight traffic that every microbatch repeats.

With FSDP each device holds 1/fsdp of every weight. A step gathers each layer's weights before its forward
pass, gathers them again for the backward pass (remat recomputes the forward), and reduce-scatters their
gradients: three passes over the model-parallel group's share of the parameters, of which a device
receives or sends the (fsdp - 1)/fsdp it does not hold. Split into m microbatches, the step makes these
passes m times, while its compute stays that of the global batch. The compiler overlaps the collectives
with the layers' matmuls, so a step takes the longer of the two:

    step seconds = max(compute seconds, m x FSDP traffic seconds)

At m = 1 the gathers hide behind compute for every shipped spec (the paper's MFU already includes them);
microbatching costs time only once m passes of traffic outlast the step's compute. The data axis's
gradient reduction happens once per step whatever m is, and is left to the MFU. An accelerator without a
collective bandwidth in palm.base.hardware.COLLECTIVE_BYTES_PER_S is estimated by compute alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

from palm.base.hardware import COLLECTIVE_BYTES_PER_S
from palm.spec.config import ModelConfig, TrainConfig


def fsdp_traffic_bytes(model: ModelConfig, num_params: int, mesh: dict[str, int]) -> float:
    """Bytes one device moves per microbatch for FSDP: two gathers of the weights in the compute dtype and
    one reduce-scatter of their float32 gradients, over the share of its model-parallel group."""
    fsdp, mp = mesh.get("fsdp", 1), mesh.get("model", 1)
    if fsdp <= 1:
        return 0.0
    share = num_params / mp * (fsdp - 1) / fsdp
    return share * (2 * jnp.dtype(model.dtype).itemsize + 4)


def step_times(model: ModelConfig, train: TrainConfig, mesh: dict[str, int], *, num_params: int,
               flops_per_token: float, accelerator: str, num_devices: int, peak_flops: float, mfu: float,
               microbatches: Sequence[int]) -> list[dict[str, Any]]:
    """Per batch_ramp stage: its steps, batch, microbatches, compute and FSDP traffic seconds, and the step's
    seconds (the larger of compute and microbatches x traffic)."""
    bandwidth = COLLECTIVE_BYTES_PER_S.get(accelerator)
    traffic = fsdp_traffic_bytes(model, num_params, mesh) / bandwidth if bandwidth else 0.0
    stages, out = list(train.batch_ramp), []
    for i, (stage, count) in enumerate(zip(stages, microbatches)):
        end = stages[i + 1].from_step if i + 1 < len(stages) else train.steps
        steps = max(0, min(end, train.steps) - stage.from_step)
        compute = stage.global_batch * model.seq_len * flops_per_token / (num_devices * peak_flops * mfu)
        out.append({"from_step": stage.from_step, "steps": steps, "global_batch": stage.global_batch,
                    "microbatches": count, "compute_seconds": compute, "fsdp_traffic_seconds": traffic,
                    "step_seconds": max(compute, count * traffic)})
    return out


def run_seconds(stages: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """The run's seconds, and the share of them that microbatching adds over compute alone."""
    total = sum(s["steps"] * s["step_seconds"] for s in stages)
    compute = sum(s["steps"] * s["compute_seconds"] for s in stages)
    return total, (total - compute) / total if total else 0.0
