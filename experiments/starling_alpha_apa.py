"""Starling-LM-7B-alpha's RL stage: APA on Nectar prompts against Starling-RM-7B-alpha.

    starling-jax plan experiments/starling_alpha_apa.py --target v5e-8      # TPU-compiled memory/FLOPs, no TPU needed
    starling-jax run experiments/starling_alpha_apa.py --workdir runs/alpha  # on a pod, with the checkpoints below

Needs local copies (HF safetensors directories; nothing is downloaded at run time):
  checkpoints/openchat_3.5            openchat/openchat_3.5 (the policy init; Mistral-7B, vocab 32002)
  checkpoints/Starling-RM-7B-alpha    berkeley-nest/Starling-RM-7B-alpha (Llama-2-7B-chat trunk + Linear(4096, 1)),
                                      converted to a LlamaForSequenceClassification directory, with its tokenizer
  data/nectar                         berkeley-nest/Nectar parquet/JSONL files (or a tfds data_dir)

Reference: the authors' trlx fork (github thwu1/trlx) at commit 0fb4e1e (27 Nov 2023, the head of its main branch
for these files, the days of the alpha release): examples/hh/mistral_apa.py (added in 46d4829, unchanged at
0fb4e1e), trlx/models/modeling_ppo.py (whose PPO loss that commit replaced by APA's), the PPO trainer, and
configs/accelerate/zero2-bf16.yaml. Later commits train another policy (openchat-3.5-1210: 700287b, 2400956).
tests/test_recipes.py holds every value below with its file and line at that commit, or "choice" and why.

What the fork's config says (and this recipe follows):
  - policy: num_layers_unfrozen=4 (the top 4 layers, the final norm and the untied LM head train; the trunk below is
    frozen and shared with the reference, "hydra"); AdamW lr 2e-7, betas (0.9, 0.95), eps 1e-8, weight decay 1e-6;
    cosine_annealing with eta_min = lr, i.e. a CONSTANT rate of 2e-7; gradient clipping 1.0 (DeepSpeed config);
    bf16 compute with fp32 master weights.
  - rollouts: 64 per process per chunk, 4 per process per update, 2 epochs per chunk (32 updates per chunk); 20,000
    updates; max_new_tokens 1024, top_k 0, top_p 1, temperature 1; prompts left-truncated to 2148 - 1024 tokens;
    100 held-out prompts from a 0.001 test split.
  - critic: value_head="layers" with value_head_layers=4: the fork's OpenChat model class
    (MistralModelWithHydraValueHead) gives the critic its own trainable copy of the top 4 layers and the final norm,
    taken from the policy at the start, plus Linear(4096, 1) without bias, run over the frozen hidden state entering
    the top 4 layers.
  - loss: APA (logp - logp_old - A)^2, i.e. lambda = 1; value loss 0.5 max((V-R)^2, (V_clip-R)^2) with the values
    clipped to old +- 0.2, vf_coef 1; a minibatch whose value loss exceeds 1 trains only the critic; GAE gamma 1,
    lambda 0.95, no advantage whitening; KL coefficient 0.01, fixed.
  - rewards: the RM score clipped to +-10, folded into running moments, divided by the running std.
  - reward model: Llama-2-7B-chat + Linear(4096, 1), pad = unk, 2048 tokens, left truncation; OpenChat samples
    re-rendered as "[INST] {user} [/INST] {reply}</s> [INST] ..." with stripped turns (template "llama2_trainer").

Deviations (choices, each with its reason in tests/test_recipes.py and docs/RLAIF.md "Fidelity"):
  - the process count is not recorded (the yaml says 8 processes, the launch comment --num_processes 2): we take 8
    devices, one process each: 512 rollouts per chunk (64 x 8), minibatches of 32 (4 x 8), 625 chunks = 20,000
    updates. The reward model is sharded over the same mesh instead of sitting on the last GPU.
  - prompts: Nectar's prompts (the fork loads a cleaned prompt set, ThWu/rlhf_cleaned_prompt, not available here).
  - the released Starling-RM-7B-alpha as the reward model (the fork's config loads banghua/refine_rm).
"""

from starling_jax.algorithms.apa import APAOptions
from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, LoggingConfig, MeshConfig, ModelSection,
                                 OptimConfig, RewardModelSection, RolloutConfig, TrainConfig)
from starling_jax.models import PRESETS

SEQ_LEN, MAX_NEW = 2148, 1024
DEVICES = 8  # one process per device (the fork's zero2-bf16.yaml: num_processes 8)
PER_PROCESS_ROLLOUTS, PER_PROCESS_BATCH, PPO_EPOCHS, TOTAL_UPDATES = 64, 4, 2, 20000
CHUNK, MINIBATCH = PER_PROCESS_ROLLOUTS * DEVICES, PER_PROCESS_BATCH * DEVICES
UPDATES_PER_CHUNK = PPO_EPOCHS * CHUNK // MINIBATCH  # 32, as the fork's 2 epochs x 64 / 4
CHUNKS = TOTAL_UPDATES // UPDATES_PER_CHUNK  # 625

# bf16 compute, fp32 master weights (DeepSpeed bf16 mixed precision): updates of 2e-7 vanish in bf16 weights
POLICY = PRESETS["openchat-3.5"].replace(dtype="bfloat16", param_dtype="float32", remat="full")
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
        data=DataConfig(source="data/nectar", heldout_fraction=0.001, max_length=SEQ_LEN,
                        max_prompt_length=SEQ_LEN - MAX_NEW, on_bad_row="skip"),
        objective=APAOptions(apa_lambda=1.0, kl_coef=0.01, kl_target=None, kl_horizon=10000,
                             vf_coef=1.0, value_clip=0.2, gamma=1.0, gae_lambda=0.95, critic_only_above=1.0,
                             value_head="layers", value_head_layers=4, reward_clip=10.0, scale_reward=True,
                             whiten_advantages=False),
        # cosine_annealing(T_max=10000, eta_min=lr) is a constant rate: cosine with end_lr_fraction = 1
        optim=OptimConfig(learning_rate=2e-7, warmup_steps=0, schedule="cosine", end_lr_fraction=1.0, b1=0.9,
                          b2=0.95, eps=1e-8, weight_decay=1e-6, grad_clip=1.0),
        rollout=RolloutConfig(prompts_per_step=CHUNK, max_new_tokens=MAX_NEW, temperature=1.0, top_k=0, top_p=1.0,
                              epochs=PPO_EPOCHS, minibatch_size=MINIBATCH, eval_prompts=100,
                              generation_batch=32),  # memory only: 4 prompts per device per rollout call
        train=TrainConfig(steps=CHUNKS, batch_size=CHUNK, eval_every=16, seed=1000),
        checkpoint=CheckpointConfig(every=16, keep=3),
        logging=LoggingConfig(every=1, tensorboard=True),
    )
