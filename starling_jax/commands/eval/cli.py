"""`starling-jax eval`: benchmark answer files, reward-model-judged win rates, RewardBench and ranking metrics.

    starling-jax eval policy CHECKPOINT --questions FILE --format mt_bench|alpaca_eval --out FILE
        answers for MT-Bench (fschat model_answer JSONL, two-turn questions answered turn by turn at MT-Bench's
        per-category temperatures) or AlpacaEval (outputs JSON), with the checkpoint's own template; resumable
    starling-jax eval compare A B --prompts FILE --judge RM [--out FILE]
        A and B answer the same prompts, the reward model RM scores both: win rate of A over B with a 95% bootstrap
        interval, ties, mean score gap and the length-controlled win rate (JSON + one readable line)
    starling-jax eval rm CHECKPOINT [--rewardbench FILE] [--nectar FILE]
        RewardBench per-subset accuracies and section scores, and the K-wise ranking metrics on Nectar rows (the
        stage's held-out rows when CHECKPOINT is a run's stage)
    starling-jax eval EXPERIMENT_OR_WORKDIR_OR_STAGE [--model DIR]
        the K-wise ranking metrics of an experiment's reward-model stage (below)

CHECKPOINT, A, B and RM are a run's stage (WORKDIR/<stage> or its export: the stage's tokenizer and template) or a
Hugging Face directory (e.g. from `starling-jax convert`; its tokenizer files and chat template).

Ranking metrics (`eval TARGET`):
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

from starling_jax.algorithms import registry
from starling_jax.commands.eval import answer, benchmarks as bm
from starling_jax.commands.eval.answer import Generator
from starling_jax.commands.eval.checkpoints import hf_model_kind, load_checkpoint
from starling_jax.commands.eval.judge import Judge, compare, rewardbench
from starling_jax.config import ConfigError, DataConfig, Experiment, MeshConfig, ModelSection
from starling_jax.data import load_tokenizer, pipelines
from starling_jax.data.templates import TEMPLATES
from starling_jax.errors import InputError
from starling_jax.metrics import stats
from starling_jax.metrics.ranking import RankingAccumulator, score_groups
from starling_jax.parallel import sharding
from starling_jax.stages import export as export_lib
from starling_jax.stages.experiment import apply_overrides, load_experiment, stages_of


SUBCOMMANDS = ("policy", "compare", "rm")


def add_ranking_arguments(parser) -> None:
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
    kind = hf_model_kind(path)
    if kind is not None:
        raise InputError(
            f"{target} is a Hugging Face {kind} directory, not an experiment or a run. "
            + (f"Score it with `starling-jax eval rm {target} --rewardbench FILE` (or --nectar FILE), or on an "
               f"experiment's held-out rows with `starling-jax eval EXPERIMENT --model {target}`"
               if kind == "reward model" else
               f"Answer benchmark questions with `starling-jax eval policy {target} --questions FILE --format "
               f"mt_bench|alpaca_eval --out FILE`, or judge it against another policy with `starling-jax eval "
               f"compare {target} B --prompts FILE --judge RM`"))
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
    rm = [s for s in stages if s[1].objective.name in registry.ALGORITHMS
          and registry.get(s[1].objective.name).head == "score"]
    if not rm:
        raise ConfigError(f"experiment {exp.name!r} has no reward-model stage; stages: "
                          f"{', '.join(n for n, _ in stages)}")
    return rm[-1]


def load_reward_model(directory: str):
    """(ModelConfig, params) from an export directory or a Hugging Face directory."""
    config, params = export_lib.load_weights(directory)
    if config.head != "score" or "score" not in params:
        raise ValueError(f"{directory}: not a reward model (head {config.head!r}; a reward model has a 'score' head)")
    return config, params


def evaluate_reward_model(config, params, stage: Experiment, split: str = "heldout", batch_size: int = 8,
                          max_groups: Optional[int] = None) -> dict:
    """Ranking metrics of a reward model on the stage's held-out (or train) rows."""
    train_rows, heldout_rows, _ = pipelines.load_rows(stage.data)
    rows = heldout_rows if split == "heldout" else train_rows
    if max_groups is not None:
        rows = rows[:max_groups]
    if not rows:
        raise ValueError(f"no {split} rows to evaluate (data.heldout_fraction={stage.data.heldout_fraction})")
    tokenizer = load_tokenizer(stage.model.tokenizer)
    acc = RankingAccumulator()
    for rewards, batch in score_groups(config, params, rows, tokenizer, stage.data, stage.model.template, batch_size):
        acc.add(rewards, batch["ranks"], batch["response_mask"])
    return acc.result()


