"""One training step of a 44.8M-parameter Mistral-shaped model: starling_jax (jax.jit) vs transformers + PyTorch eager.

    python benchmarks/bench_train_step.py                 # batch 4 x 256 tokens, AdamW, 10 interleaved rounds

The step is forward + backward of the mean next-token cross-entropy over every position, plus an AdamW update, in
fp32, from the same initial weights in both frameworks (the script checks that both give the same first loss).
starling_jax: the whole step is one jax.jit with the parameters and optimizer state donated. PyTorch: transformers'
MistralForCausalLM (its default SDPA attention), eager, torch.optim.AdamW. The two steps are timed alternately, round
by round, so outside load hits both alike; each median is printed with its achieved FLOP/s as a fraction of this
process's measured fp32 matmul peak (the larger of JAX's and torch's 2048^3 matmul; both are printed).
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
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=10, help="timed steps per framework (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per framework (compilation, allocator)")
    p.add_argument("--no-optimizer", action="store_true", help="time forward + backward only (gradients returned)")
    p.add_argument("--remat", default="none", help="starling_jax remat policy (none, full, dots, dots_no_batch)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--lr", type=float, default=1e-4)
    return p.parse_args(argv)


def make_batch(batch: int, seq: int, vocab: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(batch, seq), dtype=np.int32)
    return tokens, np.ones((batch, seq), np.int32)


# ----------------------------------------------------------------------------------------------------------------------
# starling_jax


def build_jax_step(config, params, lr: float, with_optimizer: bool):
    """(step, state): step(state, tokens [B,T], mask [B,T]) -> (state, loss), jitted with the state donated."""
    import jax
    import optax

    from starling_jax.models import forward, token_logprobs

    def loss_fn(p, tokens, mask):
        logits = forward(p, config, tokens, mask)
        return -token_logprobs(logits[:, :-1], tokens[:, 1:]).mean()

    if not with_optimizer:
        def grad_step(state, tokens, mask):
            p, _ = state  # the previous step's gradients are donated: their buffers hold this step's
            loss, grads = jax.value_and_grad(loss_fn)(p, tokens, mask)
            return (p, grads), loss
        return jax.jit(grad_step, donate_argnums=0), (params, jax.tree_util.tree_map(jax.numpy.zeros_like, params))

    opt = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)

    def train_step(state, tokens, mask):
        p, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens, mask)
        updates, opt_state = opt.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    return jax.jit(train_step, donate_argnums=0), (params, opt.init(params))


# ----------------------------------------------------------------------------------------------------------------------
# transformers + PyTorch


def torch_model_from_params(config, params):
    """MistralForCausalLM holding the same weights as our params tree (layout conversion only)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    c = config
    hf_config = MistralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, sliding_window=c.sliding_window,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=False, attention_dropout=0.0)
    model = MistralForCausalLM(hf_config).float()
    p = {k: np.asarray(v) for k, v in params.items() if k != "layers"}
    layers = {k: np.asarray(v) for k, v in params["layers"].items()}
    D = c.hidden_size
    sd = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"], "lm_head.weight": p["lm_head"].T}
    for i in range(c.num_layers):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = layers["attn_norm"][i]
        sd[pre + "post_attention_layernorm.weight"] = layers["mlp_norm"][i]
        sd[pre + "self_attn.q_proj.weight"] = layers["wq"][i].reshape(D, -1).T
        sd[pre + "self_attn.k_proj.weight"] = layers["wk"][i].reshape(D, -1).T
        sd[pre + "self_attn.v_proj.weight"] = layers["wv"][i].reshape(D, -1).T
        sd[pre + "self_attn.o_proj.weight"] = layers["wo"][i].reshape(-1, D).T
        sd[pre + "mlp.gate_proj.weight"] = layers["w_gate"][i].T
        sd[pre + "mlp.up_proj.weight"] = layers["w_up"][i].T
        sd[pre + "mlp.down_proj.weight"] = layers["w_down"][i].T
    state = {k: torch.from_numpy(np.array(v, np.float32, copy=True)) for k, v in sd.items()}  # writable copies
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weight conversion: missing {missing}, unexpected {unexpected}")
    model.train()
    return model


