"""Generation over the KV cache against independent references: transformers' generate/forward on tiny random
Mistral and Llama models (weights converted by hand here), numpy formulas for top-k/top-p, and sample frequencies."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from starling_jax import models
from starling_jax.generation.sampling import (apply_stop_strings, choose_tokens, decode_logits, filter_logits, generate,
                                   greedy_tokens, split_layers, stream)

V, D, L, H, K, E, F = 97, 32, 2, 4, 2, 8, 64
WINDOW = 6
P, N = 9, 12  # one prompt/generation shape (batch 3) for the windowed tests, so their compilations are shared
SAMPLED = dict(temperature=1.3, top_k=20, top_p=0.95)


def _hf_model(window, arch="mistral", seed=0):
    kw = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
              num_key_value_heads=K, head_dim=E, max_position_embeddings=128, rms_norm_eps=1e-5,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              initializer_range=0.3)  # peaked distributions: no near-ties for greedy decoding to split on
    if arch == "mistral":
        model = transformers.MistralForCausalLM
        hc = transformers.MistralConfig(sliding_window=window, **kw)
    else:
        model = transformers.LlamaForCausalLM
        hc = transformers.LlamaConfig(**kw)
    torch.manual_seed(seed)
    return model(hc).eval()


def _params_from_hf(hf):
    """HF Linear weights are [out, in]; ours are [in, out] with heads split out."""
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}

    def stack(name, f=lambda w: w):
        return jnp.asarray(np.stack([f(sd[f"model.layers.{i}.{name}"]) for i in range(L)]))

    return {
        "embed": jnp.asarray(sd["model.embed_tokens.weight"]),
        "final_norm": jnp.asarray(sd["model.norm.weight"]),
        "lm_head": jnp.asarray(sd["lm_head.weight"].T),
        "layers": {
            "attn_norm": stack("input_layernorm.weight"),
            "mlp_norm": stack("post_attention_layernorm.weight"),
            "wq": stack("self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, E)),
            "wk": stack("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, E)),
            "wv": stack("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, E)),
            "wo": stack("self_attn.o_proj.weight", lambda w: w.T.reshape(H, E, D)),
            "w_gate": stack("mlp.gate_proj.weight", lambda w: w.T),
            "w_up": stack("mlp.up_proj.weight", lambda w: w.T),
            "w_down": stack("mlp.down_proj.weight", lambda w: w.T),
        },
    }


def _config(window):
    return models.ModelConfig(vocab_size=V, hidden_size=D, num_layers=L, num_heads=H, num_kv_heads=K, head_dim=E,
                              mlp_dim=F, sliding_window=window, max_seq_len=128, pad_token_id=0)


def _prompts(lens, P, seed=0):
    """Left-padded random prompts [B, P] (ids >= 3, so never pad/bos/eos)."""
    rng = np.random.default_rng(seed)
    toks, mask = np.zeros((len(lens), P), np.int32), np.zeros((len(lens), P), np.int32)
    for b, n in enumerate(lens):
        toks[b, P - n:] = rng.integers(3, V, n)
        mask[b, P - n:] = 1
    return toks, mask


@pytest.fixture(scope="module")
def windowed():
    hf = _hf_model(WINDOW)
    return hf, _params_from_hf(hf), _config(WINDOW)


def _hf_greedy(hf, toks, mask, n):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(toks, dtype=torch.long), attention_mask=torch.tensor(mask),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[:, toks.shape[1]:].numpy()


def _hf_logprobs(hf, prompt, generated):
    """log p(generated[t] | prompt, generated[:t]) from one HF forward over the unpadded sequence."""
    seq = torch.tensor([list(prompt) + list(generated)], dtype=torch.long)
    with torch.no_grad():
        logp = torch.log_softmax(hf(input_ids=seq).logits[0].double(), -1).numpy()
    idx = np.arange(len(prompt) - 1, seq.shape[1] - 1)
    return logp[idx, np.asarray(generated)]


def test_greedy_matches_transformers_rolling_window(windowed):
    """Prompts longer than the window (prefill bigger than the rolling buffer), shorter ones that wrap it while
    decoding, left padding of different lengths: all equal HF's batched greedy generate and each row alone."""
    hf, params, config = windowed
    lens = [9, 4, 1]
    toks, mask = _prompts(lens, P)
    assert models.cache_slots(config, P + N) == WINDOW
    out, out_mask, _ = generate(params, config, toks, mask, jax.random.key(0), N, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out), _hf_greedy(hf, toks, mask, N))
    assert np.asarray(out_mask).all()
    for b, n in enumerate(lens):
        row = toks[b:b + 1, P - n:]
        np.testing.assert_array_equal(np.asarray(out[b]), _hf_greedy(hf, row, np.ones_like(row), N)[0])


