"""Evaluation of a real tiny checkpoint: `palm eval`, YAML multiple choice, lm-eval, GSM8K, HumanEval."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from palm.cli import main
from palm.base.errors import PalmError
from palm.evaluation.run import MC_KEYS, load_mc_task
from tests.conftest import ROOT, SPECS, copy_of


@pytest.fixture(scope="module")
def checkpoint(prefect_server, tiny_trained, tmp_path_factory) -> Path:
    """The checkpoints of a copy of the session's tiny run trained for 6 steps (tests.conftest.tiny_trained)."""
    root = copy_of(tiny_trained, tmp_path_factory.mktemp("run") / "root")
    return next((root / "train").glob("*/checkpoints"))


def mc_task(tmp_path: Path) -> Path:
    docs = [{"question": f"Question {i}: which word is a colour?", "choices": ["red", "table", "run"], "answer": 0}
            for i in range(6)]
    (tmp_path / "colours.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "colours.yaml").write_text("data: colours.jsonl\nnum_shots: 2\nanswer_prefix: ' '\n")
    return tmp_path / "colours.yaml"


#: Warnings Python shows a user by default (DeprecationWarning and its kin only in __main__'s own code).
SHOWN = lambda w: not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, ImportWarning,  # noqa: E731
                                               ResourceWarning))


def run_eval(capsys, *args, quiet: bool = False) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["eval", *args, "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    if quiet:  # what a user sees: each task's progress, no traceback, no warning, no progress bars of libraries
        assert [str(w.message) for w in caught if SHOWN(w)] == []
        for noise in ("Traceback", "Warning", "%|", "it/s]", "Generating "):
            assert noise not in captured.err, captured.err
    return {**json.loads(captured.out), "stderr": captured.err}


@pytest.mark.slow
def test_palm_eval_on_a_checkpoint_step(checkpoint, capsys, tmp_path):
    # Cost: mostly the module fixture (a 6-step tiny `palm run`, shared by this file's tests), then three tasks on
    # 8 examples at most.
    task = mc_task(tmp_path)
    out = run_eval(capsys, str(checkpoint / "6"), "--tasks", f"validation_loss,memorization,mc:{task}",
                   "--set", "eval.max_examples=8", quiet=True)
    assert out["step"] == 6
    for task_name, examples in (("validation_loss", 8), ("memorization", 8), (f"mc:{task}", 4)):  # progress per task
        assert re.search(rf"^eval {re.escape(task_name)}: {examples} examples in [\d.]+ s \([\d.]+ examples/s\)$",
                         out["stderr"], re.M), out["stderr"]
    r = out["results"]
    assert r["validation_loss"]["bits_per_byte"] > 0 and r["validation_loss"]["perplexity"] > 1
    assert 0 <= r["memorization"]["exact_match"] <= 1 and r["memorization"]["examples"] == 8
    assert r[f"mc:{task}"]["examples"] == 4 and 0 <= r[f"mc:{task}"]["acc"] <= 1


@pytest.mark.slow
def test_lm_eval_task_with_local_data_runs_through_the_palm_backend(checkpoint, capsys, tmp_path):
    docs = [{"question": f"Is {i} an even number?", "choices": ["yes", "no"], "answer": i % 2} for i in range(10)]
    (tmp_path / "even.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "palm_even.yaml").write_text(f"""task: palm_even
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'even.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    out = run_eval(capsys, str(checkpoint), "--tasks", "lm_eval:palm_even", "--set", f"eval.lm_eval_include_path={tmp_path}",
                   quiet=True)
    assert "eval lm_eval:palm_even: started" in out["stderr"] and "eval lm_eval:palm_even: done in" in out["stderr"]
    metrics = out["results"]["lm_eval:palm_even"]
    assert 0 <= metrics["acc"] <= 1


@pytest.mark.slow
def test_gsm8k_and_humaneval_run_end_to_end(checkpoint, capsys, shared_data):
    out = run_eval(capsys, str(checkpoint), "--tasks", "gsm8k,humaneval", "--set", "eval.max_examples=2",
                   "--set", "eval.max_new_tokens=16", "--set", f"eval.data_dir={shared_data}")
    assert out["results"]["gsm8k"]["n"] == 2 and 0 <= out["results"]["gsm8k"]["exact_match"] <= 1
    assert out["results"]["humaneval"]["tasks"] == 2 and out["results"]["humaneval"]["pass@1"] == 0.0


@pytest.mark.slow
def test_bad_tasks_and_paths_are_clear_errors(checkpoint, capsys, tmp_path):
    assert main(["eval", str(checkpoint), "--tasks", "bogus"]) == 2
    assert "unknown task 'bogus'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", "validation_loss"]) == 2
    assert "not inside a train stage directory" in capsys.readouterr().err


