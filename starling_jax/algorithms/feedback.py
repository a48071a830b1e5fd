"""AI feedback: K sampled replies per prompt ranked by a judge into Nectar rows (stages/kinds/feedback.py). It trains
nothing; it is an algorithm only so that one experiment chains feedback -> rm -> rl in the same loop."""

from __future__ import annotations

from starling_jax.algorithms.registry import Algorithm, register

register(Algorithm(name="feedback", kind="feedback", head="lm", loss=None,
                   summary="AI feedback: sample K replies per prompt, rank them with a judge, write Nectar rows"))
