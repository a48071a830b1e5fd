"""Starling-LM-7B-beta's RL stage: full-parameter PPO on Nectar prompts against Starling-RM-34B.

    starling-jax plan experiments/starling_beta_ppo.py --devices 16
    starling-jax run experiments/starling_beta_ppo.py --workdir runs/beta

Needs local copies (HF safetensors directories; nothing is downloaded at run time):
  checkpoints/openchat-3.5-0106   openchat/openchat-3.5-0106 (policy init; Mistral-7B architecture, vocab 32002)
  checkpoints/Starling-RM-34B     Nexusflow/Starling-RM-34B (Yi-34B-Chat trunk + Linear(7168, 1)), converted to a
                                  LlamaForSequenceClassification directory, with its tokenizer (ChatML tokens)
  data/nectar                     berkeley-nest/Nectar parquet/JSONL files (or a tfds data_dir)

Sources: the Starling-LM-7B-beta and Starling-RM-34B model cards (Nexusflow): policy OpenChat-3.5-0106, reward model
Starling-RM-34B reading Yi-34B-Chat's ChatML ("<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n..."),
PPO. The beta run's optimisation hyperparameters were not published; the values below follow the alpha recipe
(learning rate scale, chunking, sampling, KL 0.01, reward scaling) and trlx's PPO defaults (clip 0.2, value clip 0.2,
vf_coef 1, 4 PPO epochs per chunk, whitened advantages, the Ziegler adaptive KL controller with target 6 and horizon
10000). Every layer trains (no hydra), so the reference is a full frozen copy of the initial policy.
"""

from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, LoggingConfig, MeshConfig, ModelSection,
                                 ObjectiveConfig, OptimConfig, RewardModelSection, RolloutConfig, TrainConfig)
from starling_jax.models import PRESETS

SEQ_LEN, MAX_NEW = 2148, 1024

POLICY = PRESETS["openchat-3.5"].replace(dtype="bfloat16", param_dtype="float32", remat="full")
REWARD_MODEL = PRESETS["yi-34b"].replace(head="score", dtype="bfloat16", param_dtype="bfloat16")


def get_config() -> Experiment:
    return Experiment(
        name="starling_beta_ppo",
        model=ModelSection(config=POLICY, path="checkpoints/openchat-3.5-0106", tokenizer="openchat-3.5",
                           template="openchat_3.5",
                           trainable_top_layers=0, train_lm_head=True),
        reward_model=RewardModelSection(config=REWARD_MODEL, path="checkpoints/Starling-RM-34B",
                                        tokenizer="checkpoints/Starling-RM-34B", template="chatml", max_length=2048),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        data=DataConfig(source="data/nectar", heldout_fraction=0.01, max_length=SEQ_LEN,
                        max_prompt_length=SEQ_LEN - MAX_NEW, on_bad_row="skip"),
        objective=ObjectiveConfig(name="ppo", ppo_clip=0.2, value_clip=0.2, vf_coef=1.0, kl_coef=0.01, kl_target=6.0,
                                  kl_horizon=10000, gamma=1.0, gae_lambda=0.95, value_head="mlp", reward_clip=10.0,
                                  scale_reward=True, whiten_advantages=True),
        optim=OptimConfig(learning_rate=1e-6, warmup_steps=100, schedule="cosine", end_lr_fraction=0.1, b1=0.9,
                          b2=0.95, eps=1e-8, weight_decay=1e-6, grad_clip=1.0),
        rollout=RolloutConfig(prompts_per_step=64, max_new_tokens=MAX_NEW, temperature=1.0, top_k=0, top_p=1.0,
                              epochs=4, minibatch_size=32, eval_prompts=256),
        train=TrainConfig(steps=1250, batch_size=64, eval_every=125, seed=0),
        checkpoint=CheckpointConfig(every=50, keep=3),
        logging=LoggingConfig(every=10, tensorboard=True),
    )
