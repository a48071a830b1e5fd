"""Every hyperparameter of the 7B recipes with its source, asserted against the loaded configs.

A row is (recipe, field, value, source). A source names (repository, file, commit, line) of the authors' code, a model
card or a paper, or starts with "choice:" and gives the reason (values the authors did not publish or that we change
on purpose; docs/RLAIF.md "Fidelity" lists the deviations). A recipe cannot drift from this table silently:
  - each row's value must equal the loaded config's value;
  - every field a recipe sets away from its default, and every hyperparameter its stage kind reads, must have a row;
  - the learning-rate schedule is checked at several update counts against the authors' schedule;
  - each recipe's docstring is checked against the values it states.

Reference commits of the authors' trlx fork (github thwu1/trlx), found with `git log` in a mirror:
  0fb4e1e (27 Nov 2023, main): the alpha APA run: examples/hh/mistral_apa.py (added in 46d4829, same blob at
          0fb4e1e), trlx/models/modeling_ppo.py (its PPO loss replaced by APA's), the PPO trainer, the accelerate yaml.
  2400956 (4 Jan 2024, branch add-modeling-mistral): the authors' last PPO config for an OpenChat successor
          (examples/hh/mistral_apa.py runs modeling_ppo.py's PPO loss on openchat-3.5-1210): used for beta.
"""

import math
import re

import jax.numpy as jnp
import pytest

from starling_jax.config import Experiment
from starling_jax.stages.experiment import load_experiment, to_dict
from starling_jax.models import PRESETS
from starling_jax.step.state import make_schedule


def fork(path: str, line, commit: str = "0fb4e1e") -> str:
    return f"thwu1/trlx {path}@{commit} L{line}"


APA_CFG, PPO_MOD, TRAINER = "examples/hh/mistral_apa.py", "trlx/models/modeling_ppo.py", \
    "trlx/trainer/accelerate_ppo_trainer.py"
YAML, UTILS, FREEZE = "configs/accelerate/zero2-bf16.yaml", "examples/hh/utils.py", "trlx/utils/modeling.py"
TRLX_PY, TRLX_CONFIGS = "trlx/trlx.py", "trlx/data/configs.py"
BASE_TRAINER = "trlx/trainer/accelerate_base_trainer.py"
OPENCHAT_CARD = "huggingface openchat/openchat_3.5 model card + config.json (Mistral-7B-v0.1, vocab 32002)"
RM_CARD = "huggingface berkeley-nest/Starling-RM-7B-alpha model card"
BETA_CARD = "huggingface Nexusflow/Starling-LM-7B-beta and Nexusflow/Starling-RM-34B model cards"
NO_FILES = "choice: the run's files are local paths (nothing downloads at run time); README lists them"
MESH = "choice: fully sharded data parallel over every device (fsdp=-1); the fork used DeepSpeed ZeRO-2"
OPS = "choice: operational (checkpoints, logging), not a training hyperparameter"
BETA = "2400956"

