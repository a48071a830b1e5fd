"""A reward model as a judge: scores of (conversation, reply) pairs through its own tokenizer and template, and
RewardBench-style accuracies.

RewardBench (Lambert et al. 2024; allenai/reward-bench): a row is correct when the reward of `chosen` is strictly
greater than that of `rejected` (a tie counts as wrong). Per-subset accuracy; each section's score is the mean of its
subsets' accuracies weighted by the subset sizes in RewardBench's constants.EXAMPLE_COUNTS (math-prm counts 984, as
many as the six HumanEvalPack subsets together, so Reasoning weighs math and code equally), over the subsets present;
the overall score is the mean of the four sections (the leaderboard's "Score"). Scores are percentages like the
leaderboard's; subsets outside RewardBench's list are reported on their own.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from starling_jax.commands.eval.checkpoints import Checkpoint
from starling_jax.metrics import stats
from starling_jax.stages.rollout import RewardScorer

# allenai/reward-bench rewardbench/constants.py (SUBSET_MAPPING and EXAMPLE_COUNTS), as of commit a32e272b.
SECTIONS = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
SUBSET_WEIGHTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28, "mt-bench-med": 40,
    "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46, "refusals-dangerous": 100, "refusals-offensive": 100,
    "xstest-should-refuse": 250, "xstest-should-respond": 154, "donotanswer": 136, "math-prm": 984,
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}


class Judge:
    """Scores replies with a reward model (its own tokenizer and template), `batch_size` at a time."""

    def __init__(self, ckpt: Checkpoint, batch_size: int = 8, max_length: Optional[int] = None):
        self.ckpt = ckpt
        self.batch_size = max(1, batch_size)
        self.scorer = RewardScorer(ckpt.config, ckpt.params, ckpt.tokenizer, ckpt.template,
                                   max_length or ckpt.config.max_seq_len)

    def __call__(self, conversations: Sequence[list], replies: Sequence[str]) -> np.ndarray:
        """Reward [n] of each reply as the answer to its conversation (a list of messages ending with a user turn)."""
        out = []
        for i in range(0, len(replies), self.batch_size):
            convs, reps = list(conversations[i:i + self.batch_size]), list(replies[i:i + self.batch_size])
            n = len(reps)
            convs += [convs[-1]] * (self.batch_size - n)  # a fixed batch shape
            reps += [reps[-1]] * (self.batch_size - n)
            out.append(self.scorer(convs, reps)[:n])
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def section_scores(subset_accuracy: dict[str, float]) -> dict[str, float]:
    """RewardBench's section scores (percent) from per-subset accuracies in [0, 1], over the subsets present."""
    out = {}
    for section, subsets in SECTIONS.items():
        present = [s for s in subsets if s in subset_accuracy]
        if present:
            total = sum(SUBSET_WEIGHTS[s] for s in present)
            out[section] = 100 * sum(subset_accuracy[s] * SUBSET_WEIGHTS[s] for s in present) / total
    return out


def rewardbench(judge: Judge, rows: list[dict]) -> dict:
    """Score RewardBench rows: accuracy per subset, section scores, their mean, and the overall row accuracy."""
    convs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    chosen = judge(convs, [r["chosen"] for r in rows])
    rejected = judge(convs, [r["rejected"] for r in rows])
    correct = chosen > rejected
    subsets: dict[str, list[bool]] = {}
    for r, c in zip(rows, correct):
        subsets.setdefault(r["subset"], []).append(bool(c))
    per_subset = {s: float(np.mean(v)) for s, v in sorted(subsets.items())}
    sections = section_scores(per_subset)
    known = {s for subs in SECTIONS.values() for s in subs}
    result = {
        "rows": len(rows), "accuracy": float(np.mean(correct)),
        "subsets": {s: {"accuracy": per_subset[s], "n": len(subsets[s])} for s in per_subset},
        "sections": sections,
        "score": float(np.mean(list(sections.values()))) if len(sections) == len(SECTIONS) else None,
        "other_subsets": sorted(set(per_subset) - known),
        "mean_margin": float(np.mean(chosen - rejected)),
    }
    if result["score"] is None and sections:
        result["score_note"] = (f"sections present: {', '.join(sections)}; RewardBench's score averages all four "
                                f"(Chat, Chat Hard, Safety, Reasoning)")
    return result


def compare(a, b, judge, prompts: list[str], temperature: float, tie_margin: float = 0.0, n_boot: int = 2000,
            seed: int = 0) -> dict:
    """A and B (Generators) answer `prompts`; `judge` (a judge.Judge) scores both replies; head-to-head stats."""
    convs = [[{"role": "user", "content": p}] for p in prompts]
    replies_a, replies_b = a(convs, temperature), b(convs, temperature)
    scores_a, scores_b = judge(convs, replies_a), judge(convs, replies_b)
    result = stats.head_to_head(scores_a, scores_b, [len(r) for r in replies_a], [len(r) for r in replies_b],
                                identical=[x == y for x, y in zip(replies_a, replies_b)], tie_margin=tie_margin,
                                n_boot=n_boot, seed=seed)
    result["rows"] = [{"prompt": p, "reply_a": ra, "reply_b": rb, "score_a": float(sa), "score_b": float(sb)}
                      for p, ra, rb, sa, sb in zip(prompts, replies_a, replies_b, scores_a, scores_b)]
    return result
