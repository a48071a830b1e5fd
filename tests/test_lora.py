"""LoRA adapters (models/lora.py and the hook in models.transformer.decoder_layer), checked against direct formulas:
step 0 (B = 0) is the base model bit for bit; the adapted forward equals the merged weights' forward and a
hand-written W + scale * A @ B model; generation over the KV cache (fused decode layout) equals the full forward;
gradients reach only the adapters; bad options are one-line errors. peft parity is tests/test_peft.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compiled
from starling_jax import models
from starling_jax.config import MeshConfig
from starling_jax.errors import InputError
from starling_jax.generation.sampling import generate, split_layers
from starling_jax.models import lora
from starling_jax.parallel import sharding

V = 97
CONFIG = models.get_preset("tiny").replace(vocab_size=V, sliding_window=6, init_std=0.3, pad_token_id=0)
ALL = lora.LoraOptions(rank=4, alpha=8.0)


def _tokens(lengths, T, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, V, (len(lengths), T)).astype(np.int32)
    mask = np.zeros((len(lengths), T), np.int32)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    return np.where(mask > 0, toks, 0), mask


def _adapted(options=ALL, seed=0, random_b=True):
    """(config, base params, adapted params): adapters with a nonzero B unless random_b is False."""
    config = lora.configure(CONFIG, options)
    base = models.init_params(CONFIG, jax.random.key(seed))
    adapters = lora.init(config, options, jax.random.key(seed + 1))
    if random_b:
        keys = iter(jax.random.split(jax.random.key(seed + 2), 2 * len(adapters)))
        mask = jnp.asarray(lora.layer_mask(config, options), jnp.float32)
        adapters = {p: {"a": ab["a"], "b": 0.5 * jax.random.normal(next(keys), ab["b"].shape)
                        * mask.reshape(-1, *[1] * (ab["b"].ndim - 1))} for p, ab in adapters.items()}
    return config, base, lora.attach(base, adapters)


def test_step0_is_the_base_bit_for_bit():
    config, base, params = _adapted(random_b=False)
    assert set(lora.adapters_of(params)) == set(models.transformer.LORA_PROJECTIONS)
    toks, mask = _tokens([12, 7, 3], 12)
    f = compiled.forward
    ours, ref = np.asarray(f(params, config, toks, mask)), np.asarray(f(base, CONFIG, toks, mask))
    np.testing.assert_array_equal(ours, ref)
    # the reference policy is the same params without the adapters: strip makes no copy of the base
    assert lora.strip(params)["layers"]["wq"] is base["layers"]["wq"]
    np.testing.assert_array_equal(np.asarray(f(lora.strip(params), config, toks, mask)), ref)


def test_init_is_peft_s():
    config = lora.configure(CONFIG, ALL)
    adapters = lora.init(config, ALL, jax.random.key(0))
    D, H, E = CONFIG.hidden_size, CONFIG.num_heads, CONFIG.head_dim
    assert adapters["wq"]["a"].shape == (2, D, 4) and adapters["wq"]["b"].shape == (2, 4, H, E)
    assert adapters["wo"]["a"].shape == (2, H, E, 4) and adapters["wo"]["b"].shape == (2, 4, D)
    for p, ab in adapters.items():  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)); B = 0
        fan_in = np.prod(ab["a"].shape[1:-1])
        a = np.asarray(ab["a"])
        assert np.abs(a).max() <= 1 / np.sqrt(fan_in) and np.abs(a).max() > 0.8 / np.sqrt(fan_in), p
        assert abs(a.std() - 1 / np.sqrt(3 * fan_in)) < 0.15 / np.sqrt(fan_in), p
        assert not np.asarray(ab["b"]).any()
    assert lora.count(adapters) == sum(2 * 4 * (i + o) for i, o in
                                       [(D, H * E), (D, 2 * E), (D, 2 * E), (H * E, D), (D, 128), (D, 128), (128, D)])
    assert config.lora_scale == 2.0 and lora.configure(CONFIG, lora.LoraOptions(rank=4, alpha=8, rslora=True)
                                                       ).lora_scale == 4.0


def _hand_forward(base, adapters, config, toks, mask):
    """W + scale * a @ b per projection, written out here (not lora.merge), run by the plain model."""
    layers = dict(base["layers"])
    for p, ab in adapters.items():
        a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
        d = np.stack([a[l].reshape(-1, a.shape[-1]) @ b[l].reshape(b.shape[1], -1) for l in range(a.shape[0])])
        layers[p] = jnp.asarray(np.asarray(layers[p], np.float64) + config.lora_scale * d.reshape(layers[p].shape),
                                jnp.float32)
    return compiled.forward({**base, "layers": layers}, CONFIG, toks, mask)


@pytest.mark.parametrize("options", [ALL, lora.LoraOptions(rank=3, alpha=5.0, targets=("q_proj", "o", "down"),
                                                           layers=(1,))])
def test_adapted_forward_equals_merged_weights(options):
    config, base, params = _adapted(options)
    toks, mask = _tokens([12, 7, 3], 12, seed=1)
    ours = np.asarray(compiled.forward(params, config, toks, mask))
    merged = lora.merge(params, config)
    assert "lora" not in merged["layers"] and set(merged["layers"]) == set(base["layers"])
    via_merge = np.asarray(compiled.forward(merged, CONFIG, toks, mask))
    by_hand = np.asarray(_hand_forward(base, lora.adapters_of(params), config, toks, mask))
    real = mask > 0
    scale = np.abs(ours[real]).max()
    assert np.abs(ours - np.asarray(compiled.forward(base, CONFIG, toks, mask)))[real].max() > 1e-2 * scale  # it moved
    assert np.abs(ours - via_merge)[real].max() <= 1e-5 * scale
    assert np.abs(ours - by_hand)[real].max() <= 1e-5 * scale
    if options.layers is not None:  # layer 0 has no adapter: its merged weights are the base's exactly
        for p in lora.projections(options):
            np.testing.assert_array_equal(np.asarray(merged["layers"][p][0]), np.asarray(base["layers"][p][0]))


def test_generation_with_adapters_equals_the_full_forward():
    """sampling.generate (prefill by scan, then the fused per-layer decode form over a rolling KV cache) with adapters
    gives the log-probs the full forward gives its samples."""
    config, _, params = _adapted()
    toks, mask = _tokens([9, 5, 3], 9, seed=3)
    out, out_mask, logprobs = generate(params, config, toks, mask, jax.random.key(4), 12, temperature=1.3)
    seq = jnp.concatenate([toks, out], axis=1)
    seq_mask = jnp.concatenate([mask, out_mask], axis=1)
    ref = models.token_logprobs(compiled.forward(params, config, seq, seq_mask)[:, 8:-1], seq[:, 9:])
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(ref), atol=2e-5)
    step = split_layers(params)
    assert {"wqkv", "w_gate_up", "lora"} <= set(step["layers"][0])
    assert step["layers"][1]["lora"]["wq"]["a"].shape == params["layers"]["lora"]["wq"]["a"].shape[1:]


def test_gradients_reach_only_the_adapters():
    options = lora.LoraOptions(rank=4, alpha=8.0, layers=(0,))
    config, base, params = _adapted(options)
    adapters, frozen = lora.split(params)
    toks, mask = _tokens([8, 8], 8, seed=2)

    def loss(ad, fr):
        logits = models.forward(lora.attach(fr, ad), config, toks, mask)
        return jnp.mean(models.token_logprobs(logits[:, :-1], jnp.asarray(toks[:, 1:])))

    grads = jax.jit(jax.grad(loss))(adapters, frozen)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    for p, g in grads.items():
        assert np.abs(np.asarray(g["a"][0])).max() > 0 and np.abs(np.asarray(g["b"][0])).max() > 0, p
        # layer 1 is left out (a = b = 0): both gradients exactly zero, so no update moves it
        assert not np.asarray(g["a"][1]).any() and not np.asarray(g["b"][1]).any(), p
    # step 0 (B = 0): A's gradient is exactly zero, B's is not (as in peft)
    config0, _, params0 = _adapted(options, random_b=False)
    g0 = jax.jit(jax.grad(lambda ad: jnp.sum(models.forward(lora.attach(frozen, ad), config0, toks, mask)[..., 0]
                                             ** 2)))(lora.adapters_of(params0))
    assert not np.asarray(g0["wq"]["a"]).any() and np.asarray(g0["wq"]["b"]).any()


def test_dropout_only_with_a_key():
    options = lora.LoraOptions(rank=4, alpha=8.0, dropout=0.5)
    config, _, params = _adapted(options)
    toks, mask = _tokens([8, 8], 8)
    plain = np.asarray(compiled.forward(params, config, toks, mask))
    np.testing.assert_array_equal(plain, np.asarray(compiled.forward(params, config.replace(lora_dropout=0.0), toks,
                                                                   mask)))
    d1, d2 = (np.asarray(compiled.forward(params, config, toks, mask, dropout_key=jax.random.key(k))) for k in (1, 2))
    assert np.abs(d1 - plain).max() > 1e-3 and np.abs(d1 - d2).max() > 1e-3
    np.testing.assert_array_equal(d1, np.asarray(compiled.forward(params, config, toks, mask,
                                                                dropout_key=jax.random.key(1))))


def test_adapters_shard_like_their_base_weight():
    rules = MeshConfig().rules
    s = lora.specs(lora.configure(CONFIG, ALL), ALL)
    spec = lambda x: tuple(sharding.logical_to_spec(x.axes, rules))  # noqa: E731
    assert spec(s["wq"]["a"]) == (None, "fsdp", None) and spec(s["wq"]["b"]) == (None, None, "tensor", None)
    assert spec(s["wo"]["a"]) == (None, "tensor", None, None) and spec(s["wo"]["b"]) == (None, None, "fsdp")
    assert spec(s["w_down"]["a"]) == (None, "tensor", None) and spec(s["w_down"]["b"]) == (None, None, "fsdp")
    # the rank axis stays whole even under a rule that would split it
    assert tuple(sharding.logical_to_spec(("lora_rank",), (("lora_rank", "tensor"),))) == (None,)
    full = lora.full_specs(CONFIG, ALL)
    assert full["layers"]["lora"]["w_up"]["a"].init == "lora_a" and "wq" in full["layers"]


@pytest.mark.parametrize("options,match", [
    (lora.LoraOptions(targets=("q", "qkv")), r"lora.targets: 'qkv' matches no projection"),
    (lora.LoraOptions(targets=()), r"lora.targets is empty"),
    (lora.LoraOptions(rank=65), r"lora.rank=65 is larger than q_proj's width \(64 in, 64 out\)"),
    (lora.LoraOptions(rank=33, targets=("k",)), r"lora.rank=33 is larger than k_proj's width \(64 in, 32 out\)"),
    (lora.LoraOptions(rank=0), r"lora.rank=0 must be a positive integer"),
    (lora.LoraOptions(alpha=0.0), r"lora.alpha=0.0 must be a finite number > 0"),
    (lora.LoraOptions(alpha=float("nan")), r"lora.alpha=nan must be"),
    (lora.LoraOptions(dropout=1.0), r"lora.dropout=1.0 must be in \[0, 1\)"),
    (lora.LoraOptions(layers=(0, 2)), r"lora.layers=\[0, 2\] must be distinct layer indices in \[0, 2\)"),
])
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(lora.LoraError, match=match) as e:
        lora.init(CONFIG, options, jax.random.key(0))
    assert isinstance(e.value, InputError) and "\n" not in str(e.value)


def test_adapters_without_a_scale_are_an_error():
    _, base, params = _adapted()
    with pytest.raises(ValueError, match="lora_scale is None"):
        models.forward(params, CONFIG, *_tokens([4], 4))
    with pytest.raises(lora.LoraError, match="no LoRA adapters"):
        lora.merge(base, CONFIG)