ALPHA = [
    ("name", "starling_alpha_apa", "choice: the run's name"),
    ("model.config", PRESETS["openchat-3.5"].replace(dtype="bfloat16", param_dtype="float32", remat="full"),
     f"{fork(APA_CFG, 42)} model_path openchat/openchat_3.5 ({OPENCHAT_CARD}); bf16 compute with fp32 master "
     f"weights: {fork(YAML, 17)} mixed_precision bf16 under DeepSpeed; remat is a memory choice"),
    ("model.path", "checkpoints/openchat_3.5", NO_FILES),
    ("model.tokenizer", "openchat-3.5", fork(APA_CFG, 43)),
    ("model.template", "openchat_3.5", f"{fork(UTILS, 16)} from_list_to_openchat (GPT4 Correct User/Assistant); "
     "choice: the model card's exact spacing, see docs/RLAIF.md Fidelity"),
    ("model.trainable_top_layers", 4, fork(APA_CFG, 42) + " num_layers_unfrozen=4"),
    ("model.train_lm_head", True, fork(FREEZE, 32) + " the output embedding is frozen only when tied; Mistral's "
     "is untied"),
    ("reward_model.config", PRESETS["llama2-7b"].replace(head="score", dtype="bfloat16", param_dtype="bfloat16"),
     f"{fork(APA_CFG, 147)} meta-llama/Llama-2-7b-chat-hf trunk + {fork(APA_CFG, 105)} Linear(n_embd, 1, "
     "bias=False); bf16: choice (frozen, never updated)"),
    ("reward_model.path", "checkpoints/Starling-RM-7B-alpha", f"choice: the released Starling-RM-7B-alpha "
     f"({fork(UTILS, 124, BETA)}); {fork(APA_CFG, 153)} loads banghua/refine_rm"),
    ("reward_model.tokenizer", "checkpoints/Starling-RM-7B-alpha", fork(APA_CFG, 147) + " the Llama-2 tokenizer"),
    ("reward_model.template", "llama2_trainer", fork(UTILS, 4) + " from_openchat_to_llama, applied at "
     + fork(APA_CFG, 190)),
    ("reward_model.max_length", 2048, fork(APA_CFG, 175) + "; left truncation " + fork(APA_CFG, 151)),
    ("mesh.data", 1, MESH), ("mesh.fsdp", -1, MESH), ("mesh.tensor", 1, MESH),
    ("mesh.distributed", False, "choice: one host of 8 devices"),
    ("data.source", "data/nectar", f"choice: Nectar's prompts; {fork(APA_CFG, 199)} loads ThWu/rlhf_cleaned_prompt, "
     "not available here"),
    ("data.heldout_fraction", 0.001, fork(APA_CFG, 200) + " test_size=0.001"),
    ("data.max_length", 2148, fork(APA_CFG, 29) + " seq_length"),
    ("data.max_prompt_length", 1124, fork(TRLX_PY, 89) + " max_prompt_length = seq_length - max_new_tokens"),
    ("data.on_bad_row", "skip", "choice: skip malformed Nectar rows (counted in the data summary) on a long run"),
    ("objective.name", "apa", fork(PPO_MOD, 220) + " sq_loss replaces the PPO surrogate"),
    ("objective.apa_lambda", 1.0, fork(PPO_MOD, 220) + " (logprobs - advantages - old_logprobs)^2: coefficient 1"),
    ("objective.kl_coef", 0.01, fork(APA_CFG, 51)),
    ("objective.kl_target", None, fork(APA_CFG, 52) + " target=None: fixed KL controller"),
    ("objective.kl_horizon", 10000, fork(APA_CFG, 53) + " (unused with a fixed controller)"),
    ("objective.vf_coef", 1.0, fork(APA_CFG, 58)),
    ("objective.value_clip", 0.2, f"{fork(APA_CFG, 57)} cliprange_value; {fork(PPO_MOD, 192)}-201 clamp to "
     "old +- 0.2 and the max of the two squared errors"),
    ("objective.gamma", 1.0, fork(APA_CFG, 54)),
    ("objective.gae_lambda", 0.95, fork(APA_CFG, 55)),
    ("objective.critic_only_above", 1.0, fork(PPO_MOD, 221) + "-224 if vf_loss > 1: loss = vf_coef * vf_loss"),
    ("objective.value_head", "layers", f"{fork(TRAINER, 109)}-112 get_arch: openchat/openchat_3.5 -> "
     f"MistralModelWithHydraValueHead; {fork(PPO_MOD, 464)} its v_head = make_mistral_value_branch, "
     f"{fork(PPO_MOD, 273)}-279 a MistralModelBranch whose head is Linear(4096, 1, bias=False), "
     f"{fork(PPO_MOD, 294)}-295 deep copies of the top layers and the norm (made before {fork(BASE_TRAINER, 156)} "
     f"freezes the base: all trainable), run over {fork(PPO_MOD, 493)} hidden_states[-(N + 1)]"),
    ("objective.value_head_layers", 4, f"{fork(PPO_MOD, 464)} make_mistral_value_branch(base_model, "
     f"num_layers_unfrozen); {fork(APA_CFG, 42)} num_layers_unfrozen=4"),
    ("objective.reward_clip", 10.0, f"{fork(APA_CFG, 62)} cliprange_reward; applied first: {fork(TRAINER, 366)}"),
    ("objective.scale_reward", True, f"{fork(APA_CFG, 59)} scale_reward='running'; {fork(TRAINER, 372)}-379 "
     "moments of the clipped scores, then divide by the running std"),
    ("objective.whiten_advantages", False, fork(PPO_MOD, 144) + " use_whitening=False; " + fork(TRAINER, 143)),
    ("optim.learning_rate", 2e-7, fork(APA_CFG, 44)),
    ("optim.warmup_steps", 0, fork(APA_CFG, 45) + " CosineAnnealingLR has no warmup"),
    ("optim.schedule", "cosine", fork(APA_CFG, 45) + " cosine_annealing"),
    ("optim.end_lr_fraction", 1.0, fork(APA_CFG, 45) + " eta_min=2e-7 = lr: a constant rate"),
    ("optim.b1", 0.9, fork(APA_CFG, 44)), ("optim.b2", 0.95, fork(APA_CFG, 44)),
    ("optim.eps", 1e-8, fork(APA_CFG, 44)), ("optim.weight_decay", 1e-6, fork(APA_CFG, 44)),
    ("optim.grad_clip", 1.0, fork(YAML, 5) + " gradient_clipping, the launch config of " + fork(APA_CFG, 72)),
    ("rollout.prompts_per_step", 512, f"{fork(APA_CFG, 48)} num_rollouts=64 per process x 8 processes "
     f"({fork(YAML, 19)}); choice: the process count, the launch comment {fork(APA_CFG, 72)} says 2"),
    ("rollout.minibatch_size", 32, f"{fork(APA_CFG, 32)} batch_size=4 per process x 8 processes"),
    ("rollout.epochs", 2, fork(APA_CFG, 50) + " ppo_epochs"),
    ("rollout.max_new_tokens", 1024, fork(APA_CFG, 64)),
    ("rollout.temperature", 1.0, fork(APA_CFG, 67) + " do_sample with the generate default temperature 1"),
    ("rollout.top_k", 0, fork(APA_CFG, 65)), ("rollout.top_p", 1.0, fork(APA_CFG, 66)),
    ("rollout.eval_prompts", 100, fork(APA_CFG, 204)),
    ("rollout.generation_batch", 32, "choice: memory only (the samples are the same rows); 4 prompts per device "
     "per generate, scoring and experience call: the rollout phase with the train state plans at 17.3 GiB/device "
     "on 8 devices, and no value fits 16 there (16.005 at 1 row per device; 12.1 on 16 devices; RESULTS.md)"),
    ("train.steps", 625, f"{fork(APA_CFG, 31)} total_steps=20000 updates / 32 updates per chunk"),
    ("train.batch_size", 512, "choice: the chunk size (an rl stage's batch is one chunk of rollouts)"),
    ("train.grad_accum", 1, "choice: no accumulation (memory only: the update of a minibatch is the same with it)"),
    ("train.eval_every", 16, f"{fork(APA_CFG, 35)} eval_interval=500 updates ~ 16 chunks of 32"),
    ("train.seed", 1000, fork(TRLX_CONFIGS, 228) + " TrainConfig seed default (a different RNG: only a label)"),
    ("checkpoint.every", 16, fork(APA_CFG, 34) + " checkpoint_interval=500 updates ~ 16 chunks"),
    ("checkpoint.keep", 3, OPS), ("logging.every", 1, OPS), ("logging.tensorboard", True, OPS),
]

