"""Starling-RM-7B-alpha: a K-wise (Plackett-Luce) reward model on Nectar with a Llama-2-7B-chat trunk.

    starling-jax plan experiments/starling_rm_7b.py --target v5e-64     # TPU-compiled memory/FLOPs, no TPU needed
    starling-jax train experiments/starling_rm_7b.py --workdir runs/rm7b # on a pod, with the inputs below
    starling-jax eval runs/rm7b/rm                                       # held-out pairwise/top-1 accuracy, tau

Needs local copies (nothing is downloaded at run time):
  checkpoints/Llama-2-7b-chat-hf   meta-llama/Llama-2-7b-chat-hf (HF safetensors directory with its tokenizer)
  data/nectar                      berkeley-nest/Nectar parquet/JSONL files (or a tfds data_dir)

What the sources say, and where each number comes from:
  - berkeley-nest/Starling-RM-7B-alpha model card: "trained from Llama2-7B-Chat": the last layer (the LM head) is
    removed and a linear layer outputs one scalar for a (prompt, response) pair, read at the last token; trained on
    Nectar with the K-wise maximum likelihood estimator of Zhu, Jiao & Jordan (2023, arXiv 2301.11270), which is the
    Plackett-Luce loss over each prompt's full ranking of 7 responses (STARLING.md), each prompt's NLL divided by its
    K-1 choice terms as the authors' pl_loss does (objective.pl_normalize; the tiny runs use the plain sum). The
    identical answers Nectar pads some rows with count once (data.nectar). The card scores conversations
    as "<s>[INST] {user} </s> [/INST] {assistant}</s>" (our template "llama2"); so do we when training.
  - Nectar (berkeley-nest/Nectar): 182,954 prompts x 7 GPT-4-ranked responses.
  - max_length 2048 with left truncation of the prompt: the authors' RL trainer fed the RM 2048 tokens (STARLING.md).
  - Llama-2-7B: hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000 (meta-llama/Llama-2-7b-hf config.json).

Not published (our choices, labelled as such): optimiser settings and batch. AdamW lr 1e-5 with 3% warmup and cosine
decay, no weight decay, clipping at 1.0: the usual full fine-tune of a 7B RM (e.g. the Llama-2 paper's RM used 1e-5
for its 7B-70B models, Touvron et al. 2023, sec. 3.2.2). One epoch: 64 prompts (448 ranked responses) per step over
the 181k training prompts = 2,830 steps (the Llama-2 RM paper also trained one epoch, finding more overfits).

Mesh: a TPU pod slice of 64 chips (e.g. v5p-128 or v4-128: 64 chips), fully sharded data parallel (fsdp = all
devices): 7B params + AdamW state in fp32 = 112 GB spread over 64 chips, one prompt group (7 x 2048 tokens) per chip
with full rematerialisation. Multi-host: mesh.distributed = True calls jax.distributed.initialize().
"""

from starling_jax.algorithms.reward_model import PlackettLuceOptions
from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, LoggingConfig, MeshConfig, ModelSection,
                                 OptimConfig, TrainConfig)
from starling_jax.models import PRESETS

# bf16 compute, fp32 master weights (the optimiser updates fp32 params)
TRUNK = PRESETS["llama2-7b"].replace(head="score", dtype="bfloat16", param_dtype="float32", remat="full")
STEPS = 2830  # one epoch: 181,124 training prompts (99%) / 64 per step


def get_config() -> Experiment:
    return Experiment(
        name="starling_rm_7b",
        # The HF directory holds the causal LM; the rm stage drops its LM head and adds Linear(4096, 1).
        model=ModelSection(config=TRUNK, path="checkpoints/Llama-2-7b-chat-hf",
                           tokenizer="checkpoints/Llama-2-7b-chat-hf", template="llama2"),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, distributed=True),
        data=DataConfig(source="data/nectar", heldout_fraction=0.01, max_length=2048, max_prompt_length=1536,
                        max_responses=7, on_bad_row="skip"),
        objective=PlackettLuceOptions(pl_normalize=True),
        optim=OptimConfig(learning_rate=1e-5, warmup_steps=85, schedule="cosine", end_lr_fraction=0.1,
                          b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0),
        train=TrainConfig(steps=STEPS, batch_size=64, grad_accum=1, eval_every=250, eval_batches=8, seed=0),
        checkpoint=CheckpointConfig(every=250, keep=3),
        # v5p: 459 TFLOP/s bf16 per chip (Google Cloud TPU v5p documentation)
        logging=LoggingConfig(every=10, peak_flops=459e12),
    )
