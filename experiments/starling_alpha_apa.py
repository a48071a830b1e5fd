"""Starling-LM-7B-alpha's RL stage: APA on Nectar prompts against Starling-RM-7B-alpha.

    starling-jax plan experiments/starling_alpha_apa.py --devices 8          # memory/FLOPs, no hardware needed
    starling-jax run experiments/starling_alpha_apa.py --workdir runs/alpha  # on a pod, with the checkpoints below

Needs local copies (HF safetensors directories; nothing is downloaded at run time):
  checkpoints/openchat_3.5            openchat/openchat_3.5 (the policy init; Mistral-7B, vocab 32002)
  checkpoints/Starling-RM-7B-alpha    berkeley-nest/Starling-RM-7B-alpha (Llama-2-7B-chat trunk + Linear(4096, 1)),
                                      converted to a LlamaForSequenceClassification directory, with its tokenizer
  data/nectar                         berkeley-nest/Nectar parquet/JSONL files (or a tfds data_dir)

Sources for every number (docs/RLAIF.md and /shared/docs/STARLING.md have the detail):
  - Starling blog (Nov 2023) and model cards: policy OpenChat-3.5, reward model Starling-RM-7B-alpha, APA, Nectar.
  - The authors' trlx fork (thwu1/trlx) APA config: num_layers_unfrozen=4 (hydra), MLP value head
    Linear(4096, 8192)-ReLU-Linear(8192, 1), AdamW lr 2e-7, betas (0.9, 0.95), eps 1e-8, weight decay 1e-6, cosine
    schedule, 10k optimisation steps, chunk of 64 rollouts, 2 epochs per chunk, KL coefficient 0.01 fixed, reward
    scaled by a running std and clipped to +-10, top_k 0, top_p 1.0, max_new_tokens 1024, sequence length 2148,
    APA coefficient 1 (the paper's default is lambda = 0.1), value loss unclipped 0.5 (V - R)^2, GAE gamma 1,
    lambda 0.95, no advantage whitening, and: a step whose value loss exceeds 1 trains only the critic.
  - The fork's trainer re-renders OpenChat samples for the reward model as "[INST] {user} [/INST] {reply}</s>" after
    the Llama tokenizer's BOS (template "llama2_trainer"), left-truncated to 2048 tokens.

Deviations (documented, deliberate):
  - The fork's train batch was 28 (4 per process x 7 GPUs; the 8th GPU held the reward model). Here the reward model
    is sharded across the same mesh as the policy, so minibatches are 32 (4 per device on 8 devices) over chunks of
    64 rollouts: 2 epochs x 2 minibatches = 4 updates per chunk, and 2,500 chunks = the fork's 10k updates.
"""

from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, LoggingConfig, MeshConfig, ModelSection,
                                 ObjectiveConfig, OptimConfig, RewardModelSection, RolloutConfig, TrainConfig)
from starling_jax.models import PRESETS

SEQ_LEN, MAX_NEW = 2148, 1024

POLICY = PRESETS["openchat-3.5"].replace(dtype="bfloat16", param_dtype="bfloat16", remat="full")
REWARD_MODEL = PRESETS["llama2-7b"].replace(head="score", dtype="bfloat16", param_dtype="bfloat16")


def get_config() -> Experiment:
    return Experiment(
        name="starling_alpha_apa",
        model=ModelSection(config=POLICY, path="checkpoints/openchat_3.5", tokenizer="openchat-3.5",
                           template="openchat_3.5", trainable_top_layers=4, train_lm_head=True),
        reward_model=RewardModelSection(config=REWARD_MODEL, path="checkpoints/Starling-RM-7B-alpha",
                                        tokenizer="checkpoints/Starling-RM-7B-alpha", template="llama2_trainer",
                                        max_length=2048),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        data=DataConfig(source="data/nectar", heldout_fraction=0.01, max_length=SEQ_LEN,
                        max_prompt_length=SEQ_LEN - MAX_NEW, on_bad_row="skip"),
        objective=ObjectiveConfig(name="apa", apa_lambda=1.0, kl_coef=0.01, kl_target=None, vf_coef=1.0,
                                  value_clip=None, gamma=1.0, gae_lambda=0.95, critic_only_above=1.0,
                                  value_head="mlp", reward_clip=10.0, scale_reward=True, whiten_advantages=False),
        optim=OptimConfig(learning_rate=2e-7, warmup_steps=0, schedule="cosine", end_lr_fraction=0.0, b1=0.9,
                          b2=0.95, eps=1e-8, weight_decay=1e-6, grad_clip=1.0),
        rollout=RolloutConfig(prompts_per_step=64, max_new_tokens=MAX_NEW, temperature=1.0, top_k=0, top_p=1.0,
                              epochs=2, minibatch_size=32, eval_prompts=256),
        train=TrainConfig(steps=2500, batch_size=64, eval_every=250, seed=0),
        checkpoint=CheckpointConfig(every=100, keep=3),
        logging=LoggingConfig(every=10, tensorboard=True),
    )
