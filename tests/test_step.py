"""Train state, optimiser, stage losses and the jitted step (single device; tiny model)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from starling_jax import models
from starling_jax.config import ObjectiveConfig, OptimConfig
from starling_jax import algorithms
from starling_jax.algorithms import options
from starling_jax.step import losses
from starling_jax.step.state import Optimizer, create_state, decay_mask, make_optimizer, make_schedule
from starling_jax.step.step import accumulate_gradients, jit_step, make_train_step, split_micro_batches

CFG = models.PRESETS["tiny"].replace(vocab_size=128, pad_token_id=0, eos_token_id=2)
RM_CFG = CFG.replace(head="score")
_forward = jax.jit(models.forward, static_argnums=(1,))  # the reference path, jitted once (eager is slow on CPU)


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _sft_batch(rng, B=8, T=12):
    mask = np.ones((B, T), np.int32)
    mask[0, :4] = 0
    mask[3, 7:] = 0
    loss_mask = ((rng.random((B, T)) > 0.4) & (mask > 0)).astype(np.float32)
    loss_mask[5] = 0  # rows with very different token counts: micro-batch means must be weighted
    loss_mask[6, 1:] = 1
    return {"tokens": rng.integers(3, CFG.vocab_size, (B, T)).astype(np.int32), "attention_mask": mask,
            "loss_mask": loss_mask}


def _numpy_sft(params, batch):
    logp = _np_log_softmax(_forward(params, CFG, batch["tokens"], batch["attention_mask"]))[:, :-1]
    tgt, w = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:]
    nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    return (nll * w).sum() / w.sum(), w.sum()


def test_sft_loss_with_top_layers_matches_numpy_on_full_forward():
    params = models.init_params(CFG, jax.random.key(0))
    batch = _sft_batch(np.random.default_rng(0))
    want, count = _numpy_sft(params, batch)
    loss_fn = algorithms.build_loss(ObjectiveConfig(name="sft"), CFG)
    for top in (0, 1):
        trainable, frozen = losses.stage_params(params, top)
        loss, metrics = jax.jit(loss_fn)(trainable, frozen, batch, jax.random.key(0))
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
        assert float(metrics["weight"]) == count


def test_rm_losses_match_numpy_on_models_score():
    rng = np.random.default_rng(1)
    params = models.init_params(RM_CFG, jax.random.key(2))
    B, K, T = 4, 3, 10
    mask = np.ones((B, K, T), np.int32)
    mask[:, :, 7:] = rng.integers(0, 2, (B, K, 3)).cumprod(-1)  # right padding of varying length
    ranks = np.array([[1, 2, 3], [2, 1, 3], [3, 1, 2], [1, 2, 3]], np.int32)
    rmask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], np.int32)  # ragged K; last prompt: no pair
    batch = {"tokens": rng.integers(3, CFG.vocab_size, (B, K, T)).astype(np.int32), "attention_mask": mask,
             "ranks": ranks, "response_mask": rmask}
    r = np.asarray(models.score(params, RM_CFG, batch["tokens"].reshape(B * K, T), mask.reshape(B * K, T)),
                   np.float64).reshape(B, K)
    pl, bt, n_prompts, n_pairs = [], [], 0, 0
    for b in range(B):
        order = [k for k in np.argsort(ranks[b], kind="stable") if rmask[b, k]]
        if len(order) < 2:
            continue
        n_prompts += 1
        pl.append(-sum(r[b, order[j]] - np.log(np.exp(r[b, order[j:]]).sum()) for j in range(len(order))))
        for i in range(len(order)):
            for k in range(i + 1, len(order)):
                bt.append(np.log1p(np.exp(-(r[b, order[i]] - r[b, order[k]]))))
                n_pairs += 1
    trainable, frozen = losses.stage_params(params, 1)
    for name, want, weight in (("rm_plackett_luce", np.mean(pl), n_prompts), ("rm_bradley_terry", np.mean(bt),
                                                                               n_pairs)):
        loss, metrics = jax.jit(algorithms.build_loss(options(name), RM_CFG))(trainable, frozen, batch, None)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5, err_msg=name)
        assert float(metrics["weight"]) == weight
    with pytest.raises(ValueError, match="head='score'"):
        algorithms.build_loss(options("rm_plackett_luce"), CFG)


def test_dpo_loss_matches_closed_form_and_hydra_reference_is_the_initial_policy():
    rng = np.random.default_rng(3)
    params = models.init_params(CFG, jax.random.key(4))
    B, T = 4, 10
    batch = {}
    for side in ("chosen", "rejected"):
        batch[f"{side}_tokens"] = rng.integers(3, CFG.vocab_size, (B, T)).astype(np.int32)
        batch[f"{side}_attention_mask"] = np.ones((B, T), np.int32)
        batch[f"{side}_loss_mask"] = (np.arange(T) >= 4).astype(np.float32)[None].repeat(B, 0)

    def seq_logp(p, side):
        logp = _np_log_softmax(_forward(p, CFG, batch[f"{side}_tokens"]))[:, :-1]
        picked = np.take_along_axis(logp, batch[f"{side}_tokens"][:, 1:, None], -1)[..., 0]
        return (picked * batch[f"{side}_loss_mask"][:, 1:]).sum(-1)

    policy = jax.tree.map(lambda a: a * 1.1, params)  # a policy that moved away from the reference
    beta = 0.3
    h = beta * ((seq_logp(policy, "chosen") - seq_logp(params, "chosen"))
                - (seq_logp(policy, "rejected") - seq_logp(params, "rejected")))
    want = np.mean(np.log1p(np.exp(-h)))
    loss_fn = algorithms.build_loss(options("dpo", dpo_beta=beta), CFG)
    # every layer trained: the reference is a full copy of the initial params
    _, f_full = losses.stage_params(params, 0, reference=True)
    loss, metrics = jax.jit(loss_fn)(policy, f_full, batch, None)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["weight"]) == B
    # at the start of training the hydra reference equals the policy: loss = log 2
    t0, f0 = losses.stage_params(params, 1, reference=True)
    np.testing.assert_allclose(float(jax.jit(loss_fn)(t0, f0, batch, None)[0]), math.log(2), rtol=1e-6)


def test_frozen_weights_stored_in_compute_dtype_give_the_same_losses():
    """bf16 compute over fp32 master weights: the frozen trunk and reference are stored in bf16 (half the memory), the
    norms in fp32, and the SFT/DPO losses and the hydra RL forward equal those computed from the fp32 frozen trees
    bit for bit; the merged export comes back in fp32."""
    cfg = CFG.replace(dtype="bfloat16", param_dtype="float32")
    params = models.init_params(cfg, jax.random.key(0))
    batch = _sft_batch(np.random.default_rng(0))
    t_wide, f_wide = losses.stage_params(params, 1, reference=True)  # no config: stored as loaded
    t, f = losses.stage_params(params, 1, reference=True, config=cfg)
    assert f["trunk"]["layers"]["wq"].dtype == jnp.bfloat16 and f["trunk"]["embed"].dtype == jnp.bfloat16
    assert f["reference"]["lm_head"].dtype == jnp.bfloat16
    assert f["trunk"]["layers"]["attn_norm"].dtype == jnp.float32 and f["reference"]["final_norm"].dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(t))  # what trains keeps its fp32 master copy
    wide_bytes = sum(a.nbytes for a in jax.tree.leaves(f_wide))
    assert sum(a.nbytes for a in jax.tree.leaves(f)) < 0.52 * wide_bytes
    sft = jax.jit(algorithms.build_loss(ObjectiveConfig(name="sft"), cfg))
    assert float(sft(t, f, batch, jax.random.key(0))[0]) == float(sft(t_wide, f_wide, batch, jax.random.key(0))[0])
    dpo = jax.jit(algorithms.build_loss(options("dpo"), cfg))
    pairs = {f"{side}_{k}": v for side, seed in (("chosen", 1), ("rejected", 2))
             for k, v in _sft_batch(np.random.default_rng(seed)).items()}
    moved = jax.tree.map(lambda a: a * 1.1, t)  # the policy away from its reference
    assert float(dpo(moved, f, pairs, None)[0]) == float(dpo(moved, f_wide, pairs, None)[0])
    specs_t, specs_f = losses.stage_specs(cfg, 1, True, True)
    assert specs_f["trunk"]["layers"]["wq"].dtype == "bfloat16" and specs_t["layers"]["wq"].dtype == "float32"
    merged = models.merge_params(t, f["trunk"])
    assert {a.dtype for a in jax.tree.leaves(merged)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(merged["embed"], params["embed"].astype(jnp.bfloat16).astype(jnp.float32))
    # the RL hydra trees: same rule
    from starling_jax.step import hydra
    rl_t, rl_f = hydra.init_rl_params(params, cfg, jax.random.key(1), 1)
    assert rl_f["trunk"]["layers"]["w_up"].dtype == jnp.bfloat16
    assert rl_f["reference"]["layers"]["wo"].dtype == jnp.bfloat16
    assert rl_t["policy"]["layers"]["wo"].dtype == jnp.float32
    # an fp32 model is untouched
    _, f32 = losses.stage_params(models.init_params(CFG, jax.random.key(0)), 1, config=CFG)
    assert f32["trunk"]["embed"].dtype == jnp.float32


def test_schedule_and_weight_decay_mask():
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=4, schedule="cosine", end_lr_fraction=0.1)
    sched = make_schedule(cfg, total_steps=20)
    for t in (0, 2, 4, 10, 19, 20):
        want = 1e-3 * t / 4 if t < 4 else 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (t - 4) / 16))
        np.testing.assert_allclose(float(sched(t)), want, rtol=1e-5, atol=1e-9, err_msg=str(t))
    lin = make_schedule(OptimConfig(learning_rate=1.0, schedule="linear", end_lr_fraction=0.0), total_steps=10)
    np.testing.assert_allclose([float(lin(t)) for t in (0, 5, 10)], [1.0, 0.5, 0.0], atol=1e-6)
    mask = decay_mask({**models.init_params(CFG, jax.random.key(0)), "critic": models.init_value_head(
        CFG, jax.random.key(1))})
    assert mask["layers"]["wq"] and mask["embed"] and mask["lm_head"] and mask["critic"]["w1"]
    assert not (mask["layers"]["attn_norm"] or mask["layers"]["mlp_norm"] or mask["final_norm"]
                or mask["critic"]["b1"] or mask["critic"]["b2"])


def test_adamw_weight_decay_skips_norms_and_frozen_mask_holds_leaves():
    params = {"w": jnp.ones((2, 2)), "attn_norm": jnp.ones((3, 2)), "held": jnp.ones((2, 2))}
    opt = make_optimizer(OptimConfig(learning_rate=0.1, weight_decay=0.5, grad_clip=None, schedule="constant"), 10,
                         params, frozen_mask={"w": False, "attn_norm": False, "held": True})
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)  # decay only
    np.testing.assert_array_equal(updates["attn_norm"], 0.0)
    np.testing.assert_array_equal(updates["held"], 0.0)


def test_adamw_is_plain_optax_adamw_with_only_the_learning_rate_in_its_state():
    """make_optimizer keeps the learning rate in the optimiser state (the lr metric) and nothing else: b1, b2, eps,
    eps_root and weight decay stay constants XLA folds (injected, they cost ~9% of a small model's step on XLA:CPU,
    benchmarks/RESULTS.md). Its updates are optax.adamw's, bit for bit, over several steps."""
    config = OptimConfig(learning_rate=1e-2, weight_decay=0.1, grad_clip=None, schedule="constant", b1=0.9, b2=0.95)
    params = {"w": jnp.arange(6.0).reshape(2, 3) / 7, "attn_norm": jnp.ones((3,))}
    opt = make_optimizer(config, 10, params)
    state = opt.init(params)
    hyper = [n.hyperparams for n in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "hyperparams"))
             if hasattr(n, "hyperparams")]
    assert [set(h) for h in hyper] == [{"learning_rate"}]
    plain = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=config.eps, weight_decay=0.1, mask=decay_mask(params))
    ours, p1, plain_state, p2 = jax.jit(opt.update), params, plain.init(params), params
    plain_update = jax.jit(plain.update)  # both fused by XLA: eager op-by-op rounding may differ by an ulp
    for i in range(4):
        g = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), p1)
        u1, state = ours(g, state, p1)
        u2, plain_state = plain_update(g, plain_state, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


@pytest.mark.slow  # ~11 s on the 2-core CPU
def test_grad_accum_2_equals_1_on_the_same_batch_and_frozen_trunk_stays_identical():
    params = models.init_params(CFG, jax.random.key(5))
    batch = _sft_batch(np.random.default_rng(6))
    loss_fn = algorithms.build_loss(ObjectiveConfig(name="sft"), CFG)
    results = []
    for accum in (1, 2):
        trainable, frozen = losses.stage_params(jax.tree.map(jnp.copy, params), 1)
        # SGD on the schedule: the update is linear in the gradient, so params compare gradients (Adam's
        # g / sqrt(v) would amplify float noise in near-zero gradients into lr-sized differences)
        sched = make_schedule(OptimConfig(learning_rate=1e-1, warmup_steps=1), 5)
        sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=sched)  # the lr metric reads its state
        opt = Optimizer(sgd.init, sgd.update, sched)
        state = create_state(trainable, opt, jax.random.key(7), frozen)
        step = jit_step(make_train_step(loss_fn, opt, accum))
        trunk_before = jax.tree.map(np.asarray, state.frozen)
        for _ in range(2):
            state, metrics = step(state, batch)
        jax.tree.map(np.testing.assert_array_equal, trunk_before,
                               jax.tree.map(np.asarray, state.frozen))
        results.append((state, metrics))
    (s1, m1), (s2, m2) = results
    assert int(s1.step) == int(s2.step) == 2
    want_loss, count = _numpy_sft(params, batch)
    # warmup starts at lr 0, so the first update is a no-op and the second step still sees the initial params
    np.testing.assert_allclose(float(m1["loss"]), want_loss, rtol=1e-5)
    for k in ("loss", "grad_norm", "lr", "weight"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(float(m1["lr"]), 1e-1, rtol=1e-6)  # the peak, right after the 1-step warmup
    assert float(m1["weight"]) == count
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.asarray(s1.params["layers"]["wq"]), np.asarray(params["layers"]["wq"][1:]))