@pytest.mark.slow
def test_palm_eval_takes_its_defaults_from_the_runs_spec(checkpoint, capsys, tmp_path):
    # The run recorded specs/tiny.yaml resolved (<root>/spec.json): its eval section is the default.
    root = checkpoint.parent.parent.parent
    recorded = json.loads((root / "spec.json").read_text())["eval"]
    assert recorded["tasks"] and recorded["max_examples"]
    out = run_eval(capsys, str(checkpoint), "--set", "eval.tasks=[validation_loss]")
    assert out["settings"]["source"] == str(root / "spec.json")
    assert out["settings"]["max_examples"] == recorded["max_examples"]
    # max_examples caps the validation documents read.
    one = run_eval(capsys, str(checkpoint), "--tasks", "validation_loss", "--set", "eval.max_examples=1")
    three = run_eval(capsys, str(checkpoint), "--tasks", "validation_loss", "--set", "eval.max_examples=3")
    assert one["settings"]["max_examples"] == 1 and three["settings"]["max_examples"] == 3
    assert one["results"]["validation_loss"]["documents"] == 1
    assert three["results"]["validation_loss"]["documents"] == 3

    # --spec: another spec's eval section.
    spec = tmp_path / "eval.yaml"
    spec.write_text(f"extends: {SPECS / 'tiny.yaml'}\neval:\n  tasks: [validation_loss]\n  max_examples: 1\n")
    out = run_eval(capsys, str(checkpoint), "--spec", str(spec))
    assert out["settings"]["source"] == str(spec) and out["settings"]["tasks"] == ["validation_loss"]
    assert out["results"]["validation_loss"]["documents"] == one["results"]["validation_loss"]["documents"]


@pytest.mark.parametrize("assignment, message", [
    ("max_examples=5", "palm eval takes keys of the spec's eval section, written as everywhere else: eval.KEY=VALUE"),
    ("train.steps=5", "eval.KEY=VALUE"),
    ("eval.max_examples=0", "eval.max_examples: Input should be greater than 0"),
    ("eval.max_examples=[unclosed", "eval.max_examples: Input should be a valid integer"),
    ("eval.bogus=1", "eval.bogus: unknown key"),
    ("eval.tasks=[nope]", "unknown task 'nope'"),
])
@pytest.mark.slow
def test_palm_eval_set_errors_are_one_line(checkpoint, capsys, assignment, message):
    assert main(["eval", str(checkpoint), "--set", assignment]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_shipped_multiple_choice_example_runs(checkpoint, capsys):
    task = REPO / "examples" / "eval" / "capitals.yaml"
    settings, docs = load_mc_task(task)
    assert settings["num_shots"] == 3 and len(docs) == 20
    out = run_eval(capsys, str(checkpoint), "--tasks", f"mc:{task}", "--set", "eval.max_examples=5")
    metrics = out["results"][f"mc:{task}"]
    assert metrics["examples"] == 5 and 0 <= metrics["acc"] <= 1 and 0 <= metrics["acc_norm"] <= 1


def test_the_multiple_choice_format_is_documented_where_the_readme_points():
    readme = (REPO / "README.md").read_text()
    assert "docs/evaluation.md" in readme
    doc = (REPO / "docs" / "evaluation.md").read_text()
    section = doc.split("## Multiple-choice tasks in YAML", 1)[1].split("\n## ", 1)[0]
    documented = {line.split("|")[1].strip().strip("`") for line in section.splitlines()
                  if line.startswith("| `")}
    assert documented == set(MC_KEYS)
    assert "examples/eval/capitals.yaml" in section


@pytest.mark.parametrize("yaml_text, lines, message", [
    ("data: d.jsonl\nnum_shot: 1\n", ['{"question": "q", "choices": ["a"], "answer": 0}'], "unknown key(s) ['num_shot']"),
    ("question: q\n", [], "data must be a str, and is required"),
    ("data: d.jsonl\nnum_shots: two\n", [], "num_shots must be a int"),
    ("data: d.jsonl\n", ['{"question": "q", "choices": ["a", "b"], "answer": 2}'], "d.jsonl:1: 'answer' must be an index"),
    ("data: d.jsonl\n", ['{"question": "q", "choices": [], "answer": 0}'], "'choices' must be a non-empty list"),
    ("data: d.jsonl\n", ['{"question": 3, "choices": ["a"], "answer": 0}'], "'question' must be a string"),
    ("data: d.jsonl\n", ["not json"], "d.jsonl:1: not valid JSON"),
    ("data: missing.jsonl\n", [], "file not found"),
    ("data: d.jsonl\nnum_shots: 1\n", ['{"question": "q", "choices": ["a"], "answer": 0}'], "leave none after the 1 shots"),
    ("data: [d.jsonl\n", [], "t.yaml: invalid YAML: line 2, column 1"),
    ("data: d.jsonl\ndata: e.jsonl\n", [], "t.yaml: invalid YAML: line 2, column 1: duplicate key data (first at line 1)"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(6)),
     [], "expands to more than"),
])
@pytest.mark.timeout(60)
def test_multiple_choice_task_errors_name_what_to_fix(tmp_path, yaml_text, lines, message):
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "t.yaml").write_text(yaml_text)
    with pytest.raises(PalmError) as e:
        load_mc_task(tmp_path / "t.yaml")
    assert message in str(e.value)
