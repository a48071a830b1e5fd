"""Aggregate a study's cells: D/results.json, D/results.md (tables) and D/results.png (figure).

Groups of per-prompt measurements (starling_jax.commands.study.evaluate): "policy/heldout" and "policy/unseen" (the arm's
policy), "reference/..." (the SFT policy it started from, sampled with the same key), "rm/heldout" and "rm/unseen"
(the reward model's ranking of the true-utility order). Every group is summarised per arm with the paired bootstrap
of starling_jax.commands.study.stats; policy groups gain per-prompt "gain" (true reward minus the reference's on the same
prompt) and the ratio "gain_per_kl" (mean gain / mean KL, bootstrapped as a ratio of means).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from starling_jax.commands.study import Study, stats

POLICY_COLUMNS = ("true_reward", "gain", "kl", "gain_per_kl", "rm_score", "length")
RM_COLUMNS = ("pair_accuracy", "top1_accuracy", "kendall_tau")
LABELS = {"true_reward": "true reward", "gain": "gain vs SFT", "kl": "KL to SFT", "gain_per_kl": "gain / KL",
          "rm_score": "RM score", "length": "length (tokens)", "pair_accuracy": "pair acc.", "top1_accuracy": "top-1",
          "kendall_tau": "Kendall tau"}


def _group_values(records: list, group: str) -> tuple[dict, dict]:
    """values[arm][seed] = {metric: array}, clusters[seed] = prompt strings (checked equal across arms)."""
    values: dict = {}
    clusters: dict = {}
    for r in records:
        g = r["groups"].get(group)
        if g is None:
            continue
        metrics = {k: np.asarray(v, np.float64) for k, v in g.items() if k not in ("prompt", "samples")}
        if group.startswith("policy/"):
            ref = r["groups"][group.replace("policy/", "reference/")]
            metrics["gain"] = metrics["true_reward"] - np.asarray(ref["true_reward"], np.float64)
        values.setdefault(r["arm"], {})[r["seed"]] = metrics
        if r["seed"] in clusters and list(clusters[r["seed"]]) != list(g["prompt"]):
            raise ValueError(f"group {group}, seed {r['seed']}: arms were measured on different prompts")
        clusters[r["seed"]] = list(g["prompt"])
    return values, clusters


def aggregate(study: Study, records: list, shared_times: dict, this_run_s: float, failed: list,
              num_samples: int = 2000) -> dict:
    arms = [a.name for a in study.arms if any(r["arm"] == a.name for r in records)]
    seeds = sorted({r["seed"] for r in records})
    complete = [a for a in arms if sorted(r["seed"] for r in records if r["arm"] == a) == seeds]
    groups = sorted({g for r in records for g in r["groups"] if not g.startswith("reference/")})
    baseline = study.baseline_arm if study.baseline_arm in complete else None
    summary: dict = {}
    for group in groups:
        values, clusters = _group_values([r for r in records if r["arm"] in complete], group)
        if not values:
            continue
        metrics = sorted(next(iter(next(iter(values.values())).values())))
        derived = {"gain_per_kl": lambda m: m["gain"] / m["kl"]} if group.startswith("policy/") else None
        summary[group] = stats.summarise(values, clusters, metrics, baseline, derived, num_samples=num_samples)
    return {
        "study": study.name, "description": study.description, "budget": study.budget, "arms": arms,
        "complete_arms": complete, "seeds": seeds, "baseline": baseline,
        "quick": any(r.get("quick") for r in records), "failed": list(failed),
        "interval": "95% paired bootstrap over seeds and prompt clusters (2000 replicates)",
        "summary": summary,
        "cells": [{"arm": r["arm"], "seed": r["seed"], "wall_s": r["wall_s"], "summary": r["summary"],
                   "means": {g: {k: float(np.nanmean(v)) for k, v in m.items() if k not in ("prompt", "samples")}
                             for g, m in r["groups"].items()}} for r in records],
        "reused": {f"{r['arm']}@{r['seed']}": r["reused_from"] for r in records if r.get("reused_from")},
        "wall_s": {"cells": float(sum(r["wall_s"] for r in records if not r.get("reused_from"))),
                   "reused_cells": float(sum(r["wall_s"] for r in records if r.get("reused_from"))),
                   "shared": float(sum(shared_times.values())), "this_invocation": this_run_s},
    }


def _fmt(e: dict, key: str = "mean", lo: str = "lo", hi: str = "hi") -> str:
    return f"{e[key]:.3f} [{e[lo]:.3f}, {e[hi]:.3f}]"


def markdown(results: dict) -> str:
    s = results["summary"]
    lines = [f"# Study {results['study']}", ""]
    if results["description"]:
        lines += [results["description"], ""]
    lines += [f"Seeds {results['seeds']}; each entry is the mean and its {results['interval']}. "
              f"Baseline arm for the differences: {results['baseline']}."]
    if results["quick"]:
        lines += ["", "**Shortened (--quick) run: a smoke test of the machinery, not a result.**"]
    if results["failed"]:
        lines += ["", f"**Failed cells:** {', '.join(results['failed'])}"]
    for group, columns in [(g, RM_COLUMNS if g.startswith("rm/") else POLICY_COLUMNS) for g in s]:
        cols = [c for c in columns if any(c in s[group][a] for a in s[group])]
        lines += ["", f"## {group}", "", "| arm | " + " | ".join(LABELS.get(c, c) for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for arm, m in s[group].items():
            lines.append(f"| {arm} | " + " | ".join(_fmt(m[c]) if c in m else "" for c in cols) + " |")
        diffs = [(arm, m) for arm, m in s[group].items() if any("diff" in m[c] for c in cols if c in m)]
        if diffs:
            lines += ["", f"Difference from {results['baseline']} (paired):", "",
                      "| arm | " + " | ".join(LABELS.get(c, c) for c in cols) + " |", "|---|" + "---|" * len(cols)]
            for arm, m in diffs:
                lines.append(f"| {arm} | " + " | ".join(_fmt(m[c], "diff", "diff_lo", "diff_hi")
                                                        if c in m and "diff" in m[c] else "" for c in cols) + " |")
        terms = sorted({k for a in s[group] for k in s[group][a] if k.startswith("term_")})
        if terms:
            lines += ["", "Utility terms (synthetic.utility_terms; they sum to the true reward):", "",
                      "| arm | " + " | ".join(t[len("term_"):] for t in terms) + " |", "|---|" + "---|" * len(terms)]
            for arm, m in s[group].items():
                lines.append(f"| {arm} | " + " | ".join(f"{m[t]['mean']:.3f}" for t in terms) + " |")
    w = results["wall_s"]
    lines += ["", f"Wall time: cells {w['cells']:.0f} s + shared stages {w['shared']:.0f} s "
              f"(this invocation {w['this_invocation']:.0f} s)."]
    if results.get("reused"):
        lines += ["", f"Reused from identical cells of another study (`--reuse`; their {w['reused_cells']:.0f} s not "
                      f"counted above): " + ", ".join(f"{k} <- {v}" for k, v in results["reused"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> Optional[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    panels = [g for g in ("policy/heldout", "policy/unseen") if g in s]
    rm = [g for g in ("rm/heldout", "rm/unseen") if g in s]
    n = len(panels) + (1 if rm else 0)
    if not n:
        return None
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False)
    axes = axes[0]
    for ax, group in zip(axes, panels):
        for arm, m in s[group].items():
            x, y = m["kl"], m["true_reward"]
            ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["lo"]], [x["hi"] - x["mean"]]],
                        yerr=[[y["mean"] - y["lo"]], [y["hi"] - y["mean"]]], fmt="o", capsize=3, label=arm)
        kls = [m["kl"]["mean"] for m in s[group].values()]
        if min(kls) > 0 and max(kls) / min(kls) > 10:  # an arm far out (e.g. a collapsed one) would flatten the rest
            ax.set_xscale("log")
        ax.set_xlabel("KL to the SFT policy (per reply)")
        ax.set_ylabel("true reward")
        ax.set_title(f"{group}: true reward vs KL")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if rm:
        ax = axes[-1]
        arms = list(s[rm[0]])
        width = 0.8 / len(rm)
        for i, group in enumerate(rm):
            means = [s[group][a]["pair_accuracy"]["mean"] for a in arms]
            err = [[s[group][a]["pair_accuracy"]["mean"] - s[group][a]["pair_accuracy"]["lo"] for a in arms],
                   [s[group][a]["pair_accuracy"]["hi"] - s[group][a]["pair_accuracy"]["mean"] for a in arms]]
            ax.bar(np.arange(len(arms)) + i * width, means, width, yerr=err, capsize=3, label=group)
        ax.set_xticks(np.arange(len(arms)) + width * (len(rm) - 1) / 2, arms, rotation=20, fontsize=8)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0.4, 1.0)
        ax.set_ylabel("pair accuracy vs the true-utility order")
        ax.set_title("reward model")
        ax.legend(fontsize=8)
    fig.suptitle(f"study {results['study']} (seeds {results['seeds']}; 95% paired bootstrap)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(study: Study, results: dict, workdir: str) -> None:
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown(results))
    plot(results, os.path.join(workdir, "results.png"))
