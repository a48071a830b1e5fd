"""Starling-LM-7B-beta's RL stage: PPO on Nectar prompts against Starling-RM-34B.

    starling-jax plan experiments/starling_beta_ppo.py --target v5e-16
    starling-jax run experiments/starling_beta_ppo.py --workdir runs/beta

Needs local copies (HF safetensors directories; nothing is downloaded at run time):
  checkpoints/openchat-3.5-0106   openchat/openchat-3.5-0106 (policy init; Mistral-7B architecture, vocab 32002)
  checkpoints/Starling-RM-34B     Nexusflow/Starling-RM-34B (Yi-34B-Chat trunk + Linear(7168, 1)), converted to a
                                  LlamaForSequenceClassification directory, with its tokenizer (ChatML tokens)
  data/nectar                     berkeley-nest/Nectar parquet/JSONL files (or a tfds data_dir)

Sources: the Starling-LM-7B-beta and Starling-RM-34B model cards (Nexusflow): policy OpenChat-3.5-0106, reward model
Starling-RM-34B reading Yi-34B-Chat's ChatML ("<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n..."),
PPO. The beta run's training code and hyperparameters were not published. The optimisation values below are the
authors' last PPO config for an OpenChat-3.5 successor: thwu1/trlx commit 2400956 (4 Jan 2024), whose
examples/hh/mistral_apa.py trains openchat-3.5-1210 with the PPO loss of that commit's modeling_ppo.py: top 4 layers
(hydra), a critic that is its own trainable copy of those top 4 layers + final norm + Linear(4096, 1)
(MistralModelWithHydraValueHead: value_head="layers", value_head_layers=4), AdamW lr 4e-7 held constant
(cosine_annealing with eta_min = lr), betas (0.9, 0.95), weight decay 1e-6, 64 rollouts and 4 per update per process, 2 PPO epochs, clip 0.2, value clip 0.2, vf_coef 1, no advantage
whitening, KL coefficient 0.001 fixed, rewards clipped to +-10 and scaled by a running std, max_new_tokens 1024,
temperature 1, 2148 tokens, 20,000 updates. tests/test_recipes.py lists each value with its line, or "choice".

Choices: 16 devices (one process each: 1,024 rollouts per chunk, minibatches of 64, 32 updates per chunk as the
fork's 2 x 64 / 4; 625 chunks = 20,000 updates); Nectar's prompts (the fork loads ThWu/cleaned_prompt_r_2).
"""

from starling_jax.algorithms.ppo import PPOOptions
from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, LoggingConfig, MeshConfig, ModelSection,
                                 OptimConfig, RewardModelSection, RolloutConfig, TrainConfig)
from starling_jax.models import PRESETS

SEQ_LEN, MAX_NEW = 2148, 1024
DEVICES = 16  # a choice: the 34B reward model needs the room
PER_PROCESS_ROLLOUTS, PER_PROCESS_BATCH, PPO_EPOCHS, TOTAL_UPDATES = 64, 4, 2, 20000
CHUNK, MINIBATCH = PER_PROCESS_ROLLOUTS * DEVICES, PER_PROCESS_BATCH * DEVICES
CHUNKS = TOTAL_UPDATES // (PPO_EPOCHS * CHUNK // MINIBATCH)  # 625

POLICY = PRESETS["openchat-3.5"].replace(dtype="bfloat16", param_dtype="float32", remat="full")
REWARD_MODEL = PRESETS["yi-34b"].replace(head="score", dtype="bfloat16", param_dtype="bfloat16")


def get_config() -> Experiment:
    return Experiment(
        name="starling_beta_ppo",
        model=ModelSection(config=POLICY, path="checkpoints/openchat-3.5-0106", tokenizer="openchat-3.5",
                           template="openchat_3.5", trainable_top_layers=4, train_lm_head=True),
        reward_model=RewardModelSection(config=REWARD_MODEL, path="checkpoints/Starling-RM-34B",
                                        tokenizer="checkpoints/Starling-RM-34B", template="chatml", max_length=2048),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        data=DataConfig(source="data/nectar", heldout_fraction=0.001, max_length=SEQ_LEN,
                        max_prompt_length=SEQ_LEN - MAX_NEW, on_bad_row="skip"),
        objective=PPOOptions(ppo_clip=0.2, value_clip=0.2, vf_coef=1.0, kl_coef=0.001,
                             kl_target=None, kl_horizon=10000, gamma=1.0, gae_lambda=0.95, value_head="layers",
                             value_head_layers=4, reward_clip=10.0, scale_reward=True, whiten_advantages=False),
        optim=OptimConfig(learning_rate=4e-7, warmup_steps=0, schedule="cosine", end_lr_fraction=1.0, b1=0.9,
                          b2=0.95, eps=1e-8, weight_decay=1e-6, grad_clip=1.0),
        rollout=RolloutConfig(prompts_per_step=CHUNK, max_new_tokens=MAX_NEW, temperature=1.0, top_k=0, top_p=1.0,
                              epochs=PPO_EPOCHS, minibatch_size=MINIBATCH, eval_prompts=100,
                              generation_batch=64),  # memory only: 4 prompts per device per rollout call
        train=TrainConfig(steps=CHUNKS, batch_size=CHUNK, eval_every=16, seed=1000),
        checkpoint=CheckpointConfig(every=16, keep=3),
        logging=LoggingConfig(every=1, tensorboard=True),
    )
