"""experiments/smol_ifeval.py: the recipe's config (task:ifeval with its own held-out split, LoRA on the policy, the
LoRA arm's selected rate, a Hub id or local directory in STARLING_JAX_SMOL_MODEL) and its data at a study seed. The
shortened chain on the real model runs in tests/test_colab.py::test_real_model_rlaif_notebook; the studies' grids in
tests/test_study.py."""

import os

from starling_jax.commands.study import read_selection, with_seed
from starling_jax.data import instructions, pipelines
from starling_jax.stages.experiment import load_experiment, stages_of
from starling_jax.stages.validation import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "experiments", "smol_ifeval.py")


def test_smol_ifeval_config_and_its_splits(monkeypatch):
    monkeypatch.delenv("STARLING_JAX_SMOL_MODEL", raising=False)
    exp = load_experiment(RECIPE)  # the wheel's GGUF, converted once (experiments/smol_starling.py's model)
    smol = exp.model.path
    assert smol == load_experiment(os.path.join(ROOT, "experiments", "smol_starling.py")).model.path
    assert os.path.isfile(os.path.join(smol, "config.json"))
    exp = with_seed(exp, 3)  # what a study's cell at seed 3 runs
    validate(exp, num_devices=1)
    stages = dict(stages_of(exp))
    assert list(stages) == ["feedback", "rm", "policy"]
    assert {s.train.seed for s in stages.values()} == {3} and exp.data.synthetic_seed == 3
    assert exp.data.source == "task:ifeval" and exp.data.report_rows == 128 and exp.data.heldout_fraction == 0
    assert stages["feedback"].feedback.judge == "task" and stages["feedback"].feedback.k == 7
    assert stages["rm"].data.source == "stage:feedback" and stages["rm"].objective.name == "rm_plackett_luce"
    policy = stages["policy"]
    assert policy.objective.name == "apa" and policy.model.path == smol
    assert policy.model.lora is not None and policy.model.lora.rank == 8 and policy.model.trainable_top_layers == 2
    chosen = read_selection(os.path.join(ROOT, "experiments", "studies", "selected", "ifeval.json"), "lora")
    assert policy.optim.learning_rate == chosen["stages.policy.optim.learning_rate"]
    splits = pipelines.load_splits(policy.data)
    assert len(splits.heldout) == 128 and len(splits.tuning) + len(splits.train) == instructions.ROWS
    assert abs(len(splits.tuning) - 100) <= 5  # 10% of the training rows, by prompt
    seen = {instructions.signature(r["messages"])[0] for r in splits.train + splits.tuning}
    assert seen.isdisjoint({instructions.signature(r["messages"])[0] for r in splits.heldout})  # new instructions
    other = pipelines.load_splits(dict(stages_of(with_seed(load_experiment(RECIPE), 4)))["policy"].data)
    assert [r["messages"] for r in other.heldout] != [r["messages"] for r in splits.heldout]  # seeds draw anew

    monkeypatch.setenv("STARLING_JAX_SMOL_MODEL", smol)  # a Hub id or a local directory instead (Colab: hf:...)
    exp = load_experiment(RECIPE)
    assert {exp.model.path, exp.model.tokenizer, exp.reward_model.tokenizer} == {smol}
