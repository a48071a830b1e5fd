"""Aggregate a study's cells: D/results.json, D/results.md (tables) and D/results.png (figure).

Groups of per-prompt measurements (starling_jax.commands.study.evaluate): "policy/heldout" and "policy/unseen" (the arm's
policy), "reference/..." (the SFT policy it started from, sampled with the same key), "rm/heldout" and "rm/unseen"
(the reward model's ranking of the true-utility order). Every group is summarised per arm with the paired bootstrap
of starling_jax.commands.study.stats; policy groups gain per-prompt "gain" (true reward minus the reference's on the same
prompt) and the ratio "gain_per_kl" (mean gain / mean KL, bootstrapped as a ratio of means). Every figure comes with
each seed's own figure.

The report puts the study's preregistered comparisons (Study.primary) first: each paired difference with its
unadjusted 95% interval and whether the interval supports the stated direction. Everything else is exploratory: the
per-arm means with unadjusted 95% intervals (estimates, not tests), and the differences from the baseline arm, whose
intervals and p-values are Holm-adjusted over the family of every difference the tables print (a difference that is
exactly 0 in every replicate, e.g. of a reward model every arm shares, is no test and is left out; a difference whose
replicates equal another's, e.g. true reward and gain over the same reference, counts once; a twin of a primary
comparison is primary).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from starling_jax.commands.study import POLICY_METRICS, REFERENCE, RM_METRICS, SPLITS, Study, stats

POLICY_COLUMNS = POLICY_METRICS
RM_COLUMNS = RM_METRICS
LABELS = {"true_reward": "true reward", "gain": "gain vs reference", "kl": "KL to reference", "gain_per_kl": "gain / KL",
          "rm_score": "RM score", "length": "length (tokens)", "pair_accuracy": "pair acc.", "top1_accuracy": "top-1",
          "kendall_tau": "Kendall tau"}
ALPHA = 0.05


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


def short_source(path: str) -> str:
    """A reused cell's source as STUDY_WORKDIR/cells/ARM/seedS (no path of the machine it ran on)."""
    return "/".join(os.path.normpath(path).split(os.sep)[-4:])


def _twin(d: np.ndarray, others: list) -> Optional[int]:
    for i, o in enumerate(others):
        if np.allclose(d, o, rtol=1e-9, atol=1e-12):
            return i
    return None


def _primary(study: Study, draws: dict, seeded: dict, point: dict) -> list:
    """The preregistered comparisons: the paired difference, its unadjusted 95% interval, each seed's difference,
    the two-sided bootstrap p and whether the interval supports the stated direction."""
    out = []
    for c in study.primary:
        entry = {"group": c.group, "metric": c.metric, "arm": c.arm, "baseline": c.baseline,
                 "direction": c.direction, "why": c.why}
        have = draws.get(c.group, {})
        arms = (c.arm,) if c.baseline == REFERENCE else (c.arm, c.baseline)
        if not all(a in have and c.metric in have[a] for a in arms):
            out.append({**entry, "measured": False})
            continue
        s_arm = seeded[c.group][c.arm][c.metric]
        if c.baseline == REFERENCE:  # the gain is already the paired difference from the reference policy
            d, base_point, s_base = have[c.arm][c.metric], 0.0, {s: 0.0 for s in s_arm}
        else:
            d = have[c.arm][c.metric] - have[c.baseline][c.metric]
            base_point, s_base = point[c.group][c.baseline][c.metric], seeded[c.group][c.baseline][c.metric]
        lo, hi = stats.interval(d, 1 - ALPHA)
        if c.direction == "greater":
            supported, verdict = lo > 0, ("yes: the interval is above 0" if lo > 0 else
                                          "no: the interval is below 0 (the opposite direction)" if hi < 0 else
                                          "no: the interval includes 0")
        elif c.direction == "less":
            supported, verdict = hi < 0, ("yes: the interval is below 0" if hi < 0 else
                                          "no: the interval is above 0 (the opposite direction)" if lo > 0 else
                                          "no: the interval includes 0")
        else:
            supported = lo > 0 or hi < 0
            verdict = ("yes: the interval is above 0" if lo > 0 else "yes: the interval is below 0" if hi < 0 else
                       "no: the interval includes 0")
        out.append({**entry, "measured": True,
                    "diff": point[c.group][c.arm][c.metric] - base_point, "lo": lo,
                    "hi": hi, "seeds": {str(s): s_arm[s] - s_base[s] for s in s_arm}, "p": stats.bootstrap_p(d),
                    "supported": bool(supported), "verdict": verdict, "_draws": d})
    return out


