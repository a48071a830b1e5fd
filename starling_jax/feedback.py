"""AI feedback: rank K responses per prompt with a judge and write Nectar-format rows (the half of Starling that made
Nectar). The rows are what the rm stage reads unchanged (data.source = the JSONL file).

    ranks = rank_by_scores(scores)                          # a programmatic judge's scores -> Nectar ranks
    ranks = llm_rank(judge, question, answers, rng)         # an LLM judge: K-wise prompt, answers shuffled, parsed
    rows.append(nectar_row(messages, answers, models, ranks))
    write_rows("feedback.jsonl", rows)

Judges:
- a Python function `fn(messages, answer) -> float` named in config as "module:function" (`load_function`), for
  verifiable tasks (higher is better);
- a reward model (any `scorer(conversations, answers) -> scores`, e.g. train.rollout.RewardScorer);
- an LLM judge: `judge(prompt_text) -> reply_text`. The answers are shown in a shuffled order (the Nectar paper's
  mitigation of position bias) under letter labels, the judge is asked for "[[B]] > [[A]] > ...", and `parse_ranking`
  accepts only a complete permutation of the labels: a reply it cannot parse gives None (counted by the caller, never
  guessed). `self_agreement` ranks each item under two independent shuffles and reports how often they agree.
"""

from __future__ import annotations

import importlib
import json
import random
import re
from typing import Callable, Optional, Sequence

Messages = list  # [{"role", "content"}] ending with a user turn

JUDGE_PROMPT = (
    "We are ranking {k} responses to the conversation below by helpfulness, correctness and harmlessness.\n\n"
    "[Conversation]\n{conversation}\n\n{answers}\n\n"
    "Rank all {k} responses from best to worst. Reply with the ranking only, in the form "
    "{example}, using every label exactly once."
)


def load_function(spec: str) -> Callable:
    """The callable named "package.module:function"."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"judge {spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"judge {spec!r}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ValueError(f"judge {spec!r} is not callable")
    return fn


def rank_by_scores(scores: Sequence[float]) -> list[int]:
    """Nectar ranks (1 = best) from scores, higher is better; equal scores share a rank (a tie the rm stage's tie
    policy then handles)."""
    distinct = sorted(set(float(s) for s in scores), reverse=True)
    position = {}
    k = 1
    for value in distinct:
        position[value] = k
        k += sum(1 for s in scores if float(s) == value)
    return [position[float(s)] for s in scores]


def labels(k: int) -> list[str]:
    if not 2 <= k <= 26:
        raise ValueError(f"an LLM judge ranks 2..26 answers, got {k}")
    return [chr(ord("A") + i) for i in range(k)]


def judge_prompt(messages: Messages, answers: Sequence[str]) -> str:
    """The K-wise ranking prompt, with the answers in the order given (shuffle them first)."""
    names = labels(len(answers))
    conversation = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    shown = "\n\n".join(f"[Response {n}]\n{a}\n[End of Response {n}]" for n, a in zip(names, answers))
    example = " > ".join(f"[[{n}]]" for n in names[:3]) + (" > ..." if len(names) > 3 else "")
    return JUDGE_PROMPT.format(k=len(answers), conversation=conversation, answers=shown, example=example)


def parse_ranking(reply: str, k: int) -> Optional[list[int]]:
    """The judge's order as label indices, best first, or None unless the reply names every one of the k labels
    exactly once. Reads "[[C]] > [[A]] > [[B]]", and "C > A > B" / "C, A, B" when there are no double brackets."""
    names = labels(k)
    found = re.findall(r"\[\[\s*([A-Z])\s*\]\]", reply)
    if not found:
        line = next((ln for ln in reply.strip().splitlines() if re.search(r"\b[A-Z]\b", ln)), "")
        found = re.findall(r"\b([A-Z])\b", line)
    if sorted(found) != names:
        return None
    return [names.index(x) for x in found]


def llm_rank(judge: Callable[[str], str], messages: Messages, answers: Sequence[str], rng: random.Random
             ) -> Optional[list[int]]:
    """Nectar ranks of `answers` (in their own order) from an LLM judge that sees them shuffled; None if the reply
    cannot be parsed."""
    order = list(range(len(answers)))
    rng.shuffle(order)
    best_first = parse_ranking(judge(judge_prompt(messages, [answers[i] for i in order])), len(answers))
    if best_first is None:
        return None
    ranks = [0] * len(answers)
    for position, shown in enumerate(best_first):
        ranks[order[shown]] = position + 1
    return ranks


def self_agreement(rank_fn: Callable[[int, random.Random], Optional[list[int]]], items: int, seed: int = 0) -> dict:
    """Rank every item twice under independent shuffles (rank_fn(item, rng)); report the fraction of items with
    identical rankings, the mean fraction of agreeing answer pairs, and how many rankings were unparseable."""
    rng_a, rng_b = random.Random(seed), random.Random(seed + 1)
    same, pair_agree, unparsed, both = 0, 0.0, 0, 0
    for i in range(items):
        a, b = rank_fn(i, rng_a), rank_fn(i, rng_b)
        unparsed += (a is None) + (b is None)
        if a is None or b is None:
            continue
        both += 1
        same += a == b
        pairs = [(x, y) for x in range(len(a)) for y in range(x + 1, len(a))]
        pair_agree += sum((a[x] < a[y]) == (b[x] < b[y]) for x, y in pairs) / len(pairs)
    return {"items": items, "ranked_twice": both, "unparseable": unparsed,
            "identical_ranking": same / both if both else float("nan"),
            "pair_agreement": pair_agree / both if both else float("nan")}


def nectar_prompt(messages: Messages) -> str:
    """A conversation ending with a user turn as a Nectar prompt: "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:"."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a Nectar prompt needs a conversation ending with a user turn")
    tags = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\nHuman: {m['content']}" if m["role"] == "user" else f"\n\nAssistant: {m['content']}"
                   for m in messages if m["role"] in tags) + "\n\nAssistant:"


def nectar_row(messages: Messages, answers: Sequence[str], models: Sequence[str], ranks: Sequence[int],
               source: str = "starling_jax feedback") -> dict:
    """One Nectar row: prompt, answers [{answer, model, rank}], turns, num_responses, source, good_natured."""
    if not len(answers) == len(models) == len(ranks):
        raise ValueError(f"{len(answers)} answers, {len(models)} models, {len(ranks)} ranks")
    return {"prompt": nectar_prompt(messages),
            "answers": [{"answer": a, "model": m, "rank": float(r)} for a, m, r in zip(answers, models, ranks)],
            "turns": sum(1 for m in messages if m["role"] == "user"), "num_responses": len(answers),
            "source": [source], "good_natured": True}


def write_rows(path: str, rows: Sequence[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