def test_split_micro_batches_is_strided_and_checks_divisibility():
    x = np.arange(6)[:, None] * np.ones((1, 2), np.int32)
    out = split_micro_batches({"x": jnp.asarray(x)}, 2)["x"]
    np.testing.assert_array_equal(out[:, :, 0], [[0, 2, 4], [1, 3, 5]])
    with pytest.raises(ValueError, match=r"batch\['x'\].*not divisible by grad_accum=4"):
        split_micro_batches({"x": jnp.asarray(x)}, 4)


def test_abstract_batch_layouts():
    spec = algorithms.abstract_batch("rm_plackett_luce", 8, 64, 7)
    assert spec["tokens"].shape == (8, 7, 64) and spec["ranks"].shape == (8, 7)
    assert algorithms.abstract_batch("dpo", 4, 16)["rejected_loss_mask"].dtype == jnp.float32
    with pytest.raises(KeyError, match="no registered data batch layout"):
        algorithms.abstract_batch("apa", 1, 1)
    with pytest.raises(KeyError, match="build_loss covers the data-driven algorithms: dpo, rm_bradley_terry, "
                                       "rm_plackett_luce, sft"):
        algorithms.build_loss(options("ppo"), CFG)
    with pytest.raises(KeyError, match="unknown objective 'nope'"):
        algorithms.build_loss(ObjectiveConfig(name="nope"), CFG)