def test_greedy_matches_transformers_llama_no_window():
    hf = _hf_model(None, arch="llama", seed=1)
    params, config = _params_from_hf(hf), _config(None)
    N, P = 10, 8
    toks, mask = _prompts([8, 3, 5], P, seed=1)
    assert models.cache_slots(config, P + N) == P + N
    out, _, _ = generate(params, config, toks, mask, jax.random.key(0), N, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out), _hf_greedy(hf, toks, mask, N))


def test_sampled_logprobs_equal_transformers_forward(windowed):
    """Sampled (tempered, top-k, top-p) tokens; returned log-probs are the untempered model's, per HF's forward."""
    hf, params, config = windowed
    lens = [9, 2, 6]
    toks, mask = _prompts(lens, P, seed=2)
    out, out_mask, logprobs = generate(params, config, toks, mask, jax.random.key(3), N, **SAMPLED)
    out, out_mask, logprobs = map(np.asarray, (out, out_mask, logprobs))
    assert out_mask.all()
    greedy, _, _ = generate(params, config, toks, mask, jax.random.key(3), N, temperature=0.0)
    assert (out != np.asarray(greedy)).any()  # really sampled
    for b, n in enumerate(lens):
        ref = _hf_logprobs(hf, toks[b, P - n:], out[b])
        np.testing.assert_allclose(logprobs[b], ref, atol=2e-5, rtol=0)


def test_logprobs_equal_own_forward_over_padded_batch(windowed):
    """The same identity through models.forward over the left-padded prompt + generation, as the RL stage uses it."""
    _, params, config = windowed
    toks, mask = _prompts([9, 5, 3], P, seed=3)
    out, out_mask, logprobs = generate(params, config, toks, mask, jax.random.key(4), N, **SAMPLED)
    seq = jnp.concatenate([toks, out], axis=1)
    seq_mask = jnp.concatenate([mask, out_mask], axis=1)
    ref = models.token_logprobs(models.forward(params, config, seq, seq_mask)[:, P - 1:-1], seq[:, P:])
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(ref), atol=2e-5)


def test_stop_ids_end_rows(windowed):
    _, params, config = windowed
    toks, mask = _prompts([9, 4, 7], P, seed=4)
    free, _, free_lp = map(np.asarray, generate(params, config, toks, mask, jax.random.key(0), N, temperature=0.0))
    stop = int(free[0, 3])
    out, out_mask, lp = map(np.asarray, generate(params, config, toks, mask, jax.random.key(0), N,
                                                 temperature=0.0, stop_ids=(stop, V - 1)))
    for b in range(3):
        hits = np.flatnonzero(np.isin(free[b], (stop, V - 1)))
        end = hits[0] + 1 if hits.size else N  # the stop token is kept (mask 1)
        np.testing.assert_array_equal(out[b, :end], free[b, :end])
        np.testing.assert_array_equal(out_mask[b], np.arange(N) < end)
        np.testing.assert_allclose(lp[b, :end], free_lp[b, :end], atol=1e-6)
        assert (out[b, end:] == config.pad_token_id).all() and (lp[b, end:] == 0).all()
    assert out_mask[0].sum() <= 4


