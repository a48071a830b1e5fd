"""Objectives against direct numpy/python formulas (independent loops, not vectorised copies), on ragged masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from starling_jax import objectives as obj

# One compiled program per call instead of op-by-op dispatch keeps the file fast on a busy CPU.
PL, BT, METRICS = jax.jit(obj.plackett_luce_loss), jax.jit(obj.bradley_terry_loss), jax.jit(obj.rm_metrics)

RNG = np.random.default_rng(0)


def logsumexp(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ragged_rm_batch(B=6, K=5, seed=0):
    """Random rewards, a random strict ranking per row, and ragged masks including rows with 0, 1 and 2 responses."""
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(B, K)).astype(np.float32)
    mask = np.zeros((B, K), np.int32)
    counts = [K, 0, 1, 2, K - 1, 3][:B] + [K] * max(0, B - 6)
    ranks = np.zeros((B, K), np.int32)
    for b, n in enumerate(counts):
        slots = rng.choice(K, size=n, replace=False)  # valid responses need not be a prefix
        mask[b, slots] = 1
        ranks[b, slots] = rng.permutation(n) + 1
        ranks[b, mask[b] == 0] = rng.integers(1, K + 1, size=K - n)  # junk ranks in padded slots must be ignored
    rewards[mask == 0] = np.nan  # padded scores are garbage; a loss must not look at them
    return rewards, ranks, mask


def finite_grad(fn, *args):
    g = jax.jit(jax.grad(fn))(*args)
    assert np.all(np.isfinite(np.asarray(g))), g
    return np.asarray(g)


# ---------------------------------------------------------------------------------------------------------- SFT


def ref_sft(logits, targets, mask):
    total, n = 0.0, 0
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            if mask[b, t]:
                row = [float(x) for x in logits[b, t]]
                total += logsumexp(row) - row[targets[b, t]]
                n += 1
    return total / n


def test_sft_loss_matches_loop_and_has_finite_grads():
    B, T, V = 3, 7, 11
    logits = (3 * RNG.normal(size=(B, T, V))).astype(np.float32)
    targets = RNG.integers(0, V, size=(B, T)).astype(np.int32)
    mask = (RNG.random((B, T)) < 0.6).astype(np.float32)
    mask[1] = 0  # a fully masked row
    mask[0, 0] = 1
    got = jax.jit(obj.sft_loss)(logits, targets, mask)
    np.testing.assert_allclose(float(got), ref_sft(logits, targets, mask), rtol=1e-5)
    assert float(obj.token_count(mask)) == mask.sum()
    g = finite_grad(lambda x: obj.sft_loss(x, targets, mask), logits)
    assert np.all(g[1] == 0)  # masked tokens get no gradient
    # bf16 logits: the math is float32
    got16 = obj.sft_loss(jnp.asarray(logits, jnp.bfloat16), targets, mask)
    assert got16.dtype == jnp.float32
    assert float(obj.sft_loss(logits, targets, np.zeros_like(mask))) == 0.0


def test_sft_loss_shape_errors_name_tensors():
    with pytest.raises(ValueError, match=r"targets has shape \(2, 5\) but logits has shape \(2, 6, 3\)"):
        obj.sft_loss(np.zeros((2, 6, 3)), np.zeros((2, 5), np.int32), np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"sft_loss: mask has shape \(2, 4\) but targets has shape \(2, 5\)"):
        obj.sft_loss(np.zeros((2, 5, 3)), np.zeros((2, 5), np.int32), np.zeros((2, 4)))


def test_sequence_logps_matches_loop():
    B, T, V = 2, 5, 6
    logits = RNG.normal(size=(B, T, V)).astype(np.float32)
    targets = RNG.integers(0, V, size=(B, T))
    mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    got = np.asarray(obj.sequence_logps(logits, targets, mask))
    for b in range(B):
        want = sum(float(logits[b, t, targets[b, t]]) - logsumexp([float(x) for x in logits[b, t]])
                   for t in range(T) if mask[b, t])
        np.testing.assert_allclose(got[b], want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- reward models


def ref_plackett_luce(rewards, ranks, mask):
    losses = []
    for b in range(rewards.shape[0]):
        order = sorted((int(ranks[b, k]), k) for k in range(rewards.shape[1]) if mask[b, k])
        rs = [float(rewards[b, k]) for _, k in order]
        if len(rs) < 2:
            continue
        losses.append(-sum(rs[j] - logsumexp(rs[j:]) for j in range(len(rs))))
    return sum(losses) / len(losses)


def ref_plackett_luce_breslow(rewards, ranks, mask):
    """Breslow's rule for ties, from its definition: each valid response's term is its reward minus the log-sum-exp
    over the valid responses ranked the same or worse (itself included)."""
    losses = []
    for b in range(rewards.shape[0]):
        valid = [k for k in range(rewards.shape[1]) if mask[b, k]]
        if len(valid) < 2:
            continue
        losses.append(-sum(float(rewards[b, i]) - logsumexp([float(rewards[b, k]) for k in valid
                                                              if ranks[b, k] >= ranks[b, i]]) for i in valid))
    return sum(losses) / len(losses)


def test_plackett_luce_ties_break_by_position_or_share_a_choice_set():
    rng = np.random.default_rng(7)
    rewards = rng.normal(size=(5, 6)).astype(np.float32)
    ranks = np.array([[1, 2, 2, 3, 4, 5], [2, 2, 1, 1, 3, 3], [1, 1, 1, 1, 1, 1], [3, 1, 2, 4, 5, 6],
                      [1, 2, 2, 2, 3, 9]], np.int32)
    mask = np.array([[1] * 6, [1] * 6, [1, 1, 1, 0, 0, 0], [1] * 6, [1, 1, 1, 1, 1, 0]], np.int32)
    breslow = jax.jit(obj.plackett_luce_loss, static_argnames="ties")
    np.testing.assert_allclose(float(breslow(rewards, ranks, mask, ties="breslow")),
                               ref_plackett_luce_breslow(rewards, ranks, mask), rtol=1e-5)
    # "break": the strict order by (rank, index), as before (the reference sorts by the same key)
    np.testing.assert_allclose(float(PL(rewards, ranks, mask)), ref_plackett_luce(rewards, ranks, mask), rtol=1e-5)
    strict = np.argsort(np.argsort(ranks + 0.01 * np.arange(6), axis=1), axis=1).astype(np.int32) + 1
    np.testing.assert_allclose(float(breslow(rewards, strict, mask, ties="breslow")), float(PL(rewards, strict, mask)),
                               rtol=1e-6)  # the same loss on strict ranks
    # no order within a tie: swapping two tied responses' rewards leaves Breslow's loss unchanged, not break's
    swapped = rewards.copy()
    swapped[0, [1, 2]] = rewards[0, [2, 1]]
    one = lambda f, r: float(f(r[:1], ranks[:1], mask[:1]))
    assert one(lambda *a: breslow(*a, ties="breslow"), swapped) == pytest.approx(
        one(lambda *a: breslow(*a, ties="breslow"), rewards), rel=1e-6)
    assert one(PL, swapped) != pytest.approx(one(PL, rewards), rel=1e-3)
    g = finite_grad(lambda r: obj.plackett_luce_loss(r, ranks, mask, ties="breslow"), rewards)
    assert np.all(g[mask == 0] == 0)
    with pytest.raises(ValueError, match="ties must be 'break' or 'breslow', got 'efron'"):
        obj.plackett_luce_loss(rewards, ranks, mask, ties="efron")


def ref_bradley_terry(rewards, ranks, mask):
    losses = []
    for b in range(rewards.shape[0]):
        for i in range(rewards.shape[1]):
            for k in range(rewards.shape[1]):
                if mask[b, i] and mask[b, k] and ranks[b, i] < ranks[b, k]:
                    losses.append(-log_sigmoid(float(rewards[b, i]) - float(rewards[b, k])))
    return sum(losses) / len(losses)


def test_plackett_luce_matches_loop_on_ragged_masks():
    rewards, ranks, mask = ragged_rm_batch()
    got = jax.jit(obj.plackett_luce_loss)(rewards, ranks, mask)
    np.testing.assert_allclose(float(got), ref_plackett_luce(rewards, ranks, mask), rtol=1e-5)
    g = finite_grad(lambda r: obj.plackett_luce_loss(r, ranks, mask), rewards)
    assert np.all(g[mask == 0] == 0)


def test_plackett_luce_gradient_matches_finite_differences():
    rewards, ranks, mask = ragged_rm_batch(seed=3)
    r64 = np.where(mask > 0, rewards, 0.0).astype(np.float64)
    g = np.asarray(jax.jit(jax.grad(obj.plackett_luce_loss))(jnp.asarray(r64, jnp.float32), ranks, mask))
    eps = 1e-4
    for b, k in zip(*np.nonzero(mask)):
        up, down = r64.copy(), r64.copy()
        up[b, k] += eps
        down[b, k] -= eps
        fd = (ref_plackett_luce(up, ranks, mask) - ref_plackett_luce(down, ranks, mask)) / (2 * eps)
        np.testing.assert_allclose(g[b, k], fd, atol=2e-4)


def test_bradley_terry_matches_loop_and_skips_ties():
    rewards, ranks, mask = ragged_rm_batch(seed=1)
    ranks = ranks.copy()
    ranks[0, np.nonzero(mask[0])[0][:2]] = 1  # a tie in row 0: that pair must be skipped
    got = jax.jit(obj.bradley_terry_loss)(rewards, ranks, mask)
    np.testing.assert_allclose(float(got), ref_bradley_terry(rewards, ranks, mask), rtol=1e-5)
    finite_grad(lambda r: obj.bradley_terry_loss(r, ranks, mask), rewards)


def test_plackett_luce_with_two_responses_equals_bradley_terry():
    B = 8
    rewards = (2 * RNG.normal(size=(B, 2))).astype(np.float32)
    ranks = np.array([RNG.permutation(2) + 1 for _ in range(B)], np.int32)
    mask = np.ones((B, 2), np.int32)
    pl, bt = PL(rewards, ranks, mask), BT(rewards, ranks, mask)
    np.testing.assert_allclose(float(pl), float(bt), rtol=1e-6)
    want = np.mean([-log_sigmoid(float(r[np.argmin(k)] - r[np.argmax(k)])) for r, k in zip(rewards, ranks)])
    np.testing.assert_allclose(float(pl), want, rtol=1e-5)
    # ... and a K=4 batch where masks leave exactly two responses per row
    wide_r = RNG.normal(size=(B, 4)).astype(np.float32)
    wide_k = RNG.integers(1, 5, size=(B, 4)).astype(np.int32)
    wide_m = np.zeros((B, 4), np.int32)
    for b in range(B):
        i, k = RNG.choice(4, 2, replace=False)
        wide_m[b, [i, k]] = 1
        wide_k[b, [i, k]] = RNG.permutation(2) + 1
    np.testing.assert_allclose(float(PL(wide_r, wide_k, wide_m)),
                               float(BT(wide_r, wide_k, wide_m)), rtol=1e-6)


def test_plackett_luce_breaks_ties_by_position():
    rewards = np.array([[0.3, -1.0, 2.0]], np.float32)
    tied = np.array([[1, 1, 2]])
    broken = np.array([[1, 2, 3]])  # the documented rule: the earlier of two tied responses counts as better
    mask = np.ones((1, 3))
    np.testing.assert_allclose(float(PL(rewards, tied, mask)),
                               float(PL(rewards, broken, mask)), rtol=1e-6)


def test_check_ranks_rejects_ties_and_bad_ranks():
    obj.check_ranks(np.array([[2, 1, 9]]), np.array([[1, 1, 0]]))  # padded slot's rank is ignored
    with pytest.raises(ValueError, match=r"batch.ranks: row 1 has tied ranks \[1, 1\]"):
        obj.check_ranks(np.array([[1, 2], [1, 1]]), np.ones((2, 2)), where="batch.ranks")
    with pytest.raises(ValueError, match="row 0 has rank"):
        obj.check_ranks(np.array([[0, 1]]), np.ones((1, 2)))


def ref_rm_metrics(rewards, ranks, mask):
    correct = pairs = 0
    top1 = []
    taus = []
    for b in range(rewards.shape[0]):
        idx = [k for k in range(rewards.shape[1]) if mask[b, k]]
        c = d = n = 0
        for i in idx:
            for k in idx:
                if ranks[b, i] < ranks[b, k]:
                    n += 1
                    c += rewards[b, i] > rewards[b, k]
                    d += rewards[b, i] < rewards[b, k]
        correct, pairs = correct + c, pairs + n
        if n:  # a prompt whose responses all tie has no order: no tau, and no best one to find
            taus.append((c - d) / n)
            best = max(idx, key=lambda k: (rewards[b, k], -k))
            top1.append(ranks[b, best] == min(ranks[b, k] for k in idx))
    return correct / pairs, float(np.mean(top1)), float(np.mean(taus))


def test_rm_metrics_match_loops_and_scipy():
    rewards, ranks, mask = ragged_rm_batch(B=8, K=6, seed=2)
    got = jax.jit(obj.rm_metrics)(rewards, ranks, mask)
    pair, top1, tau = ref_rm_metrics(rewards, ranks, mask)
    np.testing.assert_allclose(float(got["pair_accuracy"]), pair, rtol=1e-6)
    np.testing.assert_allclose(float(got["top1_accuracy"]), top1, rtol=1e-6)
    np.testing.assert_allclose(float(got["kendall_tau"]), tau, rtol=1e-6)
    # scipy's Kendall tau (tau-b = tau-a without ties), rank 1 = best so correlate rewards with -ranks
    taus = [scipy.stats.kendalltau(rewards[b][mask[b] > 0], -ranks[b][mask[b] > 0]).statistic
            for b in range(8) if mask[b].sum() >= 2]
    np.testing.assert_allclose(float(got["kendall_tau"]), np.mean(taus), rtol=1e-5)
    assert float(got["num_pairs"]) == sum(n * (n - 1) / 2 for n in mask.sum(1))
    # perfect and reversed scores
    perfect = -ranks.astype(np.float32)
    m = METRICS(perfect, ranks, mask)
    assert float(m["pair_accuracy"]) == 1.0 and float(m["top1_accuracy"]) == 1.0 and float(m["kendall_tau"]) == 1.0
    m = METRICS(-perfect, ranks, mask)
    assert float(m["pair_accuracy"]) == 0.0 and float(m["top1_accuracy"]) == 0.0 and float(m["kendall_tau"]) == -1.0
    # tied rewards: neither concordant nor discordant, and wrong for pair accuracy; argmax takes the first of a tie
    tied = np.array([[1.0, 1.0, 0.0, 5.0]], np.float32)
    tied_ranks, tied_mask = np.array([[2, 1, 3, 1]]), np.array([[1, 1, 1, 0]])
    m = METRICS(tied, tied_ranks, tied_mask)
    np.testing.assert_allclose([float(m["pair_accuracy"]), float(m["top1_accuracy"]), float(m["kendall_tau"])],
                               ref_rm_metrics(tied, tied_ranks, tied_mask), rtol=1e-6)
    np.testing.assert_allclose([float(m["pair_accuracy"]), float(m["kendall_tau"]), float(m["top1_accuracy"])],
                               [2 / 3, 2 / 3, 0.0], rtol=1e-6)


def test_rm_metrics_count_no_pair_and_no_prompt_of_a_ranking_whose_answers_all_tie():
    """A checker ties answers that meet the same constraints: a group tied throughout states no order, so no metric
    counts it (top-1 included: any answer would be "a best one"); partly tied groups count their strict pairs."""
    rewards = np.array([[0.3, 2.0, 1.0, 0.0], [0.1, 0.9, 0.5, 0.0]], np.float32)
    ranks = np.array([[1, 1, 1, 2], [2, 1, 2, 3]])  # row 0 all tied (its 4th slot padded), row 1 partly tied
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    m = METRICS(rewards, ranks, mask)
    assert float(m["num_pairs"]) == 5 and float(m["num_ranked_prompts"]) == 1
    np.testing.assert_allclose([float(m["pair_accuracy"]), float(m["top1_accuracy"]), float(m["kendall_tau"])],
                               ref_rm_metrics(rewards, ranks, mask), rtol=1e-6)
    assert float(m["top1_accuracy"]) == 1.0 and float(m["pair_accuracy"]) == 1.0
    alone = METRICS(rewards[:1], ranks[:1], mask[:1])  # nothing to measure: each count 0, each metric 0 by safe_div
    assert [float(alone[k]) for k in ("num_pairs", "num_ranked_prompts")] == [0, 0]
    # num_prompts is what the Plackett-Luce loss averages over (the tied row too, "break" or "breslow"), so batches
    # pooled by it (train.grad_accum, several processes) give the loss of the whole batch
    assert float(m["num_prompts"]) == 2 and float(alone["num_prompts"]) == 1
    for ties in ("break", "breslow"):
        whole = float(obj.plackett_luce_loss(rewards, ranks, mask, ties=ties))
        parts = [float(obj.plackett_luce_loss(rewards[i:i + 1], ranks[i:i + 1], mask[i:i + 1], ties=ties))
                 for i in (0, 1)]
        assert whole * float(m["num_prompts"]) == pytest.approx(sum(parts), rel=1e-6)


# ------------------------------------------------------------------------------------------------------------ DPO


def test_dpo_matches_closed_form():
    B, beta = 6, 0.1
    pc, pr, rc, rr = (RNG.normal(size=B).astype(np.float32) * 20 for _ in range(4))
    loss, metrics = jax.jit(obj.dpo_loss, static_argnames="beta")(pc, pr, rc, rr, beta=beta)
    hs = [beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])) for i in range(B)]
    np.testing.assert_allclose(float(loss), np.mean([-log_sigmoid(float(h)) for h in hs]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reward_accuracy"]), np.mean([h > 0 for h in hs]), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["reward_margin"]), np.mean(hs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rewards_chosen"]), beta * np.mean(pc - rc), rtol=1e-5)
    # d loss / d pc_i = -beta * sigmoid(-h_i) / B (the closed-form DPO gradient)
    g = finite_grad(lambda x: obj.dpo_loss(x, pr, rc, rr, beta)[0], pc)
    np.testing.assert_allclose(g, [-beta / (1 + math.exp(float(h))) / B for h in hs], rtol=1e-4)
    # label smoothing (cDPO) and a mask that drops padded pairs
    ls, mask = 0.2, np.array([1, 1, 0, 1, 0, 1])
    loss, _ = obj.dpo_loss(pc, pr, rc, rr, beta, label_smoothing=ls, mask=mask)
    want = np.mean([-(1 - ls) * log_sigmoid(float(h)) - ls * log_sigmoid(-float(h)) for h, m in zip(hs, mask) if m])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------- GAE


def ref_gae(rewards, values, lengths, gamma, lam):
    """The textbook backwards loop over each row's first `length` tokens."""
    adv, ret = np.zeros_like(rewards, np.float64), np.zeros_like(rewards, np.float64)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + values[b, t]
    return adv, ret