BETA_ROWS = [
    ("name", "starling_beta_ppo", "choice: the run's name"),
    ("model.config", PRESETS["openchat-3.5"].replace(dtype="bfloat16", param_dtype="float32", remat="full"),
     f"{BETA_CARD}: OpenChat-3.5-0106 (Mistral-7B architecture); fp32 master weights {fork(YAML, 17, BETA)}"),
    ("model.path", "checkpoints/openchat-3.5-0106", NO_FILES),
    ("model.tokenizer", "openchat-3.5", BETA_CARD + " (OpenChat-3.5-0106's tokenizer)"),
    ("model.template", "openchat_3.5", BETA_CARD + " (the OpenChat-3.5-0106 template)"),
    ("model.trainable_top_layers", 4, fork(APA_CFG, 43, BETA) + " num_layers_unfrozen=4"),
    ("model.train_lm_head", True, fork(FREEZE, 32) + " untied head trains"),
    ("reward_model.config", PRESETS["yi-34b"].replace(head="score", dtype="bfloat16", param_dtype="bfloat16"),
     BETA_CARD + ": Yi-34B-Chat trunk + Linear(7168, 1); bf16: choice (frozen)"),
    ("reward_model.path", "checkpoints/Starling-RM-34B", NO_FILES),
    ("reward_model.tokenizer", "checkpoints/Starling-RM-34B", BETA_CARD),
    ("reward_model.template", "chatml", BETA_CARD + ": Yi-34B-Chat ChatML"),
    ("reward_model.max_length", 2048, fork(UTILS, 147, BETA)),
    ("mesh.data", 1, MESH), ("mesh.fsdp", -1, MESH), ("mesh.tensor", 1, MESH),
    ("mesh.distributed", False, "choice: the config does not call jax.distributed (set it for multi-host)"),
    ("data.source", "data/nectar", f"choice: Nectar's prompts; {fork(APA_CFG, 93, BETA)} loads "
     "ThWu/cleaned_prompt_r_2"),
    ("data.heldout_fraction", 0.001, fork(APA_CFG, 94, BETA)),
    ("data.max_length", 2148, fork(APA_CFG, 30, BETA)),
    ("data.max_prompt_length", 1124, fork(TRLX_PY, 89) + " seq_length - max_new_tokens"),
    ("data.on_bad_row", "skip", "choice: skip malformed Nectar rows on a long run"),
    ("objective.name", "ppo", f"{BETA_CARD} (PPO); {fork(PPO_MOD, 211, BETA)}-221 the clipped surrogate"),
    ("objective.ppo_clip", 0.2, fork(APA_CFG, 57, BETA)),
    ("objective.value_clip", 0.2, fork(APA_CFG, 58, BETA)),
    ("objective.vf_coef", 1.0, fork(APA_CFG, 59, BETA)),
    ("objective.kl_coef", 0.001, fork(APA_CFG, 52, BETA)),
    ("objective.kl_target", None, fork(APA_CFG, 53, BETA)),
    ("objective.kl_horizon", 10000, fork(APA_CFG, 54, BETA)),
    ("objective.gamma", 1.0, fork(APA_CFG, 55, BETA)), ("objective.gae_lambda", 0.95, fork(APA_CFG, 56, BETA)),
    ("objective.value_head", "layers", f"{fork(TRAINER, 110, BETA)}-113 get_arch: a model path with 'openchat' "
     f"({fork(APA_CFG, 27, BETA)} banghua/openchat-3.5-1210-bin) -> MistralModelWithHydraValueHead; "
     f"{fork(PPO_MOD, 461, BETA)} v_head = make_mistral_value_branch ({fork(PPO_MOD, 270, BETA)}-276 "
     f"Linear(4096, 1, bias=False); {fork(PPO_MOD, 291, BETA)}-292 copies of the top layers and the norm), over "
     f"{fork(PPO_MOD, 490, BETA)} hidden_states[-(N + 1)]"),
    ("objective.value_head_layers", 4, f"{fork(PPO_MOD, 461, BETA)} num_layers_unfrozen; "
     f"{fork(APA_CFG, 43, BETA)} num_layers_unfrozen=4"),
    ("objective.reward_clip", 10.0, fork(APA_CFG, 63, BETA)),
    ("objective.scale_reward", True, fork(APA_CFG, 60, BETA)),
    ("objective.whiten_advantages", False, fork(PPO_MOD, 144, BETA) + " use_whitening=False"),
    ("objective.critic_only_above", None, f"{fork(PPO_MOD, 211, BETA)}-221: the PPO loss has no critic-only rule"),
    ("optim.learning_rate", 4e-7, fork(APA_CFG, 45, BETA)),
    ("optim.warmup_steps", 0, fork(APA_CFG, 46, BETA)), ("optim.schedule", "cosine", fork(APA_CFG, 46, BETA)),
    ("optim.end_lr_fraction", 1.0, fork(APA_CFG, 46, BETA) + " eta_min = lr: constant"),
    ("optim.b1", 0.9, fork(APA_CFG, 45, BETA)), ("optim.b2", 0.95, fork(APA_CFG, 45, BETA)),
    ("optim.eps", 1e-8, fork(APA_CFG, 45, BETA)), ("optim.weight_decay", 1e-6, fork(APA_CFG, 45, BETA)),
    ("optim.grad_clip", 1.0, fork(YAML, 5, BETA)),
    ("rollout.prompts_per_step", 1024, f"{fork(APA_CFG, 49, BETA)} 64 per process x 16 devices (choice: 16, the "
     "34B reward model needs the room)"),
    ("rollout.minibatch_size", 64, fork(APA_CFG, 33, BETA) + " 4 per process x 16"),
    ("rollout.epochs", 2, fork(APA_CFG, 51, BETA)),
    ("rollout.max_new_tokens", 1024, fork(APA_CFG, 65, BETA)),
    ("rollout.temperature", 1.0, fork(APA_CFG, 69, BETA)),
    ("rollout.top_k", 0, fork(APA_CFG, 66, BETA)), ("rollout.top_p", 1.0, fork(APA_CFG, 67, BETA)),
    ("rollout.eval_prompts", 100, fork(APA_CFG, 98, BETA)),
    ("rollout.generation_batch", 64, "choice: memory only; 4 prompts per device per generate, scoring and "
     "experience call: generation plans at 15.3 GiB/device on 16 devices with the train state, reward-model scoring "
     "at 18.0 (17.6 at 32 rows: no value fits 16 there; benchmarks/RESULTS.md)"),
    ("train.steps", 625, fork(APA_CFG, 32, BETA) + " 20000 updates / 32 per chunk"),
    ("train.batch_size", 1024, "choice: the chunk size"),
    ("train.grad_accum", 1, "choice: no accumulation (memory only: the update of a minibatch is the same with it)"),
    ("train.eval_every", 16, fork(APA_CFG, 36, BETA) + " 500 updates ~ 16 chunks"),
    ("train.seed", 1000, fork(TRLX_CONFIGS, 228)),
    ("checkpoint.every", 16, fork(APA_CFG, 35, BETA) + " 500 updates ~ 16 chunks"),
    ("checkpoint.keep", 3, OPS), ("logging.every", 1, OPS), ("logging.tensorboard", True, OPS),
]

