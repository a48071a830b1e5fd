"""Head-to-head statistics of two policies judged on the same prompts: win rate with a bootstrap interval, ties, the
mean score gap, and AlpacaEval 2.0's length-controlled win rate.

Conventions (AlpacaEval's): a prompt's preference for A is 1 (A's reply scored higher), 0 (lower) or 0.5 (a tie), and
the win rate is its mean, so a tie counts half. Intervals are percentile bootstrap intervals over prompts (resampled
with replacement, a fixed seed).

Length control (Dubois et al. 2024, "Length-Controlled AlpacaEval"): fit a logistic GLM of the preference on the
length difference, then predict the preference as if the lengths were equal. AlpacaEval 2.0 models
    logit P(A preferred on prompt i) = theta_A + phi * tanh(std_delta_len_i) [+ instruction difficulty_i]
with std_delta_len = (len(B's output) - len(A's output)) / std over prompts (lengths in characters, std with ddof 1),
fitted on the soft labels (a tie is half a win and half a loss), and reports mean_i sigmoid(theta_A [+ ...]) at
std_delta_len = 0. The instruction-difficulty term needs AlpacaEval's GPT-4 annotations of its own 805 instructions
and its regularisation toward "gamed" baselines needs their annotations too, so here the GLM is AlpacaEval's
`length_controlled_minimal` formula (theta_A and phi only): LC win rate = sigmoid(theta_A). The fit is maximum
likelihood with the L2 penalty ||theta||^2 / (2 C), C = 100 (AlpacaEval fits with C = 100 when it does not
cross-validate), which keeps the estimate finite when A wins (or loses) everywhere.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

LC_C = 100.0


def preferences(scores_a, scores_b, tie_margin: float = 0.0, identical: Optional[Sequence[bool]] = None
                ) -> np.ndarray:
    """Per-prompt preference for A [n]: 1 win, 0 loss, 0.5 tie (|score gap| <= tie_margin, or identical replies)."""
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"scores must be two vectors of the same length, got {a.shape} and {b.shape}")
    gap = a - b
    pref = np.where(gap > tie_margin, 1.0, np.where(gap < -tie_margin, 0.0, 0.5))
    if identical is not None:
        pref = np.where(np.asarray(identical, bool), 0.5, pref)
    return pref


def bootstrap_interval(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` [n] (resampling the n entries with replacement)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _lc_features(lengths_a, lengths_b) -> np.ndarray:
    """tanh(std_delta_len) [n] with AlpacaEval's orientation: (len B - len A) / std (0 when all differences agree)."""
    delta = np.asarray(lengths_b, np.float64) - np.asarray(lengths_a, np.float64)
    std = delta.std(ddof=1) if delta.size > 1 else 0.0
    return np.tanh(delta / std) if std > 0 else np.zeros_like(delta)


def fit_length_glm(pref, lengths_a, lengths_b, C: float = LC_C, iters: int = 100) -> np.ndarray:
    """theta = (theta_A, phi) minimising C * sum_i CE(pref_i, sigmoid(theta_A + phi * x_i)) + ||theta||^2 / 2 with
    x = tanh(std_delta_len) (Newton's method; the objective is strictly convex)."""
    p = np.asarray(pref, np.float64)
    X = np.stack([np.ones_like(p), _lc_features(lengths_a, lengths_b)], axis=1)
    theta = np.zeros(2)
    for _ in range(iters):
        q = 1 / (1 + np.exp(-(X @ theta)))
        grad = C * X.T @ (q - p) + theta
        hess = C * (X * (q * (1 - q))[:, None]).T @ X + np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if np.max(np.abs(step)) < 1e-12:
            break
    return theta


def length_controlled_win_rate(pref, lengths_a, lengths_b, C: float = LC_C) -> float:
    """The win rate the length GLM predicts at equal lengths: sigmoid(theta_A) (see the module doc)."""
    theta = fit_length_glm(pref, lengths_a, lengths_b, C)
    return float(1 / (1 + np.exp(-theta[0])))


def head_to_head(scores_a, scores_b, lengths_a, lengths_b, identical=None, tie_margin: float = 0.0,
                 n_boot: int = 2000, seed: int = 0) -> dict:
    """Everything `eval compare` reports about A vs B (fractions in [0, 1]; intervals are 95% bootstrap)."""
    pref = preferences(scores_a, scores_b, tie_margin, identical)
    gap = np.asarray(scores_a, np.float64) - np.asarray(scores_b, np.float64)
    n = int(pref.size)
    if n == 0:
        raise ValueError("no prompts to compare")
    return {
        "n": n, "wins": int(np.sum(pref == 1.0)), "ties": int(np.sum(pref == 0.5)), "losses": int(np.sum(pref == 0.0)),
        "win_rate": float(pref.mean()), "win_rate_ci95": list(bootstrap_interval(pref, n_boot, seed)),
        "length_controlled_win_rate": length_controlled_win_rate(pref, lengths_a, lengths_b),
        "mean_score_gap": float(gap.mean()), "mean_score_gap_ci95": list(bootstrap_interval(gap, n_boot, seed)),
        "mean_length_a": float(np.mean(lengths_a)), "mean_length_b": float(np.mean(lengths_b)),
    }


def describe(result: dict, a: str = "A", b: str = "B") -> str:
    """One readable line of a head_to_head result."""
    lo, hi = result["win_rate_ci95"]
    return (f"{a} vs {b}: win rate {100 * result['win_rate']:.1f}% [95% CI {100 * lo:.1f}, {100 * hi:.1f}] "
            f"({result['wins']} wins, {result['ties']} ties, {result['losses']} losses of {result['n']}); "
            f"length-controlled {100 * result['length_controlled_win_rate']:.1f}%; mean score gap "
            f"{result['mean_score_gap']:+.3f}; mean length {result['mean_length_a']:.0f} vs "
            f"{result['mean_length_b']:.0f} chars")
