"""Batch formats: how each data stage kind's batches are made from parsed Nectar rows (the encoding of a
conversation, the kind's examples, their collation into arrays, the weightless padding row), one BatchFormat per kind,
registered under the kind's name. The built-in formats are sft, rm, dpo and rl (their layouts: data/pipelines.py's
module doc); a new data kind registers its own (register_format) and data/pipelines.py builds its datasets.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from starling_jax.data import nectar
from starling_jax.data.tokenizer import Tokenizer


# -- encoding ---------------------------------------------------------------------------------------------------

def _last_run_start(mask: Sequence[int]) -> int:
    """Start of the last run of ones in mask (the final assistant reply)."""
    i = len(mask)
    while i > 0 and not mask[i - 1]:
        i -= 1
    while i > 0 and mask[i - 1]:
        i -= 1
    return i


def encode_example(tokenizer: Tokenizer, messages: Sequence[dict], response: str, template, max_length: int,
                   max_prompt_length: int, report: nectar.DataReport, all_turns_loss: bool
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [n <= max_length] and loss mask [n] of messages + the reply `response`, truncated as documented."""
    ids, mask = tokenizer.encode_chat(list(messages) + [{"role": "assistant", "content": response}], template,
                                      add_generation_prompt=False, return_loss_mask=True)
    start = _last_run_start(mask)
    prompt, prompt_mask = ids[:start], mask[:start]
    resp, resp_mask = ids[start:], mask[start:]
    if not all_turns_loss:
        prompt_mask = [0] * len(prompt_mask)
    keep_prompt = min(len(prompt), max_prompt_length, max_length // 2)
    if len(resp) > max_length - keep_prompt:
        resp, resp_mask = resp[:max_length - keep_prompt], resp_mask[:max_length - keep_prompt]
        report.responses_truncated += 1
    room = min(max_prompt_length, max_length - len(resp))
    if len(prompt) > room:
        # Left truncation keeps the BOS (the model always saw one first) and the most recent turns.
        head = 1 if prompt and prompt[0] == tokenizer.bos_id else 0
        prompt = prompt[:head] + prompt[len(prompt) - (room - head):]
        prompt_mask = prompt_mask[:head] + prompt_mask[len(prompt_mask) - (room - head):]
        report.prompts_truncated += 1
    return np.asarray(prompt + resp, np.int32), np.asarray(prompt_mask + resp_mask, np.float32)


def encode_prompt(tokenizer: Tokenizer, messages: Sequence[dict], template, max_prompt_length: int,
                  report: nectar.DataReport) -> np.ndarray:
    ids = tokenizer.encode_chat(messages, template, add_generation_prompt=True)
    if len(ids) > max_prompt_length:
        head = 1 if ids[0] == tokenizer.bos_id else 0
        ids = ids[:head] + ids[len(ids) - (max_prompt_length - head):]
        report.prompts_truncated += 1
    return np.asarray(ids, np.int32)


def _pad(x: np.ndarray, length: int, value, left: bool = False) -> np.ndarray:
    out = np.full((length,), value, x.dtype)
    if left:
        out[length - len(x):] = x
    else:
        out[:len(x)] = x
    return out


def sft_examples(rows, tokenizer, template, max_length, max_prompt_length, report):
    """One example per row: the best-ranked answer, loss on every assistant turn."""
    out = []
    for r in rows:
        best = r["responses"][int(np.argmin(r["ranks"]))]
        tokens, loss = encode_example(tokenizer, r["messages"], best, template, max_length, max_prompt_length,
                                      report, all_turns_loss=True)
        out.append({"tokens": tokens, "loss_mask": loss})
    return out


def rm_examples(rows, tokenizer, template, max_length, max_prompt_length, max_responses, report, seed=0):
    """One K-wise group per row: its answers' token arrays (padded to [K, T] only when batched, so a large
    dataset holds just its tokens) and ranks [K]: 1 = best, tied raw ranks kept tied (objectives.reward says how each
    loss and metric reads a tie), padded slots continuing after the worst. Rows with more answers keep a seeded random
    subset."""
    out = []
    for r in rows:
        n = len(r["responses"])
        keep = np.arange(n)
        if n > max_responses:
            keep = np.sort(np.random.default_rng([seed, r.get("row", 0)]).permutation(n)[:max_responses])
            report.answers_dropped += n - max_responses
        raw = r.get("raw_ranks", r["ranks"])
        # dense levels 1.. of the kept answers' raw ranks, ties kept
        levels = np.unique(np.asarray([raw[j] for j in keep]), return_inverse=True)[1].reshape(-1) + 1
        ranks = np.arange(max_responses, dtype=np.int32) - len(keep) + levels.max() + 1  # padded: after the worst
        ranks[:len(keep)] = levels
        responses = [encode_example(tokenizer, r["messages"], r["responses"][j], template, max_length,
                                    max_prompt_length, report, all_turns_loss=False)[0] for j in keep]
        out.append({"responses": responses, "ranks": ranks})
    return out


def preference_pairs(row: dict, pairs: str, report: nectar.DataReport) -> list[tuple[int, int]]:
    """(better, worse) answer indices: "best_vs_rest" = the best vs each other, "all" = every ordered pair.
    Pairs whose raw ranks tie are skipped and counted (the tie policy for pairwise losses)."""
    if pairs not in ("best_vs_rest", "all"):
        raise ValueError(f"pairs must be 'best_vs_rest' or 'all', got {pairs!r}")
    order = list(np.argsort(row["ranks"], kind="stable"))
    raw = row.get("raw_ranks", row["ranks"])
    candidates = ([(order[0], j) for j in order[1:]] if pairs == "best_vs_rest"
                  else [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))])
    out = []
    for i, j in candidates:
        if raw[i] == raw[j]:
            report.tied_pairs_skipped += 1
        else:
            out.append((int(i), int(j)))
    return out


