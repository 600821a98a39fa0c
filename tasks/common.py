"""What every stage task shares: the spec's retry policy and a summary artifact."""

from __future__ import annotations

from typing import Any

from prefect import Task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State, TaskRun

from palm.errors import PalmError, Preempted, environment_fault
from palm.stages import StageOutput


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


def artifact_key(node: Any, kind: str) -> str:
    """<spec>-<node>-<kind>; Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return f"{node.spec.name}-{node.name}-{kind}".lower().replace("_", "-").replace(".", "-")


def publish_summary(node: Any, out: StageOutput) -> None:
    state = "reused (complete output found)" if out.cached else f"built in {out.manifest.get('seconds', 0):.1f} s"
    create_markdown_artifact(
        key=artifact_key(node, "summary"),
        markdown=f"**{node.name}** ({node.stage}) {state}\n\n- output: `{out.path}`\n- key: `{out.key}`\n"
                 f"- code version: `{out.manifest.get('code_version')}`\n",
        description=f"{node.name} stage of {node.spec.name}")