RM_PAPER = "Zhu, Jiao & Jordan 2023 (arXiv 2301.11270): the K-wise MLE"
RM_ROWS = [
    ("name", "starling_rm_7b", "choice: the run's name"),
    ("model.config", PRESETS["llama2-7b"].replace(head="score", dtype="bfloat16", param_dtype="float32",
                                                  remat="full"),
     f"{RM_CARD}: Llama2-7B-Chat with its last layer replaced by a scalar linear head; bf16/fp32/remat: choice"),
    ("model.path", "checkpoints/Llama-2-7b-chat-hf", NO_FILES),
    ("model.tokenizer", "checkpoints/Llama-2-7b-chat-hf", RM_CARD + " (Llama-2 tokenizer)"),
    ("model.template", "llama2", RM_CARD + " usage example: '<s>[INST] {user} </s> [/INST] {assistant}</s>'"),
    ("mesh.data", 1, MESH), ("mesh.fsdp", -1, MESH), ("mesh.tensor", 1, MESH),
    ("mesh.distributed", True, "choice: a 64-chip pod slice, multi-host"),
    ("data.source", "data/nectar", RM_CARD + ": trained on berkeley-nest/Nectar"),
    ("data.heldout_fraction", 0.01, "choice: 1,830 held-out prompts for ranking accuracy (not published)"),
    ("data.max_length", 2048, fork(APA_CFG, 175) + " the RM reads 2048 tokens"),
    ("data.max_prompt_length", 1536, "choice: keep >= 512 tokens of each response"),
    ("data.max_responses", 7, "huggingface berkeley-nest/Nectar dataset card: 7 ranked responses per prompt"),
    ("data.on_bad_row", "skip", "choice: skip malformed Nectar rows (counted)"),
    ("objective.name", "rm_plackett_luce", RM_CARD + " + " + RM_PAPER),
    ("objective.pl_normalize", True, "issue 12's review of the authors' pl_loss (divides by K-1); the authors' RM "
     "training code is in neither thwu1/trlx nor microsoft/RLHF-APA at any fetched commit (unverified here)"),
    ("objective.ties", "break", "choice: Nectar's GPT-4 rankings are strict (a rare tie is broken by answer order, "
     "the strict order a K-wise ranking loss needs)"),
    ("optim.learning_rate", 1e-5, "choice: Touvron et al. 2023 sec. 3.2.2 (Llama-2 RM, 7B-70B) used 1e-5"),
    ("optim.warmup_steps", 85, "choice: 3% of 2,830 steps"), ("optim.schedule", "cosine", "choice: Llama-2 RM"),
    ("optim.end_lr_fraction", 0.1, "choice: Llama-2 RM decays to 10%"),
    ("optim.b1", 0.9, "choice: AdamW, Llama-2 paper"), ("optim.b2", 0.95, "choice: AdamW, Llama-2 paper"),
    ("optim.eps", 1e-8, "choice: AdamW default"), ("optim.weight_decay", 0.0, "choice: no decay (not published)"),
    ("optim.grad_clip", 1.0, "choice: Llama-2 paper clips at 1.0"),
    ("train.steps", 2830, "choice: one epoch (Llama-2 RM: more overfits) of 181,124 prompts / 64"),
    ("train.batch_size", 64, "choice: 64 prompts x 7 responses per step, one per chip"),
    ("train.grad_accum", 1, "choice: no accumulation"),
    ("train.eval_every", 250, OPS), ("train.eval_batches", 8, OPS), ("train.seed", 0, "choice: a label"),
    ("checkpoint.every", 250, OPS), ("checkpoint.keep", 3, OPS), ("logging.every", 10, OPS),
    ("logging.peak_flops", 459e12, "Google Cloud TPU v5p documentation: 459 TFLOP/s bf16 per chip (for MFU)"),
]

