"""Text replies from a checkpoint: the one loop from conversations (or prompts already rendered) to decoded replies,
which AI feedback (`sample_k`), `eval policy` (its Generator), `generate`, the rl stage's rollouts and its evaluation
all call.

    r = generate_replies(params, config, tokenizer, "auto", conversations, key, max_new_tokens=256,
                         temperature=0.7, repeat=4, batch_size=16, length_bucket=32)
    r.texts      # one reply per row (each conversation `repeat` times), cut at the template's stop strings
    r.tokens     # [B, N] the sampled tokens; r.mask [B, N]: 1 up to the end-of-turn (stop id or stop string)

What it does, in order: render each conversation in the chat template (`tokenizer.template(template)`: "auto" is the
checkpoint's own), keeping its last `room` tokens when given; split the rows into generate calls (batching); prefill
each distinct prompt of a call once and share its KV cache among its rows (prefix sharing: sampling.generate's rows);
stop a row at the template's stop ids (its end-of-turn tokens and EOS); decode and cut at the template's stop strings
(sampling.apply_stop_strings). Texts come back as decoded, not stripped.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from starling_jax.generation import sampling
from starling_jax.models import ModelConfig, Params, check_token_ids


@dataclasses.dataclass
class Replies:
    """tokens [B, N] int32 as sampled (padding after a row's stop), mask [B, N] int32 (1 on the reply's tokens, cut
    after the token that completes a stop string), texts (decoded, cut at the first stop string), truncated (how many
    rendered prompts were cut to their last `room` tokens)."""
    tokens: np.ndarray
    mask: np.ndarray
    texts: list
    truncated: int = 0


def row_calls(n: int, rows_per_call: int, place=None) -> list:
    """This process's row indices of each call when a global batch (n local rows; the global count from `place`)
    runs in calls of rows_per_call global rows (0 or >= the batch: one call), split evenly."""
    total = place.global_size(n) if place is not None else n
    calls = total // rows_per_call if 0 < rows_per_call < total else 1
    return np.array_split(np.arange(n), calls)


def generate_replies(params: Params, config: ModelConfig, tokenizer, template, prompts, key, max_new_tokens: int, *,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repeat: int = 1,
                     batch_size: int = 0, length_bucket: int = 1, room: Optional[int] = None, constrain=None,
                     place=None) -> Replies:
    """Sample a reply per row and decode it (see the module docstring).

    params: the model's params, or a (top, trunk) pair (hydra.policy_parts; merged inside each generate call).
    template: a chat template or its name ("auto" = the tokenizer's own); its stop ids and stop strings end a reply.
    prompts: either conversations (lists of {"role", "content"} ending with a user turn), rendered here, each giving
      `repeat` consecutive rows, generated `batch_size` rows per call (0 = all in one), the last call filled to
      batch_size by repeating its last row (one compiled batch shape; those replies are dropped), prompts left padded
      to a multiple of `length_bucket`; or a pair (prompt_tokens, prompt_mask) [B, P] rendered and left padded by
      the caller (the rl stage's prompt pipeline), whose rows come in runs of `repeat` equal prompts (a GRPO/RLOO
      group), generated in calls of `batch_size` global rows split evenly (row_calls; 0 = one call).
    key: a key (call j of several samples with fold_in(key, j), a single call with key itself) or a function
      j -> call j's key.
    room: keep each rendered conversation's last `room` tokens (a prompt that must fit beside the reply).
    repeat: a call's rows of one prompt (whole runs on one process, or any rows of rendered conversations) prefill
      it once and share its KV cache (sampling.generate's rows): the same samples as prefilling every row.
    constrain: the mesh's activation constraint (sampling.generate), None off a mesh. place: a
      sharding.BatchPlacement: the prompts are placed as global arrays (this process's rows of a global batch when
      there are several processes) and the replies come back for the local rows.
    """
    t = tokenizer.template(template)
    stop_ids = tokenizer.stop_ids(t)
    truncated = 0
    if isinstance(prompts, tuple):  # rendered and padded: rows in runs of `repeat` equal prompts
        prompt_tokens, prompt_mask = np.asarray(prompts[0]), np.asarray(prompts[1])
        if place is not None:
            check_token_ids(prompt_tokens, config.vocab_size, "prompt_tokens")  # on the local rows
        n = len(prompt_tokens)
        calls = row_calls(n, batch_size, place)

        def call_prompts(rows):
            tokens, mask, g = prompt_tokens[rows], prompt_mask[rows], repeat
            if (place is None and g > 1 and len(rows) % g == 0 and rows[0] % g == 0
                    and all((a.reshape(-1, g, a.shape[1]) == a[::g, None]).all() for a in (tokens, mask))):
                return tokens[::g], mask[::g], np.repeat(np.arange(len(rows) // g), g)  # whole runs: share them
            return tokens, mask, None
    else:  # conversations: rendered here, `repeat` rows each, batch_size rows per call (the last call filled)
        rendered = []
        for c in prompts:
            ids = tokenizer.encode_chat(list(c), template=t)
            if room is not None and len(ids) > room:  # keep the most recent context
                truncated += 1
                ids = ids[-room:]
            rendered.append(ids)
        flat = [i for i in range(len(rendered)) for _ in range(repeat)]  # each row's prompt
        n = len(flat)
        size = batch_size if batch_size > 0 else max(1, n)
        calls = [flat[s:s + size] + [flat[min(s + size, n) - 1]] * max(0, s + size - n) for s in range(0, n, size)]
        slots = min(size, -(-(size - 1) // repeat) + 1)  # the most prompts `size` consecutive rows span

        def call_prompts(ids):
            shared = None
            if repeat > 1:  # each distinct prompt of the call once, padded to one compiled prompt count
                unique = sorted(set(ids))
                unique += [unique[-1]] * (slots - len(unique))
                ids, shared = unique, np.asarray([unique.index(i) for i in ids], np.int32)
            return (*sampling.left_pad([rendered[i] for i in ids], tokenizer.pad_id, length_bucket), shared)
    if not n:
        empty = np.zeros((0, max_new_tokens), np.int32)
        return Replies(empty, empty.copy(), [], truncated)
    local = place.local if place is not None else np.asarray
    parts = []
    for j, rows in enumerate(calls):
        tokens, mask, shared = call_prompts(rows)
        if place is not None:
            tokens, mask = place.put(tokens, mask)
        k = key(j) if callable(key) else key if len(calls) == 1 else jax.random.fold_in(key, j)
        out, out_mask, _ = sampling.generate(params, config, tokens, mask, k, max_new_tokens, temperature=temperature,
                                             top_k=top_k, top_p=top_p, stop_ids=stop_ids, constrain=constrain,
                                             rows=shared)
        parts.append((local(out), local(out_mask)))
    tokens = np.concatenate([p[0] for p in parts])[:n]
    texts, mask = sampling.apply_stop_strings(tokenizer, tokens, np.concatenate([p[1] for p in parts])[:n],
                                              t.stop_strings)
    return Replies(tokens, mask, list(texts), truncated)
