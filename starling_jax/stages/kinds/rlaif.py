"""The "rl" stage kind: an RL algorithm of the registry (APA, PPO, ...) against a frozen reward model, with a KL
penalty to the initial policy.

One RL step (one call of the loop's step) is one chunk of rollouts and its optimisation epochs:

  host (RolloutSource.next_batch, starling_jax.stages.rollout):
    prompts -> sampling.generate with the current policy -> decode to text -> re-render the conversation in the
    reward model's template -> tokenize with the reward model's OWN tokenizer -> models.score with the frozen RM ->
    scale by a running std and clip -> make_experience (jitted: policy/reference log-probs and critic values in one
    hydra pass, per-token reward -kl_coef * (logp_old - logp_ref) with the score at the last response token, the
    algorithm's advantages: GAE unless it registers its own)
  device (make_rl_step, jitted):
    `epochs` passes over the chunk in shuffled minibatches of the algorithm's policy loss (+ vf_coef * value_loss
    when the algorithm has a critic), one optimizer update per minibatch; with train.grad_accum = G each minibatch's
    gradient is accumulated over G micro-batches (step.accumulate_gradients), the same update in less memory.

What an RL algorithm registers (starling_jax/algorithms/registry.py, kind="rl"): `loss(out, batch, objective)`, and
optionally `advantages`, `critic=False` and `group_size`. Trees: see starling_jax.step.hydra (trainable =
{"policy", "critic"}, frozen = {"trunk", "reference"}).

Why this file is long (~720 lines): it is the whole rl kind, as data.py is the data kinds: the jitted math
(experience, loss, the minibatch update), the setup training and the planner share, the config check and the stage
program. The seam to cut when it grows is the jitted math (make_experience .. build_rl_functions) into a module of
its own.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from starling_jax import models
from starling_jax.algorithms import CriticOptions, RLOptions, registry
from starling_jax.config import ObjectiveConfig
from starling_jax.data import load_tokenizer, pipelines
from starling_jax.generation import sampling
from starling_jax.metrics import stats
from starling_jax.models import ModelConfig, Params
from starling_jax.objectives import common as obj_common, policy as obj_policy
from starling_jax.parallel import sharding
from starling_jax.stages import program as prog
from starling_jax.stages.policy_eval import measure_policy
from starling_jax.stages.rollout import (RewardScorer, RolloutSource, conversation_of, row_calls,
                                         trained_reward_template)
from starling_jax.step import adapters
from starling_jax.step.hydra import hydra_forward, init_rl_params, policy_params, policy_parts, reference_parts
from starling_jax.step.logging import plot_metrics, read_metrics
from starling_jax.step.state import abstract_state, create_state, make_optimizer, state_shardings
from starling_jax.step.step import accumulate_gradients, apply_gradients

Batch = dict[str, Any]
log = logging.getLogger(__name__)

# Keys of an RL training batch the update reads ([B, ...]); the rest ("stat_*", [B] each) are per-rollout statistics
# that the step only averages into its metrics.
TRAIN_KEYS = ("tokens", "attention_mask", "response_mask", "old_logprobs", "ref_logprobs", "old_values",
              "advantages", "returns")


def rl_algorithm(name: str) -> registry.Algorithm:
    """The registered algorithm `name`, checked to be one the rl kind trains."""
    algorithm = registry.get(name)
    if algorithm.kind != "rl":
        raise ValueError(f"the rl stage trains the algorithms of kind 'rl' ({', '.join(registry.of_kind('rl'))}); "
                         f"{name!r} is of kind {algorithm.kind!r}")
    return algorithm


def group_size(algorithm: registry.Algorithm, objective: ObjectiveConfig) -> int:
    """Rollouts sampled per prompt (consecutive rows of a chunk) for `algorithm` with `objective`'s options."""
    return 1 if algorithm.group_size is None else int(algorithm.group_size(objective))


