"""GSM8K (Cobbe et al. 2021) with 8-shot chain-of-thought prompting, as evaluated in PaLM.

The prompt is the eight standard exemplars of Wei et al. (2022), "Chain-of-Thought Prompting Elicits
Reasoning in Large Language Models" (appendix, Table 20), in "Q: ...\\nA: ..." form; each answer reasons
step by step and ends "The answer is N.". A completion is scored by exact numeric match of the number
it gives after "The answer is" (or, failing that, the last number it contains) with the number after
"####" in the reference solution.

Completions end at the first of the stop sequences (`STOP`, lm-evaluation-harness's `until` for its
gsm8k-cot task) wherever it occurs, as the harness's generation does: a completion that runs on into an
invented next question, on a new line or the same one, is scored on its own answer only.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Iterable, Sequence

from palm.base.errors import PalmError
from palm.evaluation import default_data_file, read_jsonl

# (question, chain-of-thought answer): Wei et al. (2022), Table 20, the GSM8K / math word problem exemplars.
EXEMPLARS: tuple[tuple[str, str], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
     "done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
     "have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in "
     "total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After "
     "eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops "
     "did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny "
     "20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he "
     "have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from "
     "monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many "
     "golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 "
     "more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
     "dollars left. 23 - 15 is 8. The answer is 8."),
)

# A number as written in word problems: optional minus (not a hyphen between words or numbers), optional
# dollar sign on either side of it, thousands separators, a decimal part. A trailing "." is not taken.
_NUMBER = re.compile(r"(?<![\w.)])(?P<sign>-)?\$?(?P<sign2>-)?(?P<digits>\d+(?:,\d{3}(?!\d))*(?:\.\d+)?|\.\d+)")
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)
#: Where a completion ends, wherever they occur (lm-evaluation-harness gsm8k-cot's `until`).
STOP: tuple[str, ...] = ("Q:", "</s>", "<|im_end|>")
_CALCULATOR = re.compile(r"<<[^>]*>>")


def load_problems(path: str | Path | None = None) -> list[dict[str, Any]]:
    """GSM8K problems from a JSONL file (default: the shared test split): question, answer, reference."""
    path = Path(path) if path is not None else default_data_file("gsm8k")
    rows = read_jsonl(path, required={"question": str, "answer": str}, what="GSM8K problems")
    problems = []
    for i, row in enumerate(rows, 1):
        try:
            reference = reference_answer(row["answer"])
        except PalmError as e:
            raise PalmError(f"{path}: problem {i}: {e}") from None
        problems.append({"question": row["question"], "answer": row["answer"], "reference": reference})
    if not problems:
        raise PalmError(f"{path}: no GSM8K problems")
    return problems


def reference_answer(answer_field: str) -> str:
    """The final answer of a GSM8K solution: the number after "####", without thousands separators."""
    if "####" not in answer_field:
        raise PalmError(f"a GSM8K answer must end with '#### N', got ...{answer_field[-60:]!r}")
    text = answer_field.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "")
    value = _canonical(text)
    if value is None:
        raise PalmError(f"the GSM8K answer after '####' is not a number: {text!r}")
    return value


def reference_completion(answer_field: str) -> str:
    """A GSM8K solution in the exemplars' form: its reasoning (calculator annotations removed), then
    "The answer is N." in place of "#### N"."""
    reasoning = answer_field.rsplit("####", 1)[0]
    reasoning = " ".join(_CALCULATOR.sub("", reasoning).split())
    return f"{reasoning} The answer is {reference_answer(answer_field)}."


def build_prompt(question: str, shots: int = 8) -> str:
    """The first `shots` chain-of-thought exemplars, then the question, ending "A:" for the model."""
    if not 0 <= shots <= len(EXEMPLARS):
        raise PalmError(f"shots must be between 0 and {len(EXEMPLARS)}, got {shots}")
    blocks = [f"Q: {q}\nA: {a}" for q, a in EXEMPLARS[:shots]]
    blocks.append(f"Q: {question.strip()}\nA:")
    return "\n\n".join(blocks)


def truncate(completion: str, stop: Sequence[str] = STOP) -> str:
    """`completion` up to the earliest occurrence of any stop sequence (all of it when none occurs)."""
    end = len(completion)
    for s in stop:
        at = completion.find(s)
        if s and 0 <= at < end:
            end = at
    return completion[:end]


def extract_answer(completion: str) -> str | None:
    """The number a completion answers with, as a canonical decimal string ("18", "-3.5"), or None.

    The completion is first cut at the earliest stop sequence (`truncate`), so only its first answer
    counts: an invented next question ("... 18 left. Q: John has 3 apples. A: The answer is 3.") is
    dropped wherever it starts. The number after the first "The answer is" is taken; without one (or with
    no number after it on that line), the last number in what is left.
    """
    text = truncate(completion).replace("\u2212", "-")  # a typographic minus sign
    said = _ANSWER_IS.search(text)
    if said:
        line = text[said.end():].split("\n", 1)[0]
        found = _NUMBER.search(line)
        if found:
            return _from_match(found)
    numbers = list(_NUMBER.finditer(text))
    return _from_match(numbers[-1]) if numbers else None


def exact_match(pred: str | float | int | None, ref: str | float | int) -> bool:
    """Whether two answers are the same number (so "18", "18.0" and "$18" all match 18)."""
    if pred is None:
        return False
    a = _canonical(str(pred).replace(",", "").replace("$", "").strip())
    b = _canonical(str(ref).replace(",", "").replace("$", "").strip())
    return a is not None and a == b


def grade_samples(samples: Iterable[dict[str, Any]], problems: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per sample, in order: index (from 1), question, extracted (the answer the completion
    gives, or None), reference, correct, reason. A question that is not among the problems is a PalmError
    naming it; so is a sample without string fields 'question' and 'completion'."""
    references: dict[str, str] = {}
    for p in problems:
        references.setdefault(p["question"].strip(), p.get("reference") or reference_answer(p["answer"]))
    records = []
    for i, sample in enumerate(samples, 1):
        question, completion = sample.get("question"), sample.get("completion")
        if not isinstance(question, str) or not isinstance(completion, str):
            raise PalmError(f"sample {i}: needs string fields 'question' and 'completion'")
        reference = references.get(question.strip())
        if reference is None:
            raise PalmError(f"sample {i}: question is not among the GSM8K problems: {question[:200]!r}")
        extracted = extract_answer(completion)
        correct = exact_match(extracted, reference)
        if extracted is None:
            reason = "no number in the completion"
        elif correct:
            reason = f"answer {extracted} matches the reference"
        else:
            reason = f"answer {extracted} differs from the reference {reference}"
        records.append({"index": i, "question": question, "extracted": extracted, "reference": reference,
                        "correct": correct, "reason": reason})
    return records


def score_samples(samples: Iterable[dict[str, Any]], problems: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Exact match of samples ({"question", "completion"}) against the problems with those questions.

    A question that is not among the problems is a PalmError naming it.
    """
    return score_records(grade_samples(samples, problems))


def score_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """{"exact_match", "n"} over grade_samples' records."""
    if not records:
        raise PalmError("no GSM8K samples to score")
    return {"exact_match": sum(r["correct"] for r in records) / len(records), "n": len(records)}


def _from_match(m: re.Match[str]) -> str | None:
    negative = bool(m.group("sign") or m.group("sign2"))
    return _canonical(("-" if negative else "") + m.group("digits").replace(",", ""))


def _canonical(text: str) -> str | None:
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")
