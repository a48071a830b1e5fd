"""The main job (experiments/tiny_starling.py: SFT -> K-wise RM -> APA) end to end, shortened, and the RL recipes."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from starling_jax.config import apply_overrides, load_experiment, stages_of, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment(name):
    return load_experiment(os.path.join(ROOT, "experiments", f"{name}.py"))


# Shortened so the suite stays fast (the full job: `starling-jax run experiments/tiny_starling.py`).
SHORT = [
    "stages.sft.train.steps=300",
    "stages.rm.train.steps=150",
    "stages.policy.train.steps=10",
    "stages.policy.rollout.eval_prompts=128",
    "logging.progress=false",
]
# Measured with SHORT on the decorrelated synthetic data (fixed seeds): RM held-out pair accuracy above 0.7; the RM
# score and the hidden true utility of the policy's held-out replies move by less than the evaluation noise in 10 RL
# steps (e.g. RM -1.14 -> -1.16, KL 0.18), and in the full job the true utility does not rise reliably either
# (docs/RLAIF.md "Results"). So this test checks that the whole pipeline runs and reports; whether RL improves the
# policy is the open question of the RLAIF issue, and tests/test_rlaif.py checks that each update lowers its loss.
MIN_RM_ACCURACY = 0.7


def test_tiny_starling_end_to_end(tmp_path):
    # The user's command, in a subprocess on one CPU device (tests/conftest.py simulates 8 for the sharding tests).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "starling_jax.cli", "run", os.path.join(ROOT, "experiments", "tiny_starling.py"),
           "--workdir", str(tmp_path)] + [a for o in SHORT for a in ("--set", o)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "summary.json") as f:
        summaries = json.load(f)
    assert '"true_reward_after"' in done.stdout  # `run` prints the summary too
    assert summaries["rm"]["heldout_pair_accuracy"] > MIN_RM_ACCURACY
    policy = summaries["policy"]
    assert all(isinstance(policy[k], float) for k in ("rm_score_before", "rm_score_after", "true_reward_before",
                                                     "true_reward_after"))
    assert 0 < policy["kl_to_reference"] < 20
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


@pytest.mark.parametrize("name,objective,top_layers", [("starling_alpha_apa", "apa", 4), ("starling_beta_ppo", "ppo", 0)])
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