def dpo_examples(rows, tokenizer, template, max_length, max_prompt_length, pairs, report):
    out = []
    for r in rows:
        enc = {}
        for i, j in preference_pairs(r, pairs, report):
            for j_ in (i, j):
                if j_ not in enc:
                    enc[j_] = encode_example(tokenizer, r["messages"], r["responses"][j_], template, max_length,
                                             max_prompt_length, report, all_turns_loss=False)
            out.append({"chosen": enc[i], "rejected": enc[j]})
    return out


def rl_examples(rows, tokenizer, template, max_prompt_length, report):
    return [{"prompt_tokens": encode_prompt(tokenizer, r["messages"], template, max_prompt_length, report),
             "prompt_id": np.int32(i)} for i, r in enumerate(rows)]


# -- collation ----------------------------------------------------------------------------------------------------

def _collate_sft(pad_id, T):
    def collate(xs):
        return {"tokens": np.stack([_pad(x["tokens"], T, pad_id) for x in xs]),
                "attention_mask": np.stack([_pad(np.ones(len(x["tokens"]), np.int32), T, 0) for x in xs]),
                "loss_mask": np.stack([_pad(x["loss_mask"], T, 0.0) for x in xs])}
    return collate


def _collate_rm(pad_id, K, T):
    def collate(xs):
        tokens = np.full((len(xs), K, T), pad_id, np.int32)
        attention = np.zeros((len(xs), K, T), np.int32)
        response_mask = np.zeros((len(xs), K), np.int32)
        for b, x in enumerate(xs):
            for k, ids in enumerate(x["responses"]):
                tokens[b, k, :len(ids)] = ids
                attention[b, k, :len(ids)] = 1
            response_mask[b, :len(x["responses"])] = 0 if x.get("padding") else 1
        return {"tokens": tokens, "attention_mask": attention, "ranks": np.stack([x["ranks"] for x in xs]),
                "response_mask": response_mask}
    return collate


def _collate_dpo(pad_id, T):
    def collate(xs):
        out = {}
        for side in ("chosen", "rejected"):
            out[f"{side}_tokens"] = np.stack([_pad(x[side][0], T, pad_id) for x in xs])
            out[f"{side}_attention_mask"] = np.stack([_pad(np.ones(len(x[side][0]), np.int32), T, 0) for x in xs])
            out[f"{side}_loss_mask"] = np.stack([_pad(x[side][1], T, 0.0) for x in xs])
        return out
    return collate


def _collate_rl(pad_id, P):
    def collate(xs):
        return {"prompt_tokens": np.stack([_pad(x["prompt_tokens"], P, pad_id, left=True) for x in xs]),
                "prompt_mask": np.stack([_pad(np.ones(len(x["prompt_tokens"]), np.int32), P, 0, left=True)
                                         for x in xs]),
                "prompt_id": np.asarray([x["prompt_id"] for x in xs], np.int32)}
    return collate


