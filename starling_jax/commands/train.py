"""`starling-jax run | train | feedback`: an experiment's stages through the one loop (stages/loop.py).

    starling-jax run EXPERIMENT [--workdir DIR] [--set a.b=c ...]     all stages, then the summary of each
    starling-jax run EXPERIMENT --seed N                              the same at seed N (a study's seed-N cell)
    starling-jax train EXPERIMENT [--stage NAME]                      resumes from WORKDIR's checkpoints by default
    starling-jax feedback EXPERIMENT [--stage NAME]                   only the feedback stage(s): write Nectar rows

Exit statuses: 0 done, 1 diverged, EXIT_INTERRUPTED (143) preempted or stopped by a signal; bad input is left to the
guard of every command in commands/cli.py (one line, exit 2).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import jax

from starling_jax.algorithms import registry
from starling_jax.config import ConfigError, Experiment
from starling_jax.parallel.sharding import Launch
from starling_jax.stages.experiment import apply_overrides, load_experiment, stages_of, with_seed
from starling_jax.stages.loop import StageInterrupted, TrainingDiverged, run_experiment

EXIT_INTERRUPTED = 128 + signal.SIGTERM  # the shell's convention for "terminated by SIGTERM"



def _add_common(parser) -> None:
    parser.add_argument("experiment", help="experiments/NAME.py, a bare NAME, or a saved config.json")
    parser.add_argument("--workdir", default=None, help="output directory (default: runs/<experiment name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.steps=10 "
                             "--set stages.rm.optim.learning_rate=1e-5")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and exports (start over)")
    parser.add_argument("--seed", type=int, default=None, metavar="N",
                        help="run at seed N, as a study's seed-N cell: the synthetic data, its order and every "
                             "stage's train.seed (init, rollout and evaluation sampling) set to N, before --set")
    group = parser.add_argument_group(
        "multi-process runs", "start one process per host (or per accelerator) with the same command and WORKDIR; "
        "unset flags come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID or a cluster JAX detects "
        "(SLURM, Cloud TPU); see docs/SHARDING.md")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="process 0's address for the coordination service (implies a multi-process run)")
    group.add_argument("--num-processes", type=int, default=None, metavar="N")
    group.add_argument("--process-id", type=int, default=None, metavar="I")
    group.add_argument("--init-timeout", type=int, default=300, metavar="S",
                       help="seconds to wait for every process to join (default 300)")
    group.add_argument("--heartbeat-timeout", type=int, default=100, metavar="S",
                       help="seconds after which a silent process counts as dead and the others abort (default 100)")


def add_train_arguments(parser) -> None:
    _add_common(parser)
    parser.add_argument("--stage", default=None, help="train only this stage (earlier stages it uses must be done)")


def add_run_arguments(parser) -> None:
    _add_common(parser)


def _launch(args):
    return Launch(coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                  init_timeout_s=args.init_timeout, heartbeat_timeout_s=args.heartbeat_timeout)


def _prepare(args) -> tuple[Experiment, str]:
    exp = load_experiment(args.experiment)
    if args.seed is not None:
        exp = with_seed(exp, args.seed)
    overrides = list(args.overrides)
    if args.fresh:
        overrides.append("checkpoint.resume=false")
    exp = apply_overrides(exp, overrides)
    return exp, args.workdir or os.path.join("runs", exp.name)


def _guarded(fn):
    """Exit statuses of a run that stopped on its own (diverged: 1, interrupted: EXIT_INTERRUPTED). Bad input
    (ConfigError, a missing file, ...) is left to the guard of every command in commands/cli.py (one line, exit 2)."""
    try:
        return fn()
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except StageInterrupted as e:
        print(str(e), file=sys.stderr)
        return EXIT_INTERRUPTED


def train_cli(args) -> int:
    def go():
        exp, workdir = _prepare(args)
        run_experiment(exp, workdir, only_stage=args.stage, launch=_launch(args))
        print(f"done: {workdir}", file=sys.stderr)
        return 0
    return _guarded(go)


def run_cli(args) -> int:
    def go():
        exp, workdir = _prepare(args)
        summaries = run_experiment(exp, workdir, launch=_launch(args))
        if jax.process_index() == 0:
            print(json.dumps(summaries, indent=1, default=float))
        print(f"summary: {os.path.join(workdir, 'summary.json')}", file=sys.stderr)
        return 0
    return _guarded(go)


def add_feedback_arguments(parser) -> None:
    _add_common(parser)
    parser.add_argument("--stage", default=None, help="the feedback stage to run (default: every feedback stage)")


def feedback_cli(args) -> int:
    """Run the experiment's feedback stage(s) (stages/kinds/feedback.py) and print their summaries: the Nectar rows
    written, judge counts and where the rows are."""
    def go():
        exp, workdir = _prepare(args)
        stages = [n for n, c in stages_of(exp) if registry.ALGORITHMS.get(c.objective.name) is not None
                  and registry.ALGORITHMS[c.objective.name].kind == "feedback"]
        if args.stage is not None and args.stage not in stages:
            raise ConfigError(f"--stage {args.stage}: not a feedback stage of {exp.name!r} (feedback stages: "
                              f"{', '.join(stages) or 'none'})")
        if not stages:
            raise ConfigError(f"experiment {exp.name!r} has no feedback stage (a stage with objective.name="
                              f"'feedback')")
        summaries = {}
        for name in [args.stage] if args.stage else stages:
            summaries[name] = run_experiment(exp, workdir, only_stage=name, launch=_launch(args))[name]
        if jax.process_index() == 0:
            print(json.dumps(summaries, indent=1, default=float))
        return 0
    return _guarded(go)


add_arguments = add_train_arguments
cli = train_cli