SFT_CHOICE = "choice: a common full fine-tune of a 7B chat model; OpenChat's own SFT settings are not for this data"
OPENCHAT_PAPER = "Wang et al. 2023 (arXiv 2309.11235) + huggingface openchat/openchat_3.5 model card"
SFT_ROWS = [
    ("name", "openchat_sft", "choice: the run's name"),
    ("model.config", PRESETS["openchat-3.5"].replace(dtype="bfloat16", param_dtype="float32", remat="full"),
     f"{OPENCHAT_PAPER}: Mistral-7B-v0.1 with vocab 32002; bf16/fp32/remat: choice"),
    ("model.path", "checkpoints/Mistral-7B-v0.1", NO_FILES),
    ("model.tokenizer", "openchat-3.5", OPENCHAT_PAPER), ("model.template", "openchat_3.5", OPENCHAT_PAPER),
    ("mesh.data", 1, MESH), ("mesh.fsdp", -1, MESH), ("mesh.tensor", 1, MESH),
    ("mesh.distributed", True, "choice: a 64-chip pod slice"),
    ("data.source", "data/nectar", "choice: SFT on Nectar's rank-1 answers (OpenChat used ShareGPT with C-RLFT)"),
    ("data.heldout_fraction", 0.01, "choice: held-out loss"),
    ("data.max_length", 4096, "choice: packed rows of 4096 (OpenChat-3.5 has 8192 context)"),
    ("data.max_prompt_length", 3072, "choice: room for the answer"),
    ("data.pack", True, "choice: packing for throughput"),
    ("data.on_bad_row", "skip", "choice: skip malformed rows (counted)"),
    ("objective.name", "sft", OPENCHAT_PAPER),
    ("optim.learning_rate", 2e-5, "choice: common 7B chat full fine-tune (not published for this data)"),
    ("optim.warmup_steps", 127, "choice: 3% of 4,245 steps"),
    ("optim.schedule", "cosine", f"{SFT_CHOICE} (cosine decay)"),
    ("optim.end_lr_fraction", 0.1, f"{SFT_CHOICE} (decay to 10%)"), ("optim.b1", 0.9, f"{SFT_CHOICE} (AdamW)"),
    ("optim.b2", 0.95, f"{SFT_CHOICE} (AdamW)"), ("optim.eps", 1e-8, f"{SFT_CHOICE} (AdamW default)"),
    ("optim.weight_decay", 0.1, f"{SFT_CHOICE} (weight decay)"), ("optim.grad_clip", 1.0, f"{SFT_CHOICE} (clip)"),
    ("train.steps", 4245, "choice: 3 epochs of 1,415 steps"), ("train.batch_size", 128, "choice: 128 packed rows"),
    ("train.grad_accum", 1, "choice: no accumulation on 64 chips"), ("train.seed", 0, "choice: a label"), ("train.eval_every", 500, OPS), ("train.eval_batches", 8, OPS),
    ("checkpoint.every", 500, OPS), ("checkpoint.keep", 3, OPS), ("logging.every", 10, OPS),
    ("logging.peak_flops", 459e12, "Google Cloud TPU v5p documentation (MFU)"),
]