def _exploratory(summary: dict, draws: dict, primary: list, baseline: Optional[str]) -> dict:
    """Holm-adjust the family of printed differences from the baseline (see the module docstring); writes "role"
    ("primary", "exploratory" or "identical"), and for exploratory ones "p", "p_holm", "holm_level", "holm_lo",
    "holm_hi" into the summary's entries. Returns the family's description."""
    classes: list = []  # [draws, members, is_primary]
    identical = 0
    if baseline is not None:
        for group, by_arm in summary.items():
            columns = RM_COLUMNS if group.startswith("rm/") else POLICY_COLUMNS
            for arm, metrics in by_arm.items():
                if arm == baseline:
                    continue
                local = [k for k in classes if k[3] == (group, arm)]
                for p in primary:
                    if (p["group"], p["arm"], p["baseline"]) == (group, arm, baseline) and p["measured"]:
                        if _twin(p["_draws"], [k[0] for k in local]) is None:
                            local.append([p["_draws"], [], True, (group, arm)])
                            classes.append(local[-1])
                for m in columns:
                    if m not in metrics or "diff" not in metrics[m]:
                        continue
                    d = draws[group][arm][m] - draws[group][baseline][m]
                    if np.allclose(d, 0.0, rtol=0, atol=1e-12):
                        metrics[m]["role"] = "identical"
                        identical += 1
                        continue
                    i = _twin(d, [k[0] for k in local])
                    if i is None:
                        local.append([d, [], False, (group, arm)])
                        classes.append(local[-1])
                        i = len(local) - 1
                    local[i][1].append(metrics[m])
    family = [k for k in classes if not k[2]]
    for k in classes:
        if k[2]:
            for e in k[1]:
                e["role"] = "primary"
    adjusted, levels = stats.holm([stats.bootstrap_p(k[0]) for k in family], ALPHA)
    for k, p_adj, level in zip(family, adjusted, levels):
        lo, hi = stats.interval(k[0], 1 - level)
        for e in k[1]:
            e.update(role="exploratory", p=stats.bootstrap_p(k[0]), p_holm=float(p_adj), holm_level=float(1 - level),
                     holm_lo=lo, holm_hi=hi)
    return {"tests": len(family), "differences": sum(len(k[1]) for k in family), "identical": identical,
            "alpha": ALPHA}


