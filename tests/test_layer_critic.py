"""The Starling fork's OpenChat critic, value_head="layers" (step/hydra.py): a trainable copy of the top M layers +
final norm + Linear(D, 1), initialised from the policy, reading the hidden state entering those M layers without
gradient (thwu1/trlx 0fb4e1e trlx/models/modeling_ppo.py MistralModelWithHydraValueHead, L451-495)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fake_rollout import fake_chunk
from starling_jax import models
from starling_jax.algorithms import options
from starling_jax.algorithms.apa import APAOptions
from starling_jax.config import ConfigError, OptimConfig
from starling_jax.step import hydra
from starling_jax.stages.kinds import rlaif
from starling_jax.step.state import init_state, make_optimizer

CFG = models.PRESETS["tiny"].replace(num_layers=3, vocab_size=300, pad_token_id=0, eos_token_id=2)
L, B, P, N = 3, 4, 6, 5
# (policy's trainable top layers, critic's copied layers): the fork's M = N, a branch inside the frozen trunk, a branch
# inside the policy's trainable layers, every layer trains (the branch is the embeddings)
SHAPES = [(1, 1), (1, 2), (2, 1), (0, 3)]
forward = jax.jit(hydra.hydra_forward, static_argnums=(2, 5))  # (trainable, frozen, config, tokens, mask, P)


@pytest.fixture(scope="module")
def params():
    return models.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def rollout():
    return fake_chunk(CFG.vocab_size, [0, 2, 1, 3], [5, 2, 4, 1], P, N)


def _init(params, top, m):
    return hydra.init_rl_params(params, CFG, jax.random.key(2), top, value_head_kind="layers", value_head_layers=m)


@pytest.mark.parametrize("top,m", SHAPES)
def test_critic_starts_as_a_copy_of_the_policys_top_layers(params, rollout, top, m):
    trainable, frozen = _init(params, top, m)
    critic = trainable["critic"]
    assert sorted(critic) == ["final_norm", "layers", "w"] and critic["w"].shape == (CFG.hidden_size, 1)
    for name, leaf in critic["layers"].items():
        np.testing.assert_array_equal(leaf, params["layers"][name][L - m:])
        assert leaf.unsafe_buffer_pointer() != params["layers"][name].unsafe_buffer_pointer()  # a copy
    np.testing.assert_array_equal(critic["final_norm"], params["final_norm"])
    # torch nn.Linear's default init, U(+-1/sqrt(D)) (the fork's fresh Linear(4096, 1, bias=False))
    bound = 1 / np.sqrt(CFG.hidden_size)
    assert np.all(np.abs(critic["w"]) <= bound) and np.std(np.asarray(critic["w"])) > bound / 4
    # At the start the copy IS the policy's top: the critic's last hidden state is the policy's, at every shape.
    out = forward(trainable, frozen, CFG, rollout["tokens"], rollout["attention_mask"], P)
    want = np.asarray(out["hidden"], np.float32) @ np.asarray(critic["w"], np.float32)
    np.testing.assert_allclose(out["values"], want[..., 0], atol=1e-5)


def _perturbed(critic, key):
    leaves, tree = jax.tree.flatten(critic)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("top,m", SHAPES)
def test_values_equal_a_direct_computation(params, rollout, top, m):
    """The copied layers run on the full model's hidden state entering layer L - m, then the critic's norm and
    Linear; read at the positions predicting the response tokens. The critic is perturbed first, so it is no longer
    the policy's top."""
    trainable, frozen = _init(params, top, m)
    trainable = {**trainable, "critic": _perturbed(trainable["critic"], jax.random.key(5))}
    out = forward(trainable, frozen, CFG, rollout["tokens"], rollout["attention_mask"], P)

    @jax.jit
    def direct_hidden(params, c, tokens, mask):
        x = models.embed_tokens(params, CFG, tokens)
        if L - m:
            x, _ = models.run_layers(jax.tree.map(lambda a: a[:L - m], params["layers"]), CFG, x, mask)
        x, _ = models.run_layers(c["layers"], CFG, x, mask)
        return models.final_norm(c, CFG, x)[:, P - 1:P - 1 + N]

    c = trainable["critic"]
    h = direct_hidden(params, c, rollout["tokens"], rollout["attention_mask"])
    want = np.einsum("btd,d->bt", np.asarray(h, np.float64), np.asarray(c["w"][:, 0], np.float64))
    np.testing.assert_allclose(out["values"], want, atol=1e-5)
    assert not np.allclose(out["values"], np.asarray(out["hidden"], np.float32) @ np.asarray(c["w"])[:, 0], atol=1e-3)