TABLE = {"starling_alpha_apa": ALPHA, "starling_beta_ppo": BETA_ROWS, "starling_rm_7b": RM_ROWS,
         "openchat_sft": SFT_ROWS}

# Hyperparameters a stage kind reads: each needs a row even where it equals the default.
READ = {
    "rl": ["objective." + k for k in ("name", "kl_coef", "kl_target", "vf_coef", "value_clip", "gamma", "gae_lambda",
                                       "critic_only_above", "value_head", "value_head_layers", "reward_clip",
                                       "scale_reward", "whiten_advantages")]
          + ["rollout." + k for k in ("prompts_per_step", "max_new_tokens", "temperature", "top_k", "top_p", "epochs",
                                      "minibatch_size")] + ["train.grad_accum"],
    "rm": ["objective.name", "objective.pl_normalize", "objective.ties", "data.max_responses", "train.batch_size",
           "train.grad_accum"],
    "sft": ["objective.name", "train.batch_size", "train.grad_accum", "data.pack"],
}
COMMON = ["model.config", "model.template", "model.tokenizer", "data.max_length", "data.max_prompt_length",
          "train.steps", "train.seed"] + ["optim." + k for k in ("learning_rate", "warmup_steps", "schedule",
                                                                    "end_lr_fraction", "b1", "b2", "eps",
                                                                    "weight_decay", "grad_clip")]