def shaped_rewards(scores: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array, response_mask: jax.Array,
                   kl_coef) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards [B, N] = -kl_coef * (logp_old - logp_ref), plus the (scaled) RM score [B] at each row's last
    response token; and the per-row KL estimate sum_t (logp_old - logp_ref) [B]."""
    mask = obj_common.as_weights(response_mask)
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = jnp.arange(scores.shape[0])
    rewards = rewards.at[rows, models.last_token_index(response_mask)].add(scores.astype(jnp.float32))
    return rewards * mask, jnp.sum(kl, axis=-1)


def experience_forward(trainable: Params, frozen: Params, tokens: jax.Array, attention_mask: jax.Array, *,
                       config: ModelConfig, prompt_len: int, constrain=None, temperature: float = 1.0) -> dict:
    """The forward pass of make_experience, row by row independent (so a chunk may run it in parts): logprobs,
    ref_logprobs and values [B, N] float32, without gradient."""
    out = jax.lax.stop_gradient(hydra_forward(trainable, frozen, config, tokens, attention_mask, prompt_len,
                                              constrain=constrain, temperature=temperature))
    return {k: out[k] for k in ("logprobs", "ref_logprobs", "values")}


def experience_from_forward(out: dict, response_mask: jax.Array, scores: jax.Array, kl_coef, *,
                            objective: ObjectiveConfig, group: int = 1) -> dict:
    """The rest of make_experience, over the whole chunk (advantage whitening and group baselines need every row)."""
    mask = response_mask
    rewards, kl = shaped_rewards(scores, out["logprobs"], out["ref_logprobs"], mask, kl_coef)
    algorithm = rl_algorithm(objective.name)
    values = jnp.where(mask > 0, out["values"], 0.0) if algorithm.critic else jnp.zeros_like(out["logprobs"])
    if algorithm.advantages is None:
        advantages, returns = obj_policy.gae(rewards, values, mask, objective.gamma, objective.gae_lambda)
    else:
        advantages, returns = algorithm.advantages(
            rewards=rewards, values=values, mask=mask, objective=objective, group_size=group, scores=scores,
            logprobs=out["logprobs"], ref_logprobs=out["ref_logprobs"], kl_coef=kl_coef)
    if objective.whiten_advantages:
        advantages = obj_common.masked_whiten(advantages, mask)
    return {"old_logprobs": out["logprobs"], "ref_logprobs": out["ref_logprobs"], "old_values": values,
            "rewards": rewards, "advantages": advantages, "returns": returns, "kl": kl}


def make_experience(trainable: Params, frozen: Params, tokens: jax.Array, attention_mask: jax.Array,
                    response_mask: jax.Array, scores: jax.Array, kl_coef, *, config: ModelConfig,
                    objective: ObjectiveConfig, prompt_len: int, constrain=None, temperature: float = 1.0,
                    group: int = 1) -> dict:
    """Everything the update needs from one chunk of rollouts (jit with config/objective/prompt_len/temperature/group
    static; group = rollouts per prompt, consecutive rows): experience_forward, then experience_from_forward.

    tokens, attention_mask [B, P + N] (prompt left padded, response right padded); response_mask [B, N];
    scores [B] the scaled and clipped RM scores. Returns old_logprobs, ref_logprobs, old_values, rewards, advantages,
    returns [B, N] and kl [B] (sum over each row's response tokens of logp_old - logp_ref).
    """
    out = experience_forward(trainable, frozen, tokens, attention_mask, config=config, prompt_len=prompt_len,
                             constrain=constrain, temperature=temperature)
    return experience_from_forward(out, response_mask, scores, kl_coef, objective=objective, group=group)


@dataclasses.dataclass(frozen=True)
class ExperienceFn:
    """make_experience as two jitted calls: forward(trainable, frozen, tokens, attention_mask) (row by row, so a chunk
    may run it in parts) and finish(out, response_mask, scores, kl_coef) over the whole chunk; calling it runs both
    over the whole chunk."""
    forward: Callable
    finish: Callable

    def __call__(self, trainable, frozen, tokens, attention_mask, response_mask, scores, kl_coef) -> dict:
        return self.finish(self.forward(trainable, frozen, tokens, attention_mask), response_mask, scores, kl_coef)


def rl_loss(trainable: Params, frozen: Params, batch: Batch, *, config: ModelConfig, objective: ObjectiveConfig,
            prompt_len: int, constrain=None, temperature: float = 1.0) -> tuple[jax.Array, dict]:
    """The algorithm's policy loss (+ vf_coef * value loss when it has a critic) on a (mini- or micro-)batch of
    experience -> (loss, metrics).

    Metrics: the algorithm's (means over the valid response tokens), policy_loss, value_loss, "weight" (what the loss
    averages over, from the algorithm's loss: valid tokens, or replies for GRPO/RLOO's loss_aggregation="sequence")
    and "num_tokens" (valid response tokens, what the other means average over), so micro-batches combine into the
    minibatch's loss and metrics (make_rl_step). The value loss is a token mean, so an algorithm with a critic
    averages its policy loss over tokens too (APA, PPO). objective.critic_only_above is not applied here: it is a rule
    on the whole minibatch's value loss, applied to its gradient (critic_only_rule).
    """
    out = hydra_forward(trainable, frozen, config, batch["tokens"], batch["attention_mask"], prompt_len,
                        with_reference=False, constrain=constrain, temperature=temperature)
    mask = batch["response_mask"]
    algorithm = rl_algorithm(objective.name)
    policy_loss, metrics = algorithm.loss(out, batch, objective)
    metrics = {**metrics, "num_tokens": jnp.sum(obj_common.as_weights(mask))}
    if not algorithm.critic:  # the same metric names as with a critic (the curves and logs read them)
        return policy_loss, {**metrics, "policy_loss": policy_loss, "value_loss": jnp.zeros((), jnp.float32)}
    v_loss, v_metrics = obj_policy.value_loss(out["values"], batch["old_values"], batch["returns"], mask,
                                              objective.value_clip)
    loss = policy_loss + objective.vf_coef * v_loss
    return loss, {**metrics, **v_metrics, "policy_loss": policy_loss, "value_loss": v_loss}


def critic_only_rule(grads: Params, metrics: dict, threshold: float, vf_coef: float) -> tuple[Params, dict]:
    """The Starling fork's rule (objective.critic_only_above = threshold) on one minibatch's gradient and metrics (of
    rl_loss, accumulated over its micro-batches): when the minibatch's value loss exceeds the threshold it trains only
    the critic. The policy term is dropped and the value loss reaches the critic (trainable["critic"]) only, not the
    policy's layers beneath a head critic: the gradient of vf_coef * value_loss with respect to the critic is the
    whole loss's (the policy loss does not read the critic), so every other gradient is set to zero. The loss metric
    becomes vf_coef * value_loss; critic_only is 1.0 when the rule fired."""
    critic_only = metrics["value_loss"] > threshold
    grads = {k: g if k == "critic" else jax.tree.map(lambda x: jnp.where(critic_only, jnp.zeros_like(x), x), g)
             for k, g in grads.items()}
    return grads, {**metrics, "loss": jnp.where(critic_only, vf_coef * metrics["value_loss"], metrics["loss"]),
                   "critic_only": critic_only.astype(jnp.float32)}


def _rl_weight_of(name: str) -> str:
    """The count a metric of rl_loss averages over: the loss's own units for the losses, valid tokens for the rest."""
    return "weight" if name in ("loss", "policy_loss") else "num_tokens"


