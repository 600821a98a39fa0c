"""HumanEval pass@k and GSM8K exact match on the real data in ../shared/data, and `palm eval-score`."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

from palm.cli import main
from palm.base.errors import PalmError
from palm.evaluation import gsm8k, humaneval
from palm.evaluation.metrics import mean_pass_at_k, pass_at_k, pass_at_ks
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def he_file(shared_data: Path) -> Path:
    return shared_data / "humaneval" / "HumanEval.jsonl.gz"


@pytest.fixture(scope="module")
def he_problems(he_file: Path) -> dict:
    return humaneval.load_problems(he_file)


@pytest.fixture(scope="module")
def gsm_file(shared_data: Path) -> Path:
    return shared_data / "gsm8k" / "test.jsonl"


@pytest.fixture(scope="module")
def gsm_problems(gsm_file: Path) -> list:
    return gsm8k.load_problems(gsm_file)


def write_jsonl(path: Path, rows) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ pass@k

def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The fraction of all k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12), \
                    (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    for n, c, k in [(200, 1, 100), (200, 3, 10), (1000, 7, 100), (1000, 0, 500), (2000, 1999, 1000)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15), (n, c, k)
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # one correct in 200: half the 100-subsets hold it
    assert pass_at_k(100, 5, 1) == pytest.approx(0.05)  # pass@1 is the fraction correct
    assert pass_at_k(10, 0, 10) == 0.0 and pass_at_k(10, 1, 10) == 1.0 and pass_at_k(10, 3, 8) == 1.0


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_pass_at_ks_reports_only_ks_every_problem_has_samples_for():
    counts = [(10, 3), (12, 0), (10, 10)]
    got = pass_at_ks(counts, (1, 10, 100))
    assert set(got) == {"pass@1", "pass@10"}
    assert got["pass@1"] == pytest.approx((0.3 + 0.0 + 1.0) / 3)
    assert got["pass@10"] == pytest.approx(mean_pass_at_k(counts, 10)) == pytest.approx((1.0 + 0.0 + 1.0) / 3)


# --------------------------------------------------------------------------------------------- HumanEval

@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass(he_problems):
    assert len(he_problems) == 164
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in he_problems.items()]
    start = time.monotonic()
    metrics = humaneval.score_samples(samples, he_problems)
    seconds = time.monotonic() - start
    if metrics["pass@1"] != 1.0:  # say which ones failed, and why
        results = humaneval.evaluate_samples(samples, he_problems)
        failed = [(s["task_id"], r.status, r.detail, r.stderr[-500:]) for s, r in zip(samples, results)
                  if not r.passed]
        pytest.fail(f"canonical solutions failed: {failed}")
    assert metrics == {"pass@1": 1.0, "n": 164, "tasks": 164}
    print(f"\n164 canonical HumanEval solutions: {seconds:.1f} s with {humaneval.default_workers()} workers")


@pytest.mark.slow
def test_humaneval_bodiless_and_pass_completions_all_fail(he_problems):
    samples = [{"task_id": t, "completion": completion}
               for t in he_problems for completion in ("", "    pass\n")]
    results = humaneval.evaluate_samples(samples, he_problems)
    passed = [s["task_id"] for s, r in zip(samples, results) if r.passed]
    assert passed == []
    assert all(r.status == "failed" for r in results), {r.status for r in results}
    metrics = humaneval.score_samples(samples[:8], he_problems, k=(1, 2, 10))
    assert metrics == {"pass@1": 0.0, "pass@2": 0.0, "n": 8, "tasks": 4}


def test_humaneval_pass_at_k_over_several_samples_per_task(he_problems):
    tasks = ["HumanEval/0", "HumanEval/2", "HumanEval/4"]
    correct = {"HumanEval/0": 3, "HumanEval/2": 0, "HumanEval/4": 10}
    samples = []
    for t in tasks:
        for i in range(10):
            good = i < correct[t]
            samples.append({"task_id": t, "completion": he_problems[t]["canonical_solution"] if good else
                            "    return None\n"})
    metrics = humaneval.score_samples(samples, he_problems)  # k = 1, 10, 100: 100 > 10 samples per task
    assert set(metrics) == {"pass@1", "pass@10", "n", "tasks"} and metrics["n"] == 30 and metrics["tasks"] == 3
    assert metrics["pass@1"] == pytest.approx((0.3 + 0.0 + 1.0) / 3)
    assert metrics["pass@10"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)


def test_humaneval_early_exit_with_status_zero_is_not_a_pass(he_problems):
    problem = he_problems["HumanEval/0"]
    for body in ("    import sys\n    sys.exit(0)\n", "    import os\n    os._exit(0)\n"):
        r = humaneval.check_program(problem, body)
        assert not r.passed and r.status == "failed" and r.returncode == 0, r
    assert humaneval.check_program(problem, problem["canonical_solution"]).passed


def test_humaneval_rejects_unknown_tasks_and_bad_samples(he_problems):
    with pytest.raises(PalmError, match="HumanEval/999"):
        humaneval.score_samples([{"task_id": "HumanEval/999", "completion": ""}], he_problems)
    with pytest.raises(PalmError, match="completion"):
        humaneval.score_samples([{"task_id": "HumanEval/0"}], he_problems)
    with pytest.raises(PalmError, match="no HumanEval samples"):
        humaneval.score_samples([], he_problems)


# ------------------------------------------------------------------------------------------------- GSM8K

def test_gsm8k_reference_answers():
    assert gsm8k.reference_answer("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == "18"
    assert gsm8k.reference_answer("...\n#### 1,450,000") == "1450000"
    assert gsm8k.reference_answer("...\n#### -10") == "-10"
    with pytest.raises(PalmError, match="####"):
        gsm8k.reference_answer("no final answer")
    with pytest.raises(PalmError, match="not a number"):
        gsm8k.reference_answer("#### eighteen")


def test_gsm8k_prompt_has_the_eight_chain_of_thought_exemplars():
    prompt = gsm8k.build_prompt("Janet has 3 apples. How many?")
    blocks = prompt.split("\n\n")
    assert len(blocks) == 9 and blocks[-1] == "Q: Janet has 3 apples. How many?\nA:"
    assert all(b.startswith("Q: ") and "\nA: " in b for b in blocks[:8])
    assert "15 trees in the grove" in blocks[0] and "Olivia has $23" in blocks[7]
    answers = [gsm8k.extract_answer(a) for _, a in gsm8k.EXEMPLARS]
    assert answers == ["6", "5", "39", "8", "9", "29", "33", "8"]
    assert all(a.endswith(f"The answer is {n}.") for (_, a), n in zip(gsm8k.EXEMPLARS, answers))
    assert gsm8k.build_prompt("Q?", shots=0) == "Q: Q?\nA:"
    assert gsm8k.build_prompt("Q?", shots=2).count("Q: ") == 3
    with pytest.raises(PalmError, match="shots"):
        gsm8k.build_prompt("Q?", shots=9)


@pytest.mark.parametrize("completion, expected", [
    (" She sold 48 / 2 = 24 clips in May. The answer is 72.", "72"),
    ("The answer is $1,234.50.", "1234.5"),
    ("The answer is -7.", "-7"),
    ("It fell 3 - 10 = -7 degrees. The answer is $-7", "-7"),
    ("The answer is 0.25 liters.", "0.25"),
    ("the answer is: 18", "18"),
    ("The answer is 18.\n\nQ: Tom has 99 marbles.\nA: The answer is 99.", "18"),  # a new question is not ours
    # An invented next question on the same line ends the completion too, as the harness's `until` does.
    ("So 20 - 2 = 18 left. Q: John has 3 apples. A: The answer is 3.", "18"),
    ("She pays $1,234 in all. Q: What is 5 + 5? A: 10", "1234"),
    ("The total is $1,234.", "1234"),
    ("Q: Sam has 4 pens. A: The answer is 4.", None),  # nothing before the invented question
    ("He has 7 marbles.\nQ: Ann has 2 cats. How many?\nA: 2 + 2 = 4. The answer is 4.\n\nQ: ...", "7"),
    ("The answer is: 1,234", "1234"),
    ("The answer is 12.</s> The answer is 13.", "12"),
    ("12 + 30 = 42. The answer is 42.<|im_end|>\n99", "42"),
    ("So she has 16 - 3 - 4 = 9 eggs, worth 9 * 2 = $18.", "18"),  # no "The answer is": the last number
    ("That is 1,000 + 500 = 1,500.", "1500"),
    ("pages 3-4", "4"),  # a hyphen between numbers is not a minus sign
    ("The answer is eighteen. So 18", "18"),  # no number after the phrase on its line: the last number
    ("I do not know.", None),
    ("", None),
])
def test_gsm8k_extract_answer(completion, expected):
    assert gsm8k.extract_answer(completion) == expected


def test_gsm8k_stop_sequences_are_the_harness_until():
    # lm-evaluation-harness's gsm8k-cot task: generation_kwargs.until; the harness cuts at any of them.
    import yaml

    from lm_eval import tasks as lm_eval_tasks

    harness = yaml.safe_load((Path(lm_eval_tasks.__file__).parent / "gsm8k" / "gsm8k-cot.yaml").read_text())
    assert list(gsm8k.STOP) == harness["generation_kwargs"]["until"]
    assert gsm8k.truncate("a Q: b </s> c") == "a "
    assert gsm8k.truncate("a </s> Q: b") == "a "
    assert gsm8k.truncate("no stop here") == "no stop here"


def test_gsm8k_exact_match_is_numeric():
    assert gsm8k.exact_match("18", "18") and gsm8k.exact_match("18.00", "18") and gsm8k.exact_match(18, "18")
    assert gsm8k.exact_match("$1,500", "1500") and gsm8k.exact_match("-3.50", "-3.5")
    assert not gsm8k.exact_match("17", "18") and not gsm8k.exact_match(None, "18")
    assert not gsm8k.exact_match("abc", "18")


def test_gsm8k_reference_reasoning_scores_100_percent(gsm_problems):
    assert len(gsm_problems) == 1319
    samples = [{"question": p["question"], "completion": " " + gsm8k.reference_completion(p["answer"])}
               for p in gsm_problems]
    assert samples[0]["completion"].endswith("The answer is 18.") and "<<" not in samples[0]["completion"]
    assert gsm8k.score_samples(samples, gsm_problems) == {"exact_match": 1.0, "n": 1319}


def test_gsm8k_fallback_to_the_last_number_scores_100_percent(gsm_problems):
    # The reference reasoning with "#### N" replaced by a sentence that never says "The answer is".
    samples = []
    for p in gsm_problems:
        reasoning, final = p["answer"].rsplit("####", 1)
        samples.append({"question": p["question"], "completion": f"{reasoning}So the result is {final.strip()}."})
    assert not any("answer is" in s["completion"].lower() for s in samples[:50])
    assert gsm8k.score_samples(samples, gsm_problems) == {"exact_match": 1.0, "n": 1319}


def test_gsm8k_scores_wrong_answers_and_rejects_unknown_questions(gsm_problems):
    p = gsm_problems[0]
    samples = [{"question": p["question"], "completion": "The answer is 18."},
               {"question": p["question"], "completion": "The answer is 19."},
               {"question": p["question"], "completion": "I cannot tell."}]
    assert gsm8k.score_samples(samples, gsm_problems) == {"exact_match": pytest.approx(1 / 3), "n": 3}
    with pytest.raises(PalmError, match="How many unicorns"):
        gsm8k.score_samples([{"question": "How many unicorns?", "completion": "1"}], gsm_problems)


# --------------------------------------------------------------------------------------- palm eval-score

def test_eval_score_humaneval_end_to_end(he_problems, he_file, tmp_path, capsys):
    tasks = ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    rows = [{"task_id": t, "completion": he_problems[t]["canonical_solution"]} for t in tasks]
    rows += [{"task_id": t, "completion": "    return None\n"} for t in tasks]
    samples = write_jsonl(tmp_path / "samples.jsonl.gz", rows)
    rc = main(["eval-score", "humaneval", "--samples", str(samples), "--data", str(he_file), "--json",
               "--workers", "3"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    r = json.loads(out)
    assert r["task"] == "humaneval" and r["pass@1"] == pytest.approx(0.5) and r["n"] == 6 and r["tasks"] == 3
    assert "pass@10" not in r
    assert "eval-score:" in err and "Traceback" not in err

    rc = main(["eval-score", "humaneval", "--samples", str(samples)])  # the default --data: the shared file
    out, _ = capsys.readouterr()
    assert rc == 0
    assert "pass@1       0.5000" in out and "| metric | value |" in out and "| pass@1 | 0.5000 |" in out


def test_eval_score_gsm8k_end_to_end(gsm_problems, gsm_file, tmp_path, capsys):
    rows = [{"question": p["question"], "completion": gsm8k.reference_completion(p["answer"])}
            for p in gsm_problems[:30]]
    rows += [{"question": p["question"], "completion": "The answer is 123456789."} for p in gsm_problems[:10]]
    samples = write_jsonl(tmp_path / "gsm.jsonl", rows)
    rc = main(["eval-score", "gsm8k", "--samples", str(samples), "--data", str(gsm_file), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    r = json.loads(out)
    assert r["task"] == "gsm8k" and r["exact_match"] == pytest.approx(0.75) and r["n"] == 40
    rc = main(["eval-score", "gsm8k", "--samples", str(samples)])
    out, _ = capsys.readouterr()
    assert rc == 0 and "exact_match  0.7500" in out and "| exact_match | 0.7500 |" in out


def test_eval_score_bad_input_exits_2_naming_the_line(he_problems, tmp_path, capsys):
    good = json.dumps({"task_id": "HumanEval/0", "completion": "    return True\n"})
    cases = {
        "malformed.jsonl": (good + "\n\n{not json\n", "malformed.jsonl:3", "humaneval"),
        "not_object.jsonl": (good + "\n[1, 2]\n", "not_object.jsonl:2", "humaneval"),
        "missing.jsonl": (good + '\n{"task_id": "HumanEval/1"}\n', "missing.jsonl:2",
                          "humaneval"),
        "unknown.jsonl": (json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n", "unknown.jsonl:1",
                          "humaneval"),
        "question.jsonl": (json.dumps({"question": "How many unicorns?", "completion": "1"}) + "\n",
                           "question.jsonl:1", "gsm8k"),
        "empty.jsonl": ("\n", "no HumanEval samples", "humaneval"),
    }
    for name, (text, expected, task) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        rc = main(["eval-score", task, "--samples", str(path), "--json"])
        out, err = capsys.readouterr()
        assert rc == 2, (name, err)
        assert expected in err and "Traceback" not in err and out == "", (name, err)
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    for args, expected in [(["--samples", str(tmp_path / "broken.jsonl.gz")], "broken.jsonl.gz"),
                           (["--samples", str(tmp_path / "absent.jsonl")], "samples file not found"),
                           (["--samples", str(tmp_path / "malformed.jsonl"), "--data", str(tmp_path / "x.jsonl")],
                            "not found"),
                           (["--samples", str(tmp_path / "malformed.jsonl"), "--workers", "0"], "--workers")]:
        rc = main(["eval-score", "humaneval", *args])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err, (args, err)


def test_evaltasks_import_with_the_standard_library_and_numpy_only():
    code = """
