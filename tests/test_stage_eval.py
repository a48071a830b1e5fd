"""A data stage's held-out evaluation reads every row: its batches keep the training shape (and shardings), the last
one completed with padding rows that weigh nothing, so the weighted loss and the reward model's ranking metrics equal
the ones computed in one batch of exactly the real rows (on the 8-device CPU mesh of conftest.py)."""

import logging

import jax
import numpy as np
import pytest

from starling_jax import objectives
from starling_jax.algorithms import options
from starling_jax.config import DataConfig, Experiment, MeshConfig, ModelSection, TrainConfig
from starling_jax.stages.experiment import stages_of
from starling_jax.data import pipelines
from starling_jax.models import PRESETS
from starling_jax.stages.program import StageContext
from starling_jax.stages.kinds.data import DataStage

B = 8


def make_stage(objective: str, tmp_path, eval_batches: int = 4) -> DataStage:
    model = PRESETS["tiny"].replace(num_layers=1)
    # 150 synthetic prompts: 15 held-out rows -> 15 sft examples and rm groups, 45 dpo pairs (K = 4); the test
    # checks that none is a multiple of the batch of 8
    exp = Experiment(name="evaluate_every_row", model=ModelSection(config=model), mesh=MeshConfig(data=2, fsdp=-1),
                     data=DataConfig(synthetic_prompts=150, max_length=32, max_prompt_length=16, max_responses=4),
                     objective=options(objective),
                     train=TrainConfig(steps=1, batch_size=B, eval_batches=eval_batches))
    (name, cfg), = stages_of(exp)
    return DataStage(StageContext(experiment=exp, config=cfg, stage_name=name, workdir=str(tmp_path), mesh=None,
                                  load_stage=lambda n: None))


def one_batch(stage: DataStage, rows) -> dict:
    """Every example of `rows` in one batch of exactly that many rows (no padding)."""
    d = stage.c.data
    batches = list(pipelines.make_dataset(
        stage.algorithm.kind, rows, stage.tokenizer, 100_000, template=stage.c.model.template,
        max_length=d.max_length, max_prompt_length=d.max_prompt_length, max_responses=d.max_responses,
        pairs=d.pairs, shuffle=False, num_epochs=1, drop_remainder=False))
    assert len(batches) == 1
    return batches[0]


@pytest.mark.parametrize("objective", ["sft", pytest.param("rm_plackett_luce", marks=pytest.mark.slow),
                                       "rm_bradley_terry", pytest.param("dpo", marks=pytest.mark.slow)])
