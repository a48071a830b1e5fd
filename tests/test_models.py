"""Model parity with transformers on tiny random models (fp32, CPU), parameter counts of the 7B presets, padding
invariance and the out-of-vocabulary check.

Reference: the same weights in transformers' MistralForCausalLM / LlamaForCausalLM / LlamaForSequenceClassification
(eager attention), saved with save_pretrained and read back with hf.load. Relative error = max |ours - HF| over real
(non-pad) tokens divided by max |HF| over the same tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import compiled
from starling_jax.io import hf
from starling_jax import models

torch.set_num_threads(1)  # the test machine is shared
VOCAB = 128


def _mistral(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, sliding_window=8, rms_norm_eps=1e-5, max_position_embeddings=256,
               attn_implementation="eager")
    cfg.update(kw)
    return transformers.MistralConfig(**cfg)


def _llama(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, rms_norm_eps=1e-5, max_position_embeddings=256, pad_token_id=0,
               rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, attn_implementation="eager")
    cfg.update(kw)
    return transformers.LlamaConfig(**cfg)


def _save_hf(model_cls, hf_config, path, seed=0):
    torch.manual_seed(seed)
    model = model_cls(hf_config).eval()
    with torch.no_grad():  # HF initialises norms to 1; random norms make the parity check see them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def _tokens(batch, length, seed=0, low=3):
    return np.random.default_rng(seed).integers(low, VOCAB, (batch, length)).astype(np.int32)


def _left_pad_mask(batch, length, pads):
    mask = np.ones((batch, length), np.int32)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    return mask


def _hf_logits(model, tokens, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # what our model derives from the mask
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def _rel_err(ours, ref, where):
    return float(np.abs(ours - ref)[where].max() / np.abs(ref[where]).max())


def test_mistral_logit_parity_window_gqa_left_padding(tmp_path):
    model = _save_hf(transformers.MistralForCausalLM, _mistral(), tmp_path)
    config, params = hf.load(str(tmp_path))
    assert (config.sliding_window, config.num_heads, config.num_kv_heads, config.head) == (8, 4, 2, "lm")
    tokens = _tokens(3, 24)  # 24 > window 8
    mask = _left_pad_mask(3, 24, [0, 5, 11])
    ours = np.asarray(compiled.forward(params, config, tokens, mask))
    ref = _hf_logits(model, tokens, mask)
    assert ours.dtype == np.float32 and ours.shape == (3, 24, VOCAB)
    err = _rel_err(ours, ref, mask.astype(bool))
    assert err <= 1e-4, f"max relative logit error {err:.2e}"


def test_llama_logit_parity_left_padding_rope_theta(tmp_path):
    model = _save_hf(transformers.LlamaForCausalLM, _llama(), tmp_path)
    config, params = hf.load(str(tmp_path))
    assert (config.architecture, config.sliding_window, config.rope_theta) == ("llama", None, 500000.0)
    tokens = _tokens(2, 20, seed=1)
    mask = _left_pad_mask(2, 20, [0, 7])
    err = _rel_err(np.asarray(compiled.forward(params, config, tokens, mask)), _hf_logits(model, tokens, mask),
                   mask.astype(bool))
    assert err <= 1e-4, f"max relative logit error {err:.2e}"


def test_reward_head_parity_llama_sequence_classification_right_padding(tmp_path):
    model = _save_hf(transformers.LlamaForSequenceClassification, _llama(num_labels=1), tmp_path)
    config, params = hf.load(str(tmp_path))
    assert config.head == "score" and params["score"].shape == (64, 1) and "lm_head" not in params
    lengths = [16, 9, 3]
    tokens = _tokens(3, 16, seed=2, low=1)  # HF finds the last token as the last id != pad_token_id (0)
    mask = (np.arange(16)[None] < np.array(lengths)[:, None]).astype(np.int32)
    tokens = np.where(mask > 0, tokens, 0)
    ours = np.asarray(compiled.score(params, config, tokens, mask))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    ref = ref[:, 0].numpy()
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_left_padded_row_equals_unpadded_sequence():
    config = models.PRESETS["tiny"].replace(vocab_size=VOCAB, sliding_window=4)
    rng = np.random.default_rng(0)  # numpy init: jax.random would compile a kernel per shape
    params = jax.tree.map(lambda spec: (0.05 * rng.standard_normal(spec.shape)).astype(np.float32),
                                    models.param_specs(config), is_leaf=lambda x: isinstance(x, models.ParamSpec))
    seq = _tokens(1, 10, seed=3)
    alone = np.asarray(compiled.forward(params, config, seq, np.ones_like(seq)))[0]
    padded = np.concatenate([np.full((1, 6), 5, np.int32), seq], axis=1)  # pad id 5 on purpose: only the mask counts
    mask = _left_pad_mask(1, 16, [6])
    got = np.asarray(compiled.forward(params, config, padded, mask))[0, 6:]
    np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(compiled.forward(params, config, padded, np.ones_like(padded)))[0, 6:], alone,
                           atol=1e-3), "the check must be able to fail: unmasked pads change the logits"


def test_bf16_compute_path_within_tolerance(tmp_path):
    """bf16 activations/matmuls over fp32 params: max relative logit error <= 2e-2 against HF's fp32 logits (bf16
    keeps 8 mantissa bits, ~0.4% per rounding; measured 5.5e-3 here), and nearly the same argmax tokens."""
    model = _save_hf(transformers.MistralForCausalLM, _mistral(), tmp_path)
    config, params = hf.load(str(tmp_path))
    tokens = _tokens(2, 24, seed=4)
    mask = _left_pad_mask(2, 24, [0, 4])
    ours = np.asarray(compiled.forward(params, config.replace(dtype="bfloat16"), tokens, mask))
    ref = _hf_logits(model, tokens, mask)
    assert ours.dtype == np.float32
    real = mask.astype(bool)
    err = _rel_err(ours, ref, real)
    assert 0 < err <= 2e-2, f"bf16 max relative logit error {err:.2e}"
    assert (ours[real].argmax(-1) == ref[real].argmax(-1)).mean() >= 0.9


def test_bf16_checkpoint_loads_bf16_params(tmp_path):
    model = _save_hf(transformers.LlamaForCausalLM, _llama(), tmp_path)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config, params = hf.load(str(tmp_path / "bf16"))
    assert (config.param_dtype, config.dtype) == ("bfloat16", "bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    ref = model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"], np.float32), ref)
    c32, p32 = hf.load(str(tmp_path / "bf16"), dtype="float32")
    assert c32.param_dtype == "float32" and p32["layers"]["wq"].dtype == jnp.float32
    tokens = _tokens(1, 12, seed=5)
    mask = np.ones_like(tokens)
    err = _rel_err(np.asarray(compiled.forward(params, config, tokens, mask)),
                   np.asarray(compiled.forward(p32, c32, tokens, mask)), mask.astype(bool))
    assert err <= 5e-2, f"bf16 vs fp32 compute on bf16 weights: {err:.2e}"


@pytest.mark.parametrize("preset, published", [("mistral-7b-v0.1", 7_241_732_096), ("llama2-7b", 6_738_415_616)])
def test_7b_parameter_counts_from_abstract_shapes(preset, published):
    abstract = models.abstract_params(models.PRESETS[preset])
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    assert models.count_params(abstract) == published


def test_check_token_ids_names_the_bad_id():
    models.check_token_ids(np.array([[0, 5, 32001]]), 32002)  # in range: no error
    with pytest.raises(ValueError, match=r"rm batch: token id 32002 at index \(1, 2\) is outside the vocabulary "
                                         r"\[0, 32002\) \(1 bad ids"):
        models.check_token_ids(np.array([[1, 2, 3], [4, 5, 32002]]), 32002, where="rm batch")
    with pytest.raises(ValueError, match=r"token id -1 at index \(0,\)"):
        models.check_token_ids(np.array([-1, 3]), 10)


def test_scan_unroll_gives_the_same_values_and_gradients():
    """scan_unroll (a partial and a full unroll of the scan over layers) changes the program, not the math: logits and
    gradients equal the rolled loop's, on a 3-layer model with padding."""
    # the vocabulary's size plays no part here
    config = models.get_preset("tiny", num_layers=3, vocab_size=VOCAB, pad_token_id=0, eos_token_id=2)
    params = models.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)
    mask = jnp.asarray([[0, 0, 0] + [1] * 9, [1] * 12], jnp.int32)

    def loss(p, c):
        return jnp.mean(models.forward(p, c, tokens, mask)[:, :, :50] ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    want_logits = compiled.forward(params, config, tokens, mask)
    want_grads = grad(params, config)
    for unroll in (2, 3):
        c = config.replace(scan_unroll=unroll)
        np.testing.assert_allclose(np.asarray(compiled.forward(params, c, tokens, mask)), np.asarray(want_logits),
                                   rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(grad(params, c)), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="scan_unroll"):
        config.replace(scan_unroll=0)
