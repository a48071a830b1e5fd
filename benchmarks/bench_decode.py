"""Decode throughput of the 44.8M-parameter Mistral-shaped model: starling_jax.generation.sampling.generate vs transformers'
generate, side by side in one process.

    python benchmarks/bench_decode.py                      # batch 1 and 8, 32-token prompts, 128 new tokens
    python benchmarks/bench_decode.py --batch 1 --new-tokens 64 --rounds 3

Both run greedy decoding in fp32 from the same weights (transformers' random init, converted by hand), for exactly
--new-tokens tokens (no stop id), from the same random prompts. tokens/s = batch * new_tokens / wall time of one whole
generate call (prefill included; the prompt is short). starling_jax: one jitted call (prefill + lax.while_loop over the
KV cache). transformers: MistralForCausalLM.generate (SDPA attention, DynamicCache) under torch.no_grad, timed at
each of --threads intra-op thread counts (on a loaded machine torch's spinning threads can be several times slower
than one thread), the speedup taken against the fastest. The two are timed alternately, round by round, so outside load hits both alike; the script
also reports how many leading tokens the two agree on (random weights give near-uniform logits, whose near-ties fp32
rounding may split; after a split the continuations differ).

The batch-1 bound: each token must read every weight matrix that a token passes through (layers + LM head; the
embedding is one row), so tokens/s <= memory bandwidth / those bytes; `--measure-bandwidth` times a large copy to
estimate the bandwidth this process gets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script from anywhere: import common

import numpy as np

import common

SHAPE = dict(vocab_size=32002, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64, mlp_dim=1536)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="timed generate calls per framework and batch (interleaved)")
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count()}),
                   help="torch intra-op thread counts to time (each one; the speedup is against the fastest)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--measure-bandwidth", action="store_true", help="time a 256 MB copy to estimate memory bandwidth")
    return p.parse_args(argv)


def hf_model(seed: int = 0):
    import torch
    import transformers

    s = SHAPE
    cfg = transformers.MistralConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["mlp_dim"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        head_dim=s["head_dim"], sliding_window=4096, max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=32000, bos_token_id=1, eos_token_id=32000)
    torch.manual_seed(seed)
    return transformers.MistralForCausalLM(cfg).eval()


def params_from_hf(model):
    """starling_jax params from a MistralForCausalLM (HF Linear weights are [out, in]; ours [in, out], heads split)."""
    import jax.numpy as jnp

    s = SHAPE
    D, H, K, E = s["hidden_size"], s["num_heads"], s["num_kv_heads"], s["head_dim"]
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def stack(name, f=lambda w: w):
        return jnp.asarray(np.stack([f(sd[f"model.layers.{i}.{name}"]) for i in range(s["num_layers"])]))

    return {
        "embed": jnp.asarray(sd["model.embed_tokens.weight"]), "final_norm": jnp.asarray(sd["model.norm.weight"]),
        "lm_head": jnp.asarray(sd["lm_head.weight"].T),
        "layers": {
            "attn_norm": stack("input_layernorm.weight"), "mlp_norm": stack("post_attention_layernorm.weight"),
            "wq": stack("self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, E)),
            "wk": stack("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, E)),
            "wv": stack("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, E)),
            "wo": stack("self_attn.o_proj.weight", lambda w: w.T.reshape(H, E, D)),
            "w_gate": stack("mlp.gate_proj.weight", lambda w: w.T), "w_up": stack("mlp.up_proj.weight", lambda w: w.T),
            "w_down": stack("mlp.down_proj.weight", lambda w: w.T),
        },
    }


def bytes_per_token() -> int:
    """fp32 bytes of the weight matrices one decoded token reads: every layer's projections + the LM head."""
    s = SHAPE
    D, H, K, E, F, V = (s["hidden_size"], s["num_heads"], s["num_kv_heads"], s["head_dim"], s["mlp_dim"],
                        s["vocab_size"])
    return 4 * (s["num_layers"] * (2 * D * H * E + 2 * D * K * E + 3 * D * F) + D * V)


def measure_bandwidth(mb: int = 256) -> float:
    """Bytes/s of a large numpy copy (read + write counted)."""
    a = np.ones(mb * 2 ** 20 // 4, np.float32)
    b = np.empty_like(a)
    sec, _ = common.median_time(lambda: np.copyto(b, a), iters=5, warmup=1)
    return 2 * a.nbytes / sec


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import torch

    from starling_jax.models import ModelConfig
    from starling_jax.generation.sampling import generate

    model = hf_model()
    params = params_from_hf(model)
    config = ModelConfig(**SHAPE, sliding_window=4096, max_seq_len=4096, eos_token_id=32000, pad_token_id=32000)
    P, N = args.prompt_len, args.new_tokens
    print(f"model: {SHAPE} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), fp32, greedy")
    print(f"prompt {P} tokens, {N} new tokens; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} with {args.threads} threads")
    print(common.machine_line())
    if args.measure_bandwidth:
        bw = measure_bandwidth()
        print(f"copy bandwidth {bw / 1e9:.1f} GB/s; weights read per token {bytes_per_token() / 1e6:.1f} MB -> "
              f"batch-1 bound ~{bw / bytes_per_token():.0f} tok/s")

    for B in args.batch:
        prompts = np.random.default_rng(B).integers(3, 32000, (B, P)).astype(np.int32)
        mask = np.ones((B, P), np.int32)
        key = jax.random.key(0)

        def run_jax():
            return jax.block_until_ready(generate(params, config, prompts, mask, key, N, temperature=0.0))

        def run_torch(threads):
            torch.set_num_threads(threads)
            with torch.no_grad():
                return model.generate(input_ids=torch.tensor(prompts, dtype=torch.long),
                                      attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=N,
                                      min_new_tokens=N, eos_token_id=None, pad_token_id=32000)

        t0 = time.perf_counter()
        ours = np.asarray(run_jax()[0])
        compile_s = time.perf_counter() - t0
        fns = {"starling_jax": lambda: common.time_once(run_jax)}
        if not args.skip_torch:
            theirs = run_torch(args.threads[0])[:, P:].numpy()  # warm-up
            for th in args.threads:
                fns[f"transformers/{th}t"] = lambda th=th: common.time_once(lambda: run_torch(th))
        times = common.interleaved_medians(fns, args.rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        line = (f"batch {B}: starling_jax {B * N / med['starling_jax']:7.1f} tok/s "
                f"({med['starling_jax'] * 1e3 / N:.2f} ms/step, first call incl. compile {compile_s:.1f} s)")
        theirs_med = {k: v for k, v in med.items() if k.startswith("transformers")}
        if theirs_med:
            same = ours == theirs
            prefix = np.where(same.all(1), N, np.argmin(same, axis=1))  # tokens before the first disagreement
            for k, v in theirs_med.items():
                line += f" | {k} {B * N / v:7.1f} tok/s ({v * 1e3 / N:.2f} ms/step)"
            line += (f" | speedup vs fastest {min(theirs_med.values()) / med['starling_jax']:.2f}x"
                     f" | same first {prefix.mean():.0f}/{N} tokens")
        print(line + f" | load {common.load_average()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