def aggregate(study: Study, records: list, shared_times: dict, this_run_s: float, failed: list,
              num_samples: int = stats.NUM_SAMPLES) -> dict:
    order = {a.name: i for i, a in enumerate(study.arms)}
    records = sorted(records, key=lambda r: (r["seed"], order.get(r["arm"], len(order)), r["arm"]))
    arms = [a.name for a in study.arms if any(r["arm"] == a.name for r in records)]
    seeds = sorted({r["seed"] for r in records})
    complete = [a for a in arms if sorted(r["seed"] for r in records if r["arm"] == a) == seeds]
    groups = sorted({g for r in records for g in r["groups"] if not g.startswith("reference/")})
    baseline = study.baseline_arm if study.baseline_arm in complete else None
    summary: dict = {}
    draws: dict = {}
    seeded: dict = {}
    point: dict = {}
    for group in groups:
        values, clusters = _group_values([r for r in records if r["arm"] in complete], group)
        if not values:
            continue
        metrics = sorted(next(iter(next(iter(values.values())).values())))
        derived = {"gain_per_kl": lambda m: m["gain"] / m["kl"]} if group.startswith("policy/") else None
        point[group], draws[group], seeded[group] = stats.bootstrap(values, clusters, metrics, derived,
                                                                    num_samples=num_samples)
        summary[group] = stats.entries(point[group], draws[group], seeded[group], baseline, 1 - ALPHA)
        for by_metric in summary[group].values():  # the utility terms are described, not compared
            for m, e in by_metric.items():
                if m.startswith("term_"):
                    for k in ("diff", "diff_lo", "diff_hi", "diff_seeds"):
                        e.pop(k, None)
    primary = _primary(study, draws, seeded, point)
    family = _exploratory(summary, draws, primary, baseline)
    for p in primary:
        p.pop("_draws", None)
    return {
        "study": study.name, "description": study.description, "budget": study.budget, "arms": arms,
        "complete_arms": complete, "seeds": seeds, "baseline": baseline,
        "quick": any(r.get("quick") for r in records), "failed": list(failed),
        # the study's grid cells these records lack (a study run in parts; none for a --quick smoke run)
        "unfinished": [] if any(r.get("quick") for r in records) else [
            f"{a.name}@{seed}" for seed in study.seeds for a in study.arms
            if not any(r["arm"] == a.name and r["seed"] == seed for r in records)],
        "interval": f"95% paired bootstrap over seeds and prompt clusters ({num_samples} replicates)",
        "primary": primary, "family": family, "summary": summary,
        "cells": [{"arm": r["arm"], "seed": r["seed"], "wall_s": r["wall_s"], "summary": r["summary"],
                   "means": {g: {k: float(np.nanmean(v)) for k, v in m.items() if k not in ("prompt", "samples")}
                             for g, m in r["groups"].items()}} for r in records],
        "reused": {f"{r['arm']}@{r['seed']}": short_source(r["reused_from"]) for r in records if r.get("reused_from")},
        "wall_s": {"cells": float(sum(r["wall_s"] for r in records if not r.get("reused_from"))),
                   "reused_cells": float(sum(r["wall_s"] for r in records if r.get("reused_from"))),
                   "shared": float(sum(shared_times.values())), "this_invocation": this_run_s},
    }


def steady(x: float) -> float:
    """x rounded to 9 decimals before it is printed at 3: sums in another order (another CPU's SIMD) move a figure by
    ~1e-16, which would flip a printed digit when the figure sits on a rounding boundary (0.4025); rounded first, the
    report is the same text on every machine."""
    return round(x, 9)


def _n(x: float) -> str:
    return f"{steady(x):.3f}"


def _seeds(figures: dict) -> str:
    return "(" + ", ".join(_n(v) for v in figures.values()) + ")"


def _fmt(e: dict) -> str:
    return f"{_n(e['mean'])} [{_n(e['lo'])}, {_n(e['hi'])}] {_seeds(e['seeds'])}"


def _fmt_diff(e: dict) -> str:
    role = e.get("role")
    if role == "identical":
        return f"{_n(e['diff'])} (identical in every replicate)"
    if role == "exploratory":
        p = f"p={_n(e['p_holm'])}" if e["p_holm"] >= 0.001 else "p<0.001"
        return (f"{_n(e['diff'])} [{_n(e['holm_lo'])}, {_n(e['holm_hi'])}] {p} "
                f"{_seeds(e['diff_seeds'])}")
    label = "primary" if role == "primary" else "unadjusted"
    return f"{_n(e['diff'])} [{_n(e['diff_lo'])}, {_n(e['diff_hi'])}] {label} {_seeds(e['diff_seeds'])}"


