"""The main job (experiments/tiny_starling.py: SFT -> K-wise RM -> APA) end to end, exactly as the README runs it, and the RL recipes."""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from starling_jax.stages.experiment import apply_overrides, load_experiment, stages_of
from starling_jax.stages.validation import validate

pytestmark = pytest.mark.slow  # every test here trains or runs a subprocess end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment(name):
    return load_experiment(os.path.join(ROOT, "experiments", f"{name}.py"))


# The main job as the README runs it (13 minutes alone on this 2-core CPU, 22 beside the rest of the suite), at a
# seed no study ran (the reporting studies run REPORT_SEEDS, the selection studies SELECTION_SEEDS; seed 7 was run by
# hand when issue 21 was filed); only the progress bar is off.
ARGS = ["logging.progress=false"]
GUARD_SEED = 11
# What the test guards is behaviour, not one seed's figures: the stages chain (the RM starts from the SFT export, the
# policy from the SFT export and is scored by the RM export), every summary figure exists on the held-out AND the
# unseen reporting split (generated apart from training: topics no stage trains on / templates no stage trains on,
# docs/DATA.md), the reward model ranks the unseen groups (trained topics, new phrasings) well above chance (0.5), and
# RL raises the RM's own score of the policy's replies to held-out prompts (what RL optimises). The held-out groups
# are about topics whose words the RM never saw, so its ranking there is measured, not bounded: whether it and the true
# reward transfer to new topics is a study question (experiments/studies/, docs/REPRODUCTION.md).
MIN_RM_ACCURACY = 0.6
# The published spread: rl_algorithms' APA arm is the main job at REPORT_SEEDS; its true-reward gain over the SFT
# policy on each reporting split is regenerated from the committed raw results (results/rl_algorithms), never copied.
# A fresh seed must (a) where the published 95% interval of the gain is above 0 (a rise the docs claim), gain at least
# half of its lower end, and (b) on both splits, gain at least the lower end of the 95% prediction interval for one new
# seed from the published seeds' own gains (Student t, n - 1 degrees of freedom: mean - t * sd * sqrt(1 + 1/n)).
# (b) is the guard where no rise is claimed: on held-out topics APA's interval includes 0 (docs/REPRODUCTION.md), so
# the test asks only that a new seed lands where the published seeds say one lands.
PUBLISHED = "rl_algorithms"


@functools.lru_cache(maxsize=None)  # one regeneration (10,000 bootstrap replicates) per session, read by two tests
def published_gains() -> dict:
    """{split: (lower end of the 95% interval of the main job's gain, [each published seed's gain])} from
    results/PUBLISHED's raw data (regenerated, as docs/REPRODUCTION.md's figures are)."""
    from starling_jax.commands.study import load_study, raw

    study = load_study(os.path.join(ROOT, "experiments", "studies", f"{PUBLISHED}.py"))
    results = raw.report(study, os.path.join(ROOT, "results", PUBLISHED))
    out = {}
    for split in ("heldout", "unseen"):
        gain = results["summary"][f"policy/{split}"]["apa"]["gain"]
        out[split] = (gain["lo"], [gain["seeds"][str(s)] for s in study.seeds])
    return out


def lowest_expected_gain(lo: float, seeds: list) -> float:
    """The least gain a fresh seed may show: (a) and (b) above."""
    import scipy.stats

    n = len(seeds)
    prediction_lo = float(np.mean(seeds) - scipy.stats.t.ppf(0.975, n - 1) * np.std(seeds, ddof=1) * math.sqrt(1 + 1 / n))
    return max(lo / 2, prediction_lo) if lo > 0 else prediction_lo


def test_lowest_expected_gain():
    seeds = [0.614, 0.260, 0.535, 0.546, 0.577]  # a rise: half the interval's lower end is the stricter bound here
    assert lowest_expected_gain(0.364, seeds) == 0.182
    t = 2.7764451051977987  # scipy.stats.t.ppf(0.975, 4)
    assert lowest_expected_gain(-0.03, seeds) == pytest.approx(np.mean(seeds) - t * np.std(seeds, ddof=1) * math.sqrt(1.2))
    assert lowest_expected_gain(0.9, seeds) == 0.45


def test_published_gains_are_the_studys_seeds():
    gains = published_gains()
    assert set(gains) == {"heldout", "unseen"} and all(len(seeds) == 5 for _, seeds in gains.values())


def test_guard_seed_is_one_no_study_ran():
    sys.path.insert(0, os.path.join(ROOT, "experiments", "studies"))
    try:
        from _base import REPORT_SEEDS, SELECTION_SEEDS
    finally:
        sys.path.pop(0)
    assert GUARD_SEED not in (*REPORT_SEEDS, *SELECTION_SEEDS, 7)


