"""Training: the train state and optimiser (state.py), stage losses (losses.py), the jitted step (step.py), the stage
interface and one loop for every stage (program.py, loop.py), checkpoints and logging, and the RLAIF stage (rlaif.py).

Submodules are imported explicitly (e.g. `from starling_jax.train.step import make_train_step`) so importing the
package stays cheap and free of import cycles.
"""