def test_stream_equals_generate(windowed):
    _, params, config = windowed
    toks, mask = _prompts([9, 3, 5], P, seed=5)
    args = SAMPLED
    ref = generate(params, config, toks, mask, jax.random.key(7), N, **args)
    stop = int(np.asarray(ref[0])[1, 4])
    ref = [np.asarray(a) for a in generate(params, config, toks, mask, jax.random.key(7), N, stop_ids=(stop,),
                                           **args)]
    steps = list(stream(params, config, toks, mask, jax.random.key(7), N, stop_ids=(stop,), **args))
    got = [np.stack(s, axis=1) for s in zip(*steps)]
    n = len(steps)
    assert n == ref[1].sum(axis=1).max()  # stops once all rows have
    np.testing.assert_array_equal(got[0], ref[0][:, :n])
    np.testing.assert_array_equal(got[1], ref[1][:, :n])
    np.testing.assert_allclose(got[2], ref[2][:, :n], atol=1e-5)


def _numpy_filter(logits, top_k, top_p):
    """HF's warpers: TopK (keep logits >= k-th largest), then TopP on the renormalised survivors."""
    keep = np.ones_like(logits, bool)
    if 0 < top_k < len(logits):
        keep &= logits >= np.sort(logits)[::-1][top_k - 1]
    if top_p < 1:
        order = np.argsort(-np.where(keep, logits, -np.inf), kind="stable")
        p = np.exp(logits[order] - logits.max()) * keep[order]
        p /= p.sum()
        before = np.cumsum(p) - p
        kept_p = np.zeros_like(keep)
        kept_p[order] = before < top_p
        keep &= kept_p
    return keep


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (0, 0.9), (7, 0.6), (1, 1.0), (0, 1e-6), (200, 0.99)])
def test_filter_logits_matches_numpy(top_k, top_p):
    logits = np.random.default_rng(top_k).normal(0, 2, (6, 50)).astype(np.float32)
    got = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), top_k, None if top_p == 1 else top_p)))
    for b in range(6):
        np.testing.assert_array_equal(got[b], _numpy_filter(logits[b].astype(np.float64), top_k, top_p))


@pytest.mark.parametrize("top_k,top_p,temperature", [(4, 1.0, 1.0), (0, 0.7, 1.0), (6, 0.8, 0.7)])
def test_sample_frequencies(top_k, top_p, temperature):
    """20000 draws: never outside the filtered support, and each token's frequency within 5 standard errors of its
    renormalised probability (a fixed key, so deterministic; a wrong support or temperature misses by far more)."""
    n = 20000
    logits = np.random.default_rng(9).normal(0, 1.5, 12)
    keep = _numpy_filter(logits / temperature, top_k, top_p)
    p = np.where(keep, np.exp(logits / temperature), 0)
    p /= p.sum()
    tokens, logprobs = choose_tokens(jnp.asarray(np.tile(logits, (n, 1)), jnp.float32), jax.random.key(0),
                                     temperature, top_k, None if top_p == 1 else top_p)
    tokens = np.asarray(tokens)
    assert keep[tokens].all()
    freq = np.bincount(tokens, minlength=12) / n
    bound = 5 * np.sqrt(p * (1 - p) / n) + 1e-3
    assert (np.abs(freq - p) <= bound).all(), (freq, p)
    # log-probs are the untempered, unfiltered distribution's
    full = logits - np.log(np.exp(logits).sum())
    np.testing.assert_allclose(np.asarray(logprobs), full[tokens], atol=1e-5)


