"""Gradient accumulation in the rl kind (train.grad_accum): a minibatch of rollouts taken as G micro-batches gives the
update, loss and metrics of the whole minibatch, for every RL algorithm and loss aggregation, the critic-only rule
included; validation rejects minibatches that do not split; the planner builds the accumulated step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from starling_jax import models
from starling_jax.algorithms import options
from starling_jax.config import (ConfigError, DataConfig, Experiment, LoraConfig, MeshConfig, ModelSection, OptimConfig,
                                 RewardModelSection, RolloutConfig, TrainConfig)
from starling_jax.stages.kinds import rlaif
from starling_jax.stages.validation import validate
from starling_jax.step import adapters, hydra
from starling_jax.step.state import create_state, make_optimizer

CFG = models.PRESETS["tiny"].replace(num_layers=2, vocab_size=300, pad_token_id=0, eos_token_id=2)
B, P, N = 8, 6, 5
LENGTHS = np.array([5, 1, 3, 5, 2, 4, 5, 1])  # reply lengths: micro-batches hold different numbers of tokens


@pytest.fixture(scope="module")
def params():
    return models.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def rollout():
    """A fake chunk: left-padded prompts of different lengths, right-padded replies of the LENGTHS above."""
    k = jax.random.split(jax.random.key(1), 2)
    tokens = np.array(jax.random.randint(k[0], (B, P + N), 3, CFG.vocab_size), np.int32)
    prompt_mask = (np.arange(P)[None] >= np.array([0, 1, 2, 0, 3, 1, 0, 2])[:, None]).astype(np.int32)
    response_mask = (np.arange(N)[None] < LENGTHS[:, None]).astype(np.int32)
    tokens[:, :P] = np.where(prompt_mask > 0, tokens[:, :P], 0)
    tokens[:, P:] = np.where(response_mask > 0, tokens[:, P:], 0)
    return {"tokens": tokens, "attention_mask": np.concatenate([prompt_mask, response_mask], 1),
            "response_mask": response_mask, "scores": np.asarray(2 * jax.random.normal(k[1], (B,)), np.float32)}


def _trees(params, objective, lora=None):
    algorithm = rlaif.rl_algorithm(objective.name)
    head, layers = (objective.value_head, objective.value_head_layers) if algorithm.critic else ("mlp", 0)
    top = 0 if lora is not None else 1
    run = adapters.configure(CFG, lora, top)
    trainable, frozen = hydra.init_rl_params(params, run, jax.random.key(2), top, value_head_kind=head,
                                             value_head_layers=layers, lora=lora)
    if lora is not None:  # B = 0 at init would leave A without gradient: start from trained-looking adapters
        trainable = {**trainable, "lora": jax.tree.map(
            lambda x: 0.05 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), trainable["lora"])}
    return run, trainable, frozen


def _batch(run, trainable, frozen, objective, rollout):
    """The chunk's experience, with the sampling policy's log-probs, the reference's and the old values moved off the
    current ones (as after a few updates), so that ratios, clipping and the KL term are not trivially 1, 0 and 0."""
    exp_fn, loss_fn = rlaif.build_rl_functions(run, objective, P)
    ex = exp_fn(trainable, frozen, rollout["tokens"], rollout["attention_mask"], rollout["response_mask"],
                rollout["scores"], jnp.float32(objective.kl_coef))
    batch = {k: rollout[k] for k in ("tokens", "attention_mask", "response_mask")}
    batch.update({k: ex[k] for k in ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns")})
    for i, k in enumerate(("old_logprobs", "ref_logprobs", "old_values")):
        noise = np.asarray(jax.random.normal(jax.random.key(10 + i), (B, N)), np.float32)
        batch[k] = np.asarray(batch[k]) + 0.3 * noise * rollout["response_mask"]
    batch["stat_reward"] = rollout["scores"]
    return batch, loss_fn


def _update(trainable, frozen, batch, loss_fn, objective, grad_accum, optimizer, epochs=1, minibatch=B):
    state = create_state(trainable, optimizer, jax.random.key(3), frozen)
    step = jax.jit(rlaif.make_rl_step(loss_fn, optimizer, epochs, minibatch, grad_accum, objective))
    new, metrics = step(state, batch)
    return jax.device_get(new.params), {k: float(v) for k, v in metrics.items()}


def _assert_same_metrics(got, want, where):
    """Equal to float rounding; a clip fraction (a count of tokens whose clipped term is the larger, a comparison of
    two terms that are equal up to rounding wherever the clip is inactive) may differ by one token of the minibatch."""
    assert set(got) == set(want), where
    for k in want:
        atol = 1.01 / int(LENGTHS.sum()) if k.endswith("clip_fraction") else 1e-7
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=atol, err_msg=f"{where}: metric {k}")


def _assert_same_update(before, got, want, where):
    """got and want: (params after the update, metrics). With SGD at rate 1 the update IS the gradient."""
    (p_got, m_got), (p_want, m_want) = got, want
    _assert_same_metrics(m_got, m_want, where)
    d_got = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), p_got, before)
    d_want = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), p_want, before)
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(d_want))
    assert scale > 0 and jax.tree.structure(d_got) == jax.tree.structure(d_want), where
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(d_got)[0], jax.tree.leaves(d_want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * scale, err_msg=f"{where}: {jax.tree_util.keystr(path)}")


CASES = {  # every rl algorithm and every loss aggregation it has
    "apa": dict(name="apa", apa_lambda=1.0, value_clip=None),
    "apa_clipped_layers_critic": dict(name="apa", apa_lambda=0.5, value_clip=0.2, value_head="layers",
                                      value_head_layers=1),
    "ppo": dict(name="ppo", value_clip=0.2, ppo_clip=0.1),
    "ppo_whitened": dict(name="ppo", value_clip=0.2, whiten_advantages=True),
    "grpo_sequence": dict(name="grpo", group_size=4, loss_aggregation="sequence"),
    "grpo_token": dict(name="grpo", group_size=4, loss_aggregation="token"),
    "rloo_sequence": dict(name="rloo", group_size=4, loss_aggregation="sequence", kl_in="loss", kl_estimator="k3"),
    "rloo_token": dict(name="rloo", group_size=4, loss_aggregation="token"),
}


@pytest.mark.slow  # compiles the RL step at G = 1, 2, 4, 8 (15-30 s each case when the suite runs on both cores)
@pytest.mark.parametrize("case", list(CASES))
def test_accumulated_update_equals_the_whole_minibatch(params, rollout, case):
    """One update of a minibatch of 8 rollouts (SGD at rate 1, so the parameter change is the gradient), the same
    minibatch as 2, 4 and 8 micro-batches: equal change and equal metrics (loss, policy/value loss, approx KL, clip
    fractions, grad_norm, ...), to float rounding."""
    kw = dict(CASES[case])
    objective = options(kw.pop("name"), kl_coef=0.1, **kw)
    run, trainable, frozen = _trees(params, objective)
    batch, loss_fn = _batch(run, trainable, frozen, objective, rollout)
    sgd = optax.sgd(1.0)
    want = _update(trainable, frozen, batch, loss_fn, objective, 1, sgd)
    assert want[1]["loss"] != 0 and want[1]["critic_only"] == 0.0
    for k in ("clip_fraction", "value_clip_fraction"):  # the metrics compared below are not trivially 0
        assert k not in want[1] or 0 < want[1][k] < 1 or (k == "value_clip_fraction" and not objective.value_clip)
    for grad_accum in (2, 4, 8) if case == "apa" else (2, 4):  # 8: micro-batches of one rollout
        got = _update(trainable, frozen, batch, loss_fn, objective, grad_accum, sgd)
        _assert_same_update(trainable, got, want, f"{case}, grad_accum={grad_accum}")


@pytest.mark.slow  # ~10 s on the 2-core CPU
def test_micro_batches_must_be_weighted(params, rollout):
    """The test above can fail: micro-batches averaged with equal weights (the token means of ragged replies taken as
    if each micro-batch held as many tokens) give another update and another loss."""
    objective = options("apa", kl_coef=0.1, apa_lambda=1.0, value_clip=None)
    run, trainable, frozen = _trees(params, objective)
    batch, loss_fn = _batch(run, trainable, frozen, objective, rollout)

    def unweighted(p, f, b):
        loss, metrics = loss_fn(p, f, b)
        return loss, {k: v for k, v in metrics.items() if k != "weight"}

    sgd = optax.sgd(1.0)
    want = _update(trainable, frozen, batch, loss_fn, objective, 1, sgd)
    got = _update(trainable, frozen, batch, unweighted, objective, 2, sgd)
    with pytest.raises(AssertionError):
        _assert_same_update(trainable, got, want, "equal weights")


def _value_losses(loss_fn, trainable, frozen, batch, order, grad_accum):
    """The value loss of the whole minibatch (rows `order`) and of each of its strided micro-batches."""
    mb = {k: np.asarray(v)[order] for k, v in batch.items() if k in rlaif.TRAIN_KEYS}
    whole = float(loss_fn(trainable, frozen, mb)[1]["value_loss"])
    micro = [float(loss_fn(trainable, frozen, {k: v[i::grad_accum] for k, v in mb.items()})[1]["value_loss"])
             for i in range(grad_accum)]
    return whole, micro


@pytest.mark.slow  # two RL steps compiled per case (15-30 s each when the suite runs on both cores)
@pytest.mark.parametrize("fires", [False, True])
@pytest.mark.parametrize("lora", [None, LoraConfig(rank=4, alpha=8.0)])
def test_critic_only_rule_reads_the_whole_minibatch(params, rollout, fires, lora):
    """The fork's rule acts on the minibatch's value loss, not on a micro-batch's: a threshold between the
    minibatch's value loss and a micro-batch's (above the minibatch's: the rule does not fire, though it would on that
    micro-batch; below: it fires, though that micro-batch alone would not) gives the un-accumulated update. When it
    fires the policy (layers or adapters) gets no gradient and the loss is vf_coef * value_loss."""
    objective = options("apa", kl_coef=0.1, apa_lambda=1.0, value_clip=0.2, vf_coef=0.5)
    run, trainable, frozen = _trees(params, objective, lora)
    batch, loss_fn = _batch(run, trainable, frozen, objective, rollout)
    order = np.asarray(jax.random.permutation(jax.random.split(jax.random.split(jax.random.key(3))[1], 1)[0], B))
    whole, micro = _value_losses(loss_fn, trainable, frozen, batch, order, 4)
    if fires:  # some micro-batch's value loss is below the minibatch's: the threshold sits between them
        threshold = (min(micro) + whole) / 2
    else:
        threshold = (max(micro) + whole) / 2
    assert min(micro) < threshold < whole if fires else whole < threshold < max(micro)
    objective = dataclasses.replace(objective, critic_only_above=threshold)
    batch, loss_fn = _batch(run, trainable, frozen, objective, rollout)
    sgd = optax.sgd(1.0)
    want = _update(trainable, frozen, batch, loss_fn, objective, 1, sgd)
    assert want[1]["critic_only"] == float(fires)
    if fires:
        np.testing.assert_allclose(want[1]["loss"], 0.5 * want[1]["value_loss"], rtol=1e-6)
    policy = "lora" if lora is not None else "policy"
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want[0][policy]),
                                                        jax.tree.leaves(trainable[policy]))]
    assert any(moved) != fires
    for grad_accum in (2, 4):
        got = _update(trainable, frozen, batch, loss_fn, objective, grad_accum, sgd)
        _assert_same_update(trainable, got, want, f"fires={fires}, lora={lora is not None}, grad_accum={grad_accum}")


@pytest.mark.slow  # several epochs of accumulated updates, compiled twice (about 20 s on both cores)
def test_accumulated_epochs_of_minibatches_with_adamw(params, rollout):
    """The stage's own optimiser (AdamW, warmup, clipping) over 2 epochs of 2 shuffled minibatches of 4: the same
    params and metrics (lr included) with each minibatch as 2 or 4 micro-batches."""
    objective = options("ppo", kl_coef=0.1, value_clip=0.2, critic_only_above=0.5)
    run, trainable, frozen = _trees(params, objective)
    batch, loss_fn = _batch(run, trainable, frozen, objective, rollout)
    adamw = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=2, weight_decay=0.01), 4, trainable)
    want = _update(trainable, frozen, batch, loss_fn, objective, 1, adamw, epochs=2, minibatch=4)
    for grad_accum in (2, 4):
        got = _update(trainable, frozen, batch, loss_fn, objective, grad_accum, adamw, epochs=2, minibatch=4)
        _assert_same_metrics(got[1], want[1], f"adamw, grad_accum={grad_accum}")
        for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_rl_step_rejects_a_minibatch_that_does_not_split(params):
    with pytest.raises(ValueError, match=r"minibatch_size=6 is not divisible by grad_accum=4"):
        rlaif.make_rl_step(lambda p, f, b: (0.0, {}), optax.sgd(1.0), 1, 6, 4)


def _rl_experiment(**changes) -> Experiment:
    model = models.PRESETS["tiny"].replace(vocab_size=128, pad_token_id=0, eos_token_id=2)
    exp = Experiment(name="rl_accum", model=ModelSection(config=model, trainable_top_layers=1),
                     reward_model=RewardModelSection(config=model.replace(head="score")),
                     mesh=MeshConfig(data=1, fsdp=-1, tensor=1), data=DataConfig(max_prompt_length=8),
                     objective=options("apa"), train=TrainConfig(batch_size=16, grad_accum=4),
                     rollout=RolloutConfig(prompts_per_step=16, max_new_tokens=8, epochs=1, minibatch_size=8))
    return dataclasses.replace(exp, **{k: dataclasses.replace(getattr(exp, k), **v) for k, v in changes.items()})


def test_validation_of_rl_micro_batches():
    """An rl stage's minibatch is what train.grad_accum splits (train.batch_size is not read there): each a one-line
    problem naming rollout.minibatch_size."""
    assert validate(_rl_experiment(), num_devices=2) is not None  # 8 / 4 = 2 rollouts, one per device
    with pytest.raises(ConfigError) as e:
        validate(_rl_experiment(rollout=dict(minibatch_size=6, prompts_per_step=12)), num_devices=1)
    assert ("stage 'rl': rollout.minibatch_size: 6 is not divisible by train.grad_accum=4 (each minibatch of "
            "rollouts is split into grad_accum micro-batches: set train.grad_accum to a divisor of 6 or "
            "rollout.minibatch_size to a multiple of 4)") in str(e.value), str(e.value)
    assert str(e.value).count("\n") == 1, str(e.value)  # one problem, one line
    with pytest.raises(ConfigError, match=r"rollout.minibatch_size: the micro-batch 8/4 is not divisible by the "
                                          r"mesh's data\*fsdp = 4 devices"):
        validate(_rl_experiment(), num_devices=4)
    # train.batch_size plays no part in an rl stage
    assert validate(_rl_experiment(train=dict(batch_size=7)), num_devices=2) is not None


def _scans(jaxpr, out):
    """Every scan equation of a jaxpr, nested ones included."""
    from starling_jax.commands.plan import _sub_jaxprs
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append(eqn)
        for v in eqn.params.values():
            for sub in _sub_jaxprs(v):
                _scans(sub, out)
    return out


def test_plan_builds_the_accumulated_step():
    """The planner's stage setup (what `plan` compiles) is the trained one: its update runs an inner scan of
    grad_accum micro-batches of minibatch / grad_accum rollouts, with the same matmul work as without it."""
    from starling_jax.commands import plan
    from starling_jax.parallel import sharding
    from starling_jax.stages.experiment import stages_of

    counts = {}
    for grad_accum in (1, 4):
        (_, cfg), = stages_of(_rl_experiment(train=dict(grad_accum=grad_accum)))
        setup = plan.stage_setup(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
        jaxpr = jax.make_jaxpr(setup.update)(setup.state, setup.batch).jaxpr
        tokens = (grad_accum, 8 // grad_accum, cfg.data.max_prompt_length + cfg.rollout.max_new_tokens)
        micro = [e for e in _scans(jaxpr, []) if e.params["length"] == grad_accum  # a scan over micro-batches of tokens
                 and any(tuple(getattr(v.aval, "shape", ())) == tokens for v in e.invars)]
        assert bool(micro) == (grad_accum > 1), grad_accum
        counts[grad_accum] = plan.jaxpr_flops(jaxpr)
        assert any(f"train.grad_accum={grad_accum}" in n for n in setup.notes) == (grad_accum > 1)
    assert counts[1] == counts[4]
