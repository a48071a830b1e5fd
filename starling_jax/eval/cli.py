"""`starling-jax eval EXPERIMENT_OR_CHECKPOINT`: a reward model's ranking metrics on held-out data.

What is evaluated:
  an experiment (name, .py or saved config.json)  its reward-model stage's export in WORKDIR (default runs/<name>)
  WORKDIR                                          the same, using WORKDIR/config.json
  WORKDIR/<stage> or WORKDIR/<stage>/export        that stage's export, data settings from WORKDIR/config.json
  --model DIR                                      instead of the export: a Hugging Face reward-model directory
                                                   (LlamaForSequenceClassification) or another export directory
The held-out rows are the experiment's (data.heldout_fraction of data.source, the same split training used), rendered
with the stage's tokenizer and template. Prints one JSON object: pair_accuracy, top1_accuracy, kendall_tau, groups,
pairs.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from starling_jax.config import ConfigError, Experiment, apply_overrides, load_experiment, stages_of
from starling_jax.config import OBJECTIVE_KINDS


def add_eval_arguments(parser) -> None:
    parser.add_argument("target", help="experiment (NAME, .py, config.json), WORKDIR, WORKDIR/<stage> or its export")
    parser.add_argument("--workdir", default=None, help="the experiment's WORKDIR (default runs/<experiment name>)")
    parser.add_argument("--stage", default=None, help="the reward-model stage (default: the last rm stage)")
    parser.add_argument("--model", default=None, help="evaluate this HF reward-model or export directory instead")
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout")
    parser.add_argument("--max-groups", type=int, default=None, help="evaluate at most this many groups")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (e.g. data.source=path/to/nectar)")
    parser.add_argument("--output", default=None, help="also write the JSON result here")


def resolve_target(target: str, workdir: Optional[str]) -> tuple[Experiment, str, Optional[str], Optional[str]]:
    """(experiment, workdir, stage name or None, export dir or None) for an eval target."""
    path = os.path.abspath(target)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model_config.json")):  # an export directory
            stage_dir = os.path.dirname(path)
            root = os.path.dirname(stage_dir)
            return load_experiment(os.path.join(root, "config.json")), root, os.path.basename(stage_dir), path
        if os.path.isdir(os.path.join(path, "export")):  # a stage directory
            root = os.path.dirname(path)
            return (load_experiment(os.path.join(root, "config.json")), root, os.path.basename(path),
                    os.path.join(path, "export"))
        if os.path.isfile(os.path.join(path, "config.json")):  # a WORKDIR
            return load_experiment(os.path.join(path, "config.json")), path, None, None
        raise FileNotFoundError(f"{target}: not a WORKDIR (no config.json), a stage directory (no export/) or an "
                                f"export directory (no model_config.json)")
    exp = load_experiment(target)
    return exp, workdir or os.path.join("runs", exp.name), None, None


def pick_stage(exp: Experiment, stage: Optional[str]) -> tuple[str, Experiment]:
    stages = stages_of(exp)
    if stage is not None:
        found = [s for s in stages if s[0] == stage]
        if not found:
            raise ConfigError(f"--stage {stage}: no such stage; stages: {', '.join(n for n, _ in stages)}")
        return found[0]
    rm = [s for s in stages if OBJECTIVE_KINDS.get(s[1].objective.name) == "rm"]
    if not rm:
        raise ConfigError(f"experiment {exp.name!r} has no reward-model stage; stages: "
                          f"{', '.join(n for n, _ in stages)}")
    return rm[-1]


def load_reward_model(directory: str):
    """(ModelConfig, params) from an export directory or a Hugging Face directory."""
    from starling_jax.train.checkpoint import load_export
    if os.path.isfile(os.path.join(directory, "model_config.json")):
        config, params, _ = load_export(directory)
    else:
        from starling_jax import hf
        config, params = hf.load(directory)
    if config.head != "score" or "score" not in params:
        raise ValueError(f"{directory}: not a reward model (head {config.head!r}; a reward model has a 'score' head)")
    return config, params


def evaluate_reward_model(config, params, stage: Experiment, split: str = "heldout", batch_size: int = 8,
                          max_groups: Optional[int] = None) -> dict:
    """Ranking metrics of a reward model on the stage's held-out (or train) rows."""
    from starling_jax.data import load_tokenizer, pipelines
    from starling_jax.eval.ranking import RankingAccumulator, make_reward_fn
    train_rows, heldout_rows, _ = pipelines.load_rows(stage.data)
    rows = heldout_rows if split == "heldout" else train_rows
    if max_groups is not None:
        rows = rows[:max_groups]
    if not rows:
        raise ValueError(f"no {split} rows to evaluate (data.heldout_fraction={stage.data.heldout_fraction})")
    tokenizer = load_tokenizer(stage.model.tokenizer)
    d = stage.data
    ds = pipelines.make_dataset("rm", rows, tokenizer, batch_size, template=stage.model.template,
                                max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                                max_responses=d.max_responses, shuffle=False, num_epochs=1, drop_remainder=False)
    reward_fn = make_reward_fn(config)
    acc = RankingAccumulator()
    for batch in ds:
        acc.add(reward_fn(params, batch["tokens"], batch["attention_mask"]), batch["ranks"], batch["response_mask"])
    return acc.result()


def eval_cli(args) -> int:
    try:
        exp, workdir, stage_name, export_dir = resolve_target(args.target, args.workdir)
        exp = apply_overrides(exp, args.overrides)
        name, stage = pick_stage(exp, args.stage or stage_name)
        model_dir = args.model or export_dir or os.path.join(workdir, name, "export")
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"no reward model at {model_dir}: train the stage first "
                                    f"(starling-jax train {args.target} --workdir {workdir}) or pass --model DIR")
        config, params = load_reward_model(model_dir)
        result = evaluate_reward_model(config, params, stage, args.split, args.batch_size, args.max_groups)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"model": model_dir, "split": args.split, **result}
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


add_arguments = add_eval_arguments
cli = eval_cli
