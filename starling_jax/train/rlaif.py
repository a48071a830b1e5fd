"""The "rl" stage kind: APA or PPO against a frozen reward model, with a KL penalty to the initial policy.

One RL step (one call of the loop's step) is one chunk of rollouts and its optimisation epochs:

  host (RolloutSource.next_batch, starling_jax.train.rollout):
    prompts -> sampling.generate with the current policy -> decode to text -> re-render the conversation in the
    reward model's template -> tokenize with the reward model's OWN tokenizer -> models.score with the frozen RM ->
    scale by a running std and clip -> make_experience (jitted: policy/reference log-probs and critic values in one
    hydra pass, per-token reward -kl_coef * (logp_old - logp_ref) with the score at the last response token, GAE)
  device (make_rl_step, jitted):
    `epochs` passes over the chunk in shuffled minibatches of apa_loss or ppo_policy_loss + vf_coef * value_loss.

Trees: see starling_jax.train.hydra (trainable = {"policy", "critic"}, frozen = {"trunk", "reference"}).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from starling_jax import models
from starling_jax.config import ObjectiveConfig
from starling_jax.models import ModelConfig
from starling_jax.objectives import common as obj_common
from starling_jax.objectives import group as obj_group
from starling_jax.objectives import policy as obj_policy
from starling_jax.train.hydra import hydra_forward
from starling_jax.models import Params

Batch = dict[str, Any]

# Keys of an RL training batch the update reads ([B, ...]); the rest ("stat_*", [B] each) are per-rollout statistics
# that the step only averages into its metrics.
TRAIN_KEYS = ("tokens", "attention_mask", "response_mask", "old_logprobs", "old_values", "advantages", "returns",
              "ref_logprobs")  # ref_logprobs: read by GRPO/RLOO's per-token KL term only (optional for APA/PPO)
RL_OBJECTIVES = ("apa", "ppo", "grpo", "rloo")
GROUP_OBJECTIVES = obj_group.ADVANTAGES  # critic-free, G samples per prompt: "grpo", "rloo"


def group_size(objective: ObjectiveConfig) -> int:
    """Replies sampled per prompt: objective.group_size for GRPO/RLOO, 1 otherwise."""
    return objective.group_size if objective.name in GROUP_OBJECTIVES else 1


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


def make_experience(trainable: Params, frozen: Params, tokens: jax.Array, attention_mask: jax.Array,
                    response_mask: jax.Array, scores: jax.Array, kl_coef, *, config: ModelConfig,
                    objective: ObjectiveConfig, prompt_len: int, constrain=None, temperature: float = 1.0) -> dict:
    """Everything the update needs from one chunk of rollouts (jit with config/objective/prompt_len static).

    tokens, attention_mask [B, P + N] (prompt left padded, response right padded); response_mask [B, N];
    scores [B] the scaled and clipped RM scores. Returns old_logprobs, ref_logprobs, old_values, rewards, advantages,
    returns [B, N] and kl [B] (sum over each row's response tokens of logp_old - logp_ref).
    """
    out = jax.lax.stop_gradient(hydra_forward(trainable, frozen, config, tokens, attention_mask, prompt_len,
                                              constrain=constrain, temperature=temperature))
    mask = response_mask
    if objective.name in GROUP_OBJECTIVES:  # critic-free: group-relative advantages of whole replies
        kl_in, estimator = obj_group.kl_settings(objective.name, objective.kl_in, objective.kl_estimator)
        g = obj_group.group_experience(scores, out["logprobs"], out["ref_logprobs"], mask, objective.group_size,
                                       objective.name, kl_coef, kl_in, estimator)
        zeros = jnp.zeros_like(out["logprobs"])
        _, kl = shaped_rewards(scores, out["logprobs"], out["ref_logprobs"], mask, kl_coef)  # k1, as for APA/PPO
        return {"old_logprobs": out["logprobs"], "ref_logprobs": out["ref_logprobs"], "old_values": zeros,
                "rewards": zeros.at[:, 0].set(g["rewards"]), "advantages": g["advantages"], "returns": zeros,
                "kl": kl}
    rewards, kl = shaped_rewards(scores, out["logprobs"], out["ref_logprobs"], mask, kl_coef)
    values = jnp.where(mask > 0, out["values"], 0.0)
    advantages, returns = obj_policy.gae(rewards, values, mask, objective.gamma, objective.gae_lambda)
    if objective.whiten_advantages:
        advantages = obj_common.masked_whiten(advantages, mask)
    return {"old_logprobs": out["logprobs"], "ref_logprobs": out["ref_logprobs"], "old_values": values,
            "rewards": rewards, "advantages": advantages, "returns": returns, "kl": kl}


def rl_loss(trainable: Params, frozen: Params, batch: Batch, *, config: ModelConfig, objective: ObjectiveConfig,
            prompt_len: int, constrain=None, temperature: float = 1.0) -> tuple[jax.Array, dict]:
    """APA or PPO policy loss + vf_coef * value loss on a (mini)batch of experience -> (loss, metrics).

    With objective.critic_only_above = c (the Starling fork's rule), a minibatch whose value loss exceeds c trains
    only the critic: the policy term is dropped and the value loss reaches the critic head only, not the policy's
    layers beneath it.
    """
    out = hydra_forward(trainable, frozen, config, batch["tokens"], batch["attention_mask"], prompt_len,
                        with_reference=False, constrain=constrain, temperature=temperature)
    mask = batch["response_mask"]
    old, adv = batch["old_logprobs"], batch["advantages"]
    if objective.name in GROUP_OBJECTIVES:  # no critic: the policy term only
        kl_in, estimator = obj_group.kl_settings(objective.name, objective.kl_in, objective.kl_estimator)
        w = obj_common.as_weights(mask)
        per_reply = obj_common.safe_div(jnp.sum(adv * w, axis=1), jnp.sum(w, axis=1))  # constant over a reply
        loss, metrics = obj_group.group_policy_loss(
            out["logprobs"], old, batch["ref_logprobs"], per_reply, mask, objective.ppo_clip,
            objective.kl_coef if kl_in == "loss" else 0.0, estimator, objective.loss_aggregation)
        zero = jnp.zeros((), jnp.float32)
        return loss, {**metrics, "policy_loss": loss, "value_loss": zero, "critic_only": zero}
    if objective.name == "apa":
        policy_loss, metrics = obj_policy.apa_loss(out["logprobs"], old, adv, mask, objective.apa_lambda)
    elif objective.name == "ppo":
        policy_loss, metrics = obj_policy.ppo_policy_loss(out["logprobs"], old, adv, mask, objective.ppo_clip)
    else:
        raise ValueError(f"rl_loss: objective.name must be one of {RL_OBJECTIVES}, got {objective.name!r}")
    v_loss, v_metrics = obj_policy.value_loss(out["values"], batch["old_values"], batch["returns"], mask,
                                              objective.value_clip)
    loss = policy_loss + objective.vf_coef * v_loss
    critic_only = jnp.zeros((), jnp.bool_)
    if objective.critic_only_above is not None:
        critic_only = jax.lax.stop_gradient(v_loss) > objective.critic_only_above
        detached = models.value_head(trainable["critic"], jax.lax.stop_gradient(out["hidden"]))
        v_loss_critic, _ = obj_policy.value_loss(detached, batch["old_values"], batch["returns"], mask,
                                                 objective.value_clip)
        loss = jnp.where(critic_only, objective.vf_coef * v_loss_critic, loss)
    metrics = {**metrics, **v_metrics, "policy_loss": policy_loss, "value_loss": v_loss,
               "critic_only": critic_only.astype(jnp.float32)}
    return loss, metrics


def make_rl_step(loss_fn: Callable[[Params, Params, Batch], tuple[jax.Array, dict]],
                 optimizer: optax.GradientTransformation, epochs: int, minibatch_size: int):
    """step(state, batch) -> (state, metrics): `epochs` shuffled passes over the chunk in minibatches, one optimizer
    update each (a lax.scan, so it jits to one program). state is a TrainState(step, params, frozen, opt_state, rng);
    its step counts chunks. Metrics are means over the updates, plus the means of the batch's "stat_*" rows."""

    def step(state, batch: Batch):
        data = {k: batch[k] for k in TRAIN_KEYS if k in batch}
        B = data["tokens"].shape[0]
        if B % minibatch_size:
            raise ValueError(f"rl step: the chunk of {B} rollouts is not divisible by minibatch_size={minibatch_size}")
        rng, key = jax.random.split(state.rng)
        perms = jax.vmap(lambda k: jax.random.permutation(k, B))(jax.random.split(key, epochs))
        order = perms.reshape(epochs * (B // minibatch_size), minibatch_size)

        def update(carry, idx):
            params, opt_state = carry
            mb = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state.frozen, mb)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}

        (params, opt_state), history = jax.lax.scan(update, (state.params, state.opt_state), order)
        metrics = {k: jnp.mean(v) for k, v in history.items()}
        metrics.update({k[len("stat_"):]: jnp.mean(v.astype(jnp.float32)) for k, v in batch.items()
                        if k.startswith("stat_")})
        state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return state, metrics

    return step


def build_rl_functions(config: ModelConfig, objective: ObjectiveConfig, prompt_len: int, constrain=None,
                       temperature: float = 1.0):
    """(experience_fn, loss_fn) with the static arguments bound; experience_fn is jitted. constrain: optional
    activation sharding constraint (sharding.activation_constraint(mesh, rules)) applied at layer boundaries.
    temperature: rollout.temperature (log-probs of the distribution the rollouts were sampled from)."""
    if objective.name not in RL_OBJECTIVES:
        raise ValueError(f"the rl stage needs objective.name in {RL_OBJECTIVES}, got {objective.name!r}")
    experience = jax.jit(functools.partial(make_experience, config=config, objective=objective,
                                           prompt_len=prompt_len, constrain=constrain, temperature=temperature))
    loss = functools.partial(rl_loss, config=config, objective=objective, prompt_len=prompt_len, constrain=constrain,
                             temperature=temperature)
    return experience, loss


# ----------------------------------------------------------------------------------------------------------------------
# The "rl" stage kind for the loop.


def _policy_eval(trainable: Params, frozen: Params, full_params: Params, config: ModelConfig, prompts: dict,
                 conversations: list, tokenizer, template: str, scorer, rollout, key: jax.Array,
                 true_utility=None, place=None) -> dict:
    """Sample replies to held-out prompts with `full_params`; their mean RM score, true utility (synthetic data),
    length and KL to the reference (mean over rows of sum_t log pi(a_t) - log pi_ref(a_t), under the current policy
    trees `trainable`/`frozen`, so it is the KL of whichever model sampled only when that model is the policy).
    With a `place` the prompts are this process's rows of the global set of held-out prompts; the means and the
    per-prompt lists cover all of them, the samples are the first rows of this process (process 0: the set's first)."""
    import zlib

    from starling_jax.train.rollout import sample_replies  # rollout imports this module's siblings only
    s = sample_replies(full_params, config, tokenizer, template, conversations, prompts["prompt_tokens"],
                       prompts["prompt_mask"], key, rollout.max_new_tokens, rollout.temperature, rollout.top_k,
                       rollout.top_p, place=place)
    P = s.prompt_tokens.shape[1]
    tokens = np.concatenate([s.prompt_tokens, s.tokens], axis=1)
    attn = np.concatenate([s.prompt_mask, s.mask], axis=1)
    if place is not None:
        out = _eval_forward(trainable, frozen, config, *place.put(tokens, attn), P, float(rollout.temperature))
        out = {k: place.local(v) for k, v in out.items()}
    else:
        out = _eval_forward(trainable, frozen, config, tokens, attn, P, float(rollout.temperature))
    kl = np.sum((np.asarray(out["logprobs"]) - np.asarray(out["ref_logprobs"])) * s.mask, axis=1)
    whole = (lambda local: place.whole(np.asarray(local))) if place is not None else np.asarray  # every prompt's
    scores = whole(np.asarray(scorer(conversations, s.texts), np.float32))
    text_ids = [zlib.crc32(t.encode()) & 0x7FFFFFFF for t in s.texts]  # equal replies <-> equal ids (gatherable)
    report = {"rm_score": float(np.mean(scores)), "kl_to_reference": float(np.mean(whole(kl.astype(np.float32)))),
              "response_length": float(np.mean(whole(s.mask.sum(axis=1).astype(np.float32)))),
              "per_prompt": {"rm_scores": scores.tolist(),
                             "lengths": whole(np.asarray([len(t) for t in s.texts], np.int32)).tolist(),
                             "text_ids": whole(np.asarray(text_ids, np.int32)).tolist()}}
    if true_utility is not None:
        report["true_reward"] = float(np.mean(whole(np.asarray(
            [true_utility(c, t) for c, t in zip(conversations, s.texts)], np.float32))))
    report["samples"] = [{"prompt": c[-1]["content"], "reply": t} for c, t in list(zip(conversations, s.texts))[:4]]
    return report


def judged_win_rate(after: dict, before: dict) -> dict:
    """The reward model's verdict on the same prompts, final policy vs the policy the stage started from (the SFT
    policy): win rate with its 95% bootstrap interval, ties, losses, mean score gap, length-controlled win rate
    (eval.stats.head_to_head; replies of equal text tie)."""
    from starling_jax.eval import stats
    a, b = after["per_prompt"], before["per_prompt"]
    result = stats.head_to_head(a["rm_scores"], b["rm_scores"], a["lengths"], b["lengths"],
                                identical=[x == y for x, y in zip(a["text_ids"], b["text_ids"])])
    return {k: result[k] for k in ("win_rate", "win_rate_ci95", "wins", "ties", "losses", "n", "mean_score_gap",
                                   "length_controlled_win_rate")}


@functools.partial(jax.jit, static_argnums=(2, 5, 6))
def _eval_forward(trainable, frozen, config, tokens, attention_mask, prompt_len, temperature=1.0):
    out = hydra_forward(trainable, frozen, config, tokens, attention_mask, prompt_len, temperature=temperature)
    return {"logprobs": out["logprobs"], "ref_logprobs": out["ref_logprobs"]}


def plot_curves(records: list[dict], path: str, title: str = "") -> Optional[str]:
    """A PNG of the RL curves (reward, true reward, KL, losses) from metrics.jsonl records; None if there are none."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if "loss" in r]
    if not records:
        return None
    panels = [("reward", ["reward", "true_reward"]), ("KL to reference (per sequence)", ["kl"]),
              ("loss", ["loss", "policy_loss", "value_loss"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    steps = [r["step"] for r in records]
    for ax, (name, keys) in zip(axes, panels):
        for k in keys:
            if k in records[0]:
                ax.plot(steps, [r.get(k, np.nan) for r in records], label=k, marker=".")
        ax.set_title(name)
        ax.set_xlabel("RL step (rollout chunk)")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_rl_stage(ctx):
    """StageProgram of an "apa"/"ppo" stage (see starling_jax.train.program)."""
    import os
    import sys

    from starling_jax.data import load_tokenizer
    from starling_jax.data import pipelines
    from starling_jax.train import program as prog
    from starling_jax.train.hydra import init_rl_params, policy_params, reference_params
    from starling_jax.train.rollout import RewardScorer, RolloutSource, conversation_of, trained_reward_template
    from starling_jax import sharding
    from starling_jax.train.state import abstract_state, create_state, make_optimizer, state_shardings
    from starling_jax.train.step import jit_step

    c = ctx.config
    o, r = c.objective, c.rollout
    if c.reward_model is None:
        raise ValueError(f"stage {ctx.stage_name!r}: objective {o.name!r} needs a reward_model section")
    k_policy, k_rm, k_critic, k_state = jax.random.split(jax.random.key(c.train.seed), 4)
    splits = pipelines.load_splits(c.data)  # before the models: bad data fails fast
    train_rows, data_report = splits.train, splits.report
    config, params = prog.load_model(ctx, c.model, k_policy)
    rm_config, rm_params = prog.load_model(ctx, c.reward_model, k_rm)
    if "score" not in rm_params:
        raise ValueError(f"stage {ctx.stage_name!r}: reward_model (path {c.reward_model.path!r}) has no 'score' head")
    # the reward model is fed in the template (and tokenizer) it was trained with, when its export says which
    rm_template, rm_tokenizer_name, note = trained_reward_template(ctx.experiment, c.reward_model)
    if note:
        print(f"[{ctx.stage_name}] {note}", file=sys.stderr, flush=True)
    tokenizer, rm_tokenizer = load_tokenizer(c.model.tokenizer), load_tokenizer(rm_tokenizer_name)
    trainable, frozen = init_rl_params(params, config, k_critic, c.model.trainable_top_layers, c.model.train_lm_head,
                                       o.value_head)
    del params

    # Placement on the mesh: the hydra trees shard like the model's params, the batch over its leading axis; the step
    # keeps the state's layout and donates it. Each process reads its rows of every global batch of prompts
    # (sharding.BatchPlacement; the global batches do not depend on the number of processes).
    mesh, rules = ctx.mesh if ctx.mesh is not None else sharding.make_mesh(c.mesh), c.mesh.rules
    place = sharding.BatchPlacement(mesh, rules)
    # Host-side rollout code works on global arrays only across processes; one process keeps numpy batches (and any
    # number of evaluation prompts).
    spread = place if jax.process_count() > 1 else None
    conversations = [conversation_of(row, f"train row {i}") for i, row in enumerate(train_rows)]
    G = group_size(o)  # GRPO/RLOO: a chunk is prompts_per_step / G prompts, each sampled G times in a row
    if G > 1 and jax.process_count() > 1:
        raise ValueError(f"stage {ctx.stage_name!r}: {o.name} runs on one process for now (a group of {G} replies "
                         f"must not be split across processes)")
    sharding.describe_rows(ctx.stage_name, place.rows(r.prompts_per_step // G), r.prompts_per_step // G)
    prompts = iter(pipelines.dataset_for("rl", train_rows, tokenizer, c.data, r.prompts_per_step // G,
                                         template=c.model.template, seed=c.data.shuffle_seed,
                                         process_rows=place.rows(r.prompts_per_step // G)))
    # Evaluation sets, each sampled with its own key: "heldout" (the reporting set: true_reward_before/after in the
    # summary), "unseen" (prompt templates no stage trained on; unseen_* in the summary) and "tuning" (what the
    # loop's periodic eval reports, so that choosing hyperparameters by it never looks at the reporting set).
    eval_sets, eval_sizes = {}, {}
    for i, (split, rows) in enumerate([("heldout", splits.heldout or train_rows), ("unseen", splits.unseen),
                                       ("tuning", splits.tuning)]):
        rows = rows[:r.eval_prompts]
        if spread is not None:  # split evenly over the batch shards of the mesh
            rows = rows[:len(rows) // place.parts * place.parts]
        if not rows:
            continue
        batch = next(iter(pipelines.dataset_for("rl", rows, tokenizer, c.data, len(rows), template=c.model.template,
                                                shuffle=False, num_epochs=1,
                                                process_rows=spread.rows(len(rows)) if spread else None)))
        eval_sizes[split] = len(rows)
        convs = [conversation_of(row, f"{split} row {j}") for j, row in enumerate(rows)]
        eval_sets[split] = (batch, [convs[j] for j in np.asarray(batch["prompt_id"])],
                            jax.random.fold_in(jax.random.key(c.train.seed + 1), i))
    if "heldout" not in eval_sets and spread is not None:
        raise ValueError(f"stage {ctx.stage_name!r}: rollout.eval_prompts={r.eval_prompts} held-out prompts cannot be "
                         f"split over the {place.parts} batch shards of the mesh; use at least {place.parts}")
    model_specs = models.param_specs(config)
    shard_t = sharding.param_shardings(sharding.respec(trainable, {
        "policy": model_specs, "critic": models.value_head_specs(config, o.value_head)}), mesh, rules)
    shard_f = sharding.param_shardings(sharding.respec(frozen, {"trunk": model_specs, "reference": model_specs}),
                                       mesh, rules)
    trainable, frozen = jax.device_put(trainable, shard_t), jax.device_put(frozen, shard_f)
    constrain = sharding.activation_constraint(mesh, rules)
    experience_fn, rl_loss_fn = build_rl_functions(config, o, c.data.max_prompt_length, constrain,
                                                   float(r.temperature))
    pin = sharding.batch_constraint(mesh, rules)  # shuffled minibatches stay split over the batch axes

    def loss_fn(params, frozen, minibatch):
        return rl_loss_fn(params, frozen, pin(minibatch))

    updates_per_step = r.epochs * (r.prompts_per_step // r.minibatch_size)
    optimizer = make_optimizer(c.optim, c.train.steps * updates_per_step, trainable)
    shard_state = state_shardings(optimizer, abstract_state(trainable, optimizer, frozen), shard_t, shard_f, mesh)
    state = create_state(trainable, optimizer, k_state, frozen, shard_state)
    update = make_rl_step(loss_fn, optimizer, r.epochs, r.minibatch_size)
    jitted: dict = {}  # batch keys -> jitted step (the "stat_*" rows depend on the data source)

    def step(state, batch):
        keys = tuple(sorted(batch))
        if keys not in jitted:
            shard_batch = place.shardings(batch)
            jitted[keys] = (jit_step(update, mesh, shard_state, shard_batch), shard_batch)
        fn, shard_batch = jitted[keys]
        return fn(state, sharding.put_batch(batch, shard_batch))

    scorer = RewardScorer(rm_config, rm_params, rm_tokenizer, rm_template, c.reward_model.max_length,
                          place=spread)
    true_utility = None
    if c.data.source == "synthetic":
        from starling_jax.data.synthetic import true_utility
    batches = RolloutSource(prompts=prompts, conversations=conversations, config=config, tokenizer=tokenizer,
                            template=c.model.template, scorer=scorer, experience_fn=experience_fn, objective=o,
                            rollout=r, seed=c.train.seed, true_utility=true_utility, constrain=constrain,
                            place=spread, group=G)
    def report(state, which: str, split: str = "heldout") -> dict:
        full = policy_params(state.params, state.frozen) if which == "policy" else reference_params(state.frozen)
        prompts_, conversations_, key = eval_sets[split]
        return _policy_eval(state.params, state.frozen, full, config, prompts_, conversations_, tokenizer,
                            c.model.template, scorer, r, key, true_utility, spread)

    def evaluate(state) -> dict:
        split = "tuning" if "tuning" in eval_sets else "heldout"
        return {k: v for k, v in report(state, "policy", split).items() if k not in ("samples", "per_prompt")}

    def finish(state, workdir: str) -> dict:
        before, after = report(state, "reference"), report(state, "policy")
        summary = {"objective": o.name, "steps": int(c.train.steps), "eval_prompts": eval_sizes.get("heldout", 0),
                   "rm_score_before": before["rm_score"], "rm_score_after": after["rm_score"],
                   "kl_to_reference": after["kl_to_reference"],
                   "response_length_before": before["response_length"],
                   "response_length_after": after["response_length"],
                   "samples_before": before["samples"], "samples_after": after["samples"],
                   "data": data_report.summary()}
        if "true_reward" in after:
            summary["true_reward_before"], summary["true_reward_after"] = before["true_reward"], after["true_reward"]
        summary["rm_win_rate_vs_initial"] = judged_win_rate(after, before)
        if "unseen" in eval_sets:
            u_before, u_after = report(state, "reference", "unseen"), report(state, "policy", "unseen")
            summary.update({"unseen_prompts": eval_sizes["unseen"],
                            "unseen_rm_score_before": u_before["rm_score"], "unseen_rm_score_after": u_after["rm_score"],
                            "unseen_kl_to_reference": u_after["kl_to_reference"],
                            "unseen_rm_win_rate_vs_initial": judged_win_rate(u_after, u_before)})
            if "true_reward" in u_after:
                summary["unseen_true_reward_before"] = u_before["true_reward"]
                summary["unseen_true_reward_after"] = u_after["true_reward"]
        from starling_jax.train.logging import read_metrics
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        records = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
        png = os.path.join(workdir, "curves.png")
        if jax.process_index() == 0:  # one writer of the shared WORKDIR
            png = plot_curves(records, png, f"{ctx.stage_name}: {o.name.upper()}")
        if png:
            summary["curves_png"] = png
        return summary

    def tokens_per_batch(batch) -> int:
        return int(np.count_nonzero(batch["attention_mask"]))

    return prog.StageProgram(
        state=state, step=step, batches=batches, export=lambda s: policy_params(s.params, s.frozen),
        model_config=config, evaluate=evaluate, finish=finish, tokens_per_batch=tokens_per_batch)


def _register() -> None:
    from starling_jax.train.program import register_stage_kind
    register_stage_kind("rl")(build_rl_stage)


_register()
