"""Stages: the stage contract and the stage-kind registry (program.py), the kinds (kinds/: data.py for sft / rm /
dpo, rlaif.py for rl with rollout.py, feedback.py), loading and validating an experiment (experiment.py), the one
loop (loop.py) and a finished stage's export (export.py).

Submodules are imported explicitly so importing the package stays cheap.
"""