# (dpo ~20 s, rm_plackett_luce ~11 s on the 2-core CPU; rm_bradley_terry keeps a reward model in the day-to-day tier)
def test_heldout_evaluation_reads_every_row(objective, tmp_path, caplog):
    stage = make_stage(objective, tmp_path)
    state = stage.setup.state
    # move the policy away from its start, so DPO's reference differs from it (at the start every pair's margin is 0)
    state = state.replace(params=jax.tree.map(lambda x: x * 1.5, state.params))
    rows = stage.splits.heldout
    whole = one_batch(stage, rows)
    n = len(next(iter(whole.values())))
    assert n % B, f"{n} examples fill whole batches of {B}: the test needs a partial last batch"

    with caplog.at_level(logging.WARNING):
        batches = stage.heldout(None)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(batches) == -(-n // B)  # ceil: the partial last batch is read, padded to the training shape
    assert all(len(v) == B for b in batches for v in b.values())
    result = stage.evaluate_on(state, batches)

    loss, metrics = jax.jit(stage.setup.loss)(state.params, state.frozen, whole, stage.eval_key)
    # the weight counts the real units: reply tokens, prompts (K = 4 responses each), pairs of a ranking, pairs
    want_weight = {"sft": lambda: np.sum(whole["loss_mask"][:, 1:] != 0), "rm_plackett_luce": lambda: n,
                   "rm_bradley_terry": lambda: 6 * n, "dpo": lambda: n}[objective]()
    assert float(metrics["weight"]) == want_weight
    assert result["loss"] == pytest.approx(float(loss), rel=1e-5, abs=1e-6)

    if stage.reward_fn is not None:
        rewards = stage.reward_fn(stage.merge(state), whole["tokens"], whole["attention_mask"])
        want = objectives.rm_metrics(rewards, whole["ranks"], whole["response_mask"])
        for k in ("pair_accuracy", "top1_accuracy", "kendall_tau"):
            assert result[k] == pytest.approx(float(want[k]), abs=1e-6), k
        assert result["groups"] == n == len(rows) and result["pairs"] == int(want["num_pairs"])
    # and the summary: the finish reads the held-out split the same way
    summary = stage.finish(state, str(tmp_path))
    assert summary["heldout_loss"] == pytest.approx(result["loss"], rel=1e-6)


def test_finish_reuses_the_final_evaluation_of_the_same_rows_and_state(tmp_path, monkeypatch):
    """With no tuning split the evaluation split is the held-out one; when train.eval_batches covers it, the loop's
    final evaluate() has already measured every held-out row with the final state, and finish() reports that result
    instead of measuring the rows again. Another state, or an evaluation that read only part of the split, is
    measured."""
    stage = make_stage("rm_plackett_luce", tmp_path)
    state = stage.setup.state
    assert not stage.splits.tuning and stage.eval_rows is stage.splits.heldout
    assert len(stage.eval_batches) == len(stage.heldout(None))  # 15 groups: 2 batches of 8, under eval_batches = 4
    measured = []
    evaluate_on = stage.evaluate_on
    monkeypatch.setattr(stage, "evaluate_on",
                        lambda st, batches: measured.append(len(batches)) or evaluate_on(st, batches))
    final = stage.evaluate(state)
    summary = stage.finish(state, str(tmp_path))
    assert measured == [2] + [len(stage.heldout(None, stage.splits.unseen))] * bool(stage.splits.unseen)
    assert {k: summary[f"heldout_{k}"] for k in final} == final
    moved = state.replace(params=jax.tree.map(lambda x: x * 1.5, state.params))
    measured.clear()
    again = stage.finish(moved, str(tmp_path))  # not the state evaluate() saw: measured
    assert measured[0] == 2 and again["heldout_loss"] != summary["heldout_loss"]
    part = make_stage("rm_plackett_luce", tmp_path, eval_batches=1)  # evaluate() reads part of the split
    assert len(part.eval_batches) == 1 and not part.eval_whole and stage.eval_whole
    measured.clear()
    part_on = part.evaluate_on
    monkeypatch.setattr(part, "evaluate_on", lambda st, batches: measured.append(len(batches)) or part_on(st, batches))
    part.evaluate(state)
    assert part.finish(state, str(tmp_path))["heldout_loss"] == pytest.approx(summary["heldout_loss"], rel=1e-6)
    assert measured[:2] == [1, 2]


@pytest.mark.slow  # a whole rl stage (~30 s of CPU)
def test_an_rl_stage_with_no_evaluation_prompts_samples_none(tmp_path, monkeypatch):
    """rollout.eval_prompts = 0 (a study cell, which measures its policy itself): the rl stage trains, samples no
    evaluation reply (evaluate() reports nothing, the summary has no before/after), and needs no held-out rows."""
    from starling_jax.algorithms.apa import APAOptions
    from starling_jax.config import RewardModelSection, RolloutConfig
    from starling_jax.stages.kinds.rlaif import RLStage
    from starling_jax.stages.loop import run_experiment
    tiny = PRESETS["tiny"].replace(num_layers=1)
    exp = Experiment(name="rl_no_eval", model=ModelSection(config=tiny, trainable_top_layers=1),
                     reward_model=RewardModelSection(config=tiny.replace(head="score"), max_length=48),
                     data=DataConfig(synthetic_prompts=32, heldout_fraction=0.0, max_length=40, max_prompt_length=32),
                     objective=APAOptions(),
                     rollout=RolloutConfig(prompts_per_step=8, max_new_tokens=4, minibatch_size=8, eval_prompts=0),
                     train=TrainConfig(steps=1, batch_size=8, eval_every=1))
    calls = []
    report = RLStage.report
    monkeypatch.setattr(RLStage, "report", lambda self, *a, **k: calls.append(a) or report(self, *a, **k))
    (summary,) = run_experiment(exp, str(tmp_path)).values()
    assert calls == [] and summary["eval_prompts"] == 0 and summary["steps"] == 1
    assert not any(k.endswith(("_before", "_after")) or k.startswith("true_reward") for k in summary)
