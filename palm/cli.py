"""The `palm` command: plan, run, bench and inspect PaLM pretraining pipelines.

Conventions for every subcommand: `--set dotted.key=value` overrides the spec, `--json` prints one
machine-readable object on stdout (logs go to stderr), exit codes are 0 success, 1 failure, 2 bad input
or a fault of the machine that a retry would meet again (a full disk, permission denied, a directory where
a file should be: one line naming the path), 75 a stop or a fault a later attempt may not meet.

What loads JAX, Prefect, Beam or lm-eval is imported by the command that needs it (each such import is
marked), so `palm --help`, `palm spec` and a bad argument answer at once.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import yaml

from palm.base.errors import PalmError, environment_fault
from palm.app.image import build_image
from palm.app.image import render as render_image
from palm.base.jaxenv import configure_jax
from palm import version_line
from palm.base import storage
from palm.base.files import open_regular, read_text
from palm.base.net import free_port
from palm.base.orphans import watch_descendants
from palm.base.errors import Preempted
from palm.app.report import load_plotting, write_report
from palm.dag.runner import (attach, check_run_root, complete_outputs, nodes_to_build, prepare, record_spec,
                             run_summary)
from palm.store.runlock import run_lock
from palm.data.package import build_worker_package
from palm.jobs.launch import launch, plan_launch
from palm.jobs.launch import render as render_launch
from palm.jobs.launching import JobFailed, JobPreempted, plan_json
from palm.jobs.preflight import access_token, preflight
from palm.dag.table import STAGES
from palm.dag.workflow import load_spec
from palm.spec.config import ModelConfig
from palm.dag.workflow import resolve_workflow
from palm.dag.workflow import training_node
from palm.evaluation import default_data_file, read_jsonl
from palm.evaluation import gsm8k
from palm.evaluation import humaneval
from palm.evaluation import iter_jsonl
from palm.spec.schema import spec_schema


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="path to a YAML spec (see specs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set train.steps=10 (repeatable)")


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


class _Version(argparse.Action):
    """--version: the package version and the commit, looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any):
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="palm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_Version,
                        help="print the package version and the commit it was built from, and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="parameters, FLOPs, memory per device, mesh, stages, wall time")
    _add_spec_args(p)
    _add_json(p)
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilization for the wall-time "
                   "estimate (default: PaLM's 46.2%%)")
    p.add_argument("--price-per-chip-hour", type=float, default=None, metavar="USD",
                   help="price of one accelerator chip for one hour, for the cost estimate (default for tpu-v4: "
                   "$3.22, the on-demand price; see palm/app/plan.py)")
    p.add_argument("--compile", action="store_true", help="compile the train step (every batch size of the ramp) "
                   "and the evaluation step ahead of time for the spec's TPU slices with libtpu, on this host, and "
                   "hold each one's memory per chip against the chip's; exit 1 if one does not fit")
    p.add_argument("--layers", type=int, default=None, metavar="N", help=argparse.SUPPRESS)  # tests: a shallower model

    p = sub.add_parser("run", help="run the pipeline as the Prefect flow `pretrain` (ephemeral mode unless "
                       "PREFECT_API_URL names a server)")
    _add_spec_args(p)
    _add_json(p)
    p.add_argument("--output", help="run directory (default: <infra.storage_root>/<spec name>)")
    p.add_argument("--stages", help="comma-separated stages to run (default: all)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="re-run this stage")
    p.add_argument("--verbose", "-v", action="store_true", help="also show Prefect's own log lines")

    p = sub.add_parser("worker", help="run the train stage (or, with --eval-checkpoint, the evaluation of one "
                       "checkpoint) as one host of a (multi-host) job; launchers run this on every host (see "
                       "palm/app/worker.py)")
    _add_spec_args(p)
    _add_json(p)
    p.add_argument("--output", help="run directory (default: <infra.storage_root>/<spec name>); the pack stage "
                   "must be complete there")
    p.add_argument("--node", default="train", help="the workflow's training node to run (default: train)")
    p.add_argument("--eval-checkpoint", metavar="STEP_DIR", help="evaluate this checkpoint (<train dir>/checkpoints/"
                   "<step>) with the spec's eval tasks, sharded over the job's mesh, instead of training; host 0 "
                   "writes <train dir>/evals/launched/<step>.json (palm/jobs/evaljob.py)")

    p = sub.add_parser("launch", help="launch the train stage's workers where infra.launcher says (local processes, "
                       "TPU VMs, a GKE JobSet) and follow them to the end; --dry-run prints what would run")
    _add_spec_args(p)
    _add_json(p)
    p.add_argument("--output", help="run directory (default: <infra.storage_root>/<spec name>); the pack stage "
                   "must be complete there")
    p.add_argument("--dry-run", action="store_true", help="print the commands (or the JobSet manifest) and exit")
    p.add_argument("--preflight", action="store_true", help="ask Google Cloud whether each principal of the run "
                   "(infra.identities) holds the permissions palm.base.iam lists, and the TPU quota; one line per gap, "
                   "exit 1 when there is one, 0 when all are granted; launches nothing")
    p.add_argument("--node", default="train", help="the workflow's training node to launch (default: train)")
    p.add_argument("--eval-checkpoint", metavar="STEP_DIR", help="launch the job that evaluates this checkpoint "
                   "(<train dir>/checkpoints/<step>) on the same hosts and mesh instead, and print its result")

    p = sub.add_parser("image", help="build and push the worker image (infra/Dockerfile) that infra.launcher.image "
                       "names: docker build + push, or Cloud Build; --dry-run prints the commands")
    _add_spec_args(p)
    p.add_argument("--cloud-build", action="store_true", help="build with Cloud Build (no local Docker engine needed)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")

    p = sub.add_parser("spec", help="spec utilities")
    spec_sub = p.add_subparsers(dest="spec_command", required=True)
    spec_sub.add_parser("schema", help="print the spec's JSON Schema")
    q = spec_sub.add_parser("show", help="print a spec after extends and overrides, validated")
    _add_spec_args(q)

    p = sub.add_parser("data", help="data stage utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("package", help="build what remote Beam workers (Dataflow, Flink, Spark) install with "
                            "data.beam.packaging: wheel: palm-pipeline's wheel and requirements.txt from uv.lock "
                            "(see infra/dataflow.md)")
    q.add_argument("--out", required=True, metavar="DIR", help="directory to write the wheel and requirements.txt to")
    _add_json(q)
    q = data_sub.add_parser("options", help="print the options the data and pack stages' Beam jobs are submitted "
                            "with (Dataflow: region, temp and staging locations, the workers' service account, image): "
                            "the submission's dry run")
    _add_spec_args(q)

    p = sub.add_parser("bench", help="benchmarks")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    q = bench_sub.add_parser("train", help="time the jitted train step after warm-up")
    _add_spec_args(q)
    _add_json(q)
    q.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    q.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (default 2)")
    q.add_argument("--reference", metavar="PATH", help="also run this reference_step.py at the same shapes, "
                   "in the same process tree, and report the ratio")
    q.add_argument("--profile", metavar="DIR", help="after the timed steps, trace 3 more with jax.profiler "
                   "into DIR (TensorBoard/XProf and Perfetto) and summarize the busiest device operations")
    q = bench_sub.add_parser("data", help="time the data stage against datatrove on the same documents, "
                             "per core")
    _add_json(q)
    q.add_argument("--data-dir", metavar="DIR", help="the shared corpora (default: ../shared/data next to the "
                   "repository)")
    q.add_argument("--repeat", type=int, default=3, help="runs per system; the best is reported (default 3)")
    q.add_argument("--no-datatrove", action="store_true", help="time palm alone (datatrove need not be installed)")
    q.add_argument("--max-docs", type=int, default=None, metavar="N",
                   help="use only the first N original documents of each source (for quick checks and tests)")
    q.add_argument("--target-mb", type=float, default=20.0, metavar="MB",
                   help="grow the corpus by recombining paragraphs (speeches) to this many MB (default 20; 0: the "
                   "shared text alone)")
    q.add_argument("--pairs-per-band", type=int, default=100, metavar="N",
                   help="planted copies per band of true Jaccard (exact, 0.8-0.9, 0.7-0.8, 0.5-0.7; default 100)")
    q.add_argument("--no-classifier", action="store_true", help="skip training the quality classifier")
    q = bench_sub.add_parser("input", help="tokenize-and-pack tokens/s per core and the loader's batches/s "
                             "against what one H100 consumes for specs/palm-1b-gpu.yaml")
    _add_json(q)
    q.add_argument("--data-dir", metavar="DIR", help="the shared corpora (default: ../shared/data next to the "
                   "repository)")
    q.add_argument("--vocab-size", type=int, default=16_000, metavar="N",
                   help="SentencePiece vocabulary trained on the corpora (default 16000; their ~3.5 MB "
                   "support at most ~17,600 pieces)")
    q.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="packed sequence length (default: palm-1b-gpu's model.seq_len, 2048)")
    q.add_argument("--batch", type=int, default=None, metavar="N",
                   help="sequences per global batch (default: palm-1b-gpu's global batch, 8)")
    q.add_argument("--batches", type=int, default=200, metavar="N",
                   help="timed loader batches after a short warm-up (default 200)")
    q = bench_sub.add_parser("decode", help="decode tokens/s per batch size (KV cache, jitted step) against "
                             "the memory-bandwidth roofline")
    _add_spec_args(q)
    _add_json(q)
    q.add_argument("--batches", default="1,64", metavar="N,N", help="comma-separated batch sizes (default 1,64)")
    q.add_argument("--steps", type=int, default=64, help="timed decode steps per batch size (default 64)")
    q.add_argument("--warmup", type=int, default=2, help="untimed decode steps first (default 2)")
    q.add_argument("--prompt-len", type=int, default=128, metavar="N",
                   help="random prompt tokens per row, prefilled once (default 128)")
    q = bench_sub.add_parser("generate", help="lm-eval generate_until requests/s through the palm backend, "
                             "batched against one request at a time, on a checkpoint")
    q.add_argument("checkpoint", help="a checkpoint step dir, a checkpoints dir, or a train stage dir (latest step)")
    _add_json(q)
    q.add_argument("--requests", type=int, default=32, metavar="N", help="requests (default 32)")
    q.add_argument("--max-gen-toks", type=int, default=32, metavar="N", help="max_gen_toks (default 32)")
    q.add_argument("--batch-size", type=int, default=8, metavar="N", help="batched mode's batch_size (default 8)")
    q.add_argument("--prompt-chars", type=int, default=400, metavar="N",
                   help="prompt: this many leading characters of a validation document (default 400)")
    p = sub.add_parser("checkpoint", help="list, inspect and verify training checkpoints")
    ck_sub = p.add_subparsers(dest="checkpoint_command", required=True)
    for name, text in (("list", "steps, sizes, metrics and parameter digests"),
                       ("inspect", "one checkpoint's metadata, metrics and parameter shapes"),
                       ("verify", "restore each checkpoint and check its parameter digest (exit 1 on a mismatch)")):
        q = ck_sub.add_parser(name, help=text)
        q.add_argument("path", help="a checkpoints directory, or the train stage's output directory")
        if name != "list":
            q.add_argument("--step", type=int, help="this step only (default: inspect the latest, verify all)")
        _add_json(q)
    p = sub.add_parser("eval", help="evaluate a checkpoint on tasks (PaLM's protocol, YAML and lm-eval tasks)")
    p.add_argument("checkpoint", help="a checkpoint step dir, a checkpoints dir, or a train stage dir (latest step)")
    p.add_argument("--tasks", help="comma-separated: validation_loss, memorization, gsm8k, humaneval, "
                   "mc:<task.yaml>, lm_eval:<task> (default: the spec's eval.tasks)")
    p.add_argument("--spec", metavar="SPEC", help="take the eval settings from this spec's eval section "
                   "(default: the spec the checkpoint's run recorded, <run root>/spec.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an eval setting, e.g. --set eval.max_examples=50")
    _add_json(p)

    sub.add_parser("lm-eval", add_help=False,
                   help="lm-evaluation-harness' CLI with the model \"palm\" registered: palm lm-eval --model palm "
                   "--model_args checkpoint=CKPT,batch_size=8 --tasks T --include_path DIR (every lm_eval flag)")

    p = sub.add_parser("generate", help="sample text from a checkpoint (KV-cache generation, as evaluation's)")
    p.add_argument("checkpoint", help="a checkpoint step dir, a checkpoints dir, or a train stage dir (latest step)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE", help="prompts, one per line; or JSONL (.jsonl) with a "
                   "'prompt' field per line")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N", help="new tokens per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (results do not depend on batching)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end a completion at this text "
                   "(repeatable; not included)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts decoded together")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (default: the run's)")
    _add_json(p)

    p = sub.add_parser("eval-score", help="score model samples: HumanEval pass@k (programs run in a sandbox), "
                       "GSM8K exact match")
    p.add_argument("task", choices=("humaneval", "gsm8k"), help="the evaluation task")
    p.add_argument("--samples", required=True, metavar="FILE",
                   help="samples as JSONL or .jsonl.gz: humaneval {task_id, completion}, gsm8k {question, completion}")
    p.add_argument("--data", metavar="FILE", help="the problems (default: ../shared/data/humaneval/HumanEval.jsonl.gz "
                   "or ../shared/data/gsm8k/test.jsonl next to the repository)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="HumanEval programs run at once, each in its own sandbox (default: 2 per core, at most 16)")
    p.add_argument("--out", metavar="FILE", help="write one JSON line per sample with its verdict and reason "
                   "(humaneval: index, task_id, status, passed, reason, returncode, seconds; gsm8k: index, "
                   "question, extracted, reference, correct, reason); written whole or not at all")
    _add_json(p)
    return parser


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(text)


def _cmd_plan(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)  # a broken spec is refused before JAX loads
    from palm.app.plan import PALM_MFU, plan, render  # loads JAX: only for this command

    mfu = PALM_MFU if args.mfu is None else args.mfu
    if not 0 < mfu <= 1:
        raise PalmError(f"--mfu must be in (0, 1], got {mfu}")
    if args.price_per_chip_hour is not None and not args.price_per_chip_hour > 0:
        raise PalmError(f"--price-per-chip-hour must be positive, got {args.price_per_chip_hour}")
    result = plan(spec, mfu, args.price_per_chip_hour)
    if not args.compile:
        _emit(args, result, render(result))
        return 0
    from palm.analysis.aot import (  # loads JAX and libtpu: only for this command
        compile_spec, largest_misfit, render_compiled)

    if not args.json:
        print(render(result), flush=True)

    def progress(step: Any) -> None:
        if not args.json:
            print(render_compiled([step], header=False), flush=True)

    if not args.json:
        print(render_compiled([], header=True), flush=True)
    result["compiled"] = compile_spec(spec, num_layers=args.layers, on_step=progress)
    misfit = largest_misfit(result["compiled"])
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    if misfit is not None:
        hbm = result["compiled"]["hbm_bytes_per_device"]
        print(f"palm: the {misfit['kind']} step at global batch {misfit['global_batch']} needs "
              f"{misfit['memory_per_device_bytes'] / 2**30:.2f} GiB per chip, "
              f"{(misfit['memory_per_device_bytes'] - hbm) / 2**30:.2f} GiB more than the "
              f"{hbm / 2**30:.2f} GiB of a {spec.infra.hardware.accelerator} chip; shard wider (infra.mesh), split the "
              "batch into more microbatches (train.microbatches, or auto), or use more chips", file=sys.stderr)
        return 1
    return 0


def _quiet_prefect_console() -> list[tuple[Any, int]]:
    """Prefect's own console lines off (warnings and errors stay in the flow run's logs on the API):
    `palm run` draws its own progress. Returns what to put back."""
    from prefect.logging.handlers import PrefectConsoleHandler  # loads Prefect: only for this command

    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)]
    saved = []
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                saved.append((handler, handler.level))
                handler.setLevel(logging.CRITICAL + 1)
    return saved


