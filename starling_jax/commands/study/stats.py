"""Paired bootstrap intervals over seeds and prompts for a study's per-prompt measurements.

Every arm of a study is measured on the same prompts of the same seeds (one data generation per seed, one sampling
key per split and seed), so arms are compared *paired*: each bootstrap replicate resamples the seeds with
replacement and, within each drawn seed, the prompt clusters with replacement (a cluster = the rows that share one
prompt string; the synthetic data repeats short prompts), and evaluates every arm on that same resample.

    values[arm][seed] = {metric: array [rows]}, clusters[seed] = array [rows] of cluster ids

The statistic of one arm is the mean over drawn seeds of the per-seed mean over drawn rows (each seed weighs the
same); the point estimate is the same statistic on the data as observed.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

Values = Mapping[str, Mapping[int, Mapping[str, np.ndarray]]]


def _cluster_index(ids: np.ndarray) -> list[np.ndarray]:
    """Row indices of each cluster, clusters in order of first appearance."""
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first)
    return [np.flatnonzero(inverse == c) for c in order]


def seed_means(values: Values, clusters: Mapping[int, np.ndarray], metrics: Sequence[str], num_samples: int,
               rng: np.random.Generator) -> tuple[dict, dict]:
    """(point, draws): point[arm][metric] (float) and draws[arm][metric] ([num_samples]) of the paired bootstrap."""
    arms = list(values)
    seeds = sorted(values[arms[0]])
    for arm in arms:
        if sorted(values[arm]) != seeds:
            raise ValueError(f"arm {arm!r} has seeds {sorted(values[arm])}, arm {arms[0]!r} has {seeds}: a paired "
                             f"comparison needs the same seeds in every arm")
    index = {s: _cluster_index(np.asarray(clusters[s])) for s in seeds}

    def stat(arm, metric, seed_draw, row_draws):
        per_seed = [np.nanmean(np.asarray(values[arm][s][metric], np.float64)[rows])
                    for s, rows in zip(seed_draw, row_draws)]
        return float(np.mean(per_seed))

    all_rows = [np.arange(len(clusters[s])) for s in seeds]
    point = {a: {m: stat(a, m, seeds, all_rows) for m in metrics if m in values[a][seeds[0]]} for a in arms}
    draws = {a: {m: np.empty(num_samples) for m in point[a]} for a in arms}
    for b in range(num_samples):
        seed_draw = [seeds[i] for i in rng.integers(0, len(seeds), len(seeds))]
        row_draws = []
        for s in seed_draw:
            groups = index[s]
            picked = rng.integers(0, len(groups), len(groups))
            row_draws.append(np.concatenate([groups[g] for g in picked]))
        for a in arms:
            for m in point[a]:
                draws[a][m][b] = stat(a, m, seed_draw, row_draws)
    return point, draws


def interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap draws."""
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def summarise(values: Values, clusters: Mapping[int, np.ndarray], metrics: Sequence[str], baseline: Optional[str],
              derived: Optional[Mapping[str, Callable[[dict], float]]] = None, num_samples: int = 2000,
              seed: int = 0, level: float = 0.95) -> dict:
    """{arm: {metric: {"mean", "lo", "hi"[, "diff", "diff_lo", "diff_hi"]}}} with paired differences against the
    baseline arm. derived: extra metrics computed from an arm's metric means (e.g. a ratio), bootstrapped alike."""
    rng = np.random.default_rng(seed)
    point, draws = seed_means(values, clusters, metrics, num_samples, rng)
    for name, fn in (derived or {}).items():
        for a in point:
            try:
                point[a][name] = float(fn(point[a]))
            except KeyError:
                continue
            draws[a][name] = np.array([fn({m: draws[a][m][b] for m in draws[a]}) for b in range(num_samples)])
    out: dict = {}
    for a in point:
        out[a] = {}
        for m, mean in point[a].items():
            lo, hi = interval(draws[a][m], level)
            entry = {"mean": mean, "lo": lo, "hi": hi}
            if baseline is not None and a != baseline and m in point.get(baseline, {}):
                d = draws[a][m] - draws[baseline][m]
                entry["diff"] = mean - point[baseline][m]
                entry["diff_lo"], entry["diff_hi"] = interval(d, level)
            out[a][m] = entry
    return out
