"""The pretraining flow: the spec's workflow graph as one Prefect flow, one retryable task per node.

    [compile] -> data -> tokenizer -> pack -> train -> eval        (the default graph)

or whatever graph the spec declares (palm.dag.workflow): shared upstream nodes, several models, fine-tuning,
a scaling report. Each node is the generic stage task (tasks/stage.py) submitted with its upstream tasks'
futures, so independent branches run concurrently and Prefect records the graph's edges. Node outputs
are content-addressed (palm.store.outputs): a re-run skips complete nodes, a changed node re-runs with what
depends on it, and a retried training node resumes from its checkpoints.

The flow run ends with the run's report as artifacts (tasks/report.py), beside report.md; its tasks
publish each stage's tables and, while training, a live progress artifact. Keys: tasks.common.run_key.

The flow owns SIGTERM while it runs (the tasks may run in other threads, where a handler cannot be
installed): it sets the stop event that training reads, which checkpoints at the current step and stops.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any

from prefect import flow, get_run_logger

from palm.base.jaxenv import configure_jax

# A Prefect worker runs this flow in a process of its own, not through `palm`: set JAX up as `palm` does
# (the CPU on a chip-less host with libtpu, the persistent compilation cache) before the imports below load it.
configure_jax()

from palm.base import storage
from palm.base.errors import Preempted
from palm.dag.runner import Hooks, attach, attached, existing_output, node_inputs, record_spec, run_summary
from palm.app.report import write_report
from palm.store.runlock import run_lock
from palm.dag.workflow import load_spec
from palm.dag.workflow import resolve_workflow
from tasks.report import publish_run_report
from tasks.stage import node_task
from tasks.train import sigterm_sets


def run_root(spec: Any, output: str | None) -> str:
    if output:
        return output
    from prefect.runtime import deployment

    root = spec.infra.storage_root.rstrip("/")
    # A deployment's runs keep to a directory of their own (`runs/deployments/pretrain-tiny`), apart from
    # `palm run`'s (`runs/tiny`): a deployed run never finds a local run's outputs cached, nor waits on its
    # lock; the deployment's own runs share their cache, as repeated `palm run`s do.
    name = deployment.name
    return f"{root}/deployments/{name}" if name else f"{root}/{spec.name}"


def run_graph(workflow: Any, root: str, selected: list[str], force: frozenset[str]) -> dict[str, Any]:
    """Submit every selected node as a task once the nodes it needs are submitted (their futures are its
    inputs); take the complete outputs of unselected upstream nodes as they are. Returns the outputs by
    node name, after every task has finished; the first failure is raised after all have."""
    needed = workflow.upstream(selected)
    results: dict[str, Any] = {}  # node -> StageOutput or PrefectFuture
    for node in workflow.nodes.values():
        if node.name not in needed:
            continue
        if node.name in selected:
            inputs = node_inputs(node, results)
            waits = [results[n] for n in node.after]
            results[node.name] = node_task(node).submit(node, root, inputs, node.name in force, wait_for=waits)
        else:  # its key needs its inputs' keys: wait for any of them still being built
            inputs = {kind: _resolved(out) for kind, out in node_inputs(node, results).items()}
            results[node.name] = existing_output(node, root, inputs)
    outputs, failures = {}, []
    for name, result in results.items():
        try:
            outputs[name] = _resolved(result)
        except BaseException as e:  # noqa: BLE001 - wait for every branch, then raise the first failure
            failures.append(e)
    if failures:
        raise next((e for e in failures if isinstance(e, Preempted)), failures[0])
    return outputs


def _resolved(result: Any) -> Any:
    """A task's StageOutput (waiting for it), or a StageOutput as it is."""
    return result.result() if hasattr(result, "task_run_id") else result


@flow(name="pretrain", log_prints=True)
def pretrain(spec_path: str, overrides: list[str] | None = None, output: str | None = None,
             stages: str | None = None, force: list[str] | None = None) -> dict[str, Any]:
    """Run a spec's workflow; returns the same summary `palm run --json` prints.

    Each selected node is a retryable task; nodes not selected must already have a complete output.
    Hooks attached in this process (`palm run`'s progress display and stop event) hear every node.
    """
    logger = get_run_logger()
    spec = load_spec(spec_path, overrides or [])
    workflow = resolve_workflow(spec)
    root = run_root(spec, output)
    storage.check_root(root)
    selected = workflow.select(stages)

    caller = attached()
    stop = caller.stop if caller.stop is not None else threading.Event()
    own = attach(Hooks(stop=stop)) if caller.stop is None else contextlib.nullcontext()
    # One run per run directory (palm/store/runlock.py): a second one exits 2 naming the holder.
    with run_lock(root), sigterm_sets(stop) as previous, own:
        record_spec(spec, root)
        try:
            outputs = run_graph(workflow, root, selected, frozenset(force or ()))
        except Preempted:
            if caller.stop is None and callable(previous):
                previous(signal.SIGTERM, None)  # the worker's (Prefect's) SIGTERM handling, now that it is saved
            raise
    for name, out in outputs.items():
        logger.info("stage %s: %s (%s)", name, out.path, "cached" if out.cached else "built")
    report = write_report(root, spec.name, workflow, outputs)
    publish_run_report(root, spec.name, workflow, outputs)  # the same report in the UI (tasks/report.py)
    return run_summary(root, report, outputs)