def _cmd_run(args: argparse.Namespace) -> int:
    # Bad input fails here, in a second, before Prefect starts.
    spec = load_spec(args.spec, args.overrides)
    workflow = resolve_workflow(spec)
    stages = workflow.select(args.stages)
    for forced in args.force:
        if forced not in stages:
            raise PalmError(f"--force {forced}: not among the stages to run ({', '.join(stages)})")
    root = args.output or f"{spec.infra.storage_root.rstrip('/')}/{spec.name}"

    storage.check_root(root)  # an unreachable or missing gs:// bucket: exit 2 now, not after Prefect starts
    check_run_root(spec, root)  # another spec's run root: exit 2 now (the flow checks again, under the lock)
    if not args.force and _run_cached(args, spec, workflow, stages, root):
        return 0

    # Nothing this run starts outlives it, SIGKILL included: Prefect's ephemeral API server, stage
    # subprocesses (palm/base/orphans.py).
    watch_descendants()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect waits 20 s for its ephemeral server by default; its first start on a busy 2-core machine
    # (creating the database) can take longer.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS  # loads Prefect

    api = PREFECT_API_URL.value()
    print(f"prefect: flow 'pretrain' on {api}" if api else
          "prefect: flow 'pretrain' in ephemeral mode (a temporary local API server; takes a few seconds to start)",
          file=sys.stderr, flush=True)
    # Prefect's ephemeral server starts in a process of its own; meanwhile this one loads the flow, the
    # engines of the nodes it will build and the report's plotting, and compiles the programs of the nodes
    # it will train (palm.dag.runner.prepare).
    server = None if api else _EphemeralServer(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    from prefect.exceptions import TerminationSignal  # loads Prefect: only for this command
    from flows.pretrain import pretrain  # loads Prefect and JAX: only for this command
    from palm.app.console import RunConsole  # loads rich: only for this command

    if server is not None:
        prepare(nodes_to_build(workflow, root, stages, args.force))
        load_plotting()  # for the report at the end
        server.wait()
    settings = nullcontext() if server is None else server.settings()
    restore = [] if args.verbose else _quiet_prefect_console()

    # The flow turns SIGTERM into this event: training checkpoints at the current step, raises Preempted.
    stop = threading.Event()
    steps = {n.name: n.spec.train.steps for n in workflow.nodes.values() if STAGES[n.stage].trains and n.name in stages}
    try:
        with settings, RunConsole(steps, spec.train.log_every) as console, attach(console.hooks(stop)):
            state = pretrain(args.spec, list(args.overrides), root, ",".join(stages), list(args.force),
                             return_state=True)
        summary = state.result()  # the flow's exception when it failed: PalmError (exit 2), Preempted (75)
    except Preempted as e:
        print(f"palm: {e}", file=sys.stderr)
        return Preempted.exit_code
    except TerminationSignal:  # SIGTERM outside training: the stage in progress is incomplete, never reused
        print("palm: terminated; complete stages are kept, re-run to continue", file=sys.stderr)
        return Preempted.exit_code
    except Exception as e:  # a fault of the machine in the flow itself (writing spec.json, the report)
        fault = environment_fault(e, where=root)
        if fault is None or fault is e:
            raise
        raise fault from e
    finally:
        for handler, level in restore:
            handler.setLevel(level)
    summary["flow_run"] = str(state.state_details.flow_run_id)
    _emit_run(args, summary)
    return 0


class _EphemeralServer:
    """Prefect's ephemeral API server, started now instead of when the flow first needs it: the process
    Prefect's ephemeral mode starts (prefect.server.api.server.SubprocessASGIServer: uvicorn serving
    Prefect's app factory on a free loopback port, the UI off), launched here without importing Prefect's
    server into this process (about 2 s of a first run's imports, which that process makes anyway).
    `wait()` until it answers; the flow then runs against it (`settings()`), and it is stopped at exit."""

    APP = "prefect.server.api.server:create_app"

    def __init__(self, timeout: float) -> None:
        self.timeout, self.process, self.port, self.starts = timeout, None, 0, 0
        self._start()
        atexit.register(self.stop)

    def _start(self) -> None:
        import prefect  # loads Prefect's client only (already loaded for its settings)

        self.port, self.starts = free_port(), self.starts + 1
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
             self.APP, "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self) -> None:
        """Until the server answers /health; a RuntimeError when it exits or does not answer in time."""
        import httpx  # Prefect's own HTTP client library

        deadline = time.monotonic() + self.timeout
        while True:
            code = self.process.poll()
            if code == 3 and self.starts < 3:  # uvicorn's startup failure, as when the port was taken meanwhile
                self._start()
            elif code is not None:
                raise RuntimeError(f"Prefect's ephemeral API server exited with code {code} as it started")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Prefect's ephemeral API server did not answer in {self.timeout:.0f} s "
                                   "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            time.sleep(0.1)

    def settings(self) -> Any:
        """The context in which Prefect's client uses this server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self.api_url})

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _emit_run(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    """A run's summary: the report's path on stderr, then the JSON or each node's manifest on stdout."""
    print(f"report: {summary['report']}", file=sys.stderr)
    _emit(args, summary, "\n".join(f"{s}: {o['output']}/manifest.json" for s, o in summary["stages"].items()))


def _run_cached(args: argparse.Namespace, spec: Any, workflow: Any, stages: list[str], root: str) -> bool:
    """A run whose every selected node already has its complete output: the summary and report as the flow
    would write them, in a second or two, without starting Prefect (no flow run is recorded). False, having
    done nothing, when a node has to run."""
    try:
        outputs = complete_outputs(workflow, root, stages)
    except PalmError:
        return False
    with run_lock(root):
        record_spec(spec, root)
        report = write_report(root, spec.name, workflow, outputs)
    print("palm: every stage's output is complete and cached; nothing to run, no Prefect flow run "
          "(--force STAGE to rebuild one)", file=sys.stderr)
    _emit_run(args, {**run_summary(root, report, outputs), "flow_run": None})
    return True


def _cmd_worker(args: argparse.Namespace) -> int:
    from palm.app.worker import main as worker_main  # loads JAX: only for this command

    return worker_main(args.spec, list(args.overrides), args.output, args.json, args.node, args.eval_checkpoint)


def _cmd_launch(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    root = args.output or f"{spec.infra.storage_root.rstrip('/')}/{spec.name}"

    if args.eval_checkpoint is not None:
        plan = plan_launch(spec, args.spec, root, args.overrides, eval_checkpoint=args.eval_checkpoint)
    else:
        node = training_node(spec, args.node)
        plan = plan_launch(node.spec, args.spec, root, args.overrides, node=node.name)
    if args.preflight:
        gaps = preflight(node.spec if args.eval_checkpoint is None else spec, access_token())
        for gap in gaps:
            print(gap)
        print(f"preflight: {len(gaps)} gap(s)" if gaps else "preflight: every principal holds what it needs",
              file=sys.stderr)
        return 1 if gaps else 0
    if args.dry_run:
        if args.json:
            print(json.dumps(plan_json(plan), indent=2))
        else:
            print(render_launch(plan), end="")
        return 0
    # SIGTERM stops the job the way a preemption would: the workers checkpoint, then exit 75.
    stop = threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if main_thread else None
    result = None
    try:
        if args.eval_checkpoint is not None:
            from palm.jobs.evaljob import evaluate_on_workers  # loads JAX: only for this command

            result = evaluate_on_workers(spec, args.spec, root, args.eval_checkpoint, args.overrides, stop=stop,
                                         log=lambda line: print(line, file=sys.stderr, flush=True))
        else:
            launch(plan, stop=stop)
    except (JobPreempted, Preempted) as e:
        print(f"palm: {e}", file=sys.stderr)
        return Preempted.exit_code
    except JobFailed as e:
        print(f"palm: {e}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if result is not None:
        from palm.evaluation.run import results_markdown  # loads JAX: only for this command

        _emit(args, result, f"{plan.name}: {result['checkpoint']} (step {result['step']})\n"
              + results_markdown(result["results"]))
        return 0
    _emit(args, {"status": "completed", "kind": plan.kind, "name": plan.name, "root": plan.root},
          f"{plan.name}: completed ({plan.kind})")
    return 0


def _cmd_spec(args: argparse.Namespace) -> int:
    if args.spec_command == "schema":
        print(json.dumps(spec_schema(), indent=2))
        return 0
    spec = load_spec(args.spec, args.overrides)
    print(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "options":
        from palm.data.beam import pipeline_options  # loads Beam: only for this command

        spec = load_spec(args.spec, args.overrides)
        placement = spec.infra.dataflow_options(spec.data.beam)
        for job in ("palm-data", "palm-pack"):
            options = pipeline_options(spec.data, job_name=job, worker_image=spec.infra.launcher.image,
                                       placement=placement).get_all_options(drop_default=True)
            flags = [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in options.items()]
            print(f"# {job}: the {spec.data.beam.runner} job's options\n" + " ".join(flags))
        return 0
    result = build_worker_package(args.out)
    _emit(args, result, f"wheel: {result['wheel']}\nrequirements: {result['requirements']}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    # The bench modules are imported here, in the handlers, so that `palm --help` does not load JAX.
    if args.bench_command == "data":
        return _cmd_bench_data(args)
    if args.bench_command == "input":
        return _cmd_bench_input(args)
    if args.bench_command == "decode":
        return _cmd_bench_decode(args)
    if args.bench_command == "generate":
        from palm.app.bench.generate import bench_generate, render_generate  # loads JAX: only for this command

        result = bench_generate(args.checkpoint, requests=args.requests, max_gen_toks=args.max_gen_toks,
                                batch_size=args.batch_size, prompt_chars=args.prompt_chars)
        _emit(args, result, render_generate(result))
        return 0
    from palm.app.bench.train import bench_train, render_train  # loads JAX: only for this command

    spec = load_spec(args.spec, args.overrides)
    if args.steps <= 0 or args.warmup < 0:
        raise PalmError("--steps must be positive and --warmup non-negative")
    result = bench_train(spec, steps=args.steps, warmup=args.warmup, reference=args.reference,
                         profile=args.profile)
    _emit(args, result, render_train(result))
    return 0


def _cmd_bench_data(args: argparse.Namespace) -> int:
    from palm.app.bench.data import bench_data, render_data  # loads JAX: only for this command

    result = bench_data(args.data_dir, repeat=args.repeat, datatrove=not args.no_datatrove, max_docs=args.max_docs,
                        target_mb=args.target_mb, pairs_per_band=args.pairs_per_band, classifier=not args.no_classifier)
    _emit(args, result, render_data(result))
    return 0


def _cmd_bench_input(args: argparse.Namespace) -> int:
    from palm.app.bench.input import bench_input, render_input  # loads JAX: only for this command

    result = bench_input(args.data_dir, vocab_size=args.vocab_size, seq_len=args.seq_len, batch=args.batch,
                         batches=args.batches)
    _emit(args, result, render_input(result))
    return 0


def _cmd_bench_decode(args: argparse.Namespace) -> int:
    from palm.app.bench.decode import bench_decode, render_decode  # loads JAX: only for this command

    spec = load_spec(args.spec, args.overrides)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        raise PalmError(f"--batches takes comma-separated integers, got {args.batches!r}") from None
    result = bench_decode(spec, batches=batches, steps=args.steps, prompt_len=args.prompt_len, warmup=args.warmup)
    _emit(args, result, render_decode(result))
    return 0


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from palm.core.checkpoint import (  # loads JAX and Orbax: only for this command
        describe_checkpoints, inspect_checkpoint, open_checkpoints, verify_checkpoints)

    ckpts = open_checkpoints(args.path)
    expected = _run_model_digest(args.path)
    if args.checkpoint_command == "list":
        rows = describe_checkpoints(ckpts, expected)
        text = "\n".join(f"step {r['step']:>8}  {r['bytes'] / 2**20:9.2f} MiB  "
                         + (f"loss {r['loss']}  digest {r['digest']}" if r["complete"] else r["error"])
                         for r in rows) or "no checkpoints"
        _emit(args, {"path": ckpts.directory, "checkpoints": rows}, text)
        return 0
    if args.checkpoint_command == "inspect":
        info = inspect_checkpoint(ckpts, args.step if args.step is not None else ckpts.selected_step, expected)
        text = "\n".join([f"step {info['step']} of {ckpts.directory}", f"digest {info['digest']}",
                          f"parameters {info['num_params']:,}", f"metrics {json.dumps(info['metrics'])}",
                          f"loss spikes {len(info['spikes'])}"]
                         + [f"  {p['path']}: {p['shape']} {p['dtype']}" for p in info["params"]])
        _emit(args, info, text)
        return 0
    results = verify_checkpoints(ckpts, args.step if args.step is not None else ckpts.selected_step, expected)
    ok = all(r["ok"] for r in results)
    text = "\n".join(f"step {r['step']}: " + ("FAILED: " + r["error"] if not r["ok"] else
                                               "ok (sealed files and digests)" if r["sealed"] else
                                               "ok (digests only: the step has no seal)")
                     for r in results)
    _emit(args, {"path": ckpts.directory, "ok": ok, "checkpoints": results}, text)
    return 0 if ok else 1


def _run_model_digest(path: str) -> str | None:
    """The parameter shapes digest of the model of the run a checkpoint path is in (its train stage's
    context), which every step must match; None outside a train stage directory (steps checked alone)."""
    import flax.linen as nn  # these load JAX: only for the checkpoint commands

    from palm.core.checkpoint import model_digest
    from palm.core.model import abstract_params
    from palm.evaluation.checkpoints import locate_run

    try:
        model = locate_run(path)["model"]
    except (PalmError, KeyError, OSError, ValueError):
        return None
    return model_digest(nn.unbox(abstract_params(ModelConfig(**model))))


def _cmd_eval(args: argparse.Namespace) -> int:
    from palm.evaluation.run import (  # loads JAX: only for this command
        EvalProgress, eval_settings, evaluate_checkpoint, results_markdown)

    tasks = None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    spec = load_spec(args.spec) if args.spec is not None else None
    eval_spec, source = eval_settings(args.checkpoint, spec, tasks, args.overrides, spec_path=args.spec)
    print(f"eval: settings from {source}", file=sys.stderr, flush=True)
    result = evaluate_checkpoint(args.checkpoint, eval_spec, progress=EvalProgress(sys.stderr))
    result["settings"] = {"source": source, **eval_spec.model_dump()}
    _emit(args, result, f"{result['checkpoint']} (step {result['step']})\n" + results_markdown(result["results"]))
    return 0


#: Most bytes of a plain-text --prompts-file (prompts are generated one batch after another, in memory).
MAX_PROMPTS_BYTES = 64 * 2**20


def _cmd_generate(args: argparse.Namespace) -> int:
    from palm.evaluation.checkpoints import load_checkpoint_model  # loads JAX: only for this command

    prompts = list(args.prompt)
    if args.prompts_file:
        path = args.prompts_file
        if path.endswith((".jsonl", ".jsonl.gz")):
            for lineno, record in iter_jsonl(path, what="prompts"):
                if not isinstance(record.get("prompt"), str):
                    raise PalmError(f"{path}:{lineno}: needs a string field 'prompt'")
                prompts.append(record["prompt"])
        else:
            text = read_text(path, "--prompts-file", MAX_PROMPTS_BYTES)  # bounded, regular files only
            prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PalmError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    if args.max_tokens < 1 or args.batch_size < 1:
        raise PalmError("--max-tokens and --batch-size must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise PalmError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise PalmError(f"--top-p must be in (0, 1], got {args.top_p}")
    lm = load_checkpoint_model(args.checkpoint, batch_size=args.batch_size, dtype=args.dtype, what="generate: ")
    if args.max_tokens >= lm.seq_len:
        raise PalmError(f"--max-tokens {args.max_tokens} leaves no room for a prompt in the model's {lm.seq_len} tokens")
    completions = lm.generate(prompts, args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              stop=args.stop, seed=args.seed)
    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    text = "\n\n".join(c if len(rows) == 1 else f"--- {i}: {p!r}\n{c}" for i, (p, c) in
                        enumerate(zip(prompts, completions)))
    _emit(args, {"checkpoint": str(args.checkpoint), "temperature": args.temperature, "top_p": args.top_p,
                 "seed": args.seed, "max_tokens": args.max_tokens, "samples": rows}, text)
    return 0


def _cmd_eval_score(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise PalmError(f"--workers must be at least 1, got {args.workers}")
    data = args.data or str(default_data_file(args.task))
    open_regular(args.samples, "samples").close()  # a regular file (read within bounds below), else one line
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.is_dir():
            raise PalmError(f"--out {out}: is a directory")
        if not out.parent.is_dir():
            raise PalmError(f"--out {out}: directory {out.parent} does not exist")
        if out.exists() and out.resolve() == Path(args.samples).resolve():
            raise PalmError(f"--out {out}: is the samples file")
    start = time.monotonic()
    if args.task == "humaneval":
        problems = humaneval.load_problems(data)
        samples = read_jsonl(args.samples, required={"task_id": str, "completion": str}, what="samples",
                             validate=lambda r: None if r["task_id"] in problems else
                             f"unknown HumanEval task_id {r['task_id']!r}")
        workers = args.workers or humaneval.default_workers()
        print(f"eval-score: running {len(samples)} programs in the sandbox, {workers} at a time",
              file=sys.stderr, flush=True)
        if not samples:
            raise PalmError("no HumanEval samples to score")
        results = humaneval.evaluate_samples(samples, problems, workers=workers)
        metrics = humaneval.score_results(samples, results)
        records = humaneval.sample_records(samples, results)
        errors = [r for r in records if r["status"] == "error"]
        if errors:
            print(f"eval-score: {len(errors)} sample(s) could not be run and count as failures, e.g. sample "
                  f"{errors[0]['index']}: {errors[0]['reason']}", file=sys.stderr)
        what = f"{metrics['n']} samples over {metrics['tasks']} tasks"
    else:
        problems = gsm8k.load_problems(data)
        questions = {p["question"].strip() for p in problems}
        samples = read_jsonl(args.samples, required={"question": str, "completion": str}, what="samples",
                             validate=lambda r: None if r["question"].strip() in questions else
                             f"question is not among the GSM8K problems: {r['question'][:200]!r}")
        records = gsm8k.grade_samples(samples, problems)
        metrics = gsm8k.score_records(records)
        what = f"{metrics['n']} samples"
    seconds = time.monotonic() - start
    if out is not None:
        _write_jsonl_atomically(out, records)
        print(f"eval-score: wrote {len(records)} per-sample verdicts to {out}", file=sys.stderr)
    print(f"eval-score: scored {what} in {seconds:.1f} s", file=sys.stderr)
    names = [key for key in metrics if key.startswith("pass@") or key == "exact_match"]
    text = "\n".join([f"{args.task}: {what} ({args.samples})"]
                     + [f"{name:<12} {metrics[name]:.4f}" for name in names]
                     + ["", "| metric | value |", "| --- | --- |"]
                     + [f"| {name} | {metrics[name]:.4f} |" for name in names])
    _emit(args, {"task": args.task, "samples": str(args.samples), "data": data, **metrics,
                 "seconds": round(seconds, 3)}, text)
    return 0


def _write_jsonl_atomically(path: Any, records: list[dict[str, Any]]) -> None:
    """Write records as JSONL to a temporary file next to `path`, then rename it into place: readers see
    the whole file or none (no half-written output is left behind on failure)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")  # ASCII: a lone surrogate is written escaped
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        raise PalmError(f"--out {path}: cannot write ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cmd_image(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    if args.dry_run:
        print(render_image(spec, args.cloud_build), end="")
        return 0
    build_image(spec, args.cloud_build, log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


COMMANDS = {"image": _cmd_image, "plan": _cmd_plan, "run": _cmd_run, "worker": _cmd_worker, "launch": _cmd_launch,
            "spec": _cmd_spec, "data": _cmd_data, "bench": _cmd_bench, "checkpoint": _cmd_checkpoint,
            "eval-score": _cmd_eval_score, "generate": _cmd_generate, "eval": _cmd_eval}


def _cmd_lm_eval(argv: list[str]) -> int:
    configure_jax()
    from palm.evaluation.lmeval import cli  # loads lm-eval: only for this command

    return cli(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's (argparse would claim its flags)
        try:
            return _cmd_lm_eval(argv[1:])
        except PalmError as e:
            print(f"palm: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    configure_jax()
    try:
        return COMMANDS[args.command](args)
    except PalmError as e:  # bad input, or a fault of the machine (EnvironmentFault: exit 2, or 75 if transient)
        print(f"palm: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except Exception as e:
        fault = environment_fault(e)  # an OSError (a full disk, permission denied...) no command converted
        if fault is None:
            raise
        print(f"palm: error: {fault}", file=sys.stderr)
        return fault.exit_code


def run() -> None:
    """The `palm` command (`python -m palm.cli` too): main(), then exit without the interpreter's last
    garbage collection. After a run that loaded JAX, Beam and Prefect that collection walks every object
    they made, for about 2 s, only to free memory the process is about to give back; files and sockets
    are closed by then (atexit handlers still run)."""
    code = main()
    sys.stdout.flush()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