KIND = {"starling_alpha_apa": "rl", "starling_beta_ppo": "rl", "starling_rm_7b": "rm", "openchat_sft": "sft"}
WHOLE = ("model.config", "reward_model.config", "mesh.rules")


def _get(exp: Experiment, field: str):
    obj = exp
    for part in field.split("."):
        obj = getattr(obj, part)
    return obj


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = prefix + k
        if key in WHOLE or not isinstance(v, dict):
            out[key] = v
        else:
            out.update(_flat(v, key + "."))
    return out


def _rows():
    for recipe, rows in TABLE.items():
        for field, value, source in rows:
            yield pytest.param(recipe, field, value, source, id=f"{recipe}:{field}")


@pytest.fixture(scope="module")
def recipes():
    return {name: load_experiment(name) for name in TABLE}


@pytest.mark.parametrize("recipe,field,value,source", list(_rows()))
def test_recipe_value_matches_its_source(recipes, recipe, field, value, source):
    assert source and (source.startswith("choice:") or re.search(r"@[0-9a-f]{7} L|huggingface|arXiv|Touvron|"
                                                                  r"Google Cloud|issue 12", source)), source
    got = _get(recipes[recipe], field)
    if isinstance(value, float):
        assert got == pytest.approx(value, rel=1e-12), (recipe, field, got, value)
    else:
        assert got == value, (recipe, field, got, value)


@pytest.mark.parametrize("recipe", list(TABLE))
def test_every_set_or_read_hyperparameter_has_a_row(recipe, recipes):
    exp = recipes[recipe]
    flat, default = _flat(to_dict(exp)), _flat(to_dict(Experiment(name="x")))
    rows = {field for field, _, _ in TABLE[recipe]}
    assert len(rows) == len(TABLE[recipe]), "a field has two rows"
    changed = {k for k, v in flat.items() if k != "stages" and v != default.get(k)}
    if exp.reward_model is not None:  # the reward_model section is None by default: its fields count as set
        changed = (changed - {"reward_model"}) | {f"reward_model.{k}" for k in
                                                  ("config", "path", "tokenizer", "template", "max_length")}
    missing = (changed | set(COMMON) | set(READ[KIND[recipe]])) - rows
    assert not missing, f"{recipe}: fields without a source row: {sorted(missing)}"
    assert exp.stages == ()


