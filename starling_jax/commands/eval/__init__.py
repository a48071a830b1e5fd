"""Evaluation: reward-model ranking metrics on held-out data (`starling-jax eval`)."""
