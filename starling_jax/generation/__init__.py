"""Text generation: the jitted KV-cache sampler (sampling.py) and AI-feedback sampling and judges (feedback.py)."""
