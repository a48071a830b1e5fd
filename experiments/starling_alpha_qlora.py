"""Starling-LM-7B-alpha's RL stage on ONE 16 GiB chip: APA as in alpha (experiments/starling_alpha_apa.py), with the
OpenChat-3.5 policy and the Starling-RM-7B-alpha reward model both stored in 4-bit NormalFloat and the policy trained
through LoRA adapters (QLoRA: Dettmers et al. 2023, arXiv:2305.14314).

    starling-jax plan experiments/starling_alpha_qlora.py --target v5e-1              # the update step, one v5e chip
    starling-jax plan experiments/starling_alpha_qlora.py --target v5e-1 --rollout    # the rollout phase
    starling-jax plan experiments/starling_alpha_qlora.py --target v5e-8 --set rollout.prompts_per_step=512 \
        --set rollout.minibatch_size=32 --set train.batch_size=512 \
        --set rollout.generation_batch=32 [--rollout]        # alpha's 8-process sizes, 4 rows per chip a call
    starling-jax run experiments/starling_alpha_qlora.py --workdir runs/alpha_qlora

Needs the local copies starling_alpha_apa.py lists (checkpoints/openchat_3.5, checkpoints/Starling-RM-7B-alpha,
data/nectar).

What it keeps from alpha (starling_alpha_apa.py, each value's source in its docstring and tests/test_recipes.py): the
APA loss with lambda 1, KL 0.01 fixed, GAE gamma 1 / lambda 0.95, value clip 0.2, vf_coef 1, the critic-only rule above
value loss 1, rewards clipped to +-10 and scaled by a running std, no advantage whitening, AdamW betas (0.9, 0.95), eps
1e-8, weight decay 1e-6, clip 1.0, constant rate; 1024 new tokens after prompts of up to 1124 (2148 in all), top_k 0,
top_p 1, temperature 1; the RM reads "[INST] ... [/INST]" (llama2_trainer) at up to 2048 tokens; bf16 compute.
Sizes per process as the fork's config gives them (64 rollouts per chunk, 4 per update, 2 epochs: 32 updates a
chunk, 625 chunks = 20,000 updates): on one chip that is one process, so these are the fork's own sizes for one
process (alpha ran 8: 512 and 32, the v5e-8 command above).

What changes, and why:
  - storage: both 7B models' layer matrices in nf4 (model.config.quantize, models/quantize.py: QLoRA's levels, blocks
    of 64 along each matrix's input axis, absmax in float32); the embeddings, the LM head and the RM's score head stay
    bf16. Alpha's fp32 master weights are for weights that train; nothing of the base trains here.
  - training: LoRA adapters on every projection (q, k, v, o, gate, up, down) of every layer instead of alpha's top 4
    layers in full: QLoRA's choice of targets, rank 64 and alpha 16 (the paper's 7B setting). No adapter dropout
    (QLoRA's 0.1): rl stages reject it, as it would turn the policy's log-probs against the rollouts' into noise. The
    reference is the base with the adapters off (no copy).
  - critic: trlx's default value head (a Linear(4096, 8192)-ReLU-Linear(8192, 1) on the policy's last hidden state,
    objective.value_head="mlp") instead of alpha's trainable copy of the top 4 layers: that copy alone (0.87B fp32
    parameters and their AdamW moments, ~10.5 GB) would take two thirds of the chip.
  - learning rate 1e-5: alpha's 2e-7 is a full-layer rate; LoRA's updates pass through a rank-64 product scaled by
    alpha / rank = 0.25, and LoRA rates run 10-1000x full fine-tuning's (QLoRA: 2e-4 for SFT). A choice, not tuned.
  - generation_batch: rows per generate / RM / experience call (memory only): 4, the largest of 4, 8, 16 whose
    rollout phase the TPU compiler fits on one v5e chip (`plan --rollout --search rollout.generation_batch=4,8,16`:
    15.98 GiB at 4, 17.03 at 8, 18.92 at 16; generation is the largest call; docs/SHARDING.md "One chip").
  - train.grad_accum = 4 (memory only): each update's minibatch of 4 rollouts is taken as 4 micro-batches of 1 rollout
    whose gradients accumulate into ONE optimizer update, equal to alpha's minibatch-of-4 update (the same token-mean
    APA and value losses, the critic-only rule on the whole minibatch's value loss, the same metrics; to float
    rounding: stages/kinds/rlaif.py make_rl_step, tests/test_rl_accum.py). The update's activations are one
    rollout's of 2148 tokens at a time instead of four's: the update step compiles to 15.67 GiB on one v5e
    chip with it, 19.56 without (docs/SHARDING.md "One chip").
    With the v5e-8 sizes of the command above (minibatches of 32) each micro-batch is 8 rollouts, one per chip; there
    the update step compiles to 6.22 GiB per chip and the rollout phase to 7.19 (docs/SHARDING.md "One chip").
"""

import dataclasses
import os

from starling_jax.config import Experiment, LoraConfig
from starling_jax.stages.experiment import load_experiment

ALPHA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "starling_alpha_apa.py")  # the recipe this derives

PER_PROCESS_ROLLOUTS, PER_PROCESS_BATCH, PPO_EPOCHS, TOTAL_UPDATES = 64, 4, 2, 20000  # the fork's, per process
CHUNK, MINIBATCH = PER_PROCESS_ROLLOUTS, PER_PROCESS_BATCH  # one chip = one process
UPDATES_PER_CHUNK = PPO_EPOCHS * CHUNK // MINIBATCH  # 32
CHUNKS = TOTAL_UPDATES // UPDATES_PER_CHUNK  # 625
GENERATION_BATCH = 4  # rows per rollout call (memory only; docs/SHARDING.md "One chip")
GRAD_ACCUM = MINIBATCH  # micro-batches per update: one rollout each (memory only: the update is alpha's)

# The frozen base's layers in nf4; fp32 masters for what trains (the adapters, the critic); the embeddings and LM
# head stay in the bf16 compute dtype (models.frozen_storage)
NF4 = dict(quantize="nf4", quantize_block=64)
LORA = LoraConfig(rank=64, alpha=16.0, dropout=0.0, targets=("q", "k", "v", "o", "gate", "up", "down"))


def get_config() -> Experiment:
    """experiments/starling_alpha_apa.py with the changes above (everything else is alpha's, by construction)."""
    alpha = load_experiment(ALPHA)
    r = dataclasses.replace
    return r(alpha, name="starling_alpha_qlora",
             model=r(alpha.model, config=alpha.model.config.replace(**NF4), trainable_top_layers=0,
                     train_lm_head=False, lora=LORA),
             reward_model=r(alpha.reward_model, config=alpha.reward_model.config.replace(**NF4)),
             objective=r(alpha.objective, value_head="mlp", value_head_layers=0),
             optim=r(alpha.optim, learning_rate=1e-5),
             rollout=r(alpha.rollout, prompts_per_step=CHUNK, minibatch_size=MINIBATCH,
                       generation_batch=GENERATION_BATCH),
             train=r(alpha.train, steps=CHUNKS, batch_size=CHUNK, grad_accum=GRAD_ACCUM))
