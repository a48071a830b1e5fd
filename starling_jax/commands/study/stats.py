"""Paired bootstrap intervals over seeds and prompts for a study's per-prompt measurements, bootstrap p-values and
the Holm-Bonferroni adjustment of a family of differences.

Every arm of a study is measured on the same prompts of the same seeds (one data generation per seed, one sampling
key per split and seed), so arms are compared *paired*: each bootstrap replicate resamples the seeds with
replacement and, within each drawn seed, the prompt clusters with replacement (a cluster = the rows that share one
prompt string; the synthetic data repeats short prompts), and evaluates every arm on that same resample.

    values[arm][seed] = {metric: array [rows]}, clusters[seed] = array [rows] of cluster ids

The statistic of one arm is the mean over drawn seeds of the per-seed mean over drawn rows (each seed weighs the
same; NaN rows are left out of a seed's mean); the point estimate is the same statistic on the data as observed, and
a seed's own figure is its mean over all its rows. A replicate's per-seed mean over drawn rows is computed as a
weighted mean (each row weighted by how often its cluster was drawn), which equals the mean over the concatenated
draw.

Differences are paired: arm minus baseline within each replicate. Their two-sided bootstrap p-value is
p = min(1, 2 min((#{d <= 0} + 1) / (B + 1), (#{d >= 0} + 1) / (B + 1))) over the B replicates d. holm() adjusts a
family of such p-values (Holm 1979): sorted ascending, the k-th smallest of m is tested at alpha / (m - k + 1), its
adjusted p is max_{j <= k} min(1, (m - j + 1) p_(j)), and its adjusted interval is the percentile interval at
confidence 1 - alpha / (m - k + 1). Tied p-values share the rank of the first of them (the most conservative level),
so the result does not depend on the order of the family.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

Values = Mapping[str, Mapping[int, Mapping[str, np.ndarray]]]
NUM_SAMPLES = 10000  # replicates: Holm's smallest level (alpha / m, m ~ 50) needs ~10 draws beyond each end


def _cluster_of_rows(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """(cluster index of each row, number of clusters), clusters numbered in order of first appearance."""
    _, first, inverse = np.unique(np.asarray(ids), return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(-1)], len(first)


def _weighted_means(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Mean of x [rows] or of each column of x [rows, columns] under each row of weights [S, rows] ([S] or
    [S, columns]), NaN rows left out (NaN where no finite row is drawn)."""
    finite = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ np.where(finite, x, 0.0)) / (weights @ finite.astype(np.float64))


def per_seed(values: Values, metrics: Sequence[str]) -> dict:
    """{arm: {metric: {seed: the seed's mean over its rows (NaN rows left out)}}}."""
    out: dict = {}
    for arm, by_seed in values.items():
        out[arm] = {}
        for m in metrics:
            if all(m in v for v in by_seed.values()):
                x = {s: np.asarray(v[m], np.float64) for s, v in by_seed.items()}
                out[arm][m] = {s: float(_weighted_means(np.ones((1, len(x[s]))), x[s])[0]) for s in sorted(x)}
    return out


def seed_means(values: Values, clusters: Mapping[int, np.ndarray], metrics: Sequence[str], num_samples: int,
               rng: np.random.Generator) -> tuple[dict, dict]:
    """(point, draws): point[arm][metric] (float) and draws[arm][metric] ([num_samples]) of the paired bootstrap."""
    arms = list(values)
    seeds = sorted(values[arms[0]])
    for arm in arms:
        if sorted(values[arm]) != seeds:
            raise ValueError(f"arm {arm!r} has seeds {sorted(values[arm])}, arm {arms[0]!r} has {seeds}: a paired "
                             f"comparison needs the same seeds in every arm")
    seeded = per_seed(values, metrics)
    point = {a: {m: float(np.mean([seeded[a][m][s] for s in seeds])) for m in seeded[a]} for a in arms}
    n = len(seeds)
    seed_draw = rng.integers(0, n, (num_samples, n)).reshape(-1)  # the seed in each of the B x n slots
    slot_means = {a: {m: np.empty(num_samples * n) for m in point[a]} for a in arms}
    for i, s in enumerate(seeds):
        slots = np.flatnonzero(seed_draw == i)
        cluster, num_clusters = _cluster_of_rows(clusters[s])
        picks = rng.integers(0, num_clusters, (len(slots), num_clusters))
        counts = np.bincount((picks + num_clusters * np.arange(len(slots))[:, None]).reshape(-1),
                             minlength=len(slots) * num_clusters).reshape(len(slots), num_clusters)
        weights = counts[:, cluster].astype(np.float64)  # [slots, rows]: how often each row was drawn
        columns = [(a, m) for a in arms for m in point[a]]
        x = np.stack([np.asarray(values[a][s][m], np.float64) for a, m in columns], axis=1)  # [rows, columns]
        means = _weighted_means(weights, x)
        for j, (a, m) in enumerate(columns):
            slot_means[a][m][slots] = means[:, j]
    draws = {a: {m: slot_means[a][m].reshape(num_samples, n).mean(axis=1) for m in point[a]} for a in arms}
    return point, draws


def interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap draws."""
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def bootstrap_p(diff_draws: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a paired difference being 0 (see the module docstring)."""
    d = np.asarray(diff_draws)
    below, above = (np.sum(d <= 0) + 1) / (len(d) + 1), (np.sum(d >= 0) + 1) / (len(d) + 1)
    return float(min(1.0, 2 * min(below, above)))


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(adjusted p-values, per-test levels alpha / (m - k + 1)), in the order given (see the module docstring)."""
    p = np.asarray(pvalues, np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    rank = np.empty(m, np.int64)  # 0-based rank; ties take the first rank of their block
    for k, i in enumerate(order):
        rank[i] = k if k == 0 or p[i] != p[order[k - 1]] else rank[order[k - 1]]
    multiplier = m - rank
    adjusted_sorted = np.maximum.accumulate(np.minimum(1.0, multiplier[order] * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return adjusted, alpha / multiplier


def bootstrap(values: Values, clusters: Mapping[int, np.ndarray], metrics: Sequence[str],
              derived: Optional[Mapping[str, Callable[[dict], float]]] = None, num_samples: int = NUM_SAMPLES,
              seed: int = 0) -> tuple[dict, dict, dict]:
    """(point, draws, seeds): point[arm][metric], draws[arm][metric] [num_samples] and seeds[arm][metric][seed] (each
    seed's own figure). derived: extra metrics computed from an arm's metric means (e.g. a ratio of means), applied
    alike to the point estimate, to every replicate and to each seed's means."""
    rng = np.random.default_rng(seed)
    point, draws = seed_means(values, clusters, metrics, num_samples, rng)
    seeded = per_seed(values, metrics)
    with np.errstate(invalid="ignore", divide="ignore"):  # a ratio over a zero mean is inf or NaN, not an error
        for name, fn in (derived or {}).items():
            for a in point:
                try:
                    point[a][name] = float(fn({m: np.float64(v) for m, v in point[a].items()}))
                except KeyError:
                    continue
                draws[a][name] = np.asarray(fn(draws[a]), np.float64)
                seed_list = next(iter(seeded[a].values()))
                seeded[a][name] = {s: float(fn({m: np.float64(seeded[a][m][s]) for m in seeded[a]}))
                                   for s in seed_list}
    return point, draws, seeded


def summarise(values: Values, clusters: Mapping[int, np.ndarray], metrics: Sequence[str], baseline: Optional[str],
              derived: Optional[Mapping[str, Callable[[dict], float]]] = None, num_samples: int = NUM_SAMPLES,
              seed: int = 0, level: float = 0.95) -> dict:
    """{arm: {metric: {"mean", "lo", "hi", "seeds"[, "diff", "diff_lo", "diff_hi", "diff_seeds"]}}} with paired
    differences against the baseline arm (unadjusted intervals at `level`); "seeds": {seed: each seed's figure}."""
    point, draws, seeded = bootstrap(values, clusters, metrics, derived, num_samples, seed)
    return entries(point, draws, seeded, baseline, level)


def entries(point: dict, draws: dict, seeded: dict, baseline: Optional[str], level: float = 0.95) -> dict:
    """summarise()'s table from bootstrap()'s output."""
    out: dict = {}
    for a in point:
        out[a] = {}
        for m, mean in point[a].items():
            lo, hi = interval(draws[a][m], level)
            entry = {"mean": mean, "lo": lo, "hi": hi, "seeds": {str(s): v for s, v in seeded[a][m].items()}}
            if baseline is not None and a != baseline and m in point.get(baseline, {}):
                entry["diff"] = mean - point[baseline][m]
                entry["diff_lo"], entry["diff_hi"] = interval(draws[a][m] - draws[baseline][m], level)
                entry["diff_seeds"] = {str(s): v - seeded[baseline][m][s] for s, v in seeded[a][m].items()}
            out[a][m] = entry
    return out