def test_tiny_starling_end_to_end(tmp_path):
    # The user's command, in a subprocess on one CPU device (tests/conftest.py simulates 8 for the sharding tests), at
    # XLA's default optimisation level as a user runs it (not the suite's level 0: tests/cpu_env.py).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "starling_jax.commands.cli", "run", os.path.join(ROOT, "experiments", "tiny_starling.py"),
           "--workdir", str(tmp_path), "--seed", str(GUARD_SEED)] + [a for o in ARGS for a in ("--set", o)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "summary.json") as f:
        summaries = json.load(f)
    assert '"true_reward_after"' in done.stdout  # `run` prints the summary too
    assert list(summaries) == ["sft", "rm", "policy"]
    config = json.loads((tmp_path / "config.json").read_text())
    stages = {s["name"]: s for s in config["stages"]}
    assert stages["rm"]["model"]["path"] == "stage:sft" and stages["policy"]["model"]["path"] == "stage:sft"
    assert config["reward_model"]["path"] == "stage:rm"
    rm = summaries["rm"]
    assert rm["unseen_pair_accuracy"] > MIN_RM_ACCURACY and 0 <= rm["heldout_pair_accuracy"] <= 1, rm
    assert rm["heldout_rows"] == rm["unseen_rows"] == 256
    policy = summaries["policy"]
    for split in ("", "unseen_"):
        for key in ("true_reward_before", "true_reward_after", "rm_score_before", "rm_score_after"):
            assert math.isfinite(policy[split + key]), (split + key, policy)
        assert 0 < policy[split + "kl_to_reference"] < 20, policy
    assert policy["rm_score_after"] > policy["rm_score_before"], policy
    published = published_gains()  # a seed no study ran lands within the published spread on both reporting splits
    for split, prefix in (("heldout", ""), ("unseen", "unseen_")):
        gain = policy[prefix + "true_reward_after"] - policy[prefix + "true_reward_before"]
        assert gain >= lowest_expected_gain(*published[split]), (split, gain, published[split])
    prompts = {"": policy["eval_prompts"], "unseen_": policy["unseen_prompts"]}
    for split in prompts:  # the RM-judged win rate of the final policy over the SFT policy, with its interval
        w = policy[split + "rm_win_rate_vs_initial"]
        assert w["wins"] + w["ties"] + w["losses"] == w["n"] == prompts[split]
        assert w["win_rate_ci95"][0] <= w["win_rate"] <= w["win_rate_ci95"][1]
    assert policy["rm_win_rate_vs_initial"]["win_rate"] > 0.5, policy["rm_win_rate_vs_initial"]
    assert os.path.getsize(tmp_path / "policy" / "curves.png") > 1000
    with open(tmp_path / "policy" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert {"reward", "true_reward", "kl", "loss", "value_loss", "response_length"} <= set(records[0])


def test_tiny_ppo_is_the_main_job_with_ppo():
    apa, ppo = _experiment("tiny_starling"), _experiment("tiny_ppo")
    validate(ppo, num_devices=1)
    a, p = dict(stages_of(apa)), dict(stages_of(ppo))
    assert list(a) == list(p) == ["sft", "rm", "policy"]
    assert p["policy"].objective.name == "ppo" and a["policy"].objective.name == "apa"
    for stage in ("sft", "rm"):  # the resolved stages differ only in the experiment's name
        assert dataclasses.replace(p[stage], name=a[stage].name) == a[stage]


@pytest.mark.parametrize("name,objective,top_layers", [("starling_alpha_apa", "apa", 4), ("starling_beta_ppo", "ppo", 4)])
def test_7b_recipes_validate_given_local_checkpoints(tmp_path, name, objective, top_layers):
    exp = _experiment(name)
    (cfg,) = [c for _, c in stages_of(exp)]
    assert cfg.objective.name == objective and cfg.model.trainable_top_layers == top_layers
    assert cfg.model.config.num_layers == 32 and cfg.model.config.vocab_size == 32002
    # The recipes point at local checkpoints and data; with stand-in paths they validate for an 8-device mesh.
    for d in ("policy", "rm", "nectar"):
        os.makedirs(tmp_path / d)
    exp = apply_overrides(exp, [f"model.path={tmp_path / 'policy'}", f"reward_model.path={tmp_path / 'rm'}",
                                f"reward_model.tokenizer={tmp_path / 'rm'}", f"data.source={tmp_path / 'nectar'}"])
    validate(exp, num_devices=8)