def _table(head: str, labels: list, rows: list) -> list:
    return ["| " + head + " | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)] + rows


def _primary_lines(results: dict) -> list:
    lines = ["## Primary comparisons (preregistered)", ""]
    primary = results.get("primary", [])
    if not primary:
        return lines + ["None stated in the study file: every comparison below is exploratory."]
    seeds = results["seeds"]
    lines += ["Stated in the study file before any cell ran. Each is the paired difference arm - baseline with its "
              "95% paired bootstrap interval (not adjusted for multiplicity), each seed's own difference, and "
              "whether the interval supports the stated direction.", "",
              "| comparison | group | metric | direction | difference [95%] | "
              + " | ".join(f"seed {s}" for s in seeds) + " | supported? |",
              "|---|---|---|---|---|" + "---|" * len(seeds) + "---|"]
    for p in primary:
        head = f"| {p['arm']} - {p['baseline']} | {p['group']} | {LABELS.get(p['metric'], p['metric'])} | " \
               f"{p['direction']} | "
        if not p["measured"]:
            lines.append(head + "not measured (an arm is missing or incomplete) | " + " | " * len(seeds) + " |")
            continue
        lines.append(head + f"{_n(p['diff'])} [{_n(p['lo'])}, {_n(p['hi'])}] | "
                     + " | ".join(_n(p["seeds"][str(s)]) for s in seeds) + f" | {p['verdict']} |")
    lines += ["", "Why:", ""] + [f"- {p['arm']} - {p['baseline']}, {p['group']} {p['metric']}: {p['why']}"
                                 for p in primary]
    return lines


def markdown(results: dict) -> str:
    s = results["summary"]
    lines = [f"# Study {results['study']}", ""]
    if results["description"]:
        lines += [results["description"], ""]
    seeds = ", ".join(str(x) for x in results["seeds"])
    lines += [f"Seeds {results['seeds']}; each entry is the mean and its {results['interval']}, then in "
              f"parentheses each seed's own figure (seeds {seeds} in that order). "
              f"Baseline arm for the differences: {results['baseline']}."]
    if results["quick"]:
        lines += ["", "**Shortened (--quick) run: a smoke test of the machinery, not a result.**"]
    if results["failed"]:
        lines += ["", f"**Failed cells:** {', '.join(results['failed'])}"]
    if results.get("unfinished"):
        n = len(results["unfinished"]) + len(results["cells"])
        lines += ["", f"**Partial: {len(results['cells'])} of the study's {n} cells; not yet run: "
                      f"{', '.join(results['unfinished'])}. Not a result until every cell is in.**"]
    lines += [""] + _primary_lines(results)
    f = results["family"]
    lines += ["", "## Exploratory", "",
              "Everything below is exploratory. Per-arm intervals are unadjusted 95% intervals (estimates, not "
              + (f"tests). Each difference from {results['baseline']} is paired; its interval and p (two-sided "
                 f"bootstrap) are Holm-adjusted over the family of the {f['tests']} distinct differences these "
                 f"tables print (alpha {f['alpha']}; differences with identical replicates count once; "
                 f"{f['identical']} identical in every replicate are no test; a primary comparison's entry is "
                 "marked primary and keeps its unadjusted interval)."
                 if results["baseline"] is not None and len(results["complete_arms"]) > 1 else
                 "tests). No differences: fewer than two arms, the baseline among them, finished every seed.")]
    for group, columns in [(g, RM_COLUMNS if g.startswith("rm/") else POLICY_COLUMNS) for g in s]:
        cols = [c for c in columns if any(c in s[group][a] for a in s[group])]
        lines += ["", f"### {group}", ""]
        labels = [LABELS.get(c, c) for c in cols]
        lines += _table("arm", labels, [f"| {arm} | " + " | ".join(_fmt(m[c]) if c in m else "" for c in cols) + " |"
                                      for arm, m in s[group].items()])
        diffs = [(arm, m) for arm, m in s[group].items() if any("diff" in m[c] for c in cols if c in m)]
        if diffs:
            lines += ["", f"Difference from {results['baseline']} (paired; Holm-adjusted interval and p):", ""]
            lines += _table("arm", labels, [f"| {arm} | " + " | ".join(_fmt_diff(m[c]) if c in m and "diff" in m[c]
                                                                     else "" for c in cols) + " |"
                                          for arm, m in diffs])
        terms = sorted({k for a in s[group] for k in s[group][a] if k.startswith("term_")})
        if terms:
            lines += ["", "Utility terms (synthetic.utility_terms; they sum to the true reward):", ""]
            lines += _table("arm", [t[len("term_"):] for t in terms],
                            [f"| {arm} | " + " | ".join(f"{_n(m[t]['mean'])} {_seeds(m[t]['seeds'])}" for t in terms)
                             + " |" for arm, m in s[group].items()])
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
    panels = [f"policy/{split}" for split in SPLITS if f"policy/{split}" in s]
    rm = [f"rm/{split}" for split in SPLITS if f"rm/{split}" in s]
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