@pytest.mark.parametrize("top,m", SHAPES)
def test_value_loss_gradients_reach_only_the_critic(params, rollout, top, m):
    trainable, frozen = _init(params, top, m)

    def value_loss(t, f):
        out = hydra.hydra_forward(t, f, CFG, rollout["tokens"], rollout["attention_mask"], P)
        return jnp.sum(jnp.square(out["values"] - 1.0) * rollout["response_mask"])

    g_t, g_f = jax.jit(jax.grad(value_loss, argnums=(0, 1)))(trainable, frozen)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_t["policy"]))
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_f))  # trunk and reference
    critic = jax.tree.leaves_with_path(g_t["critic"])
    assert len(critic) == 9 + 2 and all(np.any(np.asarray(g)) for _, g in critic), \
        [jax.tree_util.keystr(p) for p, g in critic if not np.any(np.asarray(g))]


def _batch(trainable, frozen, rollout, objective):
    exp_fn, loss_fn = rlaif.build_rl_functions(CFG, objective, P)
    ex = exp_fn(trainable, frozen, rollout["tokens"], rollout["attention_mask"], rollout["response_mask"],
                rollout["scores"], jnp.float32(objective.kl_coef))
    batch = {k: rollout[k] for k in ("tokens", "attention_mask", "response_mask")}
    batch.update({k: ex[k] for k in ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns")})
    return batch, loss_fn


@pytest.mark.slow
@pytest.mark.parametrize("critic_only_above", [None, 0.0])
def test_rl_update_with_the_layer_critic(params, rollout, critic_only_above):
    """One APA update (the fork's loss): the critic's layers move; the policy moves unless the critic-only rule
    fires (threshold 0: every minibatch); the trunk and reference keep their bits."""
    obj = options("apa", kl_coef=0.1, apa_lambda=1.0, value_clip=0.2, critic_only_above=critic_only_above,
                  value_head="layers", value_head_layers=1)
    trainable, frozen = _init(params, 1, 1)
    batch, loss_fn = _batch(trainable, frozen, rollout, obj)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-3, weight_decay=0.0), 4, trainable)
    state = init_state(trainable, optimizer, jax.random.key(3), frozen)
    before = jax.device_get((state.params, state.frozen))
    new_state, metrics = jax.jit(rlaif.make_rl_step(loss_fn, optimizer, epochs=1, minibatch_size=B,
                                                    objective=obj))(state, batch)
    after = jax.device_get((new_state.params, new_state.frozen))
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa
    assert same(after[1], before[1])
    assert not same(after[0]["critic"]["layers"], before[0]["critic"]["layers"])
    assert same(after[0]["policy"], before[0]["policy"]) == (critic_only_above == 0.0)
    assert float(metrics["critic_only"]) == (1.0 if critic_only_above == 0.0 else 0.0)


def _experiment(name="apa", **objective):
    from starling_jax.config import DataConfig, Experiment, ModelSection, RewardModelSection, RolloutConfig
    model = models.PRESETS["tiny"]
    return Experiment(name="x", model=ModelSection(config=model, trainable_top_layers=1),
                      reward_model=RewardModelSection(config=model.replace(head="score")),
                      data=DataConfig(max_length=32, max_prompt_length=16),
                      objective=options(name, **objective),
                      rollout=RolloutConfig(prompts_per_step=8, max_new_tokens=4, minibatch_size=8))


@pytest.mark.parametrize("objective,message", [
    (dict(value_head="layers"), r"objective.value_head_layers: 0 is not in \[1, 2\]"),
    (dict(value_head="layers", value_head_layers=3), r"objective.value_head_layers: 3 is not in \[1, 2\]"),
    (dict(value_head="mlp", value_head_layers=2), r"objective.value_head_layers: 2 is only read with "
                                                  r"value_head='layers'"),
])
def test_value_head_layers_validation(objective, message):
    from starling_jax.stages.validation import validate
    validate(_experiment(value_head="layers", value_head_layers=2))
    with pytest.raises(ConfigError, match=message) as e:
        validate(_experiment(**objective))
    assert str(e.value).count("\n") == 1  # the header and one problem line