def make_rl_step(loss_fn: Callable[[Params, Params, Batch], tuple[jax.Array, dict]],
                 optimizer: optax.GradientTransformation, epochs: int, minibatch_size: int, grad_accum: int = 1,
                 objective: Optional[ObjectiveConfig] = None):
    """step(state, batch) -> (state, metrics): `epochs` shuffled passes over the chunk in minibatches, one optimizer
    update each (a lax.scan, so it jits to one program). state is a TrainState(step, params, frozen, opt_state, rng);
    its step counts chunks. Each update is step.step's apply_gradients. Metrics are means over the updates (grad_norm,
    lr included), plus the means of the batch's "stat_*" rows.

    grad_accum = G: each minibatch is G micro-batches of minibatch_size / G rollouts (step.accumulate_gradients, a
    lax.scan), their gradients, losses and metrics combined by rl_loss's counts ("weight" for the losses, "num_tokens"
    for the token means) into the minibatch's: the same update as G = 1, with the activations of one micro-batch.
    `objective`: its minibatch-level rule (critic_only_above, critic_only_rule) acts on the minibatch's accumulated
    gradient; None = no such rule. Counts ("weight", "num_*") are not logged."""
    if grad_accum < 1 or minibatch_size % grad_accum:
        raise ValueError(f"rl step: minibatch_size={minibatch_size} is not divisible by grad_accum={grad_accum}")
    threshold = getattr(objective, "critic_only_above", None)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def grads_and_metrics(params, frozen, minibatch, _key):
        (loss, metrics), grads = grad_fn(params, frozen, minibatch)
        return grads, {**metrics, "loss": loss}

    def step(state, batch: Batch):
        data = {k: batch[k] for k in TRAIN_KEYS}
        B = data["tokens"].shape[0]
        if B % minibatch_size:
            raise ValueError(f"rl step: the chunk of {B} rollouts is not divisible by minibatch_size={minibatch_size}")
        rng, key = jax.random.split(state.rng)
        perms = jax.vmap(lambda k: jax.random.permutation(k, B))(jax.random.split(key, epochs))
        order = perms.reshape(epochs * (B // minibatch_size), minibatch_size)

        def update(carry, idx):
            params, opt_state = carry
            mb = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
            grads, metrics = accumulate_gradients(grads_and_metrics, params, state.frozen, mb, None, grad_accum,
                                                  weight_of=_rl_weight_of)
            if threshold is not None:
                grads, metrics = critic_only_rule(grads, metrics, threshold, objective.vf_coef)
            metrics = {k: v for k, v in metrics.items() if k != "weight" and not k.startswith("num_")}
            params, opt_state, update_metrics = apply_gradients(optimizer, params, opt_state, grads)
            return (params, opt_state), {"critic_only": jnp.zeros((), jnp.float32), **metrics, **update_metrics}

        (params, opt_state), history = jax.lax.scan(update, (state.params, state.opt_state), order)
        metrics = {k: jnp.mean(v) for k, v in history.items()}
        metrics.update({k[len("stat_"):]: jnp.mean(v.astype(jnp.float32)) for k, v in batch.items()
                        if k.startswith("stat_")})
        state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return state, metrics

    return step


def build_rl_functions(config: ModelConfig, objective: ObjectiveConfig, prompt_len: int, constrain=None,
                       temperature: float = 1.0, group: Optional[int] = None):
    """(experience_fn, loss_fn) with the static arguments bound; experience_fn is an ExperienceFn (two jitted
    calls). constrain: optional activation sharding constraint (sharding.activation_constraint(mesh, rules)) applied
    at layer boundaries.
    temperature: rollout.temperature (log-probs of the distribution the rollouts were sampled from); group: rollouts
    per prompt (default: the algorithm's, from the objective's options)."""
    algorithm = rl_algorithm(objective.name)
    if registry.options_error(objective):
        raise TypeError(registry.options_error(objective))
    group = group_size(algorithm, objective) if group is None else group
    experience = ExperienceFn(
        forward=jax.jit(functools.partial(experience_forward, config=config, prompt_len=prompt_len,
                                          constrain=constrain, temperature=temperature)),
        finish=jax.jit(functools.partial(experience_from_forward, objective=objective, group=group)))
    loss = functools.partial(rl_loss, config=config, objective=objective, prompt_len=prompt_len, constrain=constrain,
                             temperature=temperature)
    return experience, loss


# ----------------------------------------------------------------------------------------------------------------------
# The "rl" stage kind for the loop.


def _policy_eval(trainable: Params, frozen: Params, sample_params, config: ModelConfig, prompts: dict,
                 conversations: list, tokenizer, template: str, scorer, rollout, key: jax.Array,
                 true_utility=None, place=None) -> dict:
    """Sample replies to held-out prompts with `sample_params` (full params, or a (top, trunk) pair:
    hydra.policy_parts); their mean RM score, true utility (synthetic data),
    length and KL to the reference (mean over rows of sum_t log pi(a_t) - log pi_ref(a_t), under the current policy
    trees `trainable`/`frozen`, so it is the KL of whichever model sampled only when that model is the policy).
    With a `place` the prompts are this process's rows of the global set of held-out prompts; the means and the
    per-prompt lists cover all of them, the samples are the first rows of this process (process 0: the set's first)."""
    import zlib

    def logprobs(tokens, attn, prompt_len):
        if place is None:
            out = _eval_forward(trainable, frozen, config, tokens, attn, prompt_len, float(rollout.temperature))
            return out["logprobs"], out["ref_logprobs"]
        out = _eval_forward(trainable, frozen, config, *place.put(tokens, attn), prompt_len,
                            float(rollout.temperature))
        return place.local(out["logprobs"]), place.local(out["ref_logprobs"])

    m = measure_policy(sample_params, config, tokenizer, template, prompts, conversations, key, rollout,
                       logprobs=logprobs, scorer=scorer, true_utility=true_utility, place=place)
    s_texts, kl = m["texts"], m["kl"]
    whole = (lambda local: place.whole(np.asarray(local))) if place is not None else np.asarray  # every prompt's
    scores = whole(np.asarray(m["rm_score"], np.float32))
    text_ids = [zlib.crc32(t.encode()) & 0x7FFFFFFF for t in s_texts]  # equal replies <-> equal ids (gatherable)
    report = {"rm_score": float(np.mean(scores)), "kl_to_reference": float(np.mean(whole(kl.astype(np.float32)))),
              "response_length": float(np.mean(whole(m["length"].astype(np.float32)))),
              "per_prompt": {"rm_scores": scores.tolist(),
                             "lengths": whole(np.asarray([len(t) for t in s_texts], np.int32)).tolist(),
                             "text_ids": whole(np.asarray(text_ids, np.int32)).tolist()}}
    if true_utility is not None:
        truth = whole(np.asarray(m["true_reward"], np.float32))
        report["true_reward"] = float(np.mean(truth))
        report["per_prompt"]["true_rewards"] = truth.tolist()
    report["samples"] = [{"prompt": c[-1]["content"], "reply": t} for c, t in list(zip(conversations, s_texts))[:4]]
    return report


def judged_win_rate(after: dict, before: dict) -> dict:
    """The reward model's verdict on the same prompts, final policy vs the policy the stage started from (the SFT
    policy): win rate with its 95% bootstrap interval, ties, losses, mean score gap, length-controlled win rate
    (eval.stats.head_to_head; replies of equal text tie)."""
    a, b = after["per_prompt"], before["per_prompt"]
    result = stats.head_to_head(a["rm_scores"], b["rm_scores"], a["lengths"], b["lengths"],
                                identical=[x == y for x, y in zip(a["text_ids"], b["text_ids"])])
    return {k: result[k] for k in ("win_rate", "win_rate_ci95", "wins", "ties", "losses", "n", "mean_score_gap",
                                   "length_controlled_win_rate")}


@functools.partial(jax.jit, static_argnums=(2, 5, 6))
def _eval_forward(trainable, frozen, config, tokens, attention_mask, prompt_len, temperature=1.0):
    out = hydra_forward(trainable, frozen, config, tokens, attention_mask, prompt_len, temperature=temperature)
    return {"logprobs": out["logprobs"], "ref_logprobs": out["ref_logprobs"]}


# the panels of WORKDIR/<rl stage>/curves.png: (title, metric names)
CURVES = (("reward", ("reward", "true_reward")), ("KL to reference (per sequence)", ("kl",)),
          ("loss", ("loss", "policy_loss", "value_loss")))


def experience_spec(rollouts: int, prompt_len: int, new_tokens: int, stat_keys=()) -> dict:
    """ShapeDtypeStructs of one rl batch: TRAIN_KEYS ([B, P + N] tokens and attention mask, [B, N] the rest) plus
    the per-rollout "stat_*" rows ([B] float32) the rollout source adds."""
    S, B, P, N = jax.ShapeDtypeStruct, rollouts, prompt_len, new_tokens
    spec = {"tokens": S((B, P + N), jnp.int32), "attention_mask": S((B, P + N), jnp.int32),
            "response_mask": S((B, N), jnp.int32)}
    spec.update({k: S((B, N), jnp.float32) for k in TRAIN_KEYS if k not in spec})
    spec.update({k: S((B,), jnp.float32) for k in stat_keys})
    return spec


def rl_setup(c, model_config: ModelConfig, params: Params, mesh, key: jax.Array, stat_keys=(),
             critic_key: Optional[jax.Array] = None) -> prog.StageSetup:
    """The hydra trees, shardings, optimiser and minibatch-epoch step of an rl stage, from the policy's full params
    as arrays (training: placed in their shards) or ShapeDtypeStructs (planning); see program.StageSetup.

    The optimiser schedule spans train.steps x updates per step (rollout.epochs x minibatches per chunk): the rl
    step is one chunk of rollouts and runs that many optimiser updates. `key` seeds the state's rng (and the critic's
    init unless critic_key is given); stat_keys: the rollout source's "stat_*" rows, part of the batch layout.
    """
    o, r = c.objective, c.rollout
    algorithm = rl_algorithm(o.name)
    rules = c.mesh.rules
    abstract = prog.is_abstract(params)
    top, head, lora = c.model.trainable_top_layers, c.model.train_lm_head, c.model.lora
    k_critic, k_state = jax.random.split(key) if critic_key is None else (critic_key, key)
    run_config = adapters.configure(model_config, lora, top)  # model_config itself without adapters

    # a critic-free algorithm's options have no critic: its state holds the default head, which never trains
    value_head, value_layers = (o.value_head, o.value_head_layers) if algorithm.critic else ("mlp", 0)

    def split(p, k):
        return init_rl_params(p, run_config, k, top, head, value_head, value_layers, lora=lora)
    trainable, frozen = jax.eval_shape(split, params, k_critic) if abstract else split(params, k_critic)
    # Placement on the mesh: the hydra trees shard like the model's params, the batch over its leading axis; the
    # step keeps the state's layout and donates it.
    model_specs = models.param_specs(model_config)
    critic_specs = models.value_head_specs(model_config, value_head, value_layers)
    if lora is None:
        shard_t = sharding.param_shardings(sharding.respec(trainable, {"policy": model_specs, "critic": critic_specs}),
                                           mesh, rules)
        shard_f = sharding.param_shardings(sharding.respec(frozen, {
            "trunk": models.quantized_specs(model_specs, model_config), "reference": model_specs}), mesh, rules)
    else:  # adapters + critic train; the base is frozen and is the reference (step/adapters.py)
        specs_t, specs_f = adapters.tree_specs(run_config, lora, trainable, frozen, heads={"critic": critic_specs})
        shard_t, shard_f = sharding.param_shardings(specs_t, mesh, rules), sharding.param_shardings(specs_f, mesh, rules)
    if not abstract:
        trainable, frozen = jax.device_put(trainable, shard_t), jax.device_put(frozen, shard_f)
    updates_per_step = r.epochs * (r.prompts_per_step // r.minibatch_size)
    total = c.train.steps * updates_per_step
    optimizer = make_optimizer(c.optim, total, trainable)
    empty = abstract_state(trainable, optimizer, frozen)
    shard_state = state_shardings(optimizer, empty, shard_t, shard_f, mesh)
    state = empty if abstract else create_state(trainable, optimizer, k_state, frozen, shard_state)

    P, N, B = c.data.max_prompt_length, r.max_new_tokens, r.prompts_per_step
    constrain = sharding.activation_constraint(mesh, rules)
    experience_fn, rl_loss_fn = build_rl_functions(run_config, o, P, constrain, float(r.temperature),
                                                   group=group_size(algorithm, c.objective))
    pin = sharding.batch_constraint(mesh, rules)  # shuffled minibatches stay split over the batch axes

    def loss(params, frozen, minibatch):
        return rl_loss_fn(params, frozen, pin(minibatch))
    batch = experience_spec(B, P, N, stat_keys)
    resident = {}
    if c.reward_model is not None:  # scores rollouts between steps: live, but outside the step
        rm_config = c.reward_model.config.replace(head="score")  # stored quantized when its config says so
        rm_specs = models.quantized_specs(models.param_specs(rm_config), rm_config)
        resident["reward_model"] = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(x.dtype)),
                                                 rm_specs, is_leaf=models.transformer.is_spec),
                                    sharding.param_shardings(rm_specs, mesh, rules))
    critic_kind = (f"layers critic (a copy of the top {value_layers} layers + final norm + Linear)"
                   if value_head == "layers" else f"{value_head} critic")
    critic = f" + {critic_kind}" if algorithm.critic else " (critic-free)"
    accum = (f", each accumulated over train.grad_accum={c.train.grad_accum} micro-batches of "
             f"{r.minibatch_size // c.train.grad_accum}" if c.train.grad_accum > 1 else "")
    notes = (f"objective {o.name}: {B} rollouts of {P} prompt + {N} response tokens per step, {r.epochs} epochs of "
             f"minibatches of {r.minibatch_size} = {updates_per_step} optimiser updates per step{accum}",
             (f"trainable: {prog.layers_note(top, model_config.num_layers)}{critic}; reference: frozen copy of the "
              f"trainable layers" if lora is None else
              f"trainable: LoRA adapters (rank {lora.rank}, {', '.join(lora.targets)}) on "
              f"{prog.layers_note(top, model_config.num_layers)}{critic}; reference: the frozen base (no copy)"),
             "the rollout phase (generation with its KV cache, reward-model scoring, the experience pass) runs "
             "between steps: `plan --rollout` plans it")
    between = rollout_calls(c, run_config, state, shard_state, resident, experience_fn, constrain, mesh)
    return prog.StageSetup(state=state, state_shardings=shard_state, optimizer=optimizer, total_updates=total,
                           update=make_rl_step(loss, optimizer, r.epochs, r.minibatch_size, c.train.grad_accum, o),
                           loss=loss, batch=batch,
                           batch_shardings=sharding.batch_shardings(batch, mesh, rules), resident=resident,
                           notes=notes, between_steps=between)


