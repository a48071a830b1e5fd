"""Reward-model objectives over K ranked responses per prompt: K-wise Plackett-Luce, pairwise Bradley-Terry, and
ranking metrics. Shapes: rewards [B, K] float, ranks [B, K] int (1 = best), mask [B, K] (0 = no response: ragged K).

Ties. Equal ranks are a tie (the data pipeline keeps a row's tied raw ranks: a program judge's verdicts tie often,
GPT-4's Nectar rankings do not). Bradley-Terry and the metrics skip tied pairs. Plackett-Luce takes one of two rules:
ties="break" orders a prompt's responses best first by (rank, index), the earlier response counting as better (a
total order, as the Starling authors' loss needs; on tied data it trains on an order the labels do not state);
ties="breslow" lets tied responses share one choice set, Breslow's rule for ties in the Cox partial likelihood (of
which the Plackett-Luce likelihood is the ranking case): each response competes with itself and every valid response
ranked the same or worse, so tied responses are treated alike and the loss states no order between them (a prompt
whose responses all tie asks only that their rewards be equal). On strict ranks both rules are the same loss.
`check_ranks` on the host rejects ties (and other bad ranks) with a clear error where a strict order is required.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from starling_jax.objectives.common import as_weights, check_rank, check_same_shape, safe_div


def _check(where: str, rewards, ranks, mask) -> None:
    check_rank(where, "rewards", rewards, 2, "B, K")
    check_same_shape(where, rewards=rewards, ranks=ranks, mask=mask)


def _pairs(ranks: jax.Array, mask: jax.Array) -> jax.Array:
    """better[b, i, k] = 1 where responses i and k are both valid and rank_i < rank_k (i strictly better). [B, K, K]."""
    valid = as_weights(mask)
    both = valid[:, :, None] * valid[:, None, :]
    return both * (ranks[:, :, None] < ranks[:, None, :])


def _ranked_groups(valid: jax.Array) -> jax.Array:
    """[B] float32: 1 for a prompt with at least two valid responses (a ranking to learn from), else 0. What
    plackett_luce_loss averages over, and so rm_metrics' num_prompts, its weight when batches pool."""
    return (jnp.sum(valid, axis=-1) >= 2).astype(jnp.float32)


def plackett_luce_loss(rewards: jax.Array, ranks: jax.Array, mask: jax.Array, normalize: bool = False,
                       ties: str = "break") -> jax.Array:
    """K-wise Plackett-Luce NLL of each prompt's observed ranking, averaged over prompts (scalar float32).

    For prompt b with valid responses ordered best first sigma(1..K_b) (by (rank, index), see the module docstring):
        nll_b = -sum_{j=1..K_b} [ r_sigma(j) - log sum_{k in C(j)} exp r_sigma(k) ]
    where the choice set C(j) is {j..K_b} (ties="break") or sigma(j) and every response ranked no better than it
    (ties="breslow"; the same set on strict ranks). The last term is 0 on strict ranks. The mean is over prompts with
    at least two valid responses; prompts with fewer carry no ranking information and are not counted (a fully padded
    row changes nothing). With K_b = 2 and strict ranks this is -log sigmoid(r_better - r_worse), i.e. Bradley-Terry.
    normalize=True divides each nll_b by its K_b - 1 choice terms (a per-choice mean, as the Starling authors' RM
    loss): the same minimiser, gradients 1/(K-1) as large (it matters with grad_clip).
    """
    _check("plackett_luce_loss", rewards, ranks, mask)
    if ties not in ("break", "breslow"):
        raise ValueError(f"plackett_luce_loss: ties must be 'break' or 'breslow', got {ties!r}")
    valid = as_weights(mask)
    r = jnp.where(valid > 0, rewards.astype(jnp.float32), 0.0)  # padded slots may hold garbage (even NaN)
    K = r.shape[1]
    idx = jnp.arange(K)
    # at_or_after[b, i, k]: response k is response i itself, or a valid response in i's choice set.
    rank_i, rank_k = ranks[:, :, None], ranks[:, None, :]
    tied_after = idx[None, None, :] > idx[None, :, None] if ties == "break" else True
    after = (rank_k > rank_i) | ((rank_k == rank_i) & tied_after)
    at_or_after = (idx[:, None] == idx[None, :])[None] | (after & (valid[:, None, :] > 0))
    logz = jax.nn.logsumexp(jnp.where(at_or_after, r[:, None, :], -jnp.inf), axis=-1)  # [B, K], finite: k = i counts
    nll_b = -jnp.sum(jnp.where(valid > 0, r - logz, 0.0), axis=-1)
    counted = _ranked_groups(valid)
    if normalize:
        nll_b = safe_div(nll_b, jnp.maximum(jnp.sum(valid, axis=-1) - 1.0, 1.0))
    return safe_div(jnp.sum(nll_b * counted), jnp.sum(counted))


