"""Per-prompt measurements of one study cell, with the same protocol for every arm.

policy_measurements: the policy (any stage's export: rl, dpo, sft) and the reference (the SFT policy) each sample
one reply per prompt of a split (temperature 1, one key per split and seed, shared by every arm); per prompt: the
hidden true utility and each of its terms (synthetic.utility_terms, so a gain from formatting is told apart from a
gain in relevance), the raw reward-model score (read through the RM's own tokenizer and template), the sequence KL
sum_t log pi(a_t) - log pi_ref(a_t) of the policy's sample, and the reply length in tokens.

reward_model_measurements: per held-out group, the RM's ranking of its K answers against the order of their TRUE
utilities (not the noisy labels it was trained on): pair accuracy over untied pairs, top-1 accuracy, Kendall tau.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np

from starling_jax import models
from starling_jax.data import pipelines, synthetic
from starling_jax.metrics.ranking import group_metrics, score_groups
from starling_jax.objectives.sft import token_logprobs
from starling_jax.stages.policy_eval import measure_policy
from starling_jax.stages.rollout import conversation_of

SPLIT_KEYS = {"heldout": 1, "unseen": 2, "tuning": 3}  # fold_in offsets: each split has its own sampling key


@functools.partial(jax.jit, static_argnums=(1, 4))
def _response_logprobs(params, config, tokens, attention_mask, prompt_len):
    """log pi(token_t | tokens_<t) of the response tokens (positions prompt_len..) [B, N]."""
    logits = models.forward(params, config, tokens, attention_mask)
    return token_logprobs(logits[:, prompt_len - 1:-1], tokens[:, prompt_len:])


def prompt_batch(rows, tokenizer, data, template):
    """(RL prompt batch, conversations in batch order) of rows."""
    batch = next(iter(pipelines.dataset_for("rl", rows, tokenizer, data, len(rows), template=template,
                                            shuffle=False, num_epochs=1)))
    conversations = [conversation_of(r, f"row {i}") for i, r in enumerate(rows)]
    return batch, [conversations[i] for i in np.asarray(batch["prompt_id"])]


def policy_measurements(policy, reference, scorer, rows, *, tokenizer, template, data, rollout, key,
                        true_utility=synthetic.true_utility, who=("policy", "reference")) -> dict:
    """{"policy": {metric: [rows]}, "reference": {...}, "prompt": [rows]} (see the module docstring). policy and
    reference are (config, params); true_utility(messages, reply) -> float: the synthetic data's hidden utility (with
    its terms), or a verifiable task's (data/tasks.py; no terms). who: the groups to measure (the reference's does not
    depend on the policy: a study measures it once per seed and reuses it, starling_jax.commands.study.runner)."""
    batch, conversations = prompt_batch(rows, tokenizer, data, template)
    (config, params), (ref_config, ref_params) = policy, reference
    out: dict = {"prompt": [synthetic.nectar_prompt(c) for c in conversations]}
    options = types.SimpleNamespace(max_new_tokens=rollout.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0)
    for name, (cfg, p) in (("policy", policy), ("reference", reference)):
        if name not in who:
            continue

        def logprobs(tokens, attn, prompt_len, cfg=cfg, p=p, name=name):
            if name == "reference":  # its own replies: log pi_ref - log pi_ref = 0, no forward pass needed
                zeros = np.zeros(np.shape(tokens[:, prompt_len:]), np.float32)
                return zeros, zeros
            tokens, attn = jnp.asarray(tokens), jnp.asarray(attn)
            return (np.asarray(_response_logprobs(p, cfg, tokens, attn, prompt_len)),
                    np.asarray(_response_logprobs(ref_params, ref_config, tokens, attn, prompt_len)))

        s = measure_policy(p, cfg, tokenizer, template, batch, conversations, key, options, logprobs=logprobs,
                           scorer=scorer, true_utility=true_utility)
        m: dict = {"true_reward": np.asarray(s["true_reward"], np.float64), "rm_score": np.asarray(s["rm_score"], np.float64),
                   "kl": s["kl"].astype(np.float64), "length": s["length"].astype(np.float64)}
        if true_utility is synthetic.true_utility:
            terms = [synthetic.utility_terms(c, t) for c, t in zip(conversations, s["texts"])]
            for k in terms[0]:
                m[f"term_{k}"] = np.array([t[k] for t in terms])
        m["samples"] = [{"prompt": c[-1]["content"], "reply": t} for c, t in list(zip(conversations, s["texts"]))[:3]]
        out[name] = m
    return out


def reward_model_measurements(rm, rows, *, tokenizer, template, data, batch_size: int = 16) -> dict:
    """{"pair_accuracy", "top1_accuracy", "kendall_tau": [rows], "prompt": [rows]} against the true utilities."""
    config, params = rm
    if any("utilities" not in r for r in rows):
        raise ValueError("reward-model measurements need rows with true utilities (synthetic data, task:ifeval)")
    scores = np.concatenate([np.asarray(r) for r, _ in score_groups(config, params, rows, tokenizer, data, template,
                                                                      batch_size)])
    out = {"pair_accuracy": [], "top1_accuracy": [], "kendall_tau": []}
    for r, s in zip(rows, scores):
        k = len(r["utilities"])
        if k > data.max_responses:
            raise ValueError(f"a row has {k} answers > data.max_responses={data.max_responses}")
        for name, v in zip(out, group_metrics(s[:k], np.asarray(r["utilities"]))):
            out[name].append(v)
    result = {k: np.asarray(v) for k, v in out.items()}
    result["prompt"] = [synthetic.nectar_prompt(r["messages"]) for r in rows]
    return result

