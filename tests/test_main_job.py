"""The main job (experiments/tiny_starling.py: SFT -> K-wise RM -> APA) end to end, exactly as the README runs it, and the RL recipes."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from starling_jax.stages.experiment import apply_overrides, load_experiment, stages_of
from starling_jax.stages.validation import validate

pytestmark = pytest.mark.slow  # every test here trains or runs a subprocess end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment(name):
    return load_experiment(os.path.join(ROOT, "experiments", f"{name}.py"))


# The main job exactly as the README runs it (about 5-7 minutes alone on this 2-core CPU); only the progress bar is off.
ARGS = ["logging.progress=false"]
# What the test guards is behaviour, not one seed's figures: the stages chain (the RM starts from the SFT export, the
# policy from the SFT export and is scored by the RM export), every summary figure exists on the held-out AND the
# unseen reporting split (generated apart from training: topics no stage trains on / templates no stage trains on,
# docs/DATA.md), the reward model ranks the unseen groups (trained topics, new phrasings) well above chance (0.5), and
# RL raises the RM's own score of the policy's replies to held-out prompts (what RL optimises). The held-out groups
# are about topics whose words the RM never saw, so its ranking there is measured, not bounded: whether it and the true
# reward transfer to new topics is a study question (experiments/studies/, docs/REPRODUCTION.md).
MIN_RM_ACCURACY = 0.6


def test_tiny_starling_end_to_end(tmp_path):
    # The user's command, in a subprocess on one CPU device (tests/conftest.py simulates 8 for the sharding tests).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "starling_jax.commands.cli", "run", os.path.join(ROOT, "experiments", "tiny_starling.py"),
           "--workdir", str(tmp_path)] + [a for o in ARGS for a in ("--set", o)]
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
