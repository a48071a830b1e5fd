"""Supervised fine-tuning: next-token cross-entropy on the reply tokens (loss_mask)."""

from __future__ import annotations

from starling_jax import models, objectives
from starling_jax.algorithms.registry import Algorithm, register
from starling_jax.step import losses


def build_loss(objective, config, constrain=None) -> losses.LossFn:
    def loss_fn(params, frozen, batch, rng):
        """tokens, attention_mask [B, T]; loss_mask [B, T] float: predicts tokens[:, 1:] where loss_mask[:, 1:]."""
        losses.check_batch("sft", batch, losses.lm_batch(1, 1))
        tokens, mask = batch["tokens"], batch["attention_mask"]
        trunk = frozen.get("trunk", {})
        h = losses.hidden(params, trunk, config, tokens, mask, constrain, dropout_key=rng)  # LoRA dropout
        logits = models.lm_logits({**trunk, **params}, config, h[:, :-1])
        targets, loss_mask = tokens[:, 1:], batch["loss_mask"][:, 1:]
        return objectives.sft_loss(logits, targets, loss_mask), {"weight": objectives.token_count(loss_mask)}
    return loss_fn


register(Algorithm(name="sft", kind="sft", head="lm", loss=build_loss, batch=losses.lm_batch,
                   summary="supervised fine-tuning: next-token cross-entropy on the replies"))