# lm-eval building the "palm" model by name, on the example tasks shipped in examples/lm_eval -----------

EXAMPLES = ROOT / "examples" / "lm_eval"


@pytest.fixture
def lm_eval_offline(monkeypatch):
    """The example tasks' data_files are relative to the repository root; nothing comes from the hub."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_simple_evaluate_builds_palm_from_model_args(checkpoint, lm_eval_offline):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import palm.evaluation.lmeval

    step = checkpoint / "6"
    out = lm_eval.simple_evaluate(
        model="palm", model_args=f"checkpoint={step},batch_size=4,max_length=96,dtype=float32",
        tasks=["palm_examples"], task_manager=TaskManager(include_path=str(EXAMPLES)), limit=3,
        bootstrap_iters=0, log_samples=True)
    r = out["results"]
    assert 0 <= r["palm_example_mc"]["acc,none"] <= 1 and 0 <= r["palm_example_mc"]["acc_norm,none"] <= 1
    assert 0 <= r["palm_example_gen"]["exact_match,none"] <= 1
    assert r["palm_example_text"]["bits_per_byte,none"] > 0 and r["palm_example_ll"]["perplexity,none"] > 1
    assert {t: r[t]["sample_len"] for t in r if t != "palm_examples"} == {
        "palm_example_mc": 3, "palm_example_gen": 3, "palm_example_text": 3, "palm_example_ll": 3}

    # What lm-eval got back is what a LanguageModel on the same checkpoint computes.
    lm = palm.evaluation.lmeval.load_checkpoint(step, batch_size=2, max_length=96)
    assert lm.max_length == 96
    samples = out["samples"]
    gen = [s["arguments"][0] for s in samples["palm_example_gen"]]
    assert [s["resps"][0][0] for s in samples["palm_example_gen"]] == \
        [lm.generate([context], 16, stop=["\n"])[0] for context, _ in gen]
    texts = [s["arguments"][0][0] for s in samples["palm_example_text"]]
    want = [lm.loglikelihood_rolling(t) for t in texts]
    assert [s["resps"][0][0] for s in samples["palm_example_text"]] == pytest.approx(want, rel=1e-5)
    pairs = [tuple(a) for s in samples["palm_example_mc"] + samples["palm_example_ll"] for a in s["arguments"]]
    got = [resp[0][0] for s in samples["palm_example_mc"] + samples["palm_example_ll"] for resp in s["resps"]]
    assert got == pytest.approx([lm.loglikelihood(c, x)[0] for c, x in pairs], rel=1e-5)


@pytest.mark.slow
def test_lm_evals_builtin_tasks_are_indexed_once_per_process_to_the_same_index(monkeypatch):
    # Cost: lm-eval's own index of its 14,000 built-in task YAMLs, once (6 s on a quiet 2-core VM).
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import TaskIndex

    import palm.evaluation.lmeval  # noqa: F401 - installs the once-per-process index of the built-in tasks

    builtin = Path(lm_eval.tasks.__file__).parent
    ours, theirs = TaskIndex.build([builtin, EXAMPLES]), TaskIndex.build.lm_eval_build([builtin, EXAMPLES])
    describe = lambda index: {name: (e.kind, e.yaml_path, sorted(e.tags), e.cfg) for name, e in index.items()}  # noqa: E731
    assert describe(ours) == describe(theirs) and "palm_example_mc" in ours and len(ours) > 10_000

    walked, walk = [], TaskIndex._iter_yaml_files
    monkeypatch.setattr(TaskIndex, "_iter_yaml_files", staticmethod(lambda root: walked.append(root) or walk(root)))
    assert set(TaskManager(include_path=str(EXAMPLES)).all_tasks) == set(ours)
    assert walked == [EXAMPLES]  # the include path is read again, the built-in tasks are not


@pytest.mark.slow
def test_lm_eval_cli_runs_palm_and_bad_model_args_are_one_line(checkpoint, lm_eval_offline, capsys):
    rc = main(["lm-eval", "--model", "palm", "--model_args", f"checkpoint={checkpoint},dtype=bfloat16",
               "--batch_size", "4", "--include_path", str(EXAMPLES), "--tasks", "palm_example_mc,palm_example_gen",
               "--limit", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "palm_example_mc" in out and "palm_example_gen" in out and "exact_match" in out

    for model_args, message in [
            (f"checkpoint={checkpoint},max_length=4096", "max_length 4096 exceeds the model's seq_len 128"),
            (f"checkpoint={checkpoint},dtype=int8", "dtype must be one of float32, bfloat16 or auto"),
            (f"checkpoint={checkpoint / '6'},step=3", "is step 6, but step=3"),
            (f"checkpoint={checkpoint},batch_size=0", "batch_size must be at least 1"),
            (f"checkpoint={checkpoint},temperature=1", "unknown key(s) temperature")]:
        rc = main(["lm-eval", "--model", "palm", "--model_args", model_args, "--include_path", str(EXAMPLES),
                   "--tasks", "palm_example_mc", "--limit", "1"])
        err = capsys.readouterr().err
        assert rc == 2, model_args
        assert "palm: error: palm model_args: " in err and message in err, err[-500:]
        assert "Traceback" not in err
    # lm-eval's own input errors are one line too.
    assert main(["lm-eval", "--model", "palm", "--model_args", f"checkpoint={checkpoint}", "--include_path",
                 str(EXAMPLES), "--tasks", "no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "palm: error: lm-eval: Tasks not found: no_such_task" in err and "Traceback" not in err


@pytest.mark.slow
def test_bench_generate_batched_matches_one_at_a_time(checkpoint, capsys):
    rc = main(["bench", "generate", str(checkpoint), "--requests", "5", "--max-gen-toks", "4", "--batch-size", "2",
               "--prompt-chars", "80", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    r = json.loads(out)
    assert r["requests"] == 5 and r["batch_size"] == 2 and r["identical"] is True
    assert r["batched"]["requests_per_s"] == pytest.approx(5 / r["batched"]["seconds"])
    assert r["speedup"] == pytest.approx(r["one_at_a_time"]["seconds"] / r["batched"]["seconds"])
    assert isinstance(r["generated_tokens"], int) and r["generated_tokens"] >= 0
    assert main(["bench", "generate", str(checkpoint), "--requests", "0"]) == 2
    assert "need --requests" in capsys.readouterr().err


def test_multiple_choice_task_that_is_a_directory_or_device(tmp_path):
    (tmp_path / "t.yaml").mkdir()
    with pytest.raises(PalmError, match="t.yaml: is a directory, not a file$"):
        load_mc_task(tmp_path / "t.yaml")
    with pytest.raises(PalmError, match="/dev/zero: is a device, not a regular file$"):
        load_mc_task("/dev/zero")


@pytest.mark.parametrize("assignment, message", [
    ("eval.max_examples=[unclosed", "eval.max_examples: Input should be a valid integer"),
    ("eval.tasks={a: 1, a: 2}", "--set: eval.tasks: refused YAML value: line 1, column 8: duplicate key a"),
    ("eval.max_examples=.nan", "eval.max_examples: Input should be a finite number"),
    ("eval.batch_size=.inf", "eval.batch_size: Input should be a finite number"),
])
def test_palm_eval_set_with_bad_yaml_is_one_line_before_the_checkpoint_is_read(tmp_path, capsys, assignment, message):
    """With --spec the settings are checked before the checkpoint is looked at (none exists here)."""
    assert main(["eval", str(tmp_path / "no-checkpoint"), "--spec", str(SPECS / "tiny.yaml"), "--set", assignment]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_palm_generate_is_deterministic_and_equals_evaluations_generation(checkpoint, capsys, tmp_path):
    # Cost: five generations of 12 tokens (two greedy runs, evaluation's own, two sampled batchings), each
    # compiling prefill and decode for its batch size; the module fixture's checkpoint is shared.
    from palm.evaluation.checkpoints import load_checkpoint_model

    prompts = ["The king", "To be, or not", "First Citizen:"]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts[1:]) + "\n")
    args = ["generate", str(checkpoint), "--prompt", prompts[0], "--prompts-file", str(tmp_path / "prompts.jsonl"),
            "--max-tokens", "12", "--batch-size", "2", "--json"]
    runs = []
    for _ in range(2):
        assert main(args) == 0
        runs.append(json.loads(capsys.readouterr().out)["samples"])
    assert runs[0] == runs[1] and [r["prompt"] for r in runs[0]] == prompts
    # Evaluation's greedy generation (what GSM8K and HumanEval use) on the same checkpoint, another batch size.
    lm = load_checkpoint_model(checkpoint, batch_size=4)
    assert [r["completion"] for r in runs[0]] == lm.generate(prompts, 12)
    # Sampling: the seed decides, not the batching.
    sampled = []
    for batch in ("1", "3"):
        assert main(["generate", str(checkpoint), "--prompt", prompts[0], "--prompt", prompts[2], "--max-tokens", "12",
                     "--temperature", "0.9", "--top-p", "0.9", "--seed", "5", "--batch-size", batch, "--json"]) == 0
        sampled.append(json.loads(capsys.readouterr().out)["samples"])
    assert sampled[0] == sampled[1]
    assert [r["completion"] for r in sampled[0]] == lm.generate([prompts[0], prompts[2]], 12, temperature=0.9,
                                                                 top_p=0.9, seed=5)


@pytest.mark.parametrize("extra, message", [
    ([], "no prompts"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be"),
    (["--prompt", "x", "--top-p", "0"], "--top-p must be"),
    (["--prompt", "x", "--max-tokens", "100000"], "leaves no room for a prompt"),
    (["--prompts-file", "/nonexistent/p.txt"], "not found"),
])
@pytest.mark.slow
def test_palm_generate_bad_input_is_one_line(checkpoint, capsys, extra, message):
    assert main(["generate", str(checkpoint), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["empty-step-directory", "emptied-meta-metadata"])
def test_generate_and_eval_on_a_damaged_step_are_one_line_naming_the_good_steps(checkpoint, capsys, tmp_path, damage):
    """An empty step directory (Orbax's KeyError) or an emptied meta/metadata (JSONDecodeError) used to be a
    traceback from `palm generate` and `palm eval`."""
    import shutil

    train = tmp_path / "train" / checkpoint.parent.name
    shutil.copytree(checkpoint.parent, train)
    steps = sorted(int(p.name) for p in (train / "checkpoints").iterdir() if p.name.isdigit())
    if damage == "empty-step-directory":
        bad = train / "checkpoints" / str(steps[-1] + 3)
        bad.mkdir()
        good = steps
    else:
        bad = train / "checkpoints" / str(steps[-1])
        (bad / "meta" / "metadata").write_text("")
        good = steps[:-1]
    for args in (["generate", str(bad), "--prompt", "To be"], ["eval", str(bad), "--set", "eval.max_examples=2"]):
        rc = main(args)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("palm: error:")]
        assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
        assert f"checkpoint {bad} is unusable" in lines[0], err
        assert f"good steps: {', '.join(map(str, good))}" in lines[0], err


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "long-line", "gzip-bomb", "too-large-text"])
def test_files_a_user_names_are_read_bounded_and_regular_only(tmp_path, capsys, monkeypatch, kind):
    """`palm generate --prompts-file /dev/zero` used to read 4 GB in 5 s: every file a user names is a
    regular file read within palm.base.files' bounds, else one line naming it (exit 2, in milliseconds)."""
    import gzip
    import os
    import time

    from palm.base import files

    if kind == "device":
        cases = [(["generate", str(tmp_path), "--prompts-file", "/dev/zero"], "/dev/zero is a device"),
                 (["eval-score", "humaneval", "--samples", "/dev/zero"], "/dev/zero is a device")]
    elif kind == "fifo":
        fifo = tmp_path / "prompts.jsonl"
        os.mkfifo(fifo)  # nobody writes to it: opening it used to block
        cases = [(["generate", str(tmp_path), "--prompts-file", str(fifo)], "is a FIFO, not a regular file"),
                 (["eval-score", "gsm8k", "--samples", str(fifo)], "is a FIFO, not a regular file")]
    elif kind == "directory":
        cases = [(["generate", str(tmp_path), "--prompts-file", str(tmp_path)], "is a directory"),
                 (["eval-score", "gsm8k", "--samples", str(tmp_path)], "is a directory")]
    elif kind == "long-line":
        monkeypatch.setattr(files, "MAX_LINE_BYTES", 1 << 20)
        big = tmp_path / "samples.jsonl"
        big.write_bytes(b"x" * (2 << 20))
        cases = [(["eval-score", "gsm8k", "--samples", str(big)], "samples.jsonl:1: a line longer than 1 MiB")]
    elif kind == "gzip-bomb":
        monkeypatch.setattr(files, "MAX_BYTES", 2 << 20)
        bomb = tmp_path / "samples.jsonl.gz"
        with gzip.open(bomb, "wb") as f:
            for _ in range(64):  # 64 MiB of blank lines (skipped as they are read) in about 64 kB
                f.write((b" " * 1023 + b"\n") * 1024)
        cases = [(["eval-score", "gsm8k", "--samples", str(bomb)], "larger than 2 MiB")]
    else:
        monkeypatch.setattr("palm.cli.MAX_PROMPTS_BYTES", 1 << 20)
        big = tmp_path / "prompts.txt"
        big.write_text("To be\n" * 400_000)
        cases = [(["generate", str(tmp_path), "--prompts-file", str(big)], "is larger than 1 MiB")]
    for args, words in cases:
        start = time.perf_counter()
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err, err
        assert time.perf_counter() - start < 10


@pytest.mark.slow
def test_generate_and_eval_refuse_a_borrowed_step_naming_the_good_ones(checkpoint, capsys, tmp_path):
    """Issue 27.2: a step directory holding another step's files is named in one line, with the good steps."""
    import shutil

    train = checkpoint.parent
    root = tmp_path / "run"
    copy = root / "train" / train.name
    shutil.copytree(train, copy)
    for record in train.parent.parent.glob("*.json"):  # the run's spec record, for eval's settings
        shutil.copy(record, root)
    ckpts = copy / "checkpoints"
    shutil.rmtree(ckpts / "6")
    shutil.copytree(ckpts / "3", ckpts / "6")
    for argv in (["generate", str(ckpts / "6"), "--prompt", "The"],
                 ["eval", str(ckpts / "6"), "--tasks", "validation_loss"]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err, err[-2000:]
        lines = [line for line in err.splitlines() if line.startswith("palm: error: ")]
        assert rc == 2 and len(lines) == 1, err[-2000:]
        assert f"{ckpts}/6 is unusable: its meta records step 3" in lines[0] and "good steps: 0, 3" in lines[0]