def rollout_calls(c, model_config: ModelConfig, state, shard_state, resident: dict, experience_fn, constrain,
                  mesh) -> dict:
    """The compiled calls of one chunk's rollout phase (RolloutSource.next_batch), as program.PhaseCall: while they
    run, the train state and the reward model stay on the devices. In order: "generate" (one sampling.generate call
    of rollout.generation_batch global rows from the policy's (top, trunk) pair, no merged copy),
    "reward_model" (models.score of rollout.generation_batch rows at reward_model.max_length tokens, the longest
    RewardScorer pads to), "experience" (experience_forward of as many rows: policy, reference and critic) and
    "advantages" (experience_from_forward over the whole chunk)."""
    r, rules = c.rollout, c.mesh.rules
    B, P, N = r.prompts_per_step, c.data.max_prompt_length, r.max_new_tokens
    shape = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    S = jax.ShapeDtypeStruct

    def rows(**arrays):  # split over the mesh's batch axes, as BatchPlacement.put places a global batch
        spec = {k: S(shp, dt) for k, (shp, dt) in arrays.items()}
        shard = sharding.batch_shardings(spec, mesh, rules)
        return tuple(spec.values()), tuple(shard[k] for k in spec)

    G = -(-B // len(row_calls(B, r.generation_batch)))  # rows of the largest call
    prompts, prompts_sh = rows(prompt_tokens=((G, P), jnp.int32), prompt_mask=((G, P), jnp.int32))
    key = jax.eval_shape(lambda: jax.random.key(0))

    def generate(top, trunk, prompt_tokens, prompt_mask, key):
        return sampling.generate((top, trunk), model_config, prompt_tokens, prompt_mask, key, N, r.temperature,
                                 r.top_k, r.top_p, constrain=constrain)

    if adapters.is_lora(state.params):  # the adapters, the base's top and the trunk: policy_parts inside the call
        def generate_lora(lora, base, trunk, *inputs):
            return generate(*policy_parts({"lora": lora}, {"base": base, "trunk": trunk}), *inputs)
        fn = generate_lora
        trees = (state.params["lora"], state.frozen["base"], state.frozen["trunk"])
        tree_sh = (shard_state.params["lora"], shard_state.frozen["base"], shard_state.frozen["trunk"])
    else:
        fn = generate
        trees = (state.params["policy"], state.frozen["trunk"])
        tree_sh = (shard_state.params["policy"], shard_state.frozen["trunk"])
    calls = {"generate": prog.PhaseCall(
        fn, shape(trees), tree_sh, (*prompts, key), (*prompts_sh, sharding.replicated(mesh)),
        f"generate: {G} of the chunk's {B} prompts per call (rollout.generation_batch), {P} + {N} tokens")}
    if "reward_model" in resident:
        rm, rm_sh = resident["reward_model"]
        rm_config, T = c.reward_model.config.replace(head="score"), c.reward_model.max_length
        rm_inputs, rm_inputs_sh = rows(tokens=((G, T), jnp.int32), attention_mask=((G, T), jnp.int32))
        calls["reward_model"] = prog.PhaseCall(
            functools.partial(_rm_score, rm_config, constrain), (rm,), (rm_sh,), rm_inputs, rm_inputs_sh,
            f"reward_model: {G} of the chunk's {B} replies per call, up to {T} tokens (reward_model.max_length)")
    exp_inputs, exp_sh = rows(tokens=((G, P + N), jnp.int32), attention_mask=((G, P + N), jnp.int32))
    calls["experience"] = prog.PhaseCall(
        experience_fn.forward, shape((state.params, state.frozen)), (shard_state.params, shard_state.frozen),
        exp_inputs, exp_sh,
        f"experience: policy, reference and critic forward over {G} of the chunk's {B} rollouts per call, {P} + {N} "
        f"tokens")
    out, out_sh = rows(logprobs=((B, N), jnp.float32), ref_logprobs=((B, N), jnp.float32),
                       values=((B, N), jnp.float32))
    finish_inputs, finish_sh = rows(response_mask=((B, N), jnp.int32), scores=((B,), jnp.float32))
    calls["advantages"] = prog.PhaseCall(
        lambda lp, ref, v, mask, scores, kl: experience_fn.finish(
            {"logprobs": lp, "ref_logprobs": ref, "values": v}, mask, scores, kl),
        (), (), (*out, *finish_inputs, S((), jnp.float32)), (*out_sh, *finish_sh, sharding.replicated(mesh)),
        f"advantages: rewards and advantages over the chunk's {B} rollouts")
    return calls


def _rm_score(rm_config: ModelConfig, constrain, params: Params, tokens, attention_mask):
    """The reward model's scoring call as RewardScorer makes it for the rollouts (models.score)."""
    return models.score(params, rm_config, tokens, attention_mask, constrain)


class RLStage:
    """The program of an rl stage: the policy's hydra trees and the shared setup (rl_setup), a frozen reward model
    with its own tokenizer and template, the rollout source, and held-out evaluation by sampling. Its methods are the
    StageProgram the loop runs (program())."""

    def __init__(self, ctx: prog.StageContext):
        c = self.c = ctx.config
        o, r = c.objective, c.rollout
        self.stage_name = ctx.stage_name
        self.algorithm = algorithm = rl_algorithm(o.name)
        group = group_size(algorithm, o)
        if c.reward_model is None:
            raise ValueError(f"stage {ctx.stage_name!r}: objective {o.name!r} needs a reward_model section")
        k_policy, k_rm, k_critic, k_state = jax.random.split(jax.random.key(c.train.seed), 4)
        self.splits = splits = pipelines.load_splits(c.data)  # before the models: bad data fails fast
        self.main_split = "heldout" if c.data.reporting else "tuning"  # a selection run reports the tuning split
        if r.eval_prompts and not getattr(splits, self.main_split):  # never report training prompts as another split
            fix = ("data.heldout_fraction > 0 (or data.report_rows > 0 for synthetic data)" if c.data.reporting
                   else "data.tuning_fraction > 0")
            name = {"heldout": "held-out", "tuning": "tuning"}[self.main_split]
            raise ValueError(f"stage {ctx.stage_name!r}: no {name} rows to report on (data.source "
                             f"{c.data.source!r}); set {fix}")
        train_rows = splits.train
        # Layers that are only ever stored frozen are read quantized when their config says so (load_model): the
        # reward model's, and the policy's when it trains through adapters and no critic copies its top layers
        lora_only = c.model.lora is not None and not (algorithm.critic and o.value_head == "layers")
        self.model_config, params = config, params = prog.load_model(ctx, c.model, k_policy, frozen_layers=lora_only)
        rm_config, rm_params = prog.load_model(ctx, c.reward_model, k_rm, frozen_layers=True)
        if "score" not in rm_params:
            raise ValueError(f"stage {ctx.stage_name!r}: reward_model (path {c.reward_model.path!r}) has no 'score' "
                             f"head")
        rm_params = prog.quantize_frozen(ctx, rm_config, rm_params)
        # the reward model is fed in the template (and tokenizer) it was trained with, when its export says which
        rm_template, rm_tokenizer_name, note = trained_reward_template(ctx.experiment, c.reward_model)
        if note:
            log.info("[%s] %s", ctx.stage_name, note)
        self.tokenizer = load_tokenizer(c.model.tokenizer)
        rm_tokenizer = load_tokenizer(rm_tokenizer_name)
        self.mesh = mesh = ctx.mesh if ctx.mesh is not None else sharding.make_mesh(c.mesh)
        # Each process reads its rows of every global batch of prompts (sharding.BatchPlacement; the global batches
        # do not depend on the number of processes). Host-side rollout code works on global arrays only across
        # processes; one process keeps numpy batches (and any number of evaluation prompts).
        place = sharding.BatchPlacement(mesh, c.mesh.rules)
        self.spread = spread = place if jax.process_count() > 1 else None
        if r.prompts_per_step % place.parts:
            raise ValueError(f"stage {ctx.stage_name!r}: rollout.prompts_per_step={r.prompts_per_step} rollouts cannot "
                             f"be split over the {place.parts} batch shards of the mesh; use a multiple of "
                             f"{place.parts}")
        self.true_utility = splits.true_utility
        stat_keys = RolloutSource.STAT_KEYS + (("stat_true_reward",) if self.true_utility is not None else ())
        self.setup = rl_setup(c, config, params, mesh, k_state, stat_keys, critic_key=k_critic)
        del params
        self.update = self.setup.jit(mesh)
        # the config that runs the policy: with model.lora its adapters' scale (self.model_config, the exported
        # architecture, has none: the export folds them into the weights)
        self.run_config = config = adapters.configure(config, c.model.lora, c.model.trainable_top_layers)
        self.base = prog.base_pointer(ctx, c.model) if c.model.lora is not None else None

        conversations = [conversation_of(row, f"train row {i}") for i, row in enumerate(train_rows)]
        chunk_prompts = r.prompts_per_step // group  # each sampled `group` times
        # This process's rows of the chunk of rollouts. With groups (G rows per prompt, consecutive) every process reads
        # the chunk's prompts, repeats each G times and keeps its rows of that global chunk: a group may straddle
        # processes (its statistics are computed on the global arrays), and the chunk is the one-process chunk.
        rollout_rows = place.rows(r.prompts_per_step)
        sharding.describe_rows(ctx.stage_name, rollout_rows, r.prompts_per_step)
        prompts = iter(pipelines.dataset_for("rl", train_rows, self.tokenizer, c.data, chunk_prompts,
                                             template=c.model.template, seed=c.data.shuffle_seed,
                                             process_rows=rollout_rows if group == 1 else None))
        # Evaluation sets, each sampled with its own key: "heldout" (the reporting set: true_reward_before/after in
        # the summary), "unseen" (prompt templates no stage trained on; unseen_* in the summary) and "tuning" (what
        # the loop's periodic eval reports, so that choosing hyperparameters by it never looks at the reporting set).
        self.eval_sets, self.eval_sizes = {}, {}
        for i, (split, rows) in enumerate([("heldout", splits.heldout), ("unseen", splits.unseen),
                                           ("tuning", splits.tuning)]):
            rows = rows[:r.eval_prompts]
            if spread is not None:  # split evenly over the batch shards of the mesh
                rows = rows[:len(rows) // place.parts * place.parts]
            if not rows:
                continue
            batch = next(iter(pipelines.dataset_for("rl", rows, self.tokenizer, c.data, len(rows),
                                                    template=c.model.template, shuffle=False, num_epochs=1,
                                                    process_rows=spread.rows(len(rows)) if spread else None)))
            self.eval_sizes[split] = len(rows)
            convs = [conversation_of(row, f"{split} row {j}") for j, row in enumerate(rows)]
            self.eval_sets[split] = (batch, [convs[j] for j in np.asarray(batch["prompt_id"])],
                                     jax.random.fold_in(jax.random.key(c.train.seed + 1), i))
        if r.eval_prompts and self.main_split not in self.eval_sets and spread is not None:
            raise ValueError(f"stage {ctx.stage_name!r}: rollout.eval_prompts={r.eval_prompts} {self.main_split} "
                             f"prompts cannot "
                             f"be split over the {place.parts} batch shards of the mesh; use at least {place.parts}")

        constrain = sharding.activation_constraint(mesh, c.mesh.rules)
        experience_fn, _ = build_rl_functions(config, o, c.data.max_prompt_length, constrain, float(r.temperature),
                                              group=group)
        self.scorer = RewardScorer(rm_config, rm_params, rm_tokenizer, rm_template, c.reward_model.max_length,
                                   place=spread)
        self.batches = RolloutSource(prompts=prompts, conversations=conversations, config=config,
                                     tokenizer=self.tokenizer, template=c.model.template, scorer=self.scorer,
                                     experience_fn=experience_fn, objective=o, rollout=r, seed=c.train.seed,
                                     true_utility=self.true_utility, constrain=constrain, place=spread,
                                     group=group, group_rows=rollout_rows if group > 1 else None)
        self.last_eval = prog.LastEvaluation()  # evaluate()'s report of its split, for finish to reuse

    def step(self, state, batch):
        return self.update(state, sharding.put_batch(batch, self.setup.batch_shardings))

    def report(self, state, which: str, split: str = "heldout") -> dict:
        """Sampled replies of the policy (or the reference) to an eval split: RM score, KL, length, true reward."""
        parts = policy_parts(state.params, state.frozen) if which == "policy" else reference_parts(state.frozen)
        prompts, conversations, key = self.eval_sets[split]
        return _policy_eval(state.params, state.frozen, parts, self.run_config, prompts, conversations,
                            self.tokenizer, self.c.model.template, self.scorer, self.c.rollout, key, self.true_utility,
                            self.spread)

    def evaluate(self, state) -> Optional[dict]:
        split = "tuning" if "tuning" in self.eval_sets else "heldout"
        if split not in self.eval_sets:  # rollout.eval_prompts = 0: the stage measures nothing itself
            return None
        report = self.last_eval.keep(state, split, self.report(state, "policy", split))
        return {k: v for k, v in report.items() if k not in ("samples", "per_prompt")}

    def finish(self, state, workdir: str) -> dict:
        c, o = self.c, self.c.objective
        main = self.main_split
        summary = {"objective": o.name, "steps": int(c.train.steps), "eval_split": main,
                   "eval_prompts": self.eval_sizes.get(main, 0), "data": self.splits.report.summary()}
        if main in self.eval_sets:
            summary.update(self._before_after(state, main))
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        records = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
        png = os.path.join(workdir, "curves.png")
        if jax.process_index() == 0:  # one writer of the shared WORKDIR
            png = plot_metrics(records, png, CURVES, "RL step (rollout chunk)", f"{self.stage_name}: {o.name.upper()}")
        if png:
            summary["curves_png"] = png
        return summary

    def _before_after(self, state, main: str) -> dict:
        """The reference's and the final policy's replies to the evaluation split (and the unseen one) compared."""
        before = self.report(state, "reference", main)
        # the loop's final evaluate() sampled the policy on this split with this very state when it is the evaluation
        # split (a selection run's tuning split, or the held-out one with no tuning split): the same replies, reused
        after = self.last_eval.of(state, main) or self.report(state, "policy", main)
        summary = {"rm_score_before": before["rm_score"], "rm_score_after": after["rm_score"],
                   "kl_to_reference": after["kl_to_reference"],
                   "response_length_before": before["response_length"],
                   "response_length_after": after["response_length"],
                   "samples_before": before["samples"], "samples_after": after["samples"]}
        if "true_reward" in after:
            summary["true_reward_before"], summary["true_reward_after"] = before["true_reward"], after["true_reward"]
            # prompt by prompt (the eval split's rows in order), for paired intervals over prompts and seeds
            summary["true_rewards_before"] = before["per_prompt"]["true_rewards"]
            summary["true_rewards_after"] = after["per_prompt"]["true_rewards"]
        summary["rm_win_rate_vs_initial"] = judged_win_rate(after, before)
        if "unseen" in self.eval_sets:
            u_before, u_after = self.report(state, "reference", "unseen"), self.report(state, "policy", "unseen")
            summary.update({"unseen_prompts": self.eval_sizes["unseen"],
                            "unseen_rm_score_before": u_before["rm_score"], "unseen_rm_score_after": u_after["rm_score"],
                            "unseen_kl_to_reference": u_after["kl_to_reference"],
                            "unseen_rm_win_rate_vs_initial": judged_win_rate(u_after, u_before)})
            if "true_reward" in u_after:
                summary["unseen_true_reward_before"] = u_before["true_reward"]
                summary["unseen_true_reward_after"] = u_after["true_reward"]
        return summary

    def export(self, state) -> Params:
        if adapters.is_lora(state.params):  # the adapters folded into the base's weights
            return jax.jit(adapters.merged, static_argnums=2)(state.params, state.frozen, self.run_config)
        return policy_params(state.params, state.frozen)

    @staticmethod
    def tokens_per_batch(batch) -> int:
        return int(np.count_nonzero(batch["attention_mask"]))

    def program(self) -> prog.StageProgram:
        lora = self.c.model.lora
        return prog.StageProgram(state=self.setup.state, step=self.step, batches=self.batches, export=self.export,
                                 model_config=self.model_config, evaluate=self.evaluate, finish=self.finish,
                                 tokens_per_batch=self.tokens_per_batch, setup=self.setup, base=self.base,
                                 adapters=None if lora is None else prog.adapter_export(self.c, self.model_config,
                                                                                         self.base))



def check_rl(c, algorithm: registry.Algorithm, earlier: dict) -> list[tuple[str, str]]:
    """The rl kind's checks of a stage config (validation runs them): a reward model, whole rollout groups and
    minibatches, on-policy sampling, and a critic only where the algorithm trains one."""
    problems: list[tuple[str, str]] = []

    def bad(field, msg):
        problems.append((field, msg))

    obj = c.objective.name
    base = CriticOptions if algorithm.critic else RLOptions  # what this kind and the critic read
    if not isinstance(c.objective, base):
        bad("objective", f"objective {obj!r}: the rl kind reads options deriving from algorithms.{base.__name__}; "
            f"register {algorithm.name!r} with such options")
        return problems
    if c.reward_model is None:
        bad("reward_model", f"objective {obj!r} needs a reward_model section")
    r = c.rollout
    for field, value in (("rollout.prompts_per_step", r.prompts_per_step), ("rollout.max_new_tokens",
                         r.max_new_tokens), ("rollout.epochs", r.epochs), ("rollout.minibatch_size",
                         r.minibatch_size)):
        if value < 1:
            bad(field, f"must be >= 1, got {value}")
    group = 1 if algorithm.group_size is None else algorithm.group_size(c.objective)
    for field, msg in (algorithm.check(c) if algorithm.check else ()):
        bad(field, msg)
    if group < 1 or r.prompts_per_step % group:
        bad("rollout.prompts_per_step", f"{r.prompts_per_step} rollouts are not whole groups of {group} per "
            f"prompt (objective {obj!r})")
    if r.generation_batch < 0 or (r.generation_batch and r.prompts_per_step % r.generation_batch):
        bad("rollout.generation_batch", f"{r.generation_batch} must be 0 (the whole chunk) or a divisor of "
            f"rollout.prompts_per_step={r.prompts_per_step}")
    if r.minibatch_size >= 1 and r.prompts_per_step % r.minibatch_size:
        bad("rollout.prompts_per_step", f"{r.prompts_per_step} is not divisible by rollout.minibatch_size="
            f"{r.minibatch_size}")
    if r.temperature <= 0:
        bad("rollout.temperature", f"must be > 0, got {r.temperature}")
    if not 0 < r.top_p <= 1:
        bad("rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    # The update scores rollouts under the temperature-scaled distribution (step/hydra.py); a top-k / top-p
    # filtered sampler would make log pi_old, the KL penalty and the ratios those of another distribution.
    if r.top_k > 0:
        bad("rollout.top_k", f"{r.top_k}: RL rollouts must be on-policy; top-k filtering is not supported in RL "
            "stages (use rollout.top_k=0; rollout.temperature is supported)")
    elif 0 < r.top_p < 1:
        bad("rollout.top_p", f"{r.top_p}: RL rollouts must be on-policy; top-p filtering is not supported in RL "
            "stages (use rollout.top_p=1.0; rollout.temperature is supported)")
    return problems


@prog.register_stage_kind("rl", setup=rl_setup, check=check_rl, reads=("model", "reward_model"))
def build_rl_stage(ctx: prog.StageContext) -> prog.StageProgram:
    """StageProgram of an rl stage (see starling_jax.stages.program)."""
    return RLStage(ctx).program()