def test_gae_matches_backwards_loop_on_ragged_rows():
    B, T, gamma, lam = 4, 9, 0.97, 0.9
    rewards = RNG.normal(size=(B, T)).astype(np.float32)
    values = RNG.normal(size=(B, T)).astype(np.float32)
    lengths = [9, 5, 1, 0]
    mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.float32)
    adv, ret = jax.jit(obj.gae)(rewards, values, mask, gamma, lam)
    want_adv, want_ret = ref_gae(rewards, values, lengths, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


def test_gae_gamma_lam_one_is_reward_to_go_and_skips_masked_positions():
    rewards = np.array([[0.0, 1.0, 99.0, 2.0, 5.0]], np.float32)
    values = np.array([[0.5, 0.25, 99.0, 1.0, 7.0]], np.float32)
    mask = np.array([[1, 1, 0, 1, 0]])  # a hole and a pad: 99s and the pad must be ignored
    adv, ret = obj.gae(rewards, values, mask, 1.0, 1.0)
    # gamma = lam = 1: A_t = (sum of rewards from t on) - V_t, returns = reward-to-go
    np.testing.assert_allclose(np.asarray(ret), [[3.0, 3.0, 0.0, 2.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adv), [[2.5, 2.75, 0.0, 1.0, 0.0]], rtol=1e-6)
    # the same as the compacted row
    adv_c, _ = obj.gae(rewards[:, [0, 1, 3]], values[:, [0, 1, 3]], np.ones((1, 3)), 0.9, 0.8)
    adv_h, _ = obj.gae(rewards, values, mask, 0.9, 0.8)
    np.testing.assert_allclose(np.asarray(adv_h)[:, [0, 1, 3]], np.asarray(adv_c), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- APA / PPO


def rl_batch(B=3, T=6, seed=4):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 1.0, size=(B, T))).astype(np.float32)
    old = (logp + 0.3 * rng.normal(size=(B, T))).astype(np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    mask = (np.arange(T)[None] < np.array([T, 3, 1])[:B, None]).astype(np.float32)
    return logp, old, adv, mask


def test_apa_loss_matches_loop():
    logp, old, adv, mask = rl_batch()
    lam = 0.1
    loss, metrics = jax.jit(obj.apa_loss, static_argnames="lam")(logp, old, adv, mask, lam=lam)
    terms = [(logp[b, t] - old[b, t] - adv[b, t] / lam) ** 2 for b, t in zip(*np.nonzero(mask))]
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)
    kl = [math.exp(logp[b, t] - old[b, t]) - 1 - (logp[b, t] - old[b, t]) for b, t in zip(*np.nonzero(mask))]
    np.testing.assert_allclose(float(metrics["approx_kl"]), np.mean(kl), rtol=1e-4)
    g = finite_grad(lambda x: obj.apa_loss(x, old, adv, mask, lam)[0], logp)
    assert np.all(g[mask == 0] == 0)
    # the minimiser is logp = old + A / lam
    assert float(obj.apa_loss(old + adv / lam, old, adv, mask, lam)[0]) < 1e-8


def ref_ppo(logp, old, adv, mask, eps):
    losses, clipped = [], []
    for b, t in zip(*np.nonzero(mask)):
        ratio = math.exp(float(logp[b, t]) - float(old[b, t]))
        a = float(adv[b, t])
        l1, l2 = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
        losses.append(max(l1, l2))
        clipped.append(l2 > l1)
    return np.mean(losses), np.mean(clipped)


def test_ppo_loss_matches_loop():
    logp, old, adv, mask = rl_batch()
    loss, metrics = jax.jit(obj.ppo_policy_loss, static_argnames="clip_eps")(logp, old, adv, mask, clip_eps=0.2)
    want, want_clip = ref_ppo(logp, old, adv, mask, 0.2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["clip_fraction"]), want_clip, rtol=1e-6)
    finite_grad(lambda x: obj.ppo_policy_loss(x, old, adv, mask, 0.2)[0], logp)