def ranking_cli(args) -> int:
    exp, workdir, stage_name, export_dir = resolve_target(args.target, args.workdir)
    exp = apply_overrides(exp, args.overrides)
    name, stage = pick_stage(exp, args.stage or stage_name)
    model_dir = args.model or export_dir or os.path.join(workdir, name, "export")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"no reward model at {model_dir}: train the stage first "
                                f"(starling-jax train {args.target} --workdir {workdir}) or pass --model DIR")
    config, params = load_reward_model(model_dir)
    result = evaluate_reward_model(config, params, stage, args.split, args.batch_size, args.max_groups)
    result = {"model": model_dir, "split": args.split, **result}
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0



# ----------------------------------------------------------------------------------------------------------------------
# eval policy | compare | rm


def _common(p, judge: bool = False) -> None:
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer (name or path)")
    p.add_argument("--template", default=None, help="override the checkpoint's chat template (e.g. openchat_3.5)")
    p.add_argument("--stage", default=None, help="the stage, when a checkpoint is a run's WORKDIR")
    p.add_argument("--batch-size", type=int, default=8, help="rows generated / scored together")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="shard over a device mesh, e.g. fsdp=-1 (all devices) or data=2,fsdp=4 (default: one device)")
    if not judge:
        p.add_argument("--max-new-tokens", type=int, default=None,
                       help="reply length limit (default min(1024, half the model's context))")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--length-bucket", type=int, default=64, help="pad prompts to a multiple of this")


def _parser_class():
    import argparse

    class Parser(argparse.ArgumentParser):
        """Usage errors become one InputError line (exit 2 through the CLI guard), like every other bad input."""

        def error(self, message):
            raise InputError(f"{self.prog}: {message} (see {self.prog} --help)")
    return Parser


def _subparsers():
    ArgumentParser = _parser_class()
    parsers = {}
    p = ArgumentParser(prog="starling-jax eval policy", description="MT-Bench / AlpacaEval answer files "
                                "from a policy, with its own chat template (resumable: answers already in --out are "
                                "kept)")
    p.add_argument("checkpoint", help="a run's stage (WORKDIR/<stage>) or a Hugging Face directory")
    p.add_argument("--questions", required=True, help="MT-Bench question.jsonl or AlpacaEval instructions (.json)")
    p.add_argument("--format", required=True, choices=("mt_bench", "alpaca_eval"))
    p.add_argument("--out", required=True, help="fschat answer JSONL (mt_bench) or AlpacaEval outputs JSON")
    p.add_argument("--model-id", default=None, help="model_id / generator name (default: the checkpoint's name)")
    p.add_argument("--temperature", type=float, default=None,
                   help="alpaca_eval: sampling temperature (default 0.7; 0 = greedy); mt_bench uses its per-category "
                        "temperatures unless this is given")
    p.add_argument("--num-choices", type=int, default=1, help="mt_bench: answers per question (fschat's num_choices)")
    _common(p)
    parsers["policy"] = p

    p = ArgumentParser(prog="starling-jax eval compare", description="win rate of policy A over policy B "
                                "on the same prompts, judged by a reward model")
    p.add_argument("a", help="policy A: a run's stage or a Hugging Face directory")
    p.add_argument("b", help="policy B (the baseline)")
    p.add_argument("--prompts", required=True, help=".txt (one per line), or .json/.jsonl/.parquet rows with "
                   "'prompt', 'instruction' or 'turns'")
    p.add_argument("--judge", required=True, help="the reward model: an rm stage or a *ForSequenceClassification dir")
    p.add_argument("--judge-template", default=None, help="override the judge's chat template")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of A and B (0 = greedy)")
    p.add_argument("--tie-margin", type=float, default=0.0, help="score gaps within this count as ties")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals")
    p.add_argument("--out", default=None, help="also write the JSON result (with every prompt, reply and score)")
    _common(p)
    parsers["compare"] = p

    p = ArgumentParser(prog="starling-jax eval rm", description="RewardBench section scores and K-wise "
                                "ranking metrics of a reward model")
    p.add_argument("checkpoint", help="an rm stage (WORKDIR/<stage>) or a *ForSequenceClassification directory")
    p.add_argument("--rewardbench", default=None, help="RewardBench rows (.parquet/.json/.jsonl: prompt, chosen, "
                   "rejected, subset)")
    p.add_argument("--nectar", default=None, help="Nectar-format rows for the K-wise metrics (default for a run's "
                   "stage: its experiment's held-out rows)")
    p.add_argument("--max-groups", type=int, default=None, help="K-wise metrics on at most this many groups")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    _common(p, judge=True)
    parsers["rm"] = p
    return parsers