@pytest.mark.parametrize("recipe,total,checks", [
    # the fork's cosine_annealing(T_max=10000, eta_min=lr) is constant: the rate at every update is the lr
    ("starling_alpha_apa", 20000, [(0, 2e-7), (1, 2e-7), (5000, 2e-7), (10000, 2e-7), (15000, 2e-7), (19999, 2e-7)]),
    ("starling_beta_ppo", 20000, [(0, 4e-7), (7000, 4e-7), (19999, 4e-7)]),
    # choices: linear warmup then cosine to 10%
    ("starling_rm_7b", 2830, [(0, 0.0), (40, 1e-5 * 40 / 85), (85, 1e-5),
                              (1457, 1e-5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (1457 - 85) / 2745)))),
                              (2830, 1e-6)]),
    ("openchat_sft", 4245, [(0, 0.0), (127, 2e-5), (4245, 2e-6)]),
])
def test_learning_rate_schedule(recipes, recipe, total, checks):
    exp = recipes[recipe]
    if exp.objective.name in ("apa", "ppo"):  # the rl stage's schedule counts optimiser updates
        r = exp.rollout
        assert exp.train.steps * r.epochs * (r.prompts_per_step // r.minibatch_size) == total
    else:
        assert exp.train.steps == total
    schedule = make_schedule(exp.optim, total)
    for step, want in checks:
        assert float(schedule(jnp.asarray(step))) == pytest.approx(want, rel=1e-4, abs=1e-12), (recipe, step)


def test_rl_updates_per_chunk_match_the_fork():
    """The fork: 64 rollouts per process, 4 per update, 2 epochs -> 32 updates between rollout phases."""
    for name in ("starling_alpha_apa", "starling_beta_ppo"):
        r = load_experiment(name).rollout
        assert r.epochs * r.prompts_per_step // r.minibatch_size == 2 * 64 // 4


# Each recipe docstring's stated values, checked against the config (regex on the docstring -> config value).
DOC_CLAIMS = {
    "starling_alpha_apa": [(r"num_layers_unfrozen=(\d+)", "model.trainable_top_layers", int),
                           (r"lr ([\d.e-]+),", "optim.learning_rate", float),
                           (r"CONSTANT rate of ([\d.e-]+)", "optim.learning_rate", float),
                           (r"gradient clipping ([\d.]+)", "optim.grad_clip", float),
                           (r"(\d+) epochs per chunk", "rollout.epochs", int),
                           (r"max_new_tokens (\d+)", "rollout.max_new_tokens", int),
                           (r"(\d+) held-out prompts", "rollout.eval_prompts", int),
                           (r"KL coefficient ([\d.]+), fixed", "objective.kl_coef", float),
                           (r"clipped to old \+- ([\d.]+)", "objective.value_clip", float),
                           (r"exceeds (\d+) trains only the critic", "objective.critic_only_above", float),
                           (r"clipped to \+-(\d+)", "objective.reward_clip", float),
                           (r"(\d+) rollouts per chunk", "rollout.prompts_per_step", int),
                           (r"minibatches of (\d+)", "rollout.minibatch_size", int),
                           (r"(\d+) chunks", "train.steps", int),
                           (r'value_head="(\w+)"', "objective.value_head", str),
                           (r"value_head_layers=(\d+)", "objective.value_head_layers", int),
                           (r'template "(\w+)"', "reward_model.template", str)],
    "starling_beta_ppo": [(r"lr ([\d.e-]+) held constant", "optim.learning_rate", float),
                          (r"top (\d+) layers", "model.trainable_top_layers", int),
                          (r"(\d+) PPO epochs", "rollout.epochs", int),
                          (r"KL coefficient ([\d.]+) fixed", "objective.kl_coef", float),
                          (r"value clip ([\d.]+)", "objective.value_clip", float),
                          (r"([\d,]+) rollouts per chunk", "rollout.prompts_per_step", int),
                          (r"minibatches of (\d+)", "rollout.minibatch_size", int),
                          (r"(\d+) chunks", "train.steps", int),
                          (r'value_head="(\w+)"', "objective.value_head", str),
                          (r"value_head_layers=(\d+)", "objective.value_head_layers", int)],
    "starling_rm_7b": [(r"AdamW lr ([\d.e-]+)", "optim.learning_rate", float),
                       (r"([\d,]+) steps", "train.steps", int),
                       (r"our template \"(\w+)\"", "model.template", str),
                       (r"divided by its (K-1)", "objective.pl_normalize", lambda s: True)],
    "openchat_sft": [(r"AdamW lr ([\d.e-]+)", "optim.learning_rate", float),
                     (r"weight\s+decay ([\d.]+)", "optim.weight_decay", float),
                     (r"(\d+) packed sequences", "train.batch_size", int),
                     (r"of (\d+) tokens per step", "data.max_length", int),
                     (r"(\d+) epochs", "train.steps", lambda s: int(s) * 1415)],
    "starling_alpha_qlora": [(r"train.grad_accum = (\d+)", "train.grad_accum", int),
                             (r"minibatch of (\d+) rollouts", "rollout.minibatch_size", int)],
    "tiny_starling": [(r"tiny (\d+)-layer", "model.config.num_layers", int),
                      (r"the top (\d+) of the \d+ layers", "stages[2].model.trainable_top_layers", int),
                      (r"the top \d+ of the (\d+) layers", "stages[2].model.config.num_layers", int)],
}


def _field(exp, field: str):
    obj = exp
    for part in field.split("."):
        m = re.fullmatch(r"(\w+)\[(\d+)\]", part)
        obj = getattr(obj, m.group(1))[int(m.group(2))] if m else getattr(obj, part)
    return obj


@pytest.mark.parametrize("recipe", list(DOC_CLAIMS))
def test_recipe_docstring_states_the_config_values(recipe):
    import importlib.util
    from starling_jax.stages.experiment import EXPERIMENTS_DIR
    spec = importlib.util.spec_from_file_location(f"_doc_{recipe}", EXPERIMENTS_DIR / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc, exp = " ".join(module.__doc__.split()), module.get_config()
    for pattern, field, parse in DOC_CLAIMS[recipe]:
        m = re.search(pattern, doc)
        assert m, f"{recipe}: the docstring no longer states {field} ({pattern!r})"
        stated, actual = parse(m.group(1).replace(",", "")), _field(exp, field)
        if isinstance(stated, float) and not isinstance(actual, bool):
            assert actual is not None and math.isclose(stated, actual, rel_tol=1e-9), (recipe, field, stated, actual)
        else:
            assert stated == actual, (recipe, field, stated, actual)