def build_torch_step(model, lr: float, with_optimizer: bool):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0) \
        if with_optimizer else None

    def step(tokens, mask):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, attention_mask=mask, labels=tokens).loss
        loss.backward()
        if opt is not None:
            opt.step()
        return loss

    return step


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    import jax

    from starling_jax.models import ModelConfig, count_params, init_params

    config = ModelConfig(**SHAPE, sliding_window=None, max_seq_len=max(4096, args.seq), remat=args.remat)
    params = init_params(config, jax.random.key(0))
    n_params = count_params(params)
    flops = common.decoder_train_flops(**SHAPE, batch=args.batch, seq=args.seq)
    with_opt = not args.no_optimizer
    tokens_np, mask_np = make_batch(args.batch, args.seq, config.vocab_size)

    print(f"model: Mistral-shaped, {SHAPE}, untied LM head, no sliding window, fp32: {n_params:,} parameters "
          f"({flops['matmul_params']:,} in matmuls)")
    print(f"step: batch {args.batch} x seq {args.seq} = {flops['tokens']} tokens, mean next-token cross-entropy, "
          f"forward + backward{' + AdamW update' if with_opt else ''}; {flops['total'] / 1e9:.1f} GFLOP of matmuls "
          f"per step ({flops['attention'] / 1e9:.1f} of them attention)")
    print(f"jax {jax.__version__} ({jax.default_backend()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}), "
          f"remat={args.remat}")
    print(common.machine_line())

    # Peaks first, while nothing else of ours holds the cores.
    peaks = {"jax": common.matmul_peak_jax()}
    torch_model = None
    if not args.skip_torch:
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        peaks["torch"] = common.matmul_peak_torch()
        print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
        torch_model = torch_model_from_params(config, params)  # copies the weights before donation frees them
    peak = max(peaks.values())
    print("fp32 2048^3 matmul peak: " + ", ".join(f"{k} {common.fmt_flops(v)}" for k, v in peaks.items())
          + f"; reference peak = {common.fmt_flops(peak)} (the larger)")

    t0 = time.perf_counter()
    jstep, state = build_jax_step(config, params, args.lr, with_opt)
    del params
    tokens, mask = jax.numpy.asarray(tokens_np), jax.numpy.asarray(mask_np)
    state, loss = jstep(state, tokens, mask)
    jax_first_loss = float(loss)
    print(f"starling_jax: compiled + first step in {time.perf_counter() - t0:.1f} s")

    def run_jax():
        nonlocal state
        start = time.perf_counter()
        state, loss = jstep(state, tokens, mask)
        jax.block_until_ready(loss)
        return time.perf_counter() - start

    fns = {"starling_jax": run_jax}
    if torch_model is not None:
        tstep = build_torch_step(torch_model, args.lr, with_opt)
        t_tokens, t_mask = torch.from_numpy(tokens_np.astype(np.int64)), torch.from_numpy(mask_np.astype(np.int64))
        torch_first_loss = tstep(t_tokens, t_mask).item()
        rel = abs(torch_first_loss - jax_first_loss) / abs(torch_first_loss)
        print(f"first-step loss: starling_jax {jax_first_loss:.6f}, PyTorch {torch_first_loss:.6f} (rel diff {rel:.1e})")
        if rel > 1e-4:
            raise SystemExit("the two frameworks disagree on the loss of the same weights: not the same computation")

        def run_torch():
            start = time.perf_counter()
            tstep(t_tokens, t_mask)
            return time.perf_counter() - start
        fns["PyTorch eager"] = run_torch

    for _ in range(max(args.warmup - 1, 0)):
        for fn in fns.values():
            fn()
    load_before = common.load_average()
    times = common.interleaved_medians(fns, args.rounds)
    medians = {k: statistics.median(v) for k, v in times.items()}

    print(f"\n{args.rounds} interleaved rounds (load average before {load_before}, after {common.load_average()}):")
    for name, med in medians.items():
        achieved = flops["total"] / med
        print(f"  {name:14s} median {med:.3f} s/step  (min {min(times[name]):.3f}, max {max(times[name]):.3f})  "
              f"{common.fmt_flops(achieved)} = {achieved / peak:.0%} of peak  "
              f"{flops['tokens'] / med:,.0f} tokens/s")
    if "PyTorch eager" in medians:
        ratio = medians["PyTorch eager"] / medians["starling_jax"]
        print(f"  speed ratio (PyTorch time / starling_jax time): {ratio:.2f}x")
    return medians


if __name__ == "__main__":
    main()