def add_eval_arguments(parser) -> None:
    import argparse
    parser.description = __doc__.split("\n\n")[1] if "\n\n" in __doc__ else None
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("Options of each form: starling-jax eval policy --help (compare, rm likewise); "
                     "starling-jax eval TARGET --help for the ranking metrics.")
    parser.add_argument("eval_args", nargs=argparse.REMAINDER,
                        help="policy | compare | rm ..., or TARGET [--workdir --stage --model --split --max-groups "
                             "--batch-size --set --output] for the ranking metrics")


def _mesh(spec: Optional[str]):
    if not spec:
        return None, None
    sizes = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("data", "fsdp", "tensor"):
            raise InputError(f"--mesh {spec}: axes are data, fsdp and tensor (e.g. fsdp=-1 or data=2,fsdp=4)")
        try:
            sizes[key.strip()] = int(value)
        except ValueError:
            raise InputError(f"--mesh {spec}: {key.strip()} needs an integer size") from None
    config = MeshConfig(**{"data": 1, "fsdp": 1, "tensor": 1, **sizes})
    return sharding.make_mesh(config), config.rules


def _load(path, args, want, template=None, own_template=False):
    """A checkpoint with the command's overrides (a judge keeps its own tokenizer and template: own_template)."""
    mesh, rules = _mesh(args.mesh)
    return load_checkpoint(path, stage=None if own_template else args.stage,
                           tokenizer=None if own_template else args.tokenizer,
                           template=template if own_template else (template or args.template),
                           dtype=args.dtype, mesh=mesh, rules=rules, want=want), mesh, rules


def _generator(ckpt, args, mesh, rules):
    if args.top_k < 0 or not 0 < args.top_p <= 1:
        raise InputError(f"--top-k must be >= 0 and 0 < --top-p <= 1 (got {args.top_k}, {args.top_p})")
    return Generator(ckpt, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, top_p=args.top_p,
                     top_k=args.top_k, seed=args.seed, length_bucket=args.length_bucket, mesh=mesh, rules=rules)