import importlib.abc, sys
allowed = set(sys.stdlib_module_names) | {"numpy", "palm"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in allowed:
            raise ImportError("not the standard library or numpy: " + name)
sys.meta_path.insert(0, Block())
import palm.evaluation.gsm8k, palm.evaluation.humaneval, palm.evaluation.metrics, palm.evaluation.sandbox
import palm.evaluation.isolation, palm.evaluation.isolation_runner, palm.evaluation.cgroups
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------ malformed samples, per-sample verdicts

def test_a_malformed_sample_is_a_failure_with_its_reason_and_the_run_goes_on(he_problems):
    good = he_problems["HumanEval/0"]["canonical_solution"]
    samples = [{"task_id": "HumanEval/0", "completion": good},
               {"task_id": "HumanEval/0", "completion": json.loads('"\\ud800"')},  # a lone surrogate
               {"task_id": "HumanEval/0", "completion": good[:-1] + "\udfff\n"}]
    results = humaneval.evaluate_samples(samples, he_problems, workers=2)
    assert [r.status for r in results] == ["passed", "error", "error"], results
    assert "malformed sample" in results[1].detail and "\\ud800" in results[1].detail
    metrics = humaneval.score_samples(samples, he_problems, k=(1,))
    assert metrics == {"pass@1": pytest.approx(1 / 3), "n": 3, "tasks": 1}


def test_eval_score_humaneval_writes_one_verdict_per_sample(he_problems, he_file, tmp_path, capsys):
    p0, p2 = he_problems["HumanEval/0"], he_problems["HumanEval/2"]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("\n".join([
        json.dumps({"task_id": "HumanEval/0", "completion": p0["canonical_solution"]}),
        json.dumps({"task_id": "HumanEval/2", "completion": "    return None\n"}),
        '{"task_id": "HumanEval/2", "completion": "\\ud800"}',
        json.dumps({"task_id": "HumanEval/0", "completion": "    print('ok')\n    import os\n    os._exit(0)\n"}),
        json.dumps({"task_id": "HumanEval/2", "completion": p2["canonical_solution"]}),
    ]) + "\n")
    out = tmp_path / "verdicts.jsonl"
    rc = main(["eval-score", "humaneval", "--samples", str(samples), "--data", str(he_file), "--json",
               "--out", str(out), "--workers", "2"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(stdout)["pass@1"] == pytest.approx((1 / 2 + 1 / 3) / 2)  # HumanEval/0: 1 of 2; /2: 1 of 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["task_id"], r["status"], r["passed"]) for r in rows] == [
        (1, "HumanEval/0", "passed", True), (2, "HumanEval/2", "failed", False), (3, "HumanEval/2", "error", False),
        (4, "HumanEval/0", "failed", False), (5, "HumanEval/2", "passed", True)]
    assert rows[0]["reason"] == "" and "exit status 1" in rows[1]["reason"]
    assert "malformed sample" in rows[2]["reason"] and "before the program ran to its end" in rows[3]["reason"]
    assert all(set(r) == {"index", "task_id", "status", "passed", "reason", "returncode", "seconds"} for r in rows)
    assert "1 sample(s) could not be run" in err and "Traceback" not in err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_eval_score_gsm8k_writes_one_verdict_per_sample(gsm_problems, gsm_file, tmp_path, capsys):
    p = gsm_problems[0]
    rows = [{"question": p["question"], "completion": gsm8k.reference_completion(p["answer"])},
            {"question": p["question"], "completion": "The answer is 123456789."},
            {"question": p["question"], "completion": "I cannot tell."}]
    samples = write_jsonl(tmp_path / "gsm.jsonl", rows)
    out = tmp_path / "verdicts.jsonl"
    rc = main(["eval-score", "gsm8k", "--samples", str(samples), "--data", str(gsm_file), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["extracted"], r["reference"], r["correct"]) for r in got] == [
        (1, p["reference"], p["reference"], True), (2, "123456789", p["reference"], False),
        (3, None, p["reference"], False)]
    assert all(r["question"] == p["question"] for r in got)
    assert "matches" in got[0]["reason"] and "differs" in got[1]["reason"] and "no number" in got[2]["reason"]


def test_eval_score_out_is_written_whole_or_not_at_all(he_file, tmp_path, capsys):
    out = tmp_path / "verdicts.jsonl"
    out.write_text("previous\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0", "completion": "    return True\\n"}\n{not json\n')
    rc = main(["eval-score", "humaneval", "--samples", str(bad), "--data", str(he_file), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:2" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "previous\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "verdicts.jsonl"]
    for args, expected in [(["--out", str(tmp_path)], "is a directory"),
                           (["--out", str(tmp_path / "absent" / "v.jsonl")], "does not exist"),
                           (["--out", str(bad)], "is the samples file")]:
        rc = main(["eval-score", "gsm8k", "--samples", str(bad), *args])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err and "Traceback" not in err, (args, err)
