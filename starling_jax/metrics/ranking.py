"""Reward-model ranking metrics on held-out groups: pairwise accuracy, top-1 accuracy and Kendall tau of the RM's
scores against the observed rankings, pooled over batches exactly (each metric weighted by what it averages over)."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from starling_jax import models, objectives
from starling_jax.models import ModelConfig


def make_reward_fn(config: ModelConfig) -> Callable:
    """jit (params, tokens [B, K, T], attention_mask [B, K, T]) -> rewards [B, K] float32 (score head at each
    response's last non-pad token). Padded response slots get a score too; the metrics mask them out."""
    def rewards(params, tokens, mask):
        B, K, T = tokens.shape
        return models.score(params, config, tokens.reshape(B * K, T), mask.reshape(B * K, T)).reshape(B, K)
    return jax.jit(rewards)


_metrics = jax.jit(objectives.rm_metrics)
# metric -> the count it averages over (objectives.rm_metrics returns both)
WEIGHTS = {"pair_accuracy": "num_pairs", "top1_accuracy": "num_prompts", "kendall_tau": "num_tau_prompts"}


class RankingAccumulator:
    """Add batches of (rewards [B, K], ranks [B, K], response_mask [B, K]); result() pools them."""

    def __init__(self):
        self._sums = {k: 0.0 for k in WEIGHTS}
        self._weights = {w: 0.0 for w in WEIGHTS.values()}

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