def test_ppo_clipping_regimes():
    eps = 0.2
    log_ratio = np.log(np.array([[1.5, 1.5, 0.5, 0.5, 1.1, 1.1]], np.float32))
    adv = np.array([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0]], np.float32)
    old = np.zeros_like(log_ratio)
    mask = np.ones_like(log_ratio)
    # ratio 1.5, A > 0: clipped at 1.2, no gradient;  ratio 1.5, A < 0: unclipped, loss 1.5, gradient
    # ratio 0.5, A > 0: unclipped, loss -0.5;         ratio 0.5, A < 0: clipped at 0.8, no gradient
    # ratio 1.1 (inside the trust region): unclipped either way
    per_token = jax.grad(lambda x: obj.ppo_policy_loss(x, old, adv, mask, eps)[0] * 6)(log_ratio)
    want_grad = np.array([[0.0, 1.5, -0.5, 0.0, -1.1, 1.1]])  # d(-A ratio)/d logp = -A ratio where unclipped
    np.testing.assert_allclose(np.asarray(per_token), want_grad, rtol=1e-5, atol=1e-7)
    loss, m = obj.ppo_policy_loss(log_ratio, old, adv, mask, eps)
    np.testing.assert_allclose(float(loss), np.mean([-1.2, 1.5, -0.5, 0.8, -1.1, 1.1]), rtol=1e-5)
    np.testing.assert_allclose(float(m["clip_fraction"]), 2 / 6, rtol=1e-6)


