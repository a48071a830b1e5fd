"""Autoregressive generation over the KV cache of starling_jax.models: one prefill, then a jitted decode loop.

The cache (models.init_cache) holds `cache_slots(config, P + N)` slots: the sliding window when the model has one and it
is shorter than the total length (a rolling buffer, so prompts longer than the window work), else the total length.
Prompts are left padded ([B, P] with prompt_mask 0 on the padding); every row then writes its n-th new token in the
same column, and positions come from the mask, so rows of different lengths decode together exactly as they would
alone.

Randomness: the token of step i is drawn with `jax.random.fold_in(key, i)`, so `generate` and `stream` give the same
tokens for the same key.

On a mesh, pass `constrain=sharding.activation_constraint(mesh, rules)`: the prefill's and every decode step's
residual stream is pinned to the batch axes (so XLA does not follow the FSDP-sharded weights and replicate the
activations), and the KV cache stays split over the batch axes and over the kv heads (the `kv_heads` rule, e.g. tensor).

Prefix sharing: a prompt sampled K times (AI feedback's K replies, a GRPO/RLOO group) is prefilled once;
`generate(..., rows=)` copies its next-token logits and KV cache to its K rows (share_prefill), which then decode on
their own: the same samples as prefilling every row, for the same key.

Shape letters: B batch, P prompt length, N max_new_tokens, V vocab, S cache slots.
"""

from __future__ import annotations

import functools
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from starling_jax.models import (ModelConfig, cache_slots, cast_matrices, check_token_ids, decode_layers, embed_tokens,
                                 final_norm, fuse_projections, init_cache, lm_logits, run_layers)
from starling_jax.models import Params



# ----------------------------------------------------------------------------------------------------------------------
# Choosing a token from logits.


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: Optional[jax.Array] = None) -> jax.Array:
    """Set every logit outside the top-k and then the nucleus (top-p) set to -inf. logits [..., V] -> [..., V].

    top_k = 0 (or >= V) keeps all; top_p None keeps all. The nucleus is the smallest set of most likely tokens (after
    top-k, renormalised) whose probability reaches top_p: a token is kept when the mass of the tokens strictly more
    likely than it is < top_p, so the most likely token is always kept (HF's TopK- then TopPLogitsWarper). Ties at
    the cut are kept.
    """
    V = logits.shape[-1]
    sorted_desc = None
    if 0 < top_k < V:
        sorted_desc = jax.lax.top_k(logits, top_k)[0]  # [..., k], descending
    if top_p is not None:
        if sorted_desc is None:
            sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc.astype(jnp.float32), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1 since mass_before[0] = 0 < top_p
        threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
    elif sorted_desc is not None:
        threshold = sorted_desc[..., -1:]
    else:
        return logits
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def choose_tokens(logits: jax.Array, key: jax.Array, temperature, top_k: int = 0, top_p=None,
                  greedy: bool = False) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row. logits [B, V] float32 -> (tokens [B] int32, logprobs [B] float32).

    greedy: argmax; else a draw from softmax(filter_logits(logits / temperature, top_k, top_p)). The log-prob is
    always under the untempered, unfiltered model distribution (log pi_old for APA/PPO, what a forward pass gives).
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        tokens, picked = greedy_tokens(logits)
    else:
        tokens = jax.random.categorical(key, filter_logits(logits / temperature, top_k, top_p), axis=-1)
        tokens = tokens.astype(jnp.int32)
        picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return tokens, picked - jax.nn.logsumexp(logits, axis=-1)


