"""A fake chunk of rollouts for the RL tests that need no sampling (tests/test_rlaif.py, test_layer_critic.py,
test_lora_stages.py): random tokens, left-padded prompts and right-padded replies of the lengths given, one score each."""

import jax
import numpy as np


def fake_chunk(vocab_size: int, prompt_pad: list[int], reply_length: list[int], prompt_len: int, reply_len: int,
               key: jax.Array = None) -> dict:
    """{"tokens" [B, P + N], "attention_mask", "response_mask" [B, N], "scores" [B]} for B = len(prompt_pad) rows;
    row b's prompt has prompt_pad[b] pad tokens (0) on the left, its reply reply_length[b] tokens then pads. Token ids
    are drawn in [3, vocab_size) (0-2 are pad/bos/eos), from `key` (default key(1))."""
    k = jax.random.split(jax.random.key(1) if key is None else key, 2)
    B = len(prompt_pad)
    assert len(reply_length) == B and max(prompt_pad) < prompt_len and max(reply_length) <= reply_len
    tokens = np.array(jax.random.randint(k[0], (B, prompt_len + reply_len), 3, vocab_size), np.int32)
    prompt_mask = (np.arange(prompt_len)[None] >= np.array(prompt_pad)[:, None]).astype(np.int32)
    response_mask = (np.arange(reply_len)[None] < np.array(reply_length)[:, None]).astype(np.int32)
    tokens[:, :prompt_len] = np.where(prompt_mask > 0, tokens[:, :prompt_len], 0)
    tokens[:, prompt_len:] = np.where(response_mask > 0, tokens[:, prompt_len:], 0)
    return {"tokens": tokens, "attention_mask": np.concatenate([prompt_mask, response_mask], 1),
            "response_mask": response_mask, "scores": np.asarray(jax.random.normal(k[1], (B,)), np.float32)}
