"""Verifiable tasks: procedurally generated prompts whose replies a program can check (data.source = "task:NAME").

A task gives the rows every stage reads (raw Nectar rows, each a prompt with one reference answer, so an SFT stage
could train on it; parsed like any Nectar file) plus two functions of (messages, reply):

    true_utility  what evaluation reports (the rl stage's true_reward_before/after): 1.0 for an exact answer, else 0.0
    judge         what the feedback stage ranks K samples by (higher is better); may give partial credit so that a
                  ranking carries signal when no sample is right

Rows hold their problem, so both functions read the answer from the row's own text (the prompt), never from a
global table: a held-out prompt is checked exactly as a training one.

A task may also generate its own reporting split (make_report_rows(split, n, seed), read through data.report_rows,
like the synthetic data's) and check it against the training rows (check_reporting(train_rows, report_rows) raises
ValueError when they share what the split holds out); load_splits calls both.

arithmetic: "What is 7 + 12?"-style sums of two integers in [1, 20], each unordered pair once with one of PHRASINGS
(so held-out prompts, split by prompt string, are held-out problems). The reply's answer is its last integer.

ifeval: chat instructions with 1-3 constraints a program checks (word and sentence counts, required and forbidden
words, a bulleted list, JSON with given keys, lowercase, an end phrase, no commas, a title); data/instructions.py.
Its held-out split (data.report_rows) shares neither an instruction nor a combination of constraint types with any
training row.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Callable, Optional, Sequence

from starling_jax.data import instructions

PHRASINGS = ("What is {a} + {b}?", "Compute {a} + {b}.", "Calculate {a} plus {b}.", "What is the sum of {a} and {b}?",
             "Add {a} and {b}.", "{a} + {b} = ?")
OPERANDS = (1, 20)
_INT = re.compile(r"-?\d+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_PROBLEM = re.compile(r"(\d+)\D+?(\d+)")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    make_rows: Callable[[int], list[dict]]  # seed -> rows
    true_utility: Callable[[Sequence[dict], str], float]
    judge: Callable[[Sequence[dict], str], float]
    summary: str
    make_report_rows: Optional[Callable[[str, int, int], list[dict]]] = None  # (split, n, seed) -> rows
    report_splits: tuple[str, ...] = ()  # the splits make_report_rows generates
    check_reporting: Optional[Callable[[Sequence[dict], Sequence[dict]], None]] = None


def reply_answer(reply: str) -> Optional[int]:
    """The answer a reply gives: its last integer (thousands separators ignored), None when it has none."""
    found = _INT.findall(_THOUSANDS.sub("", reply))
    return int(found[-1]) if found else None


def problem_of(messages: Sequence[dict]) -> tuple[int, int]:
    """The two operands of the last user turn of an arithmetic prompt."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    m = _PROBLEM.search(users[-1]) if users else None
    if m is None:
        raise ValueError(f"not an arithmetic prompt: {users[-1] if users else messages!r}")
    return int(m.group(1)), int(m.group(2))


def arithmetic_correct(messages: Sequence[dict], reply: str) -> float:
    """1.0 if the reply's last integer is the sum, else 0.0."""
    a, b = problem_of(messages)
    return float(reply_answer(reply) == a + b)


def arithmetic_judge(messages: Sequence[dict], reply: str) -> float:
    """The feedback ranking score: 1 for the exact sum; a wrong number earns 0.5 * (1 - min(|error|, 10) / 10) (near
    misses rank above wild ones); a reply without a number scores -0.5."""
    a, b = problem_of(messages)
    got = reply_answer(reply)
    if got is None:
        return -0.5
    if got == a + b:
        return 1.0
    return 0.5 * (1.0 - min(abs(got - (a + b)), 10) / 10.0)


def arithmetic_rows(seed: int) -> list[dict]:
    """Raw Nectar rows: every unordered pair {a, b} of OPERANDS once, operands in a random order, with a phrasing
    drawn by `seed`."""
    rng = random.Random(seed)
    lo, hi = OPERANDS
    rows = []
    for a in range(lo, hi + 1):
        for b in range(a, hi + 1):
            x, y = (a, b) if rng.random() < 0.5 else (b, a)
            text = rng.choice(PHRASINGS).format(a=x, b=y)
            rows.append({"prompt": f"\n\nHuman: {text}\n\nAssistant:", "turns": 1, "num_responses": 1,
                         "answers": [{"answer": f"{x} + {y} = {x + y}.", "model": "reference", "rank": 1.0}],
                         "source": ["task:arithmetic"], "good_natured": True})
    return rows


TASKS = {
    "arithmetic": Task("arithmetic", arithmetic_rows, arithmetic_correct, arithmetic_judge,
                       "sums of two integers in [1, 20] (210 problems); exact answer = the reply's last integer"),
    "ifeval": Task("ifeval", instructions.make_rows, instructions.true_utility, instructions.judge,
                   f"{len(instructions.INSTRUCTIONS)} chat instructions x 1-3 checkable constraints "
                   f"({len(instructions.TYPES)} types); true utility = fraction of constraints met",
                   make_report_rows=instructions.make_report_rows, report_splits=("heldout",),
                   check_reporting=instructions.check_reporting),
}


def get(source: str) -> Task:
    """The task of a data.source "task:NAME"."""
    name = source[len("task:"):] if source.startswith("task:") else source
    if name not in TASKS:
        raise ValueError(f"{source!r}: no such task; known: "
                         f"{', '.join('task:' + n for n in sorted(TASKS))}")
    return TASKS[name]