# -- batch formats: one per data stage kind, registered under the kind's name ------------------------------------

@dataclasses.dataclass(frozen=True)
class Lengths:
    """The sizes and choices a batch format reads (from a DataConfig or make_dataset's arguments)."""
    max_length: int  # T: tokens of a prompt + reply
    max_prompt_length: int  # P: prompt tokens (truncated from the left)
    max_responses: int  # K: answers kept per row
    pairs: str  # which preference pairs a pairwise format makes ("best_vs_rest" | "all")
    seed: int  # the seed of the data order (and of a row's kept answers)


@dataclasses.dataclass(frozen=True)
class BatchFormat:
    """How a data stage kind's batches are made from parsed Nectar rows.

    examples(rows, tokenizer, template, lengths, report) -> [example]: one dict of numpy arrays per example, unpadded.
    collate(pad_id, lengths) -> batch_fn([example]) -> {key: numpy array [B, ...]}: the batch the kind's loss reads.
    padding(example) -> a copy that weighs nothing in the kind's objective and metrics (evaluation's last batch is
      completed with such rows); None: the format has none (pad_last is refused).
    min_responses: the answers per row the format needs (a ranking or a pair needs 2).
    packable: examples are {"tokens", "loss_mask"} rows that data.pack may pack several to a row (sft)."""
    name: str
    examples: Callable[..., list]
    collate: Callable[..., Callable[[list], dict]]
    padding: Optional[Callable[[dict], dict]] = None
    min_responses: int = 1
    packable: bool = False


FORMATS: dict[str, BatchFormat] = {}


def register_format(fmt: BatchFormat) -> BatchFormat:
    """Add the batch format of data stage kind `fmt.name` (re-registering an equal one is allowed)."""
    old = FORMATS.get(fmt.name)
    if old is not None and old != fmt:
        raise ValueError(f"batch format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(kind: str) -> BatchFormat:
    if kind not in FORMATS:
        raise ValueError(f"unknown pipeline kind {kind!r}; known: {tuple(FORMATS)}")
    return FORMATS[kind]


register_format(BatchFormat(
    "sft", examples=lambda rows, tok, tmpl, n, report: sft_examples(rows, tok, tmpl, n.max_length,
                                                                     n.max_prompt_length, report),
    collate=lambda pad, n: _collate_sft(pad, n.max_length),
    padding=lambda e: {**e, "loss_mask": np.zeros_like(e["loss_mask"])},  # no loss token
    packable=True))
register_format(BatchFormat(
    "rm", examples=lambda rows, tok, tmpl, n, report: rm_examples(rows, tok, tmpl, n.max_length, n.max_prompt_length,
                                                                   n.max_responses, report, n.seed),
    collate=lambda pad, n: _collate_rm(pad, n.max_responses, n.max_length),
    padding=lambda e: {**e, "padding": True},  # no counted response: no prompt, pair or ranking metric
    min_responses=2))
register_format(BatchFormat(
    "dpo", examples=lambda rows, tok, tmpl, n, report: dpo_examples(rows, tok, tmpl, n.max_length,
                                                                     n.max_prompt_length, n.pairs, report),
    collate=lambda pad, n: _collate_dpo(pad, n.max_length),
    # no loss token on either side, which dpo's loss counts as no pair
    padding=lambda e: {side: (e[side][0], np.zeros_like(e[side][1])) for side in ("chosen", "rejected")},
    min_responses=2))
register_format(BatchFormat(
    "rl", examples=lambda rows, tok, tmpl, n, report: rl_examples(rows, tok, tmpl, n.max_prompt_length, report),
    collate=lambda pad, n: _collate_rl(pad, n.max_prompt_length)))


# -- padding rows (evaluation reads every example in batches of the training shape) -----------------------------

def padding_example(kind: str, example: dict) -> dict:
    """A copy of `example` that weighs nothing in its kind's objective and metrics (its format's `padding`). The tokens
    stay real ones, so every forward over it stays finite."""
    fmt = get_format(kind)
    if fmt.padding is None:
        raise ValueError(f"pad_last: {kind!r} batches have no padding rows (kinds "
                         f"{', '.join(n for n, f in FORMATS.items() if f.padding is not None)})")
    return fmt.padding(example)
