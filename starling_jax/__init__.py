"""starling_jax: the Starling-7B RLAIF pipeline (SFT, K-wise reward model, APA/PPO, DPO) in JAX."""

__version__ = "0.1.0"