def greedy_tokens(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(argmax [B] int32, max [B]) of logits [B, V]: the first index of the row's maximum, as jnp.argmax gives.

    Why not jnp.argmax: XLA:CPU emits its (value, index) reduction as a slow scalar loop; a max, then the smallest
    index holding it, are two plain vectorised reductions (about 3x faster on [8, 32002], a few % of a batch-8 decode
    step). A row with a NaN has no index equal to its max: it gets V - 1 (jnp.argmax would give the NaN's index).
    """
    V = logits.shape[-1]
    best = jnp.max(logits, axis=-1)
    index = jnp.min(jnp.where(logits == best[:, None], jnp.arange(V, dtype=jnp.int32), V - 1), axis=-1)
    return index, best


# ----------------------------------------------------------------------------------------------------------------------
# Prefill and one decode step.


def _pin_cache(cache: Params, constrain) -> Params:
    """The cache's k/v (stacked [L, B, S, K, E] or per-layer tuples of [1, B, S, K, E]) constrained to
    constrain.kv_cache's layout; unchanged without a constraint."""
    if constrain is None:
        return cache
    pin = lambda a: tuple(constrain.kv_cache(x) for x in a) if isinstance(a, tuple) else constrain.kv_cache(a)
    return {**cache, "k": pin(cache["k"]), "v": pin(cache["v"])}


def _embed(params: Params, config: ModelConfig, tokens: jax.Array, constrain) -> jax.Array:
    if constrain is None:
        return embed_tokens(params, config, tokens)
    return constrain(embed_tokens({**params, "embed": constrain.embedding(params["embed"])}, config, tokens))


def _stacks(params) -> tuple[Params, tuple]:
    """(params without their layers, the layer stacks bottom to top) of full params or of a (top, rest) pair of
    models.split_params parts: the parts' stacks are used as they are (no concatenated copy of the layers)."""
    if not isinstance(params, tuple):
        return params, (params["layers"],)
    top, rest = params
    outer = {**{k: v for k, v in rest.items() if k != "layers"}, **{k: v for k, v in top.items() if k != "layers"}}
    return outer, tuple(p["layers"] for p in (rest, top) if "layers" in p)


def prefill(params: Params, config: ModelConfig, prompt_tokens: jax.Array, prompt_mask: jax.Array,
            slots: int, constrain=None) -> tuple[jax.Array, Params]:
    """Run the prompt [B, P] into a fresh cache of `slots` slots. constrain: see the module docstring. params: full
    params, or a (top, rest) pair of models.split_params parts (their layer stacks run one after the other).

    Returns (next-token logits [B, V] float32, decode cache): the cache of models.init_cache with k and v split into
    per-layer tuples of [1, B, S, K, E] (see decode_step for why).
    """
    params, stacks = _stacks(params)
    cache = _pin_cache(init_cache(config, prompt_tokens.shape[0], slots), constrain)
    x = _embed(params, config, prompt_tokens, constrain)
    start = jnp.int32(0) if prompt_tokens.shape[1] <= slots else None  # a fresh cache: slots 0..P-1, no wrap
    ks, vs, first = [], [], 0
    for layers in stacks:  # each stack writes its layers' slice of the cache; pos and index move the same for all
        n = jax.tree.leaves(layers)[0].shape[0]
        part = {**cache, "k": cache["k"][first:first + n], "v": cache["v"][first:first + n]}
        x, part = run_layers(layers, config, x, prompt_mask, part, constrain=constrain, write_start=start)
        part = _pin_cache(part, constrain)
        ks += [part["k"][l:l + 1] for l in range(n)]
        vs += [part["v"][l:l + 1] for l in range(n)]
        first += n
    # Left padding puts every row's last real token in the last column.
    logits = lm_logits(params, config, final_norm(params, config, x[:, -1]))
    return logits, _pin_cache({**part, "k": tuple(ks), "v": tuple(vs)}, constrain)


def split_layers(params: Params, head_vd: bool = True, dtype=None, fuse: bool = True) -> Params:
    """params with "layers" as a tuple of one dict per layer (no leading layer axis; with `fuse`, q/k/v and gate/up
    fused, see models.fuse_projections): the form decode_step runs fastest on. params: full params or a (top, rest)
    pair of models.split_params parts. dtype: the compute dtype (config.dtype): the layers' matrices, which every
    matmul casts to it anyway, are stored in it (the same numbers; with float32 master weights and bfloat16 compute,
    half the bytes to keep and to read per token).

    Why: a decode step reads every weight once, so it is bound by memory traffic. Run as one lax.scan, each step
    would first copy its layer's slice of the stacked weights (XLA materialises a dynamic slice that feeds a dot),
    doubling the traffic; separate per-layer arrays made once, outside the loop, are read in place. Fusing the
    projections while copying costs nothing more and makes 4 matrix-vector products per layer instead of 7. Not on
    a mesh (generate passes fuse = constrain is None): with heads split over a tensor axis the concatenation would
    mix two shardings and make XLA regather the weights.

    head_vd: store an untied LM head [D, V] transposed, as "lm_head_vd" [V, D] (a tied head is the embedding, [V, D]
    already). XLA:CPU's kernels for a [B, D] @ [D, V] matmul with a few rows (B = 8) run well below the memory bound;
    with the vocabulary rows outermost (h @ W^T) the batch-8 head is ~25% faster, the whole batch-8 decode ~12%.
    At batch 1 the [D, V] layout is as fast, so generate passes head_vd = batch > 1 (benchmarks/RESULTS.md).
    decode_logits reads either form.
    """
    outer, stacks = _stacks(params)

    def one(layers, l):
        layer = jax.tree.map(lambda a: a[l], layers)  # LoRA adapters ("lora", nested) sliced with their layer
        layer = fuse_projections(layer) if fuse else layer
        return layer if dtype is None else cast_matrices(layer, dtype)
    out = {**outer, "layers": tuple(one(layers, l) for layers in stacks
                                    for l in range(jax.tree.leaves(layers)[0].shape[0]))}
    if head_vd and "lm_head" in out:
        out["lm_head_vd"] = out.pop("lm_head").T
    return out


def decode_logits(params: Params, config: ModelConfig, h: jax.Array) -> jax.Array:
    """models.lm_logits for params as split_layers gives: [B, D] -> [B, V] float32."""
    if config.tie_embeddings or "lm_head_vd" in params:
        w = params["embed"] if config.tie_embeddings else params["lm_head_vd"]
        return jax.lax.dot_general(h, w.astype(h.dtype), (((h.ndim - 1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
    return lm_logits(params, config, h)


def decode_step(params: Params, config: ModelConfig, cache: Params, tokens: jax.Array,
                active: jax.Array, constrain=None) -> tuple[jax.Array, Params]:
    """Feed one token per row (tokens [B]; active [B] bool, False for rows that already stopped, which are fed as
    padding). params as split_layers gives, cache as prefill gives. Returns (next-token logits [B, V] float32, cache).
    constrain: see the module docstring.
    """
    # One token per row: the residual stream [B, 1, D] is tiny, so on a mesh it is kept whole on every device and the
    # matmuls run against the weights' FSDP shards in place (partial sums over the split embed axis, then a small
    # all-reduce). Split over the batch instead, XLA all-gathers every layer's weights each step and hoists those
    # gathers out of the decode loop: the whole model on every device. The KV cache stays split (see _pin_cache).
    pin = None if constrain is None else constrain.whole
    x = embed_tokens(params, config, tokens[:, None])
    x = x if pin is None else pin(x)
    x, cache = decode_layers(params["layers"], config, x, active[:, None].astype(jnp.int32), cache, constrain=pin)
    cache = _pin_cache(cache, constrain)
    return decode_logits(params, config, final_norm(params, config, x[:, 0])), cache


def _is_stop(tokens: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
    if not stop_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[:, None] == jnp.asarray(stop_ids, jnp.int32)[None, :], axis=-1)


def _pad_id(config: ModelConfig) -> int:
    return config.pad_token_id if config.pad_token_id is not None else 0


# ----------------------------------------------------------------------------------------------------------------------
# The jitted generation loop.

_STATIC = ("config", "max_new_tokens", "top_k", "stop_ids", "greedy", "use_top_p", "constrain")


def share_prefill(logits: jax.Array, cache: Params, rows: jax.Array, constrain=None) -> tuple[jax.Array, Params]:
    """Prefix sharing: the next-token logits [U, V] and decode cache (prefill's) of U prompts -> those of B rows, row b
    a copy of prompt rows[b]'s. A prompt sampled K times is prefilled once; its rows then decode on their own."""
    take = lambda a, axis: jnp.take(a, rows, axis=axis)
    cache = {**cache, "k": tuple(take(c, 1) for c in cache["k"]), "v": tuple(take(c, 1) for c in cache["v"]),
             "pos": take(cache["pos"], 0)}
    return take(logits, 0), _pin_cache(cache, constrain)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate(params, prompt_tokens, prompt_mask, key, temperature, top_p, rows, *, config, max_new_tokens, top_k,
              stop_ids, greedy, use_top_p, constrain):
    P = prompt_tokens.shape[1]
    B = prompt_tokens.shape[0] if rows is None else rows.shape[0]
    N = max_new_tokens
    pad = _pad_id(config)
    top_p = top_p if use_top_p else None

    def emit(i, logits, done, out):
        """Choose step i's token, write it (or padding, for rows already done) into the outputs."""
        tok, lp = choose_tokens(logits, jax.random.fold_in(key, i), temperature, top_k, top_p, greedy)
        live = ~done
        tokens, mask, logprobs = out
        out = (tokens.at[:, i].set(jnp.where(live, tok, pad)), mask.at[:, i].set(live.astype(jnp.int32)),
               logprobs.at[:, i].set(jnp.where(live, lp, 0.0)))
        return tok, done | _is_stop(tok, stop_ids), out

    logits, cache = prefill(params, config, prompt_tokens, prompt_mask, cache_slots(config, P + N), constrain)
    if rows is not None:
        logits, cache = share_prefill(logits, cache, rows, constrain)
    out = (jnp.full((B, N), pad, jnp.int32), jnp.zeros((B, N), jnp.int32), jnp.zeros((B, N), jnp.float32))
    tok, done, out = emit(0, logits, jnp.zeros((B,), bool), out)
    step_params = split_layers(params, head_vd=B > 1, dtype=jnp.dtype(config.dtype), fuse=constrain is None)

    def cond(state):
        i, _, _, done, _ = state
        return (i < N) & ~jnp.all(done)  # stop early once every row has met a stop id

    def body(state):
        i, cache, tok, done, out = state
        logits, cache = decode_step(step_params, config, cache, tok, ~done, constrain)
        tok, done, out = emit(i, logits, done, out)
        return i + 1, cache, tok, done, out

    _, _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, tok, done, out))
    return out


def _options(config: ModelConfig, max_new_tokens, temperature, top_k, top_p, stop_ids) -> dict:
    """Validate the sampling options on the host; returns the static ones."""
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if float(temperature) < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {top_k}")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}")
    stop_ids = tuple(int(s) for s in stop_ids)
    bad = [s for s in stop_ids if not 0 <= s < config.vocab_size]
    if bad:
        raise ValueError(f"stop_ids {bad} are outside the vocabulary [0, {config.vocab_size})")
    return dict(max_new_tokens=int(max_new_tokens), top_k=int(top_k), stop_ids=stop_ids,
                greedy=float(temperature) == 0.0, use_top_p=float(top_p) < 1.0)


def _check_prompts(config: ModelConfig, prompt_tokens, prompt_mask, max_new_tokens: int):
    """Shape/dtype checks always; value checks (ids in range, left padding, non-empty rows) when the arrays are
    concrete (generate may also be traced inside a caller's jit, where they are skipped)."""
    if prompt_mask is None:
        prompt_mask = jnp.ones(jnp.shape(prompt_tokens), jnp.int32)
    if jnp.ndim(prompt_tokens) != 2 or jnp.shape(prompt_tokens) != jnp.shape(prompt_mask):
        raise ValueError(f"prompt_tokens {tuple(jnp.shape(prompt_tokens))} and prompt_mask "
                         f"{tuple(jnp.shape(prompt_mask))} must both be [batch, prompt_len]")
    P = jnp.shape(prompt_tokens)[1]
    if P + max_new_tokens > config.max_seq_len:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds the model's max_seq_len "
                         f"{config.max_seq_len}")
    # value checks need the values: skipped under a caller's jit and for global arrays spread over processes
    if not any(isinstance(a, jax.core.Tracer) or (isinstance(a, jax.Array) and not a.is_fully_addressable)
               for a in (prompt_tokens, prompt_mask)):
        check_token_ids(prompt_tokens, config.vocab_size, "prompt_tokens")
        m = np.asarray(prompt_mask)
        if not np.isin(m, (0, 1)).all():
            raise ValueError("prompt_mask must be 0 (padding) or 1 (token); packed segment ids are not prompts")
        empty = np.flatnonzero(m.sum(axis=1) == 0)
        if empty.size:
            raise ValueError(f"prompt rows {empty.tolist()} have no tokens (prompt_mask all 0)")
        right = np.flatnonzero((np.diff(m, axis=1) < 0).any(axis=1))
        if right.size:
            raise ValueError(f"prompt rows {right.tolist()} are not left padded (a 1 before a 0 in prompt_mask); "
                             "generation appends after the last column, so pad prompts on the left")
    return jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)


def generate(params: Params, config: ModelConfig, prompt_tokens, prompt_mask, key: jax.Array, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), constrain=None, rows=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sample up to N = max_new_tokens tokens after left-padded prompts.

    params: the model's params, or a pair (top, rest) as models.split_params gives them (an RL stage's trainable top
    layers and frozen trunk), used as they are: no merged copy of the weights is made.
    prompt_tokens [B, P] int, prompt_mask [B, P] (0 = left padding, 1 = token; None = no padding).
    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. A row stops after the first token in stop_ids.
    Returns tokens [B, N] int32 (padding after a row's stop: config.pad_token_id, or 0), mask [B, N] int32 (1 on the
    generated tokens, the stop token included) and logprobs [B, N] float32: log pi(token | prefix) under the model at
    temperature 1 without filtering (0 where mask is 0).

    constrain: None, or sharding.activation_constraint(mesh, rules) to keep activations and the KV cache split over
    the mesh's batch axes (see the module docstring); the tokens are the same either way.

    rows: None, or [B] int: prefix sharing. prompt_tokens/prompt_mask then hold U distinct prompts, row b of the
    output samples after prompt rows[b]: each prompt is prefilled once and its KV cache copied to its rows (a prompt
    sampled K times: AI feedback's K replies, a GRPO/RLOO group). The samples equal those of
    generate(prompt_tokens[rows], prompt_mask[rows]) with the same key; the prefill's work and temporaries are U/B of
    that.

    Compiled once per (config, shapes, max_new_tokens, top_k, stop_ids, greedy, top_p < 1, constrain); temperature
    and top_p are traced. Options must be Python numbers; the arrays may be traced (callable inside a caller's jit).
    """
    opts = _options(config, max_new_tokens, temperature, top_k, top_p, stop_ids)
    prompt_tokens, prompt_mask = _check_prompts(config, prompt_tokens, prompt_mask, opts["max_new_tokens"])
    if rows is not None:
        if jnp.ndim(rows) != 1:
            raise ValueError(f"rows must be [batch] prompt indices, got shape {tuple(jnp.shape(rows))}")
        if not isinstance(rows, jax.core.Tracer):
            r = np.asarray(rows)
            if r.size and (r.min() < 0 or r.max() >= jnp.shape(prompt_tokens)[0]):
                raise ValueError(f"rows must index the {jnp.shape(prompt_tokens)[0]} prompts, got values "
                                 f"{r.min()}..{r.max()}")
        rows = jnp.asarray(rows, jnp.int32)
    return _generate(params, prompt_tokens, prompt_mask, key, jnp.float32(temperature or 1.0), jnp.float32(top_p),
                     rows, config=config, constrain=constrain, **opts)


# ----------------------------------------------------------------------------------------------------------------------
# Streaming: the same computation with a host loop, so a caller can show each token as it comes.

_STEP_STATIC = ("config", "top_k", "greedy", "use_top_p")


@functools.partial(jax.jit, static_argnames=_STEP_STATIC + ("slots",))
def _stream_start(params, prompt_tokens, prompt_mask, key, temperature, top_p, *, config, slots, top_k, greedy,
                  use_top_p):
    logits, cache = prefill(params, config, prompt_tokens, prompt_mask, slots)
    tok, lp = choose_tokens(logits, jax.random.fold_in(key, 0), temperature, top_k, top_p if use_top_p else None,
                            greedy)
    return cache, tok, lp


@functools.partial(jax.jit, static_argnames=_STEP_STATIC, donate_argnames=("cache",))
def _stream_next(params, cache, tok, active, key, i, temperature, top_p, *, config, top_k, greedy, use_top_p):
    logits, cache = decode_step(params, config, cache, tok, active)
    tok, lp = choose_tokens(logits, jax.random.fold_in(key, i), temperature, top_k, top_p if use_top_p else None,
                            greedy)
    return cache, tok, lp


def stream(params: Params, config: ModelConfig, prompt_tokens, prompt_mask, key: jax.Array, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           stop_ids: Sequence[int] = ()) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Like generate, but yields each step's (tokens [B], mask [B], logprobs [B]) as numpy arrays as soon as it is
    chosen (one host sync per token: for interactive use, not for throughput). Stacking the yields gives generate's
    outputs for the same arguments; iteration ends when every row has stopped or after max_new_tokens steps."""
    opts = _options(config, max_new_tokens, temperature, top_k, top_p, stop_ids)
    prompt_tokens, prompt_mask = _check_prompts(config, prompt_tokens, prompt_mask, opts["max_new_tokens"])
    N, stops, pad = opts["max_new_tokens"], np.asarray(opts["stop_ids"], np.int32), _pad_id(config)
    static = dict(config=config, top_k=opts["top_k"], greedy=opts["greedy"], use_top_p=opts["use_top_p"])
    temperature, top_p = jnp.float32(temperature or 1.0), jnp.float32(top_p)
    slots = cache_slots(config, prompt_tokens.shape[1] + N)
    cache, tok, lp = _stream_start(params, prompt_tokens, prompt_mask, key, temperature, top_p, slots=slots, **static)
    step_params = jax.jit(split_layers, static_argnums=1)(params, prompt_tokens.shape[0] > 1)
    done = np.zeros(prompt_tokens.shape[0], bool)
    for i in range(N):
        if i > 0:
            cache, tok, lp = _stream_next(step_params, cache, tok, jnp.asarray(~done), key, jnp.int32(i), temperature,
                                          top_p, **static)
        t, l, live = np.asarray(tok), np.asarray(lp), ~done
        yield np.where(live, t, pad).astype(np.int32), live.astype(np.int32), np.where(live, l, 0.0).astype(np.float32)
        done = done | np.isin(t, stops)
        if done.all():
            return


# ----------------------------------------------------------------------------------------------------------------------
# Stop strings (host side: they depend on the tokenizer).


def apply_stop_strings(tokenizer, tokens, mask, stop_strings: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Cut each row at the first stop string in its decoded text (e.g. "GPT4 Correct User:").

    tokenizer: anything with decode(list[int]) -> str (starling_jax.data.load_tokenizer's Tokenizer).
    tokens, mask [B, N] as returned by generate. Returns (texts, mask [B, N] int32): each row's decoded text up to
    (not including) its first stop string, and the mask cut after the token that completes that string, so, like a
    stop id, the tokens that spell the stop stay in the action sequence and the policy is credited for stopping.
    Rows without a stop string keep their text and mask.
    """
    tokens, mask = np.asarray(tokens), np.asarray(mask).astype(np.int32).copy()
    if tokens.shape != mask.shape or tokens.ndim != 2:
        raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} must both be [batch, new_tokens]")
    stop_strings = [s for s in stop_strings if s]
    texts = []
    for b in range(tokens.shape[0]):
        cols = np.flatnonzero(mask[b])
        ids = tokens[b, cols].tolist()
        text = tokenizer.decode(ids)
        hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
        if not hits:
            texts.append(text)
            continue
        texts.append(text[:min(hits)])

        def has_stop(n):  # does the text of the first n tokens contain a stop string?
            t = tokenizer.decode(ids[:n])
            return any(s in t for s in stop_strings)

        lo, hi = 1, len(ids)  # smallest n with has_stop(n): has_stop is monotone in n, and true at n = len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
        mask[b, cols[lo:]] = 0
    return texts, mask


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, bucket: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to one length, rounded up to a multiple of `bucket`. Returns tokens, mask [B, P] int32."""
    P = max(len(r) for r in rows)
    P = -(-P // bucket) * bucket
    tokens = np.full((len(rows), P), pad_id, np.int32)
    mask = np.zeros((len(rows), P), np.int32)
    for b, r in enumerate(rows):
        if r:
            tokens[b, P - len(r):] = r
            mask[b, P - len(r):] = 1
    return tokens, mask
