"""Data benchmark: tokenization and grain pipeline throughput on this machine (CPU), and (--learnability) how well a
tiny reward model learns the synthetic Nectar's hidden utility.

    python benchmarks/bench_data.py                      # throughput
    python benchmarks/bench_data.py --learnability       # + train a 2-layer, 64-wide RM, report true-order accuracy
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time

import numpy as np

from starling_jax.data import load_tokenizer, make_dataset, parse_rows, synthetic


def timed(fn, repeat=1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def throughput(num_prompts: int, batch_size: int, max_length: int, max_prompt_length: int) -> dict:
    results = {}
    tok = load_tokenizer("openchat-3.5")
    t, raw = timed(lambda: synthetic.make_rows(num_prompts))
    results["synthetic_rows_per_s"] = num_prompts / t
    t, (rows, _) = timed(lambda: parse_rows(raw))
    results["parse_rows_per_s"] = num_prompts / t
    texts = [a for r in rows for a in r["responses"]]
    t, ids = timed(lambda: [tok.encode(x) for x in texts], repeat=3)
    results["encode_tokens_per_s"] = sum(map(len, ids)) / t
    results["encode_texts_per_s"] = len(texts) / t
    convs = [r["messages"] + [{"role": "assistant", "content": r["responses"][0]}] for r in rows]
    t, enc = timed(lambda: [tok.encode_chat(c, add_generation_prompt=False, return_loss_mask=True) for c in convs],
                   repeat=3)
    results["encode_chat_with_mask_tokens_per_s"] = sum(len(e[0]) for e in enc) / t
    for kind, kwargs in (("sft", {}), ("sft", {"pack": True}), ("rm", {}), ("dpo", {}), ("rl", {})):
        name = kind + ("_packed" if kwargs else "")
        t_build, ds = timed(lambda: make_dataset(kind, rows, tok, batch_size, max_length=max_length,
                                                 max_prompt_length=max_prompt_length, **kwargs))
        it = iter(ds)
        next(it)
        n = 50
        t, batches = timed(lambda: [next(it) for _ in range(n)])
        examples = n * batch_size
        results[f"{name}_build_s"] = t_build
        results[f"{name}_batches_per_s"] = n / t
        results[f"{name}_examples_per_s"] = examples / t
        key = "prompt_mask" if kind == "rl" else "chosen_attention_mask" if kind == "dpo" else "attention_mask"
        results[f"{name}_tokens_per_s"] = sum(int((b[key] > 0).sum()) for b in batches) / t
    return results


def learnability(steps: int, batch_size: int, seed: int = 0, learning_rate: float = 1e-3) -> dict:
    """Train a tiny K-wise (Plackett-Luce) RM on the synthetic rows; accuracy against the TRUE utility order."""
    import jax
    import jax.numpy as jnp
    import optax
    from starling_jax.models import PRESETS, init_params, score
    config = PRESETS["tiny"].replace(head="score")
    tok = load_tokenizer("openchat-3.5")
    raw = synthetic.make_rows(2000, seed=seed)
    rows, _ = parse_rows(raw)
    train, test = rows[:1800], rows[1800:]
    T, P = 80, 56
    ds = iter(make_dataset("rm", train, tok, batch_size, max_length=T, max_prompt_length=P, seed=seed))
    params = init_params(config, jax.random.key(seed))
    opt = optax.adamw(learning_rate, weight_decay=0.0)
    opt_state = opt.init(params)

    def rewards(params, batch):
        b, k, t = batch["tokens"].shape
        r = score(params, config, batch["tokens"].reshape(b * k, t), batch["attention_mask"].reshape(b * k, t))
        return r.reshape(b, k)

    def pl_loss(params, batch):
        r = rewards(params, batch)
        order = jnp.argsort(batch["ranks"], axis=1)  # best first; padded slots last
        r = jnp.take_along_axis(r, order, 1)
        m = jnp.take_along_axis(batch["response_mask"], order, 1).astype(jnp.float32)
        r = jnp.where(m > 0, r, -1e9)
        tail = jax.lax.cumlogsumexp(r[:, ::-1], axis=1)[:, ::-1]  # log sum_{k >= j} exp r_k
        return -jnp.sum((r - tail) * m) / r.shape[0]

    @jax.jit
    def step(params, opt_state, batch):
        loss, g = jax.value_and_grad(pl_loss)(params, batch)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    score_fn = jax.jit(rewards)

    def accuracy(params):
        test_ds = make_dataset("rm", test, tok, 25, max_length=T, max_prompt_length=P, shuffle=False, num_epochs=1)
        ok = total = ok_noisy = 0
        for b, batch_rows in zip(test_ds, (test[i:i + 25] for i in range(0, len(test), 25))):
            r = np.asarray(score_fn(params, b))
            for rr, row in zip(r, batch_rows):
                u = row["utilities"]
                for i, j in itertools.combinations(range(len(u)), 2):
                    if u[i] != u[j]:
                        total += 1
                        ok += (rr[i] > rr[j]) == (u[i] > u[j])
                        ok_noisy += (row["ranks"][i] < row["ranks"][j]) == (u[i] > u[j])
        return ok / total, ok_noisy / total

    acc0, labels = accuracy(params)
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, {k: jnp.asarray(v) for k, v in next(ds).items()})
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    acc, _ = accuracy(params)
    return {"steps": steps, "batch_rows": batch_size, "learning_rate": learning_rate, "train_s": seconds, "loss_first": float(np.mean(losses[:10])),
            "loss_last": float(np.mean(losses[-10:])), "true_pair_acc_init": acc0, "true_pair_acc": acc,
            "noisy_label_true_pair_acc": labels}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-prompt-length", type=int, default=96)
    p.add_argument("--learnability", action="store_true")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    args = p.parse_args()
    out = {"machine": f"{platform.processor() or platform.machine()} ({platform.system()})"}
    out.update(throughput(args.prompts, args.batch_size, args.max_length, args.max_prompt_length))
    if args.learnability:
        out["learnability"] = learnability(args.steps, args.batch_size, learning_rate=args.learning_rate)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
