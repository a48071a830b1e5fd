"""Policy evaluation by sampling, the one measurement the rl stage's reports (held-out, unseen, tuning: before and
after training) and a study cell's per-prompt measurements both take: a reply per prompt from one model, then per
prompt its reward-model score, its sequence KL to the reference, its length and (synthetic data) its true utility.

    m = measure_policy(params, config, tokenizer, template, prompts, conversations, key, sampling_options,
                       logprobs=fn, scorer=scorer, true_utility=synthetic.true_utility)
    m["rm_score"], m["kl"], m["length"], m["texts"], m.get("true_reward")     # one entry per prompt row
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from starling_jax.generation.replies import generate_replies


def measure_policy(sample_params, config, tokenizer, template, prompts: dict, conversations: list, key, options, *,
                   logprobs: Callable, scorer: Callable, true_utility: Optional[Callable] = None, place=None) -> dict:
    """Sample one reply per prompt and measure it.

    sample_params: the params that sample (full params, or a (top, trunk) pair: hydra.policy_parts / reference_parts);
    prompts: an RL prompt batch (prompt_tokens, prompt_mask [B, P], left padded in `template`) and conversations its
    rows' conversations; options: max_new_tokens, temperature, top_k, top_p (a RolloutConfig); logprobs(tokens,
    attention_mask, prompt_len) -> (log pi, log pi_ref) [B, N] of the sampled tokens under the policy and the
    reference (numpy, this process's rows); scorer(conversations, texts) -> raw reward-model scores [B]. place: a
    sharding.BatchPlacement when the rows are this process's rows of a global set (the caller gathers).

    Returns, for this process's rows: "texts" (decoded replies), "tokens" / "mask" [B, N] (mask cut at the
    end-of-turn), "rm_score" (the scorer's output), "kl" [B] float64 (sum_t log pi(a_t) - log pi_ref(a_t) over the
    reply), "length" [B] (reply tokens), and "true_reward" [B] (true_utility(conversation, text)) when given.
    """
    prompt_tokens, prompt_mask = np.asarray(prompts["prompt_tokens"]), np.asarray(prompts["prompt_mask"])
    s = generate_replies(sample_params, config, tokenizer, template, (prompt_tokens, prompt_mask), key,
                         options.max_new_tokens, temperature=options.temperature, top_k=options.top_k,
                         top_p=options.top_p, place=place)
    tokens = np.concatenate([prompt_tokens, s.tokens], axis=1)
    attention_mask = np.concatenate([prompt_mask, s.mask], axis=1)
    logp, logp_ref = logprobs(tokens, attention_mask, prompt_tokens.shape[1])
    out = {"texts": s.texts, "tokens": s.tokens, "mask": s.mask, "rm_score": scorer(conversations, s.texts),
           "kl": np.sum((np.asarray(logp) - np.asarray(logp_ref)) * s.mask, axis=1), "length": s.mask.sum(axis=1)}
    if true_utility is not None:
        out["true_reward"] = [true_utility(c, t) for c, t in zip(conversations, s.texts)]
    return out