def test_top_k_restricts_generation(windowed):
    """Through the whole loop: each sampled token is among the top-k of the model's logits at its step."""
    _, params, config = windowed
    toks, mask = _prompts([9, 6, 2], P, seed=6)
    out, _, _ = generate(params, config, toks, mask, jax.random.key(1), N, temperature=2.0, top_k=3)
    seq = jnp.concatenate([toks, out], axis=1)
    logits = np.asarray(models.forward(params, config, seq, jnp.concatenate([mask, jnp.ones_like(out)], 1)))
    logits = logits[:, P - 1:-1]
    rank = (logits > np.take_along_axis(logits, np.asarray(out)[..., None], -1)).sum(-1)
    assert (rank < 3).all()
    assert (rank > 0).any()  # temperature 2 really leaves the argmax


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = jnp.asarray(np.random.default_rng(0).normal(0, 1, (64, 40)), jnp.float32)
    greedy = np.asarray(jnp.argmax(logits, -1))
    for k, p in [(1, None), (0, 1e-6), (1, 0.5)]:
        np.testing.assert_array_equal(np.asarray(choose_tokens(logits, jax.random.key(k), 3.0, k, p)[0]), greedy)


def test_greedy_tokens_is_argmax_with_its_tie_rule():
    """greedy_tokens (max, then the first index holding it) against numpy's argmax, ties included, and the greedy
    choose_tokens' log-prob against the direct formula."""
    rng = np.random.default_rng(3)
    logits = rng.integers(-3, 4, (64, 40)).astype(np.float32)  # small integers: many rows with tied maxima
    logits[0] = 2.0  # a row that is all one value: index 0
    tokens, best = greedy_tokens(jnp.asarray(logits))
    np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))
    np.testing.assert_array_equal(np.asarray(best), logits.max(-1))
    tok, lp = choose_tokens(jnp.asarray(logits), jax.random.key(0), 1.0, greedy=True)
    full = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(lp), full[np.arange(64), logits.argmax(-1)], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tied,head_vd", [(False, True), (False, False), (True, True)])