def test_critic_free_options_have_no_critic():
    """GRPO's options have no critic to shape: a value_head is an unknown key, named with what to do."""
    from starling_jax.stages.experiment import apply_overrides
    exp = _experiment(name="grpo")
    with pytest.raises(ConfigError, match=r"--set objective.value_head: unknown key 'value_head' in GRPOOptions; .*"
                                          r"\(GRPOOptions holds the options of objective 'grpo'; to train another "
                                          r"algorithm set objective.name first\)"):
        apply_overrides(exp, ["objective.value_head=layers"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'value_head'"):
        options("grpo", value_head="layers")


def test_value_head_specs_shard_the_copied_layers_like_the_models():
    specs = models.value_head_specs(CFG, "layers", 2)
    model = models.param_specs(CFG)
    for name, spec in specs["layers"].items():
        assert spec.axes == model["layers"][name].axes and spec.shape == (2, *model["layers"][name].shape[1:])
    assert specs["final_norm"] == model["final_norm"]
    with pytest.raises(ValueError, match=r"copies 1..3 layers, got 4"):
        models.value_head_specs(CFG, "layers", 4)
    assert dataclasses.asdict(APAOptions())["value_head_layers"] == 0


@pytest.mark.slow
def test_tiny_rl_stage_runs_and_resumes_with_the_layer_critic(tmp_path, caplog, monkeypatch):
    """A whole APA stage (random 2-layer policy and reward model, synthetic prompts) with value_head="layers" on the
    test's 8 simulated devices: it trains, checkpoints the critic's layer stack, and a run resumed from the step-1
    checkpoint reproduces step 2 exactly (metrics and every parameter, critic included)."""
    import logging
    import shutil

    from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, LoggingConfig, MeshConfig, ModelSection,
                                     RewardModelSection, RolloutConfig, TrainConfig)
    from starling_jax.step.checkpoint import Checkpoints
    from starling_jax.step.logging import read_metrics
    from starling_jax.stages.loop import run_experiment

    model = models.PRESETS["tiny"]
    exp = Experiment(
        name="tiny_layer_critic", model=ModelSection(config=model, trainable_top_layers=1),
        reward_model=RewardModelSection(config=model.replace(head="score"), max_length=48),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        data=DataConfig(source="synthetic", synthetic_prompts=64, heldout_fraction=0.125, max_length=40,
                        max_prompt_length=32),
        objective=options("apa", apa_lambda=1.0, value_clip=0.2, critic_only_above=1.0,
                          value_head="layers", value_head_layers=1),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=0, schedule="constant"),
        rollout=RolloutConfig(prompts_per_step=8, max_new_tokens=4, epochs=1, minibatch_size=8, eval_prompts=8),
        train=TrainConfig(steps=2, batch_size=8, eval_every=0, seed=0),
        checkpoint=CheckpointConfig(every=1, keep=2),
        logging=LoggingConfig(every=1, tensorboard=False, progress=False))
    first = tmp_path / "first"
    from starling_jax.stages.kinds.rlaif import RLStage
    calls, report = [], RLStage.report
    monkeypatch.setattr(RLStage, "report", lambda self, state, which, split="heldout":
                        calls.append((which, split)) or report(self, state, which, split))
    run_experiment(exp, str(first))
    # no tuning split: the final evaluate() samples the policy on the held-out split and finish() reuses its replies
    assert sorted(calls) == [("policy", "heldout"), ("reference", "heldout")], calls
    summary = json.loads((first / "summary.json").read_text())["rl"]
    assert summary["true_reward_after"] == summary["eval"]["true_reward"]
    stage = first / "rl"
    ckpts = Checkpoints(str(stage / "checkpoints"))
    assert ckpts.steps() == [1, 2]
    saved = ckpts.restore(2, None).state["params"]
    assert saved["critic"]["layers"]["wq"].shape[0] == 1 and "final_norm" in saved["critic"]

    second = tmp_path / "second"  # the same run, stopped after the step-1 checkpoint
    shutil.copytree(first, second)
    shutil.rmtree(second / "rl" / "export")
    shutil.rmtree(second / "rl" / "checkpoints" / "2")
    (second / "summary.json").unlink()
    # the CLI's setup_logging (run in-process by earlier tests) stops "starling_jax" records at their own handler
    monkeypatch.setattr(logging.getLogger("starling_jax"), "propagate", True)
    with caplog.at_level(logging.INFO):
        run_experiment(exp, str(second))
    assert "[rl] resumed from" in caplog.text and caplog.text.split("resumed from ")[1].split()[0].endswith("/1")
    want = {r["step"]: r["loss"] for r in read_metrics(str(stage)) if "loss" in r}
    got = {r["step"]: r["loss"] for r in read_metrics(str(second / "rl")) if "loss" in r}
    assert got == want and sorted(got) == [1, 2]
    resumed = Checkpoints(str(second / "rl" / "checkpoints")).restore(2, None).state["params"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(saved)))