def test_value_loss_matches_loop_and_clipping_regimes():
    rng = np.random.default_rng(5)
    v, old, ret = (rng.normal(size=(3, 5)).astype(np.float32) for _ in range(3))
    mask = (np.arange(5)[None] < np.array([[5], [2], [0]])).astype(np.float32)
    c = 0.2
    loss, m = jax.jit(obj.value_loss, static_argnames="clip")(v, old, ret, mask, clip=c)
    terms, clipped = [], []
    for b, t in zip(*np.nonzero(mask)):
        vc = old[b, t] + min(max(v[b, t] - old[b, t], -c), c)
        e1, e2 = (v[b, t] - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2
        terms.append(max(e1, e2))
        clipped.append(e2 > e1)
    np.testing.assert_allclose(float(loss), 0.5 * np.mean(terms), rtol=1e-5)
    np.testing.assert_allclose(float(m["value_clip_fraction"]), np.mean(clipped), rtol=1e-6)
    finite_grad(lambda x: obj.value_loss(x, old, ret, mask, c)[0], v)
    # regimes: old 0, return 1. V = 0.5 moved by 0.5 > clip toward R: the clipped error (0.8^2) is larger and holds,
    # no gradient. V = 2 overshoots: its own error (1) is larger than the clipped one (0.8^2): gradient (V - R).
    # V = 0.1 within the clip: unclipped.
    vv = np.array([[0.5, 2.0, 0.1]], np.float32)
    oo, rr, mm = np.zeros_like(vv), np.ones_like(vv), np.ones_like(vv)
    loss, m = obj.value_loss(vv, oo, rr, mm, 0.2)
    np.testing.assert_allclose(float(loss), 0.5 * np.mean([0.64, 1.0, 0.81]), rtol=1e-5)
    g = jax.grad(lambda x: obj.value_loss(x, oo, rr, mm, 0.2)[0] * 3)(vv)
    np.testing.assert_allclose(np.asarray(g), [[0.0, 1.0, -0.9]], rtol=1e-5, atol=1e-7)
    # clip=None: plain 0.5 (V - R)^2 (APA's critic)
    loss, _ = obj.value_loss(vv, oo, rr, mm, None)
    np.testing.assert_allclose(float(loss), 0.5 * np.mean([0.25, 1.0, 0.81]), rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ KL helpers


def test_kl_estimators_are_unbiased_in_exact_expectation():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    logp, logq = np.log(p).astype(np.float32), np.log(q).astype(np.float32)
    k1, k3 = np.asarray(obj.kl_k1(logp, logq)), np.asarray(obj.kl_k3(logp, logq))
    np.testing.assert_allclose(np.sum(p * k1), true_kl, rtol=1e-5)  # E_{a ~ p} of each estimate = KL(p || q)
    np.testing.assert_allclose(np.sum(p * k3), true_kl, rtol=1e-5)
    assert np.all(k3 >= 0)


def test_kl_controllers_follow_ziegler():
    assert float(obj.update_kl_coef(0.01, 5.0, 64)) == pytest.approx(0.01)
    # trlx AdaptiveKLController(0.1, target=6, horizon=10000).update(current=3, n_steps=256)
    err = max(min(3 / 6 - 1, 0.2), -0.2)
    assert float(obj.update_kl_coef(0.1, 3.0, 256, target=6.0, horizon=10000)) == pytest.approx(
        0.1 * (1 + err * 256 / 10000), rel=1e-6)
    # a large KL is clipped at +20%
    assert float(obj.adaptive_kl_coef(0.1, 100.0, 10000, 6.0, 10000)) == pytest.approx(0.12, rel=1e-6)
    jax.jit(obj.adaptive_kl_coef, static_argnums=(3, 4))(0.1, jnp.float32(3.0), 8, 6.0, 100.0)


def test_running_moments_match_numpy_over_updates():
    state = obj.running_moments_init()
    assert float(obj.running_std(state)) == 1.0
    update = jax.jit(obj.running_moments_update)
    seen = []
    for i, n in enumerate([5, 1, 8]):
        xs = RNG.normal(loc=i, scale=2.0, size=(2, n)).astype(np.float32)
        mask = RNG.random((2, n)) < 0.7
        mask[0, 0] = True
        state = update(state, xs, mask)
        seen.extend(xs[mask].tolist())
        np.testing.assert_allclose(float(state["mean"]), np.mean(seen), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(state["var"]), np.var(seen), rtol=1e-4)
        assert float(state["count"]) == len(seen)
        if len(seen) > 1:
            np.testing.assert_allclose(float(obj.running_std(state)), np.std(seen, ddof=1), rtol=1e-4)
    same = update(state, np.ones((3,), np.float32), np.zeros((3,)))  # nothing valid: unchanged
    for k in state:
        assert float(same[k]) == float(state[k])


def test_masked_mean_and_whiten():
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    vals = x[mask > 0]
    np.testing.assert_allclose(float(obj.masked_mean(x, mask)), vals.mean(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(obj.masked_mean(x, mask, axis=1)), [x[0, :2].mean(), x[1].mean(), 0.0],
                               rtol=1e-6)
    w = np.asarray(obj.masked_whiten(x, mask))
    np.testing.assert_allclose(w[mask > 0], (vals - vals.mean()) / np.sqrt(vals.var() + 1e-8), rtol=1e-5)
    assert np.all(w[mask == 0] == 0)
    w = np.asarray(obj.masked_whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(w[mask > 0], (vals - vals.mean()) / np.sqrt(vals.var() + 1e-8) + vals.mean(),
                               rtol=1e-5)
    x_nan = np.where(mask > 0, x, np.nan)  # masked garbage stays out
    assert np.isfinite(float(obj.masked_mean(x_nan, mask)))


def test_shape_mismatch_errors_name_both_tensors():
    with pytest.raises(ValueError, match=r"plackett_luce_loss: ranks has shape \(2, 3\) but rewards has shape \(2, 4\)"):
        obj.plackett_luce_loss(np.zeros((2, 4)), np.ones((2, 3), np.int32), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"gae: mask has shape \(2, 5\) but rewards has shape \(2, 4\)"):
        obj.gae(np.zeros((2, 4)), np.zeros((2, 4)), np.ones((2, 5)), 1.0, 0.95)
    with pytest.raises(ValueError, match=r"ppo_policy_loss: advantages has shape"):
        obj.ppo_policy_loss(np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((2, 3)), np.ones((2, 4)), 0.2)
