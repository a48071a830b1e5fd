"""Correctness defects of issue 12, each with a test that fails without its fix: split_params(top_layers=0) trains
every layer; RL log-probs come from the distribution actually sampled; identical Nectar answers are one response;
reward clip -> moments -> scale order; the fork's multi-turn reward-model text; Plackett-Luce normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compiled
from starling_jax import algorithms, models
from starling_jax.step import hydra, losses

CFG = models.PRESETS["tiny"].replace(num_layers=3, vocab_size=300, pad_token_id=0, eos_token_id=2)


@pytest.fixture(scope="module")
def params():
    return models.init_params(CFG, jax.random.key(0))


# ---------------------------------------------------------------------------------------------------------------------
# 9. split_params(top_layers=0) means all layers, with or without the head.

@pytest.mark.parametrize("train_head", [True, False])
def test_split_params_zero_means_all_layers(params, train_head):
    trainable, frozen = models.split_params(params, 0, train_head)
    assert trainable["layers"]["wq"].shape[0] == CFG.num_layers
    assert "layers" not in frozen
    assert ("lm_head" in trainable) == train_head and ("lm_head" in frozen) != train_head
    # same split as naming every layer explicitly
    t_all, f_all = models.split_params(params, CFG.num_layers, train_head)
    assert jax.tree.structure(trainable) == jax.tree.structure(t_all)
    assert jax.tree.structure(frozen) == jax.tree.structure(f_all)
    merged = models.merge_params(trainable, frozen)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the split forward equals the full one (the trunk is just the embedding)
    tokens = jnp.array([[5, 6, 7, 8]], jnp.int32)
    mask = jnp.ones_like(tokens)
    np.testing.assert_allclose(losses.hidden(trainable, frozen, CFG, tokens, mask),
                               models.hidden_states(params, CFG, tokens, mask), atol=1e-6)


def test_hydra_zero_top_layers_with_frozen_head_trains_every_layer(params):
    trainable, frozen = hydra.init_rl_params(params, CFG, jax.random.key(1), 0, train_head=False)
    assert trainable["policy"]["layers"]["wq"].shape[0] == CFG.num_layers
    assert "layers" not in frozen["trunk"] and "lm_head" in frozen["trunk"]
    tokens = jnp.array([[0, 5, 6, 7, 8, 9]], jnp.int32)
    mask = jnp.array([[0, 1, 1, 1, 1, 1]], jnp.int32)
    out = jax.jit(hydra.hydra_forward, static_argnums=(2, 5))(trainable, frozen, CFG, tokens, mask, 3)
    logits = compiled.forward(params, CFG, tokens, mask)
    want = models.token_logprobs(logits[:, 2:5], tokens[:, 3:])
    np.testing.assert_allclose(out["logprobs"], want, atol=2e-5)
    np.testing.assert_allclose(out["ref_logprobs"], want, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Reward clip -> running moments of the clipped scores -> divide (trlx's order), never clip after dividing.

def test_scale_scores_clips_first_then_moments_then_divides():
    from starling_jax.objectives import kl as obj_kl
    from starling_jax.stages.rollout import scale_scores
    m0 = {k: float(v) for k, v in obj_kl.running_moments_init().items()}
    raw1 = np.array([30.0, -25.0, 1.0, 2.0], np.float32)
    raw2 = np.array([0.5, 12.0, -3.0, 40.0], np.float32)
    s1, m1 = scale_scores(raw1, m0, 10.0, True)
    s2, m2 = scale_scores(raw2, m1, 10.0, True)
    # independent: the clipped scores seen so far, their sample std (Bessel, trlx RunningMoments.std)
    seen1 = np.clip(raw1, -10, 10)
    seen2 = np.concatenate([seen1, np.clip(raw2, -10, 10)])
    np.testing.assert_allclose(s1, seen1 / np.std(seen1, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(s2, np.clip(raw2, -10, 10) / np.std(seen2, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(m2["mean"], seen2.mean(), rtol=1e-5)
    # with a small std the scaled scores exceed the clip: trlx does not clip again
    s3, _ = scale_scores(np.array([10.0, 9.9], np.float32), m0, 10.0, True)
    assert np.abs(s3).max() > 10.0
    s4, _ = scale_scores(raw1, m0, 10.0, False)
    np.testing.assert_allclose(s4, seen1)


# ---------------------------------------------------------------------------------------------------------------------
# 7. Plackett-Luce normalised by the K-1 choice terms (the authors' pl_loss) as an option.

def test_plackett_luce_normalize_divides_each_prompt_by_k_minus_1():
    from starling_jax.objectives import reward as obj_reward
    rewards = jnp.array([[0.3, -1.0, 2.0, 0.5], [1.0, 0.2, 9.0, 9.0]], jnp.float32)
    ranks = jnp.array([[2, 1, 4, 3], [1, 2, 3, 4]], jnp.int32)
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]], jnp.int32)

    def nll(r, order):  # independent loop: -sum_j [r_j - log sum_{k >= j} exp r_k]
        r = np.asarray(r, np.float64)[order]
        return -sum(r[j] - np.log(np.exp(r[j:]).sum()) for j in range(len(r)))

    n0 = nll(rewards[0], [1, 0, 3, 2])
    n1 = nll(rewards[1, :3], [0, 1, 2])
    got_sum = float(obj_reward.plackett_luce_loss(rewards, ranks, mask))
    got_mean = float(obj_reward.plackett_luce_loss(rewards, ranks, mask, normalize=True))
    np.testing.assert_allclose(got_sum, (n0 + n1) / 2, rtol=1e-5)
    np.testing.assert_allclose(got_mean, (n0 / 3 + n1 / 2) / 2, rtol=1e-5)


def test_rm_stage_loss_reads_pl_normalize():
    from starling_jax.algorithms import options
    from starling_jax.step import losses
    cfg = CFG.replace(head="score")
    p = models.init_params(cfg, jax.random.PRNGKey(3))
    K, T = 3, 6
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, K, T), 3, cfg.vocab_size)
    batch = {"tokens": tokens, "attention_mask": jnp.ones((2, K, T), jnp.int32),
             "ranks": jnp.array([[1, 2, 3], [3, 1, 2]], jnp.int32), "response_mask": jnp.ones((2, K), jnp.int32)}
    out = {}
    for norm in (False, True):
        fn = algorithms.build_loss(options("rm_plackett_luce", pl_normalize=norm), cfg)
        out[norm] = float(fn(p, {}, batch, jax.random.PRNGKey(0))[0])
    np.testing.assert_allclose(out[True], out[False] / (K - 1), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 10. RL is on-policy for every accepted sampling setting: the update's log-probs are those of the distribution the
# sampler drew from (temperature), and filtered sampling (top-k / top-p) is rejected for RL stages.

@pytest.mark.slow  # 104 s at load ~22 here
def test_rl_logprobs_are_those_of_the_tempered_sampling_distribution(params):
    from starling_jax.generation import sampling
    from starling_jax.algorithms import options
    from starling_jax.stages.kinds import rlaif
    T, P, N = 0.6, 4, 6
    prompt = jnp.array([[0, 0, 5, 6], [7, 8, 9, 10]], jnp.int32)
    pmask = (prompt > 0).astype(jnp.int32)
    trainable, frozen = hydra.init_rl_params(params, CFG, jax.random.PRNGKey(1), 1)
    toks, mask, _ = sampling.generate(hydra.policy_params(trainable, frozen), CFG, prompt, pmask,
                                      jax.random.PRNGKey(5), N, temperature=T, stop_ids=())
    tokens = jnp.concatenate([prompt, toks], axis=1)
    attn = jnp.concatenate([pmask, mask], axis=1)
    # independent: the sampler's distribution at each step is softmax(logits / T) of the full model
    logits = compiled.forward(params, CFG, tokens, attn)[:, P - 1:P + N - 1] / T
    want = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    want = np.take_along_axis(want, np.asarray(toks)[..., None], axis=-1)[..., 0] * np.asarray(mask)
    obj = options("apa", apa_lambda=1.0)
    exp_fn, loss_fn = rlaif.build_rl_functions(CFG, obj, P, temperature=T)
    scores = jnp.zeros((2,), jnp.float32)
    exp = exp_fn(trainable, frozen, tokens, attn, mask, scores, jnp.float32(0.1))
    np.testing.assert_allclose(np.asarray(exp["old_logprobs"]) * np.asarray(mask), want, atol=2e-5)
    np.testing.assert_allclose(np.asarray(exp["ref_logprobs"]) * np.asarray(mask), want, atol=2e-5)
    # the training pass sees the same distribution: at the rollout's params the ratio is exactly 1
    batch = {"tokens": tokens, "attention_mask": attn, "response_mask": mask, "old_logprobs": exp["old_logprobs"],
             "old_values": exp["old_values"], "advantages": jnp.zeros_like(exp["advantages"]),
             "returns": exp["old_values"]}
    _, metrics = jax.jit(loss_fn)(trainable, frozen, batch)
    assert abs(float(metrics["log_ratio"])) < 1e-6


@pytest.mark.parametrize("override,field", [("stages.policy.rollout.top_k=5", "rollout.top_k"),
                                            ("stages.policy.rollout.top_p=0.9", "rollout.top_p")])
def test_rl_stage_rejects_filtered_sampling(override, field):
    from starling_jax.config import ConfigError
    from starling_jax.stages.experiment import apply_overrides, load_experiment
    from starling_jax.stages.validation import validate
    exp = apply_overrides(load_experiment("tiny_ppo"), [override])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ".*on-policy"):
        validate(exp)
    validate(apply_overrides(load_experiment("tiny_ppo"), ["stages.policy.rollout.temperature=0.7"]))  # temperature is fine


# ---------------------------------------------------------------------------------------------------------------------
# 5. The reward model's text for a multi-turn conversation, as the fork's from_openchat_to_llama builds it: each turn
# stripped, "[INST] u [/INST] a</s>" turns joined by one space (thwu1/trlx examples/hh/utils.py at 0fb4e1e).

def test_llama2_trainer_joins_stripped_turns_like_the_fork():
    from starling_jax.data.templates import jinja_template, render_text
    conv = [{"role": "user", "content": " Hi there \n"}, {"role": "assistant", "content": "\nHello! "},
            {"role": "user", "content": "More?"}, {"role": "assistant", "content": "  Sure.\n\n"}]
    want = "[INST] Hi there [/INST] Hello!</s> [INST] More? [/INST] Sure.</s>"
    assert render_text(conv, "llama2_trainer", add_generation_prompt=False) == want
    assert render_text(conv[:3], "llama2_trainer") == "[INST] Hi there [/INST] Hello!</s> [INST] More? [/INST]"
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment()
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
    text = env.from_string(jinja_template("llama2_trainer")).render(messages=conv, bos_token="<s>",
                                                                    add_generation_prompt=False)
    assert text == "<s>" + want


# ---------------------------------------------------------------------------------------------------------------------
# 11. Identical Nectar answers are one response (kept at the best rank), counted in the data summary.

def _nectar_row(texts_ranks, utilities=None):
    row = {"prompt": "\n\nHuman: Say hi\n\nAssistant: ",
           "answers": [{"answer": t, "model": f"m{k}", "rank": r} for k, (t, r) in enumerate(texts_ranks)]}
    if utilities is not None:
        row["utilities"] = utilities
    return row


def test_identical_answers_are_one_response_and_counted():
    from starling_jax.data.nectar import NectarError, parse_rows
    padded = _nectar_row([("Hi!", 3.0), ("Hello.", 1.0), ("Hi!", 2.0), ("I can't help.", 5.0), ("Hello.", 4.0),
                          ("Hey", 6.0), ("I can't help.", 7.0)], utilities=[0, 1, 2, 3, 4, 5, 6])
    parsed_rows, report = parse_rows([padded, _nectar_row([("a", 1.0), ("b", 2.0)])])
    parsed = parsed_rows[0]
    # each text once, at its best rank; the order of the row kept
    assert parsed["responses"] == ["Hello.", "Hi!", "I can't help.", "Hey"]
    assert parsed["raw_ranks"] == [1.0, 2.0, 5.0, 6.0] and parsed["ranks"] == [1, 2, 3, 4]
    assert parsed["models"] == ["m1", "m2", "m3", "m5"] and parsed["utilities"] == [1.0, 2.0, 3.0, 5.0]
    # no pair of the ranking compares a text with itself
    texts = parsed["responses"]
    assert len(set(texts)) == len(texts)
    assert report.duplicate_answers == 3 and report.rows_with_duplicates == 1
    assert "identical answers merged 3 (in 1 rows" in report.summary()
    # equal ranks: the earlier copy is kept
    [tie], _ = parse_rows([_nectar_row([("x", 1.0), ("y", 2.0), ("y", 2.0)])])
    assert tie["responses"] == ["x", "y"] and tie["models"] == ["m0", "m1"]
    # nothing left to rank: a bad row, named, or skipped and counted
    only_one = _nectar_row([("same", 1.0), ("same ", 2.0)])
    with pytest.raises(NectarError, match="only 1 distinct"):
        parse_rows([only_one])
    kept, report = parse_rows([only_one], on_bad_row="skip")
    assert kept == [] and report.skipped == {"identical_answers": 1}


# ---------------------------------------------------------------------------------------------------------------------
# 6. The reward model's template travels with its export: chaining our RM into an RL stage feeds it the template
# (and tokenizer) it was trained with, whatever the rl config's reward_model section says.

def test_reward_model_uses_the_template_it_was_trained_with(tmp_path):
    import dataclasses
    import json
    from starling_jax.stages.experiment import load_experiment
    from starling_jax.data.templates import jinja_template
    from starling_jax.stages.rollout import trained_reward_template
    exp = load_experiment("tiny_starling")  # rm stage: mistral-7b-v0.1 tokenizer, "llama2" template
    section = dataclasses.replace(exp.reward_model, template="llama2_trainer", tokenizer="openchat-3.5")
    template, tokenizer, note = trained_reward_template(exp, section)
    assert (template, tokenizer) == ("llama2", "mistral-7b-v0.1")
    assert "'llama2'" in note and "'llama2_trainer'" in note and "stage 'rm'" in note
    assert trained_reward_template(exp, exp.reward_model) == ("llama2", "mistral-7b-v0.1", None)
    # an HF export carries its template as Jinja (convert writes jinja_template of the stage's template)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": jinja_template("chatml")}))
    hf_section = dataclasses.replace(exp.reward_model, path=str(tmp_path), template="llama2")
    assert trained_reward_template(exp, hf_section)[0] == "chatml"
    # a checkpoint without a recognisable template keeps the configured one
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert trained_reward_template(exp, hf_section) == ("llama2", hf_section.tokenizer, None)