def test_decode_logits_equal_lm_logits(tied, head_vd):
    """The decode loop's head (split_layers' [V, D] copy of an untied head, or the tied embedding) gives
    models.lm_logits' values."""
    config = models.ModelConfig(vocab_size=V, hidden_size=D, num_layers=L, num_heads=H, num_kv_heads=K, head_dim=E,
                                mlp_dim=F, tie_embeddings=tied)
    params = models.init_params(config, jax.random.key(0))
    h = jax.random.normal(jax.random.key(1), (3, D))
    step_params = split_layers(params, head_vd)
    assert ("lm_head_vd" in step_params) == (head_vd and not tied)
    np.testing.assert_allclose(np.asarray(decode_logits(step_params, config, h)),
                               np.asarray(models.lm_logits(params, config, h)), rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors(windowed):
    _, params, config = windowed
    toks, mask = _prompts([3, 5], 6)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"rows \[0\] are not left padded"):
        generate(params, config, toks, np.array([[1, 1, 1, 0, 0, 0], mask[1]]), key, 4)
    with pytest.raises(ValueError, match=r"prompt rows \[1\] have no tokens"):
        generate(params, config, toks, np.array([mask[0], np.zeros(6, np.int32)]), key, 4)
    with pytest.raises(ValueError, match=r"\(2, 6\) and prompt_mask \(2, 5\)"):
        generate(params, config, toks, mask[:, 1:], key, 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(params, config, np.where(mask > 0, V, 0), mask, key, 4)
    with pytest.raises(ValueError, match="top_p"):
        generate(params, config, toks, mask, key, 4, top_p=0.0)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 128"):
        generate(params, config, toks, mask, key, 123)


class _CharTokenizer:
    """One token per character: ids are code points."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_apply_stop_strings():
    rows = ["Hi there GPT4 Correct User: more", "no stop here", "ab<STOP>c GPT4 Correct User:"]
    N = max(map(len, rows)) + 2
    tokens, mask = np.zeros((3, N), np.int32), np.zeros((3, N), np.int32)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = [ord(c) for c in r]
        mask[b, :len(r)] = 1
    texts, new_mask = apply_stop_strings(_CharTokenizer(), tokens, mask, ["GPT4 Correct User:", "<STOP>"])
    assert texts == ["Hi there ", "no stop here", "ab"]
    assert new_mask[0].sum() == len("Hi there GPT4 Correct User:")  # the stop string's tokens stay in the mask
    np.testing.assert_array_equal(new_mask[1], mask[1])
    assert new_mask[2].sum() == len("ab<STOP>")


# ----------------------------------------------------------------------------------------------------------------------
# generate / chat CLI on a tiny HF checkpoint with the OpenChat tokenizer.


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = transformers.MistralConfig(vocab_size=32002, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=16,
                                     max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
                                     eos_token_id=32000, pad_token_id=32000, initializer_range=0.5)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(cfg).eval()
    path = str(tmp_path_factory.mktemp("hf_tiny"))
    model.save_pretrained(path)
    return path, model


def _hf_reply(model, tokenizer, prompt, n):
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=n, eos_token_id=32000,
                             pad_token_id=32000)[0, len(ids):].tolist()
    if 32000 in out:
        out = out[:out.index(32000)]
    text = tokenizer.decode(out)
    for s in ("GPT4 Correct User:", "GPT4 Correct Assistant:"):
        text = text.split(s)[0]
    return text.strip()


def test_generate_cli_matches_transformers(hf_dir, capsys):
    from starling_jax.commands.cli import main
    from starling_jax.data import load_tokenizer

    path, model = hf_dir
    prompts = ["Hello there", "What is 2+2? Answer briefly."]
    assert main(["generate", path, "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "8",
                 "--temperature", "0", "--json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tok = load_tokenizer("openchat-3.5")
    assert [g["prompt"] for g in got] == prompts
    assert [g["reply"] for g in got] == [_hf_reply(model, tok, p, 8) for p in prompts]


def test_chat_cli_streams_the_same_reply(hf_dir):
    import argparse
    import io

    from starling_jax.commands import chat
    from starling_jax.data import load_tokenizer

    path, model = hf_dir
    parser = argparse.ArgumentParser()
    chat.add_chat_arguments(parser)
    args = parser.parse_args([path, "--max-new-tokens", "8", "--temperature", "0"])
    lines = iter(["Hello there", "/reset", "What is 2+2? Answer briefly.", "/exit"])
    out = io.StringIO()
    assert chat.chat_cli(args, input_fn=lambda _: next(lines), out=out) == 0
    replies = [line[len("Assistant: "):] for line in out.getvalue().splitlines() if line.startswith("Assistant: ")]
    tok = load_tokenizer("openchat-3.5")
    assert replies == [_hf_reply(model, tok, "Hello there", 8), _hf_reply(model, tok, "What is 2+2? Answer briefly.", 8)]


def test_printable_prefix_holds_back_partial_stops():
    from starling_jax.commands.chat import printable_prefix

    stops = ["GPT4 Correct User:"]
    assert printable_prefix("Sure, here", stops) == len("Sure, here")
    assert printable_prefix("Sure. GPT4 Cor", stops) == len("Sure. ")
    assert printable_prefix("caf\ufffd", stops) == 3


def test_load_checkpoint_from_stage_export(tmp_path, windowed):
    from starling_jax.commands.chat import load_checkpoint
    from starling_jax.step.checkpoint import save_export

    _, params, config = windowed
    save_export(str(tmp_path / "sft" / "export"), config, params, {"loss": 1.0})
    (tmp_path / "config.json").write_text("{}")  # a run's WORKDIR holds the experiment's config.json: not a HF dir
    for where, stage in [(tmp_path, None), (tmp_path, "sft"), (tmp_path / "sft", None), (tmp_path / "sft" / "export", None)]:
        got_config, got, tok = load_checkpoint(str(where), stage)
        assert got_config == config and tok is None
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face directory"):
        load_checkpoint(str(tmp_path / "sft"), "rm")


@pytest.mark.parametrize("window,chunk", [(6, 4), (6, 1), (None, 5)])
def test_cache_chunked_writes_equal_forward(window, chunk):
    """models.run_layers with a cache, fed in chunks (rolling buffer of `window` slots, wrapping mid-chunk), gives the
    hidden states of one forward pass over the whole left-padded batch."""
    config = models.get_preset("tiny").replace(vocab_size=V, sliding_window=window, init_std=0.3)
    params = models.init_params(config, jax.random.key(0))
    toks, mask = _prompts([15, 8, 3], 15, seed=7)
    ref = jax.jit(models.hidden_states, static_argnums=1)(params, config, toks, mask)
    cache = models.init_cache(config, 3, models.cache_slots(config, 15))

    @jax.jit  # one compile per chunk shape, every chunk of that shape reuses it
    def chunk_step(params, cache, toks, mask):
        x = models.embed_tokens(params, config, toks)
        x, cache = models.run_layers(params["layers"], config, x, mask, cache)
        return models.final_norm(params, config, x), cache

    outs = []
    for s in range(0, 15, chunk):
        x, cache = chunk_step(params, cache, toks[:, s:s + chunk], mask[:, s:s + chunk])
        outs.append(x)
    got = jnp.concatenate(outs, axis=1)
    np.testing.assert_allclose(np.asarray(got)[mask > 0], np.asarray(ref)[mask > 0], atol=2e-5)


@pytest.mark.parametrize("window", [6, None])
def test_decode_layers_fused_equal_forward(window):
    """The decode step's form (sampling.split_layers: one dict per layer with q/k/v and gate/up fused by
    models.fuse_projections; models.decode_layers over per-layer caches, no scan), fed one token at a time through a
    rolling buffer that wraps, gives the hidden states of one forward pass over the left-padded batch."""
    config = models.get_preset("tiny").replace(vocab_size=V, sliding_window=window, init_std=0.3)
    params = models.init_params(config, jax.random.key(0))
    step_params = split_layers(params)
    assert {"wqkv", "w_gate_up"} <= set(step_params["layers"][0]) and "wq" not in step_params["layers"][0]
    toks, mask = _prompts([15, 8, 3], 15, seed=7)
    ref = models.hidden_states(params, config, toks, mask)
    cache = models.init_cache(config, 3, models.cache_slots(config, 15))
    cache = {**cache, "k": tuple(cache["k"][l:l + 1] for l in range(config.num_layers)),
             "v": tuple(cache["v"][l:l + 1] for l in range(config.num_layers))}
    step = jax.jit(lambda p, c, t, m: models.decode_layers(p["layers"], config, models.embed_tokens(p, config, t),
                                                           m, c))
    outs = []
    for s in range(15):
        x, cache = step(step_params, cache, toks[:, s:s + 1], mask[:, s:s + 1])
        outs.append(models.final_norm(params, config, x))
    got = jnp.concatenate(outs, axis=1)
    np.testing.assert_allclose(np.asarray(got)[mask > 0], np.asarray(ref)[mask > 0], atol=2e-5)


def test_prefix_shared_sampling_equals_repeated_prefill(windowed):
    """rows=: each distinct prompt prefilled once, its KV cache (a rolling buffer here: prompt 9 > window 6) shared by
    its rows; the samples equal those of prefilling every row, for the same key (3 prompts x K = 3, in an order that
    is not sorted)."""
    _, params, config = windowed
    toks, mask = _prompts([9, 3, 5], P, seed=11)
    rows = np.asarray([0, 0, 0, 2, 2, 2, 1, 1, 1], np.int32)
    ref = [np.asarray(a) for a in generate(params, config, toks[rows], mask[rows], jax.random.key(3), N, **SAMPLED)]
    got = [np.asarray(a) for a in generate(params, config, toks, mask, jax.random.key(3), N, rows=rows, **SAMPLED)]
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[2], ref[2], atol=1e-5)
    assert len({tuple(r) for r in got[0][:3]}) > 1  # the rows of one prompt sample differently
    with pytest.raises(ValueError, match="rows must index the 3 prompts"):
        generate(params, config, toks, mask, jax.random.key(3), N, rows=np.asarray([0, 3]))
