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

import jax

from starling_jax.generation import replies

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


def shuffled_prompt(messages: Messages, answers: Sequence[str], rng: random.Random) -> tuple[list[int], str]:
    """(order, judge prompt): the answers shown in a random order (order[i] = the answer shown under label i)."""
    order = list(range(len(answers)))
    rng.shuffle(order)
    return order, judge_prompt(messages, [answers[i] for i in order])


def ranks_from_reply(reply: str, order: Sequence[int]) -> Optional[list[int]]:
    """Nectar ranks of the answers in their own order from the judge's reply to a shuffled_prompt; None if the reply
    does not name every label exactly once."""
    best_first = parse_ranking(reply, len(order))
    if best_first is None:
        return None
    ranks = [0] * len(order)
    for position, shown in enumerate(best_first):
        ranks[order[shown]] = position + 1
    return ranks


def llm_rank(judge: Callable[[str], str], messages: Messages, answers: Sequence[str], rng: random.Random
             ) -> Optional[list[int]]:
    """Nectar ranks of `answers` (in their own order) from an LLM judge that sees them shuffled; None if the reply
    cannot be parsed."""
    order, prompt = shuffled_prompt(messages, answers, rng)
    return ranks_from_reply(judge(prompt), order)


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


# ----------------------------------------------------------------------------------------------------------------------
# Sampling K responses per prompt and building the rows (what the feedback stage kind runs)


def sample_k(params, config, tokenizer, template, conversations: Sequence[Messages], k: int, key,
             max_new_tokens: int, temperature: float = 0.7, top_p: float = 1.0, batch_size: int = 16,
             length_bucket: int = 32) -> list[list[str]]:
    """K sampled replies per conversation from one checkpoint (rendered in `template`, "auto" = the tokenizer's own),
    decoded and cut at the template's stop tokens and stop strings (replies.generate_replies). Rows are generated
    batch_size at a time (call j samples with fold_in(key, j * batch_size)), prompts left padded to a multiple of
    length_bucket (few compiled shapes); each call prefills each of its distinct prompts once (prefix sharing)."""
    r = replies.generate_replies(params, config, tokenizer, template, conversations,
                                 lambda j: jax.random.fold_in(key, j * batch_size), max_new_tokens,
                                 temperature=temperature, top_p=top_p, repeat=k, batch_size=batch_size,
                                 length_bucket=length_bucket)
    texts = [s.strip() for s in r.texts]
    return [texts[i * k:(i + 1) * k] for i in range(len(conversations))]


def build_rows(conversations: Sequence[Messages], samples: Sequence[Sequence[str]],
               score: Callable[[Messages, str], float], model: str = "policy") -> tuple[list[dict], dict]:
    """Nectar rows ranked by a programmatic judge `score(messages, answer)` (higher is better), and counts: rows
    written, rows skipped because a sample was empty (Nectar rows need non-empty answers), rows whose answers all
    scored the same (no ranking signal, kept: the rm stage's tie policy decides), and the mean score."""
    rows, skipped, flat, total, n = [], 0, 0, 0.0, 0
    for messages, answers in zip(conversations, samples):
        if any(not a.strip() for a in answers):
            skipped += 1
            continue
        scores = [float(score(messages, a)) for a in answers]
        total += sum(scores)
        n += len(scores)
        flat += len(set(scores)) == 1
        rows.append(nectar_row(messages, answers, [model] * len(answers), rank_by_scores(scores)))
    return rows, {"rows": len(rows), "skipped_empty_answer": skipped, "rows_without_signal": flat,
                  "mean_score": total / n if n else float("nan")}
