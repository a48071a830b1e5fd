"""Batched generation for benchmarks: conversations -> replies with a checkpoint's own template and stop ids, and the
MT-Bench / AlpacaEval answer files (`starling-jax eval policy`).

Prompts are left padded to a multiple of `length_bucket` and batches are filled to `batch_size` rows (repeating a
row, whose reply is dropped), so generation compiles once per (prompt bucket, temperature is greedy or not). With a
mesh the parameters are sharded by the model's logical axes and each batch is split over the mesh's batch axes
(batch_size must divide by data * fsdp); jit partitions the decode loop accordingly.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

import jax

from starling_jax.commands.eval import benchmarks as bm
from starling_jax.commands.eval.checkpoints import Checkpoint
from starling_jax.config import MeshConfig
from starling_jax.errors import InputError
from starling_jax.generation.replies import generate_replies
from starling_jax.parallel import sharding

GREEDY_BELOW = 1e-4  # fschat: a temperature below this decodes greedily


class Generator:
    """Replies from one checkpoint. Call with conversations (lists of {"role", "content"} ending with a user turn)."""

    def __init__(self, ckpt: Checkpoint, *, max_new_tokens: Optional[int] = None, batch_size: int = 8,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, length_bucket: int = 64, mesh=None, rules=None):
        if batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {batch_size}")
        limit = ckpt.config.max_seq_len
        self.max_new_tokens = min(1024, limit // 2) if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= self.max_new_tokens < limit:
            raise InputError(f"--max-new-tokens must be in [1, {limit - 1}] (the model's context is {limit}), got "
                             f"{self.max_new_tokens}")
        self.ckpt, self.batch_size, self.top_p, self.top_k = ckpt, batch_size, top_p, top_k
        self.room = limit - self.max_new_tokens  # prompt tokens that fit beside the reply
        self.length_bucket = min(max(1, length_bucket), self.room)
        self.room -= self.room % self.length_bucket  # a padded prompt must fit too
        self.key = jax.random.key(seed)
        self.calls = 0
        self.truncated = 0
        self.place = None if mesh is None else sharding.BatchPlacement(mesh, MeshConfig().rules if rules is None
                                                                          else rules)

    def __call__(self, conversations: Sequence[list], temperature: float) -> list[str]:
        """One reply per conversation (sampled at `temperature`; greedy below 1e-4), in order."""
        ck, calls = self.ckpt, self.calls
        r = generate_replies(ck.params, ck.config, ck.tokenizer, ck.template, conversations,
                             lambda j: jax.random.fold_in(self.key, calls + j), self.max_new_tokens,
                             temperature=0.0 if temperature < GREEDY_BELOW else float(temperature), top_k=self.top_k,
                             top_p=self.top_p, batch_size=self.batch_size, length_bucket=self.length_bucket,
                             room=self.room, place=self.place)
        self.calls += -(-len(conversations) // self.batch_size)
        self.truncated += r.truncated
        return [t.strip() for t in r.texts]


def _progress(total: int, initial: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="q", file=sys.stderr, disable=None)


def answer_mt_bench(gen: Generator, questions: list[dict], out_path: str, model_id: str, num_choices: int = 1,
                    temperature: Optional[float] = None, on_batch: Optional[Callable[[], None]] = None) -> dict:
    """Answer MT-Bench questions turn by turn (turn k sees the model's own answers to turns < k) at each category's
    temperature (or `temperature` for all), appending fschat model_answer records to out_path; questions already
    there are skipped."""
    done = bm.read_fschat_answers(out_path)
    todo = [q for q in questions if q["question_id"] not in done]
    bar = _progress(len(questions), len(questions) - len(todo), "mt_bench")
    by_temperature: dict[float, list[dict]] = {}
    for q in todo:
        t = bm.mt_bench_temperature(q["category"]) if temperature is None else temperature
        by_temperature.setdefault(t, []).append(q)
    for t, group in by_temperature.items():
        for start in range(0, len(group), gen.batch_size):
            batch = group[start:start + gen.batch_size]
            choices = []
            for _ in range(num_choices):
                convs: list[list[dict]] = [[] for _ in batch]
                turns: list[list[str]] = [[] for _ in batch]
                for k in range(max(len(q["turns"]) for q in batch)):
                    live = [i for i, q in enumerate(batch) if k < len(q["turns"])]
                    for i in live:
                        convs[i].append({"role": "user", "content": batch[i]["turns"][k]})
                    replies = gen([convs[i] for i in live], t)
                    for i, r in zip(live, replies):
                        convs[i].append({"role": "assistant", "content": r})
                        turns[i].append(r)
                choices.append(turns)
            bm.append_jsonl(out_path, [bm.fschat_answer(q["question_id"], model_id, [c[i] for c in choices])
                                       for i, q in enumerate(batch)])
            bar.update(len(batch))
            if on_batch:
                on_batch()
    bar.close()
    return {"answered": len(todo), "skipped": len(questions) - len(todo), "total": len(questions)}


def answer_alpaca_eval(gen: Generator, rows: list[dict], out_path: str, generator_name: str, temperature: float,
                       on_batch: Optional[Callable[[], None]] = None) -> dict:
    """Answer AlpacaEval instructions; the outputs JSON (a list in the instructions' order) is rewritten after each
    batch, and instructions already in it (same instruction and dataset) are skipped."""
    existing = bm.read_alpaca_eval_outputs(out_path)
    have = {(r["instruction"], r.get("dataset")): r for r in existing}
    todo = [r for r in rows if (r["instruction"], r["dataset"]) not in have]
    bar = _progress(len(rows), len(rows) - len(todo), "alpaca_eval")
    for start in range(0, len(todo), gen.batch_size):
        batch = todo[start:start + gen.batch_size]
        replies = gen([[{"role": "user", "content": r["instruction"]}] for r in batch], temperature)
        for r, reply in zip(batch, replies):
            have[(r["instruction"], r["dataset"])] = bm.alpaca_eval_output(r["instruction"], reply, generator_name,
                                                                           r["dataset"])
        ordered = [have[(r["instruction"], r["dataset"])] for r in rows if (r["instruction"], r["dataset"]) in have]
        bm.write_json_atomic(out_path, ordered)
        bar.update(len(batch))
        if on_batch:
            on_batch()
    bar.close()
    if not todo and not existing:
        bm.write_json_atomic(out_path, [])
    return {"answered": len(todo), "skipped": len(rows) - len(todo), "total": len(rows)}
