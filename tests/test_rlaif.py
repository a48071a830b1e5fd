"""The rl stage's pieces on tiny random models: hydra reference, KL-shaped rewards, APA/PPO updates, critic-only rule,
cross-tokenizer reward scoring."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compiled
from fake_rollout import fake_chunk
from starling_jax import models
from starling_jax.algorithms import options
from starling_jax.config import OptimConfig
from starling_jax.step import hydra
from starling_jax.stages.kinds import rlaif
from starling_jax.step.state import create_state, init_state, make_optimizer

CFG = models.PRESETS["tiny"].replace(num_layers=3, vocab_size=300, pad_token_id=0, eos_token_id=2)
B, P, N = 8, 6, 5


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def rollout():
    return fake_chunk(CFG.vocab_size, [0, 1, 2, 0, 3, 1, 0, 2], [5, 1, 3, 5, 2, 4, 5, 1], P, N)


@pytest.fixture(scope="module")
def params():
    return models.init_params(CFG, jax.random.key(0))


@pytest.mark.parametrize("top_layers", [1, 3])
def test_hydra_reference_equals_initial_policy(params, rollout, top_layers):
    trainable, frozen = hydra.init_rl_params(params, CFG, jax.random.key(2), top_layers)
    if top_layers < CFG.num_layers:
        assert frozen["trunk"]["layers"]["wq"].shape[0] == CFG.num_layers - top_layers
        assert "embed" not in trainable["policy"]
    else:
        assert frozen["trunk"] == {}
    out = jax.jit(hydra.hydra_forward, static_argnums=(2, 5))(trainable, frozen, CFG, rollout["tokens"],
                                                              rollout["attention_mask"], P)
    # Independent reference: a plain forward over the whole sequence; the logits at P-1+j predict response token j.
    logits = compiled.forward(params, CFG, rollout["tokens"], rollout["attention_mask"])
    want = np.asarray(models.token_logprobs(logits[:, P - 1:P + N - 1], rollout["tokens"][:, P:]))
    np.testing.assert_allclose(out["ref_logprobs"], want, atol=2e-5)
    np.testing.assert_allclose(out["logprobs"], want, atol=2e-5)
    assert out["values"].shape == (B, N)
    # The merged trees give back the original params.
    assert _leaves_equal(hydra.policy_params(trainable, frozen), params)
    assert _leaves_equal(hydra.reference_params(frozen), params)


@pytest.mark.parametrize("top_layers", [1, 3])
def test_sampling_from_the_policy_parts_equals_the_merged_policy(params, rollout, top_layers):
    """sampling.generate on the hydra's (top, trunk) pair (merged inside the compiled call; what the rollouts and the
    held-out evaluation sample from) gives the tokens, mask and log-probs of the merged params."""
    from starling_jax.generation import sampling

    trainable, frozen = hydra.init_rl_params(params, CFG, jax.random.key(2), top_layers)
    prompts, mask = rollout["tokens"][:, :P], rollout["attention_mask"][:, :P]
    for parts, full in ((hydra.policy_parts(trainable, frozen), hydra.policy_params(trainable, frozen)),
                        (hydra.reference_parts(frozen), hydra.reference_params(frozen))):
        got = sampling.generate(parts, CFG, prompts, mask, jax.random.key(3), N, temperature=1.0)
        want = sampling.generate(full, CFG, prompts, mask, jax.random.key(3), N, temperature=1.0)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("name", ["ppo", "rloo"])
def test_experience_in_parts_equals_the_whole_chunk(params, rollout, name):
    """RolloutSource.experience with rollout.generation_batch rows per forward call (memory only) gives the
    experience of one call over the whole chunk: the forward is row by row, the advantages (GAE; RLOO's group
    baselines over consecutive rows) are computed once over the chunk."""
    from types import SimpleNamespace

    from starling_jax.stages.rollout import RolloutSource

    obj = options(name, whiten_advantages=True, **({"group_size": 2} if name == "rloo" else {}))
    trainable, frozen = hydra.init_rl_params(params, CFG, jax.random.key(2), 1)
    exp_fn, _ = rlaif.build_rl_functions(CFG, obj, P)
    state = SimpleNamespace(params=trainable, frozen=frozen)
    args = (rollout["tokens"], rollout["attention_mask"], rollout["response_mask"], rollout["scores"])
    whole = jax.device_get(exp_fn(trainable, frozen, *args, jnp.float32(0.3)))
    for rows in (0, 2, 3):  # one call; 4 calls of 2 rows; 2 calls (of 4 rows each: array_split of 8 into 8 // 3)
        source = SimpleNamespace(place=None, experience_fn=exp_fn, kl_coef=0.3,
                                 rollout=SimpleNamespace(generation_batch=rows))
        got = jax.device_get(RolloutSource.experience(source, state, *args))
        assert set(got) == set(whole)
        for k in whole:
            np.testing.assert_allclose(got[k], whole[k], rtol=1e-5, atol=1e-6, err_msg=f"{k}, {rows} rows per call")


def test_shaped_rewards_and_gae_against_numpy_loops(params, rollout):
    obj = options("apa", gamma=0.9, gae_lambda=0.8, value_clip=None)
    trainable, frozen = hydra.init_rl_params(params, CFG, jax.random.key(2), 1)
    exp_fn, _ = rlaif.build_rl_functions(CFG, obj, P)
    kl_coef = 0.3
    ex = jax.device_get(exp_fn(trainable, frozen, rollout["tokens"], rollout["attention_mask"],
                               rollout["response_mask"], rollout["scores"], jnp.float32(kl_coef)))
    lp, ref, v = ex["old_logprobs"].astype(np.float64), ex["ref_logprobs"].astype(np.float64), ex["old_values"]
    for b in range(B):
        n = int(rollout["response_mask"][b].sum())
        r = [-kl_coef * (lp[b, t] - ref[b, t]) for t in range(n)]
        r[n - 1] += rollout["scores"][b]
        np.testing.assert_allclose(ex["rewards"][b, :n], r, atol=1e-5)
        assert np.all(ex["rewards"][b, n:] == 0)
        np.testing.assert_allclose(ex["kl"][b], sum(lp[b, t] - ref[b, t] for t in range(n)), atol=1e-5)
        adv, nxt_v, nxt_a = np.zeros(n), 0.0, 0.0
        for t in reversed(range(n)):
            delta = r[t] + 0.9 * nxt_v - v[b, t]
            adv[t] = nxt_a = delta + 0.9 * 0.8 * nxt_a
            nxt_v = v[b, t]
        np.testing.assert_allclose(ex["advantages"][b, :n], adv, atol=1e-4)
        np.testing.assert_allclose(ex["returns"][b, :n], adv + v[b, :n], atol=1e-4)


def _one_update(params, rollout, objective, top_layers, optim=OptimConfig(learning_rate=1e-3, weight_decay=0.0)):
    trainable, frozen = hydra.init_rl_params(params, CFG, jax.random.key(2), top_layers, value_head_kind="mlp")
    exp_fn, loss_fn = rlaif.build_rl_functions(CFG, objective, P)
    ex = exp_fn(trainable, frozen, rollout["tokens"], rollout["attention_mask"], rollout["response_mask"],
                rollout["scores"], jnp.float32(objective.kl_coef))
    batch = {k: rollout[k] for k in ("tokens", "attention_mask", "response_mask")}
    batch.update({k: ex[k] for k in ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns")})
    batch["stat_reward"] = rollout["scores"]
    optimizer = make_optimizer(optim, 4, trainable)
    state = init_state(trainable, optimizer, jax.random.key(3), frozen)
    before_trainable = jax.device_get(state.params)
    before_frozen = jax.device_get(state.frozen)
    loss_jit = jax.jit(loss_fn)  # compiled once for the loss before and after the update
    loss_before, _ = loss_jit(state.params, state.frozen, batch)
    step = jax.jit(rlaif.make_rl_step(loss_fn, optimizer, epochs=1, minibatch_size=B, objective=objective))
    new_state, metrics = step(state, batch)
    loss_after, _ = loss_jit(new_state.params, new_state.frozen, batch)
    return before_trainable, before_frozen, new_state, metrics, float(loss_before), float(loss_after)


@pytest.mark.parametrize("name,top_layers", [("apa", 1), ("ppo", 0)])
def test_update_lowers_loss_and_keeps_frozen_bits(params, rollout, name, top_layers):
    obj = options(name, kl_coef=0.1, **(dict(apa_lambda=1.0, value_clip=None) if name == "apa" else {}))
    before_t, before_f, new_state, metrics, l0, l1 = _one_update(params, rollout, obj, top_layers)
    assert l1 < l0, (l0, l1)
    assert np.isclose(float(metrics["loss"]), l0, rtol=1e-5)  # one full-batch update: the step saw the same loss
    assert int(new_state.step) == 1
    assert _leaves_equal(new_state.frozen, before_f)  # trunk and reference: bit-identical
    if top_layers:
        assert len(jax.tree.leaves(before_f["trunk"])) > 0
    assert not _leaves_equal(new_state.params["policy"], before_t["policy"])
    assert not _leaves_equal(new_state.params["critic"], before_t["critic"])
    np.testing.assert_allclose(float(metrics["reward"]), np.mean(rollout["scores"]), rtol=1e-6)


@pytest.mark.parametrize("name,kl_in,estimator", [("grpo", None, None), ("rloo", None, None), ("grpo", "reward", "k1"),
                                                  ("rloo", "loss", "k3")])
def test_group_objectives_in_the_rl_stage(params, rollout, name, kl_in, estimator):
    """GRPO/RLOO through the rl stage's own experience and update functions: group-relative advantages of the
    (KL-penalised) scores on every token of a reply, no critic update, the policy moves, the loss falls."""
    from starling_jax.objectives.group import group_advantages
    obj = options(name, kl_coef=0.1, group_size=4,
                  **{k: v for k, v in (("kl_in", kl_in), ("kl_estimator", estimator)) if v is not None})
    trainable, frozen = hydra.init_rl_params(params, CFG, jax.random.PRNGKey(2), 1, value_head_kind="mlp")
    exp_fn, _ = rlaif.build_rl_functions(CFG, obj, P)
    ex = jax.device_get(exp_fn(trainable, frozen, rollout["tokens"], rollout["attention_mask"],
                               rollout["response_mask"], rollout["scores"], jnp.float32(0.1)))
    where, est = obj.kl_in, obj.kl_estimator  # unless set, each algorithm's own: GRPO's k3 in the loss, RLOO's k1
                                              # in the reward
    assert (where, est) == ((kl_in, estimator) if kl_in else {"grpo": ("loss", "k3"), "rloo": ("reward", "k1")}[name])
    mask = rollout["response_mask"]
    d = ex["ref_logprobs"].astype(np.float64) - ex["old_logprobs"]
    k = (-d if est == "k1" else np.exp(d) - d - 1) * mask
    rewards = rollout["scores"] - (0.1 * k.sum(1) if where == "reward" else 0.0)
    want = np.asarray(group_advantages(jnp.asarray(rewards, jnp.float32), 4,
                                       {"grpo": "normalised", "rloo": "leave_one_out"}[name]))
    np.testing.assert_allclose(ex["advantages"], want[:, None] * mask, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ex["kl"], ((ex["old_logprobs"] - ex["ref_logprobs"]) * mask).sum(1), rtol=1e-5,
                               atol=1e-5)  # the logged KL is k1, as for APA/PPO
    assert not ex["old_values"].any() and not ex["returns"].any()
    before_t, before_f, new_state, metrics, l0, l1 = _one_update(params, rollout, obj, 1)
    assert l1 < l0, (l0, l1)
    assert float(metrics["value_loss"]) == 0.0
    assert _leaves_equal(new_state.params["critic"], before_t["critic"])  # no critic: zero gradient, no decay
    assert not _leaves_equal(new_state.params["policy"], before_t["policy"])
    assert _leaves_equal(new_state.frozen, before_f)


def test_critic_only_above_trains_only_the_critic(params, rollout):
    # A threshold of 0 makes every minibatch critic-only: the policy must not move (Adam's first step from zero
    # moments with a zero gradient is exactly zero; no weight decay), the critic must.
    obj = options("apa", kl_coef=0.1, apa_lambda=1.0, value_clip=None, critic_only_above=0.0)
    before_t, before_f, new_state, metrics, l0, l1 = _one_update(params, rollout, obj, 1)
    assert float(metrics["critic_only"]) == 1.0
    assert _leaves_equal(new_state.params["policy"], before_t["policy"])
    assert not _leaves_equal(new_state.params["critic"], before_t["critic"])
    assert _leaves_equal(new_state.frozen, before_f)


def test_cross_tokenizer_scoring_equals_direct_scoring():
    """Policy (OpenChat tokenizer, openchat_3.5 template) replies decoded, re-rendered in the Llama-2 chat template
    and encoded with the reward model's own (Mistral/Llama SentencePiece, 32000-row) tokenizer give the same score as
    the same text written out by hand in that template and encoded directly."""
    from starling_jax.generation import sampling
    from starling_jax.data import load_tokenizer
    from starling_jax.stages.rollout import RewardScorer

    policy_tok, rm_tok = load_tokenizer("openchat-3.5"), load_tokenizer("mistral-7b-v0.1")
    rm_cfg = models.PRESETS["tiny"].replace(head="score", vocab_size=32000, pad_token_id=0, eos_token_id=2,
                                            sliding_window=None)
    rm_params = models.init_params(rm_cfg, jax.random.key(5))
    scorer = RewardScorer(rm_cfg, rm_params, rm_tok, "llama2", max_length=64, pad_multiple=16)
    convs = [[{"role": "user", "content": "Tell me about cats."}],
             [{"role": "user", "content": "Tell me about rain."},
              {"role": "assistant", "content": "Rain falls from grey clouds."},
              {"role": "user", "content": "And what about coffee?"}]]
    replies = ["Cats purr and nap in the sun.", "Coffee beans are roasted, then brewed in a cup."]
    # What the policy emits: the reply's tokens, its <|end_of_turn|>, then padding; then a stop string case.
    eot = policy_tok.end_of_turn_id
    rows = [policy_tok.encode(r) + [eot] for r in replies]
    tokens = np.zeros((2, 24), np.int32)
    mask = np.zeros((2, 24), np.int32)
    for i, ids in enumerate(rows):
        tokens[i, :len(ids)], mask[i, :len(ids)] = ids, 1
    texts, _ = sampling.apply_stop_strings(policy_tok, tokens, mask, ("GPT4 Correct User:",))
    assert texts == replies
    got = scorer(convs, texts)

    direct = ["<s>[INST] Tell me about cats. </s> [/INST] Cats purr and nap in the sun.</s>",
              "<s>[INST] Tell me about rain. </s> [/INST] Rain falls from grey clouds.</s>"
              "<s>[INST] And what about coffee? </s> [/INST] Coffee beans are roasted, then brewed in a cup.</s>"]
    ids = [rm_tok.encode(t, parse_special=True) for t in direct]  # the whole string is scaffolding here
    assert all(max(x) < 32000 and x[0] == rm_tok.bos_id for x in ids)
    T = max(len(x) for x in ids)
    want_tokens = np.array([x + [0] * (T - len(x)) for x in ids], np.int32)
    want_mask = np.array([[1] * len(x) + [0] * (T - len(x)) for x in ids], np.int32)
    want = np.asarray(compiled.score(rm_params, rm_cfg, want_tokens, want_mask))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # in calls of one row each (rollout.generation_batch, memory only): the same scores
    np.testing.assert_allclose(scorer(convs, texts, batch=1), got, rtol=1e-6)
    # The policy's own rendering of the same chat is another sequence (the re-rendering matters).
    assert policy_tok.encode_chat(convs[0] + [{"role": "assistant", "content": replies[0]}], template="openchat_3.5",
                                  add_generation_prompt=False) != ids[0]


def test_rl_step_makes_the_shared_update_and_logs_its_learning_rate():
    """The rl kind's minibatch updates are step.step's apply_gradients: the same params as a hand-written optax loop,
    and the metrics carry lr (the mean rate of the chunk's updates, here the warmup ramp 0 -> 1e-2 -> 2e-2)."""
    params = {"w": jnp.arange(4.0, dtype=jnp.float32)}

    def loss_fn(p, frozen, mb):
        return jnp.mean((mb["advantages"] * p["w"]) ** 2), {}

    optimizer = make_optimizer(OptimConfig(learning_rate=3e-2, warmup_steps=3, schedule="constant",
                                           weight_decay=0.0), 10, params)
    state = create_state(params, optimizer, jax.random.key(0))
    batch = {k: jnp.ones((4, 4), jnp.float32) for k in rlaif.TRAIN_KEYS}
    batch["advantages"] = jnp.arange(16.0, dtype=jnp.float32).reshape(4, 4) / 16
    new, metrics = jax.jit(rlaif.make_rl_step(loss_fn, optimizer, epochs=1, minibatch_size=2))(state, batch)
    np.testing.assert_allclose(float(metrics["lr"]), (0.0 + 1e-2) / 2, rtol=1e-6)

    rng, key = jax.random.split(state.rng)  # the same minibatch order, then plain optax updates
    order = jax.random.permutation(jax.random.split(key, 1)[0], 4).reshape(2, 2)
    p, opt_state = params, state.opt_state
    for idx in order:
        mb = {k: v[idx] for k, v in batch.items()}
        grads = jax.grad(lambda q: loss_fn(q, None, mb)[0])(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_array_equal(np.asarray(new.params["w"]), np.asarray(p["w"]))


def test_group_rollouts_share_each_prompts_prefill_and_sample_as_before(monkeypatch):
    """generate_replies on a rollout chunk with repeat=G (a GRPO/RLOO chunk: each prompt G times in a row), in calls
    of 4 rows: each call prefills its 2 distinct prompts once; the replies equal those of repeat=1 (every row
    prefilled), same key."""
    from starling_jax import models
    from starling_jax.data import load_tokenizer
    from starling_jax.generation.replies import generate_replies

    tok = load_tokenizer("openchat-3.5")
    config = models.get_preset("tiny")
    params = models.init_params(config, jax.random.key(0))
    convs = [[{"role": "user", "content": c}] for c in ("Say hi.", "Count to three.", "Name a colour.", "Why?")]
    t = tok.template("auto")
    from starling_jax.generation import sampling
    tokens, mask = sampling.left_pad([tok.encode_chat(c, template=t) for c in convs], tok.pad_id, 16)
    G = 2
    tokens, mask = np.repeat(tokens, G, axis=0), np.repeat(mask, G, axis=0)
    run = lambda group: generate_replies(params, config, tok, "auto", (tokens, mask), jax.random.key(5), 6,
                                         batch_size=4, repeat=group)
    seen = []
    real = sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda *a, **kw: seen.append((len(a[2]), kw["rows"])) or real(*a, **kw))
    shared = run(G)
    assert [(n, list(r)) for n, r in seen] == [(2, [0, 0, 1, 1])] * 2  # 2 calls of 2 prompts for 4 rows
    plain = run(1)
    assert seen[2:] == [(4, None)] * 2
    np.testing.assert_array_equal(shared.tokens, plain.tokens)
    np.testing.assert_array_equal(shared.mask, plain.mask)
    assert shared.texts == plain.texts and len(shared.texts) == 8