def _write(path: Optional[str], result: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
            f.write("\n")


def policy_cli(args) -> int:
    if args.temperature is not None and args.temperature < 0:
        raise InputError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.num_choices < 1:
        raise InputError(f"--num-choices must be >= 1, got {args.num_choices}")
    rows = (bm.read_mt_bench_questions(args.questions) if args.format == "mt_bench"
            else bm.read_alpaca_eval_instructions(args.questions))
    ckpt, mesh, rules = _load(args.checkpoint, args, "lm")
    gen = _generator(ckpt, args, mesh, rules)
    model_id = args.model_id or ckpt.name
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.format == "mt_bench":
        report = answer.answer_mt_bench(gen, rows, args.out, model_id, args.num_choices, temperature=args.temperature)
    else:
        temperature = 0.7 if args.temperature is None else args.temperature
        report = answer.answer_alpaca_eval(gen, rows, args.out, model_id, temperature)
    if gen.truncated:
        print(f"note: {gen.truncated} prompts were longer than the model's context allows beside "
              f"{gen.max_new_tokens} new tokens and were cut to their most recent tokens", file=sys.stderr)
    print(json.dumps({"out": args.out, "format": args.format, "model_id": model_id, "template": ckpt.template.name,
                      **report}))
    return 0


def compare_cli(args) -> int:
    if args.temperature < 0 or args.tie_margin < 0 or args.bootstrap < 1:
        raise InputError("--temperature and --tie-margin must be >= 0 and --bootstrap >= 1")
    prompts = bm.read_prompts(args.prompts)
    ck_a, mesh, rules = _load(args.a, args, "lm")
    ck_b, _, _ = _load(args.b, args, "lm")
    ck_j, _, _ = _load(args.judge, args, "score", template=args.judge_template, own_template=True)
    result = compare(_generator(ck_a, args, mesh, rules), _generator(ck_b, args, mesh, rules),
                     Judge(ck_j, args.batch_size), prompts, args.temperature, args.tie_margin, args.bootstrap,
                     args.seed)
    rows = result.pop("rows")
    head = {"a": args.a, "b": args.b, "judge": args.judge, "prompts": args.prompts, "temperature": args.temperature,
            **result}
    _write(args.out, {**head, "rows": rows})
    print(json.dumps(head))
    print(stats.describe(result, ck_a.name, ck_b.name))
    return 0


def rm_cli(args) -> int:
    rb_rows = bm.read_rewardbench(args.rewardbench) if args.rewardbench else None  # bad files fail before loading
    ckpt, _, _ = _load(args.checkpoint, args, "score")
    result: dict = {"model": args.checkpoint, "template": ckpt.template.name}
    if rb_rows is not None:
        result["rewardbench"] = rewardbench(Judge(ckpt, args.batch_size), rb_rows)
    if args.nectar:
        template = ckpt.template.name if ckpt.template.name in TEMPLATES else "auto"  # "auto": the dir's own Jinja
        stage = Experiment(name="eval_rm", model=ModelSection(config=ckpt.config, tokenizer=ckpt.tokenizer_name,
                                                              template=template),
                           data=DataConfig(source=args.nectar, heldout_fraction=0.0,
                                           max_length=min(ckpt.config.max_seq_len, 1024),
                                           max_prompt_length=min(ckpt.config.max_seq_len // 2, 512)))
        result["nectar"] = {"source": args.nectar, **evaluate_reward_model(
            ckpt.config, ckpt.params, stage, "train", args.batch_size, args.max_groups)}
    elif export_lib.is_stage_source(args.checkpoint):
        ref = export_lib.resolve_stage(args.checkpoint, args.stage)
        if ref.config.data is not None:
            result["nectar"] = {"source": f"{ref.config.data.source} (held-out split)", **evaluate_reward_model(
                ckpt.config, ckpt.params, ref.config, "heldout", args.batch_size, args.max_groups)}
    if len(result) == 2:
        raise InputError(f"{args.checkpoint}: nothing to evaluate: pass --rewardbench FILE and/or --nectar FILE")
    _write(args.out, result)
    print(json.dumps(result, indent=1))
    rb = result.get("rewardbench")
    if rb:
        secs = ", ".join(f"{k} {v:.1f}" for k, v in rb["sections"].items())
        score = f"score {rb['score']:.1f}; " if rb["score"] is not None else ""
        print(f"RewardBench: {score}{secs} ({rb['rows']} rows, accuracy {100 * rb['accuracy']:.1f}%)")
    return 0


def eval_cli(args) -> int:
    argv = list(args.eval_args)
    if argv and argv[0] in SUBCOMMANDS and not (len(argv) == 1 and os.path.exists(argv[0])):
        parsers = _subparsers()
        sub = parsers[argv[0]].parse_args(argv[1:])
        return {"policy": policy_cli, "compare": compare_cli, "rm": rm_cli}[argv[0]](sub)
    p = _parser_class()(prog="starling-jax eval", description="K-wise ranking metrics of a reward model")
    add_ranking_arguments(p)
    return ranking_cli(p.parse_args(argv))


add_arguments = add_eval_arguments
cli = eval_cli
