"""The one registry: built-in algorithms and stage kinds, what a registration holds, and that an algorithm registered
by one module is picked up by config validation and trained by its stage kind without touching any other table."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starling_jax import algorithms, models
from starling_jax.algorithms import registry
from starling_jax.config import ConfigError, Experiment, ObjectiveConfig, RewardModelSection
from starling_jax.stages.experiment import stages_of
from starling_jax.stages.validation import validate
from starling_jax.objectives import policy as obj_policy
from starling_jax.step import hydra
from starling_jax.stages import kinds, program
from starling_jax.stages.kinds import rlaif

BUILT_IN = {"sft": ("sft", "lm", False), "rm_plackett_luce": ("rm", "score", False),
            "rm_bradley_terry": ("rm", "score", False), "dpo": ("dpo", "lm", True), "apa": ("rl", "lm", True),
            "ppo": ("rl", "lm", True), "feedback": ("feedback", "lm", False)}


def test_built_in_algorithms_and_kinds():
    for name, (kind, head, reference) in BUILT_IN.items():
        a = registry.get(name)
        assert (a.kind, a.head, a.reference) == (kind, head, reference), name
        assert (a.batch is None) == (kind in ("rl", "feedback")), name
    assert set(BUILT_IN) <= set(registry.names())
    assert {"sft", "rm", "dpo", "rl", "feedback"} <= set(kinds.names())
    assert registry.of_kind("rm") == ["rm_bradley_terry", "rm_plackett_luce"]
    with pytest.raises(KeyError, match="unknown objective 'rm_kwise'; known: apa, dpo, feedback, grpo, ppo, rloo"):
        registry.get("rm_kwise")
    with pytest.raises(KeyError, match="no stage kind 'rlhf' is registered"):
        program.get_kind("rlhf")


def test_register_rejects_a_second_algorithm_under_a_taken_name():
    sft = registry.get("sft")
    registry.register(sft)  # re-importing a module registers the same record again: allowed
    with pytest.raises(ValueError, match="algorithm 'sft' is already registered"):
        registry.register(dataclasses.replace(sft, head="score"))
    with pytest.raises(ValueError, match="head must be 'lm' or 'score'"):
        registry.register(dataclasses.replace(sft, name="x", head="value"))
    assert registry.get("sft") is sft


# A critic-free REINFORCE with a per-batch mean baseline: registered here the way a new module under
# starling_jax/algorithms/ registers itself, then trained by the rl kind's own functions.

def _reinforce_advantages(rewards, values, mask, objective, group_size, **_):
    returns = jnp.sum(rewards * mask, axis=1)  # the whole reply's shaped reward
    adv = returns - jnp.mean(returns)
    return jnp.broadcast_to(adv[:, None], rewards.shape) * mask, jnp.zeros_like(rewards)


def _reinforce_loss(out, batch, objective):
    mask = batch["response_mask"].astype(jnp.float32)
    loss = -jnp.sum(out["logprobs"] * batch["advantages"] * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss, {"mean_advantage": jnp.mean(batch["advantages"])}


@pytest.fixture
def reinforce():
    algorithm = registry.register(registry.Algorithm(
        name="test_reinforce", kind="rl", head="lm", loss=_reinforce_loss, reference=True,
        advantages=_reinforce_advantages, critic=False, group_size=lambda objective: 2, options=algorithms.RLOptions))
    yield algorithm
    del registry.ALGORITHMS["test_reinforce"]


@pytest.mark.slow  # trains a stage: 221 s at load ~22 here
def test_a_registered_algorithm_is_validated_and_trained_by_its_kind(reinforce):
    exp = Experiment(name="x", objective=registry.options("test_reinforce"), reward_model=RewardModelSection())
    validate(exp, num_devices=1)
    assert [n for n, _ in stages_of(exp)] == ["rl"]  # a single stage is named after its algorithm's kind
    odd = dataclasses.replace(exp, rollout=dataclasses.replace(exp.rollout, prompts_per_step=15, minibatch_size=5))
    with pytest.raises(ConfigError, match="15 rollouts are not whole groups of 2 per prompt"):
        validate(odd, num_devices=1)
    with pytest.raises(ConfigError, match="unknown objective 'test_reinforc'; did you mean test_reinforce"):
        validate(dataclasses.replace(exp, objective=ObjectiveConfig(name="test_reinforc")), num_devices=1)

    cfg = models.PRESETS["tiny"].replace(num_layers=2, vocab_size=64)
    params = models.init_params(cfg, jax.random.key(0))
    trainable, frozen = hydra.init_rl_params(params, cfg, jax.random.key(1), 1)
    rng = np.random.default_rng(0)
    B, P, N = 4, 3, 4
    tokens = rng.integers(3, 64, (B, P + N)).astype(np.int32)
    attention = np.ones((B, P + N), np.int32)
    response_mask = np.ones((B, N), np.int32)
    scores = np.array([1.0, -1.0, 0.5, 0.0], np.float32)
    experience_fn, loss_fn = rlaif.build_rl_functions(cfg, exp.objective, P, group=2)
    ex = experience_fn(trainable, frozen, tokens, attention, response_mask, scores, jnp.float32(0.0))
    # with kl_coef 0 a reply's shaped reward is its score: the advantage is the score minus the batch mean
    np.testing.assert_allclose(np.asarray(ex["advantages"])[:, 0], scores - scores.mean(), atol=1e-6)
    batch = {"tokens": tokens, "attention_mask": attention, "response_mask": response_mask,
             **{k: ex[k] for k in ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns")}}
    loss, metrics = loss_fn(trainable, frozen, batch)
    logp = hydra.hydra_forward(trainable, frozen, cfg, tokens, attention, P)["logprobs"]
    want = -float(np.mean(np.asarray(logp) * np.asarray(ex["advantages"])))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["value_loss"]) == 0.0  # critic-free: no value term
    grads = jax.grad(lambda t: loss_fn(t, frozen, batch)[0])(trainable)
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in jax.tree.leaves(grads["critic"]))


def test_built_in_rl_losses_are_the_objectives():
    """apa / ppo registrations call the pure objectives with their config fields."""
    rng = np.random.default_rng(1)
    logp, old, adv = (rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3))
    mask = np.ones((3, 4), np.float32)
    batch = {"old_logprobs": old, "advantages": adv, "response_mask": mask}
    got, _ = registry.get("apa").loss({"logprobs": logp}, batch, registry.options("apa", apa_lambda=0.3))
    np.testing.assert_allclose(float(got), float(obj_policy.apa_loss(logp, old, adv, mask, 0.3)[0]))
    got, _ = registry.get("ppo").loss({"logprobs": logp}, batch, registry.options("ppo", ppo_clip=0.1))
    np.testing.assert_allclose(float(got), float(obj_policy.ppo_policy_loss(logp, old, adv, mask, 0.1)[0]))


def test_build_loss_covers_the_data_algorithms():
    cfg = models.PRESETS["tiny"]
    for name in ("sft", "dpo"):
        assert callable(algorithms.build_loss(registry.options(name), cfg))
    with pytest.raises(ValueError, match="needs a reward model"):
        algorithms.build_loss(registry.options("rm_plackett_luce"), cfg)
    with pytest.raises(TypeError, match=r"objective 'dpo' takes DPOOptions \(starling_jax.algorithms.dpo\), got "
                                        r"ObjectiveConfig"):
        algorithms.build_loss(ObjectiveConfig(name="dpo"), cfg)


def test_every_algorithm_registers_typed_described_options():
    """Each algorithm's options are its own frozen type deriving from ObjectiveConfig (the base itself for one without
    options), defined in its own module; every option has a type the validation checks and a description."""
    import typing

    import pydantic
    from pydantic.fields import FieldInfo

    own = {"apa": "APAOptions", "ppo": "PPOOptions", "grpo": "GRPOOptions", "rloo": "RLOOOptions", "dpo": "DPOOptions",
           "rm_plackett_luce": "PlackettLuceOptions", "sft": "ObjectiveConfig", "rm_bradley_terry": "ObjectiveConfig",
           "feedback": "ObjectiveConfig"}
    for name, cls_name in own.items():
        cls = registry.get(name).options
        assert cls.__name__ == cls_name and issubclass(cls, ObjectiveConfig), name
        assert cls is ObjectiveConfig or cls.__module__ == f"starling_jax.algorithms.{name.split('_')[0]}" or \
            cls.__module__ == "starling_jax.algorithms.reward_model", (name, cls.__module__)  # in its own module
        assert registry.options(name).name == name and type(registry.options(name)) is cls
        for field, tp in typing.get_type_hints(cls, include_extras=True).items():
            if field == "name":
                continue
            info = [m for m in typing.get_args(tp)[1:] if isinstance(m, FieldInfo)]
            assert info and info[0].description, (name, field)
            pydantic.TypeAdapter(tp).validate_python(getattr(registry.options(name), field))  # defaults are valid
    # the kind's bases: every rl algorithm's options carry the rollouts' settings, a critic's its own
    for name in registry.of_kind("rl"):
        a = registry.get(name)
        assert issubclass(a.options, algorithms.CriticOptions if a.critic else algorithms.RLOptions), name
        assert a.critic or not issubclass(a.options, algorithms.CriticOptions), name
    with pytest.raises(ValueError, match="options must be a frozen dataclass deriving from ObjectiveConfig"):
        registry.register(dataclasses.replace(registry.get("sft"), name="x", options=dict))


def test_switch_keeps_the_shared_settings_set_away_from_their_defaults():
    apa = registry.options("apa", apa_lambda=1.0, kl_coef=0.2, vf_coef=0.5, whiten_advantages=True)
    grpo = registry.switch(apa, "grpo", group_size=2)
    assert grpo == registry.options("grpo", kl_coef=0.2, whiten_advantages=True, group_size=2)
    assert registry.switch(apa, "ppo") == registry.options("ppo", kl_coef=0.2, vf_coef=0.5, whiten_advantages=True)
    # GRPO's defaults are its own, not carried into RLOO's
    assert (registry.switch(grpo, "rloo").kl_in, registry.switch(grpo, "rloo").kl_estimator) == ("reward", "k1")


def test_the_documented_options_are_the_registered_ones():
    from pathlib import Path
    doc = (Path(__file__).resolve().parent.parent / "docs" / "TRAINING.md").read_text()
    assert algorithms.options_table() in doc, "paste the new algorithms.options_table() into docs/TRAINING.md"
