"""The training step: the train state and optimiser (state.py), the jitted update (step.py), the one hydra forward
(hydra.py), shared loss pieces (losses.py), checkpoints (checkpoint.py) and metrics (logging.py).

Submodules are imported explicitly (e.g. `from starling_jax.step.step import make_train_step`) so importing the
package stays cheap and free of import cycles.
"""
