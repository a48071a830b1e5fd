"""Correctness defects of issue 12, each with a test that fails without its fix: split_params(top_layers=0) trains
every layer; RL log-probs come from the distribution actually sampled; identical Nectar answers are one response;
reward clip -> moments -> scale order; the fork's multi-turn reward-model text; Plackett-Luce normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starling_jax import models
from starling_jax.train import hydra

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
    assert jax.tree_util.tree_structure(trainable) == jax.tree_util.tree_structure(t_all)
    assert jax.tree_util.tree_structure(frozen) == jax.tree_util.tree_structure(f_all)
    merged = models.merge_params(trainable, frozen)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the split forward equals the full one (the trunk is just the embedding)
    tokens = jnp.array([[5, 6, 7, 8]], jnp.int32)
    mask = jnp.ones_like(tokens)
    np.testing.assert_allclose(models.split_hidden_states(trainable, frozen, CFG, tokens, mask),
                               models.hidden_states(params, CFG, tokens, mask), atol=1e-6)


def test_hydra_zero_top_layers_with_frozen_head_trains_every_layer(params):
    trainable, frozen = hydra.init_rl_params(params, CFG, jax.random.key(1), 0, train_head=False)
    assert trainable["policy"]["layers"]["wq"].shape[0] == CFG.num_layers
    assert "layers" not in frozen["trunk"] and "lm_head" in frozen["trunk"]
    tokens = jnp.array([[0, 5, 6, 7, 8, 9]], jnp.int32)
    mask = jnp.array([[0, 1, 1, 1, 1, 1]], jnp.int32)
    out = hydra.hydra_forward(trainable, frozen, CFG, tokens, mask, 3)
    logits = models.forward(params, CFG, tokens, mask)
    want = models.token_logprobs(logits[:, 2:5], tokens[:, 3:])
    np.testing.assert_allclose(out["logprobs"], want, atol=2e-5)
    np.testing.assert_allclose(out["ref_logprobs"], want, atol=2e-5)
