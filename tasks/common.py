"""What every stage task shares: the spec's retry policy and a summary artifact."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State, TaskRun

from palm.base.errors import PalmError, Preempted, environment_fault
from palm.store.outputs import StageOutput
from palm.app.report import throughput


def worth_retrying(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry crashes and transient failures, never bad input (a PalmError fails the same way every
    time), a fault of the machine that a retry meets again (a full disk, a path this user may not use, a
    directory where a file should be: EnvironmentFault, or an OSError of that kind that reached here
    unconverted), nor a stop this process was asked for (Preempted: the caller exits 75 and resumes later).
    A TransientFault (a connection reset or timed out) is retried."""
    try:
        state.result()
    except Preempted:
        return False
    except PalmError as e:
        return getattr(e, "retryable", False)
    except BaseException as e:  # noqa: BLE001 - anything else may be transient: that is what retries are for
        fault = environment_fault(e)
        return fault is None or fault.retryable
    return True


def as_environment_fault(error: BaseException, root: str) -> BaseException:
    """What a stage task raises for `error`: the EnvironmentFault it is (naming the path, `root` when the
    OSError names none), so that it is not retried and the CLI prints one line; else `error` itself."""
    fault = environment_fault(error, where=root)
    return error if fault is None else fault


def with_retry_policy(task: Task, spec: Any, stage: str) -> Task:
    """The task with the spec's retries for this stage: count, first delay, exponential backoff."""
    policy = spec.retry_policy(stage)
    delays = [policy.delay_seconds * policy.backoff**i for i in range(policy.retries)]
    return task.with_options(retries=policy.retries, retry_delay_seconds=delays or 0,
                             retry_condition_fn=worth_retrying)


def run_key(spec_name: str, root: str | Path) -> str:
    """The run's identity in artifact keys: `<spec name>-<8 hex digits>`, the digits the start of the
    SHA-256 of the run root (the run's output directory: the pretrain flow's `output`, else
    `<infra.storage_root>/<spec name>`).

    The root is taken as local paths resolved to absolute ones and gs:// paths without a trailing slash,
    so the pretrain flow (given any spelling of the directory) and eval-new-checkpoints (which finds the
    root from a checkpoint path) name the same run alike. Two runs of one spec into different directories
    get different keys (separate histories in the UI); a re-run or resume into the same directory keeps its
    keys, so its artifacts are new versions in the run's history.

    Every artifact of a run is keyed `<run key>-<rest>` (artifact_key: `<run key>-<node>-<kind>`; the run
    report `<run key>-report`). Prefect allows lowercase letters, digits and dashes only: names are
    lowercased and each run of any other characters becomes one dash.
    """
    text = str(root)
    text = text.rstrip("/") if text.startswith("gs://") else str(Path(text).resolve())
    return f"{_slug(spec_name)}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def run_artifact_key(spec_name: str, root: str | Path, *parts: Any) -> str:
    """<run key>-<part>-<part>… (see run_key)."""
    return "-".join([run_key(spec_name, root), *(_slug(p) for p in parts)])


def artifact_key(node: Any, root: str | Path, kind: str) -> str:
    """<run key>-<node>-<kind> (see run_key)."""
    return run_artifact_key(node.spec.name, root, node.name, kind)


def publish_summary(node: Any, root: str | Path, out: StageOutput) -> None:
    """The node's summary: where its output is and, for a training node, how training went."""
    state = "reused (complete output found)" if out.cached else f"built in {out.manifest.get('seconds', 0):.1f} s"
    lines = [f"**{node.name}** ({node.stage}) {state}", "", f"- output: `{out.path}`", f"- key: `{out.key}`",
             f"- code version: `{out.manifest.get('code_version')}`"]
    if "final_step" in out.manifest:
        lines += training_lines(out.manifest)
    create_markdown_artifact(key=artifact_key(node, root, "summary"), markdown="\n".join(l for l in lines if l is not None) + "\n",
                             description=f"{node.name} stage of {node.spec.name} ({root})")


def training_lines(manifest: dict[str, Any]) -> list[str]:
    """Markdown list items of a training node's result: steps, final loss, throughput and MFU (means over
    the steps in its metrics.jsonl after the first, which compiles; MFU where the chip's peak is known),
    the checkpoint; "unknown" for what the manifest lacks (launched workers write their own)."""
    m = manifest
    loss = f"{m['final_loss']:.4f}" if m.get("final_loss") is not None else "unknown"
    try:
        speed = throughput(m["metrics"]) if m.get("metrics") else {}
    except (OSError, ValueError):  # unreadable metrics: the summary says "unknown", training stays done
        speed = {}
    tps = f"{speed['tokens_per_second']:,.0f}" if speed.get("tokens_per_second") is not None else "unknown"
    mfu = (f"{speed['mfu']:.1%}" if speed.get("mfu") is not None
           else "unknown (no peak FLOPs known for this chip)" if speed.get("tokens_per_second") is not None
           else "unknown")
    return [f"- steps: {m.get('final_step')}", f"- final loss: {loss}", f"- tokens/s: {tps}", f"- MFU: {mfu}",
            f"- parameters: {m['params']:,}" if m.get("params") is not None else None,
            f"- checkpoint: `{m['checkpoint']}`" if m.get("checkpoint") else None,
            f"- resumed from step: {m['resumed_from']}" if m.get("resumed_from") else None]