def bradley_terry_loss(rewards: jax.Array, ranks: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over all valid (better, worse) pairs in the batch of -log sigmoid(r_better - r_worse) (scalar float32).

    Every pair of a prompt's ranking counts (C(K, 2) pairs for a strict ranking of K); pairs with equal ranks are
    skipped; no pairs at all gives 0.
    """
    _check("bradley_terry_loss", rewards, ranks, mask)
    r = jnp.where(as_weights(mask) > 0, rewards.astype(jnp.float32), 0.0)
    better = _pairs(ranks, mask)
    nll = jax.nn.softplus(r[:, None, :] - r[:, :, None])  # -log sigmoid(r_i - r_k) for i better than k
    return safe_div(jnp.sum(jnp.where(better > 0, nll, 0.0)), jnp.sum(better))


# each metric of rm_metrics -> the count (also returned) it is a mean over, by which batches pool exactly
RM_METRIC_COUNTS = {"pair_accuracy": "num_pairs", "top1_accuracy": "num_ranked_prompts",
                    "kendall_tau": "num_ranked_prompts"}


def rm_metrics(rewards: jax.Array, ranks: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Ranking metrics of `rewards` against the given `ranks` (scalars, float32):

    pair_accuracy  fraction of valid strictly-ranked pairs with r_better > r_worse (equal rewards count as wrong),
                   pooled over the batch; weight: num_pairs.
    top1_accuracy  fraction of prompts (with >= 1 strictly-ranked pair) whose highest reward (first index on a tie)
                   is a best-ranked response; weight: num_ranked_prompts. A prompt whose responses all tie has no
                   best one to find (any would do), so it is not counted.
    kendall_tau    mean over prompts (with >= 1 strictly-ranked pair) of (concordant - discordant) / pairs, over the
                   prompt's strictly-ranked pairs (tau-a; equals tau-b when neither ranks nor rewards tie); a reward tie
                   is neither concordant nor discordant; weight: num_ranked_prompts.
    The weights are returned too, so an evaluator can average over batches exactly, with num_prompts: the prompts
    with >= 2 valid responses, which plackett_luce_loss averages over (all tied or not: the Plackett-Luce stage's
    weight when batches pool).
    """
    _check("rm_metrics", rewards, ranks, mask)
    valid = as_weights(mask)
    # A finite sentinel (not -inf) so padded slots lose the argmax without ever making an inf - inf = NaN.
    r = jnp.where(valid > 0, rewards.astype(jnp.float32), -1e30)
    better = _pairs(ranks, mask)
    diff = jnp.where(better > 0, r[:, :, None] - r[:, None, :], 0.0)  # r_i - r_k for i better than k
    concordant = better * (diff > 0)
    discordant = better * (diff < 0)

    num_pairs = jnp.sum(better)
    pair_accuracy = safe_div(jnp.sum(concordant), num_pairs)

    num_prompts = jnp.sum(_ranked_groups(valid))
    pairs_b = jnp.sum(better, axis=(1, 2))
    has_pair = (pairs_b > 0).astype(jnp.float32)
    num_ranked_prompts = jnp.sum(has_pair)
    best = jnp.argmax(r, axis=-1)
    best_rank = jnp.min(jnp.where(valid > 0, ranks, jnp.iinfo(jnp.int32).max), axis=-1)
    top1 = (jnp.take_along_axis(ranks, best[:, None], axis=-1)[:, 0] == best_rank).astype(jnp.float32)
    top1_accuracy = safe_div(jnp.sum(top1 * has_pair), num_ranked_prompts)

    tau_b = safe_div(jnp.sum(concordant, axis=(1, 2)) - jnp.sum(discordant, axis=(1, 2)), pairs_b)
    kendall_tau = safe_div(jnp.sum(tau_b * has_pair), num_ranked_prompts)
    return {"pair_accuracy": pair_accuracy, "top1_accuracy": top1_accuracy, "kendall_tau": kendall_tau,
            "num_pairs": num_pairs, "num_prompts": num_prompts, "num_ranked_prompts": num_ranked_prompts}


def check_ranks(ranks, mask, where: str = "ranks") -> None:
    """Host-side validation of a [B, K] ranks array (numpy): each row's valid ranks must be distinct integers >= 1.

    Raises ValueError naming `where`, the row and the offending ranks. Run it in the data pipeline, not inside a step.
    """
    ranks, valid = np.asarray(ranks), np.asarray(mask) != 0
    if ranks.ndim != 2 or ranks.shape != valid.shape:
        raise ValueError(f"{where}: ranks has shape {ranks.shape} and the mask {valid.shape}; both must be [B, K]")
    for b in range(ranks.shape[0]):
        row = ranks[b][valid[b]]
        if (row < 1).any():
            raise ValueError(f"{where}: row {b} has rank(s) {row.tolist()} below 1 (1 = best)")
        if len(set(row.tolist())) != len(row):
            raise ValueError(f"{where}: row {b} has tied ranks {row.tolist()}; a Plackett-Luce ranking must be strict")