@pytest.mark.parametrize("name", ["rm_plackett_luce", "rm_bradley_terry"])
def test_rm_ranking_metrics_under_grad_accum_pool_as_one_batch(name):
    """Micro-batches with different numbers of pairs, prompts and responses: each ranking metric combines by the
    count it is a mean over (pairs, prompts, prompts with a pair, responses), not by what the loss averages over, so
    grad_accum = 2 reports what one batch reports. Without the algorithm's weight_of the means are weighted by the
    loss's weight (prompts for Plackett-Luce, pairs for Bradley-Terry) and differ."""
    rng = np.random.default_rng(8)
    B, K, T = 4, 4, 8
    # the micro-batches are rows 0, 2 and rows 1, 3: 12 pairs of 2 prompts, and 4 pairs of 2
    rmask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], np.int32)
    batch = {"tokens": rng.integers(3, CFG.vocab_size, (B, K, T)).astype(np.int32),
             "attention_mask": np.ones((B, K, T), np.int32),
             "ranks": np.array([[1, 2, 3, 4], [1, 2, 3, 4], [4, 3, 2, 1], [2, 1, 3, 4]], np.int32),
             "response_mask": rmask}
    params = models.init_params(RM_CFG, jax.random.key(9))
    trainable, frozen = losses.stage_params(params, 1)
    loss_fn = algorithms.build_loss(options(name), RM_CFG)

    def metrics_of(_, parts, b, rng):  # the metrics alone (no gradients: nothing to compare there, and cheaper)
        loss, metrics = loss_fn(*parts, b, rng)
        return {}, {**metrics, "loss": loss}

    def run(grad_accum, weight_of=None):
        return jax.jit(lambda b: accumulate_gradients(metrics_of, {}, (trainable, frozen), b, None, grad_accum,
                                                      weight_of)[1])(batch)
    one, two, plain = run(1), run(2, algorithms.get(name).weight_of), run(2)  # plain: every mean by the loss weight
    keys = ("loss", "pair_accuracy", "top1_accuracy", "kendall_tau", "reward_mean")
    for k in keys:
        np.testing.assert_allclose(float(two[k]), float(one[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(one["num_responses"]) == rmask.sum() and float(two["num_pairs"]) == float(one["num_pairs"])
    assert any(not np.isclose(float(plain[k]), float(one[k]), rtol=1e-5, atol=1e-6) for k in keys[1:])
