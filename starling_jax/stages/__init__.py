"""Stages: the stage contract and the one kind registry (program.py), the kinds (data_stage.py: sft / rm / dpo,
rlaif.py + rollout.py: rl, feedback_stage.py: feedback), loading and validating an experiment (experiment.py), the
one loop (loop.py) and a finished stage's export (export.py).

Submodules are imported explicitly so importing the package stays cheap.
"""
