"""GRPO and RLOO (objectives/group.py) against direct formulas written as loops, and against TRL's GRPO loss.

TRL reference: trl/trainer/grpo_trainer.py (GRPOTrainer, v0.16-0.17): advantages (r - group mean) / (group std +
1e-4) with torch's unbiased std; the loss with loss_type="grpo" is per token -min(coef_1 A, clamp(coef_1, 1 - eps,
1 + eps) A) + beta * (exp(ref - logp) - (ref - logp) - 1), averaged over each completion's tokens, then over
completions. It is transcribed below in torch (TRL itself is not a dependency) and compared value and gradient.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starling_jax.objectives.group import group_advantages, group_policy_loss, kl_estimate

torch = pytest.importorskip("torch")


def _batch(seed, B=6, T=5):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-2.0, 0.5, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)  # ratios well outside [0.8, 1.2] too
    ref = (logp + rng.normal(0, 0.4, (B, T))).astype(np.float32)
    mask = np.zeros((B, T), np.int32)
    for b, n in enumerate(rng.integers(1, T + 1, B)):  # ragged replies
        mask[b, :n] = 1
    adv = rng.normal(size=B).astype(np.float32)
    return logp, old, ref, mask, adv


@pytest.mark.parametrize("G", [2, 3, 4])
def test_group_advantages_against_loops(G):
    rng = np.random.default_rng(G)
    r = rng.normal(size=4 * G).astype(np.float32)
    grpo = np.asarray(group_advantages(jnp.asarray(r), G, "normalised"))
    rloo = np.asarray(group_advantages(r, G, "leave_one_out"))
    for g in range(4):
        group = [float(x) for x in r[g * G:(g + 1) * G]]
        mean = sum(group) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (G - 1))
        for i in range(G):
            others = [group[j] for j in range(G) if j != i]
            assert grpo[g * G + i] == pytest.approx((group[i] - mean) / (std + 1e-4), rel=1e-5, abs=1e-5)
            assert rloo[g * G + i] == pytest.approx(group[i] - sum(others) / (G - 1), rel=1e-5, abs=1e-5)
    # a group of equal rewards carries no signal in either
    flat = np.asarray(group_advantages(jnp.ones(2 * G), G, "normalised"))
    assert np.all(flat == 0) and np.all(np.asarray(group_advantages(jnp.ones(2 * G), G, "leave_one_out")) == 0)


def test_group_advantages_reject_bad_shapes():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        group_advantages(jnp.zeros(6), 4, "normalised")
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(jnp.zeros(6), 1, "leave_one_out")
    with pytest.raises(ValueError, match="baseline must be"):
        group_advantages(jnp.zeros(4), 2, "ppo")


def _loop_loss(logp, old, ref, mask, adv, eps, beta, estimator, aggregate):
    per_reply, tokens = [], []
    for b in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            rho = math.exp(logp[b, t] - old[b, t])
            surrogate = -min(rho * adv[b], min(max(rho, 1 - eps), 1 + eps) * adv[b])
            d = float(ref[b, t]) - float(logp[b, t])
            k = -d if estimator == "k1" else math.exp(d) - d - 1
            terms.append(surrogate + beta * k)
        per_reply.append(sum(terms) / len(terms))
        tokens += terms
    return sum(per_reply) / len(per_reply) if aggregate == "sequence" else sum(tokens) / len(tokens)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("aggregate", ["sequence", "token"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_group_policy_loss_against_a_loop(estimator, aggregate, beta):
    logp, old, ref, mask, adv = _batch(0)
    logp_nan = np.where(mask > 0, logp, np.nan).astype(np.float32)  # padded slots must not matter
    loss, metrics = group_policy_loss(jnp.asarray(logp_nan), old, ref, jnp.asarray(adv), mask, 0.2, beta, estimator,
                                      aggregate)
    want = _loop_loss(logp, old, ref, mask, adv, 0.2, beta, estimator, aggregate)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert 0 < float(metrics["clip_fraction"]) < 1
    k = np.asarray(kl_estimate(jnp.asarray(logp), jnp.asarray(ref), estimator))
    assert float(metrics["ref_kl"]) == pytest.approx(float((k * mask).sum() / mask.sum()), rel=1e-5)


def _trl_grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask, eps, beta):
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    per_token_loss = per_token_loss + beta * per_token_kl
    return ((per_token_loss * completion_mask).sum(dim=1) / completion_mask.sum(dim=1)).mean()


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_matches_trl_loss_and_gradient(seed):
    logp, old, ref, mask, _ = _batch(seed, B=8)
    rewards = np.random.default_rng(seed + 10).normal(size=8).astype(np.float32)
    G = 4
    adv = group_advantages(jnp.asarray(rewards), G, "normalised")
    r = torch.tensor(rewards).view(-1, G)
    trl_adv = ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)).view(-1)
    np.testing.assert_allclose(np.asarray(adv), trl_adv.numpy(), rtol=1e-5, atol=1e-6)

    def ours(lp):
        return group_policy_loss(lp, old, ref, adv, mask, 0.2, 0.04, "k3", "sequence")[0]

    loss, grad = jax.value_and_grad(ours)(jnp.asarray(logp))
    lp = torch.tensor(logp, requires_grad=True)
    want = _trl_grpo_loss(lp, torch.tensor(old), torch.tensor(ref), trl_adv, torch.tensor(mask, dtype=torch.float32),
                          0.2, 0.04)
    want.backward()
    assert float(loss) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(np.asarray(grad), lp.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_group_experience_places_the_kl_in_the_reward_or_not(kl_in, estimator):
    from starling_jax.objectives.group import group_experience
    logp, _, ref, mask, _ = _batch(3, B=6)
    scores = np.random.default_rng(4).normal(size=6).astype(np.float32)
    out = group_experience(jnp.asarray(scores), logp, ref, mask, 3, "leave_one_out", 0.1, kl_in, estimator)
    d = ref.astype(np.float64) - logp
    per_token = -d if estimator == "k1" else np.exp(d) - d - 1
    kl = (per_token * mask).sum(axis=1)
    np.testing.assert_allclose(np.asarray(out["kl"]), kl, rtol=1e-5)
    rewards = scores - 0.1 * kl if kl_in == "reward" else scores
    np.testing.assert_allclose(np.asarray(out["rewards"]), rewards, rtol=1e-5, atol=1e-6)
    r = rewards.reshape(2, 3)
    loo = (r - (r.sum(axis=1, keepdims=True) - r) / 2).reshape(-1)
    np.testing.assert_allclose(np.asarray(out["advantages"]), loo[:, None] * mask, rtol=1e-5, atol=1e-6)
