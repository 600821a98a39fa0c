"""Evaluate every checkpoint of a run that has no result yet, exactly once.

Started by each `palm.core.checkpoint.saved` event (with that checkpoint's path) and on a schedule as a
fallback (with no checkpoint: every run under the spec's root). Claims in the run's ledger make two
evaluation runs that start at the same moment split the work instead of repeating it.

Each claimed checkpoint is evaluated where `eval.launch` and its size say (palm.jobs.evaljob.placement): in
this process, or, for a checkpoint too large for it (PaLM 540B's 2.2 TB of parameters on the Prefect
worker's small VM), as a sharded job on the spec's launcher, on the same hosts and mesh as training, which
this flow follows to its end. Either way: claim, evaluate, record once; a failure releases the claim
and fails the flow run with the job's error. A re-run re-attaches to the running job of the same
checkpoint instead of starting a second one.

After each evaluation the run's table of evaluations across checkpoints (`<run key>-<node>-evaluations`,
tasks.eval.publish_evaluations: every checkpoint of the ledger, by step) gets a new version, and once
more at the end where the latest lacks a step that a concurrent evaluation run recorded meanwhile.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import get_run_context

from palm.base.jaxenv import configure_jax

# A Prefect worker runs this flow in a process of its own, not through `palm`: set JAX up as `palm` does
# (the CPU on a chip-less host with libtpu, the persistent compilation cache) before the imports below load it.
configure_jax()

from palm.base import storage
from palm.core.checkpoint import open_checkpoints
from palm.store.tensorboard import write_eval_results
from palm.base.errors import PalmError
from palm.spec.config import ModelConfig
from palm.jobs.evaljob import placement
from palm.evaluation.checkpoints import locate_run
from palm.store.ledger import EvalLedger
from palm.store import layout
from palm.spec.schema import Spec
from palm.dag.workflow import load_spec
from tasks.eval import eval_checkpoint_task, eval_on_workers_task, publish_evaluations


def spec_of_run(root: str) -> Spec:
    """The resolved spec a run root (local or gs://) was started with (written by `palm run` and the
    pretrain flow)."""
    try:
        return Spec.model_validate(json.loads(storage.read_text(layout.spec_record(root))))
    except FileNotFoundError:
        raise PalmError(f"{root} has no {layout.SPEC_RECORD}; pass spec_path") from None


@flow(name="eval-new-checkpoints", log_prints=True)
def evaluate_new_checkpoints(checkpoint: str | None = None, spec_path: str | None = None,
                             overrides: list[str] | None = None, output: str | None = None) -> dict[str, Any]:
    """Evaluate the checkpoints without results: of `checkpoint`'s run, or of every run under the root."""
    logger = get_run_logger()
    # The spec launched evaluation jobs load: the run's recorded one, or the file this flow was given.
    worker_spec, worker_overrides = spec_path, list(overrides or [])
    if checkpoint is not None:
        train_dirs = [locate_run(checkpoint)["train_dir"]]
        root = layout.run_root(train_dirs[0])
        # The run's own recorded spec first: a deployment's spec_path is the scheduled fallback's, and
        # would evaluate another run's checkpoints with the wrong settings.
        try:
            spec = spec_of_run(root)
            worker_spec, worker_overrides = layout.spec_record(root), []
        except PalmError:
            if spec_path is None:
                raise
            spec = load_spec(spec_path, overrides or [])
    else:
        if spec_path is None:
            raise PalmError("give a checkpoint (event-triggered) or a spec_path (scheduled)")
        spec = load_spec(spec_path, overrides or [])
        root = output or f"{spec.infra.storage_root.rstrip('/')}/{spec.name}"
        train_dirs = [storage.parent(p) for p in storage.glob(layout.output_contexts(root))]  # every training node
    owner = str(get_run_context().flow_run.id)
    evaluated, skipped, touched = [], [], []
    for train_dir in train_dirs:
        ledger = EvalLedger(layout.ledger_dir(train_dir))
        ckpts = open_checkpoints(train_dir)
        steps = ckpts.steps()
        ckpts.close()
        pending = ledger.pending(steps)
        if not pending:
            continue
        where, why = placement(spec, ModelConfig(**locate_run(train_dir)["model"]))
        logger.info("evaluating the checkpoints of %s %s: %s", train_dir,
                    "in this process" if where == "local" else "on launched workers", why)
        for step in pending:
            if not ledger.claim(step, owner):
                skipped.append(layout.checkpoint_dir(train_dir, step))
                continue
            path = layout.checkpoint_dir(train_dir, step)
            try:
                if where == "local":
                    result = eval_checkpoint_task(path, spec.eval, spec.name, root)
                else:
                    result = eval_on_workers_task(path, spec, worker_spec, worker_overrides, root)
                    result = {k: result[k] for k in ("checkpoint", "step", "results", "job")}
            except BaseException:
                ledger.release(step)
                raise
            ledger.record(step, {**result, "evaluated_by": owner})
            write_eval_results(layout.eval_events_dir(train_dir), result["step"], result["results"])
            publish_evaluations(spec.name, root, train_dir, ledger.results())  # the table so far, in the UI
            evaluated.append(result["checkpoint"])
            if train_dir not in touched:
                touched.append(train_dir)
            logger.info("evaluated %s: %s", result["checkpoint"], result["results"])
    for train_dir in touched:  # what a concurrent evaluation run recorded after this one's last table
        publish_evaluations(spec.name, root, train_dir, EvalLedger(layout.ledger_dir(train_dir)).results(),
                            if_stale=True)
    return {"evaluated": evaluated, "claimed_elsewhere": skipped}
