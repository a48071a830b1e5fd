"""Reward-model ranking metrics on held-out groups: pairwise accuracy, top-1 accuracy and Kendall tau of the RM's
scores against the observed rankings (or a group's true utilities), pooled over batches exactly (each metric weighted
by what it averages over). The one definition of the metrics is objectives.rm_metrics; every evaluation of a reward
model's ranking (the rm stage's eval, `starling-jax eval ranking`, a study's measurements) goes through this module."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from starling_jax import models, objectives
from starling_jax.data import pipelines
from starling_jax.models import ModelConfig


def make_reward_fn(config: ModelConfig) -> Callable:
    """jit (params, tokens [B, K, T], attention_mask [B, K, T]) -> rewards [B, K] float32 (score head at each
    response's last non-pad token). Padded response slots get a score too; the metrics mask them out."""
    def rewards(params, tokens, mask):
        B, K, T = tokens.shape
        return models.score(params, config, tokens.reshape(B * K, T), mask.reshape(B * K, T)).reshape(B, K)
    return jax.jit(rewards)


def score_groups(config: ModelConfig, params, rows, tokenizer, data, template: str, batch_size: int):
    """Yield (rewards [B, K], batch) of the reward model over `rows` as K-answer groups, in order, each row once (the
    last batch may be smaller). `data`: a DataConfig (max_length, max_prompt_length, max_responses)."""
    reward_fn = make_reward_fn(config)
    ds = pipelines.make_dataset("rm", rows, tokenizer, batch_size, template=template, max_length=data.max_length,
                                max_prompt_length=data.max_prompt_length, max_responses=data.max_responses,
                                shuffle=False, num_epochs=1, drop_remainder=False)
    for batch in ds:
        yield reward_fn(params, batch["tokens"], batch["attention_mask"]), batch


_metrics = jax.jit(objectives.rm_metrics)
WEIGHTS = objectives.RM_METRIC_COUNTS  # metric -> the count it averages over (objectives.rm_metrics returns both)


class RankingAccumulator:
    """Add batches of (rewards [B, K], ranks [B, K], response_mask [B, K]); result() pools them."""

    def __init__(self):
        self._sums = {k: 0.0 for k in WEIGHTS}
        self._weights = {w: 0.0 for w in (*WEIGHTS.values(), "num_prompts")}  # num_prompts: the groups measured

    def add(self, rewards, ranks, response_mask) -> None:
        if not isinstance(ranks, jax.Array):  # global arrays (several processes) stay as they are
            ranks, response_mask = np.asarray(ranks), np.asarray(response_mask)
        m = jax.device_get(_metrics(rewards, ranks, response_mask))
        for k, w in WEIGHTS.items():
            self._sums[k] += float(m[k]) * float(m[w])
        for w in self._weights:
            self._weights[w] += float(m[w])

    def result(self) -> dict:
        out = {k: self._sums[k] / self._weights[w] if self._weights[w] else float("nan") for k, w in WEIGHTS.items()}
        out["groups"] = int(self._weights["num_prompts"])
        out["pairs"] = int(self._weights["num_pairs"])
        return out


def ranks_of(utilities) -> np.ndarray:
    """Dense ranks of one group's utilities: 1 = the highest, equal utilities share a rank (so that pair is not
    strictly ranked and no metric counts it)."""
    u = np.asarray(utilities, np.float64)
    return 1 + np.searchsorted(-np.unique(u)[::-1], -u)


def group_metrics(scores, utilities) -> tuple[float, float, float]:
    """(pair accuracy, top-1 accuracy, Kendall tau) of one group's scores against its true utilities, by
    objectives.rm_metrics: pairs of equal utility are not counted; NaN where a metric has nothing to average. The
    fractions are taken in float64 from rm_metrics' counts, so they are the exact ratios."""
    ranks = ranks_of(utilities)[None].astype(np.int32)
    m = jax.device_get(_metrics(np.asarray(scores, np.float32)[None], ranks, np.ones(ranks.shape, np.float32)))
    pairs = float(m["num_pairs"])
    nan = float("nan")
    pair_accuracy = round(float(m["pair_accuracy"]) * pairs) / pairs if pairs else nan
    ranked = float(m["num_ranked_prompts"])
    top1 = float(m["top1_accuracy"]) if ranked else nan
    kendall_tau = round(float(m["kendall_tau"]) * pairs) / pairs if ranked else nan
    return pair_accuracy, top1, kendall_tau
