"""Host side of RL: prompts, sampling, cross-tokenizer reward scoring, and the rollout stream the loop pulls from.

The policy and the reward model may use different tokenizers and chat templates (Starling-alpha: OpenChat-3.5 policy,
Llama-2-chat reward model). A rollout is therefore decoded to text with the POLICY tokenizer, the conversation plus
that reply is re-rendered in the reward model's template and encoded with the reward model's OWN tokenizer, and only
then scored.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from starling_jax import models
from starling_jax.data.nectar import parse_prompt
from starling_jax.data.templates import TEMPLATES, jinja_template
from starling_jax.generation.replies import generate_replies, row_calls
from starling_jax.models import ModelConfig, Params
from starling_jax.objectives import kl as obj_kl
from starling_jax.step.hydra import policy_parts

Conversation = list  # [{"role": "user" | "assistant", "content": str}, ...] ending with a user turn


def conversation_of(row: dict, where: str = "row") -> Conversation:
    """The conversation (messages ending with the user turn to answer) of a data row: its "messages" if present,
    else its Nectar "prompt" string parsed."""
    if "messages" in row:
        return list(row["messages"])
    if "prompt" not in row:
        raise ValueError(f"{where}: an RL prompt row needs 'messages' or a Nectar 'prompt' field, got {sorted(row)}")
    try:
        return parse_prompt(row["prompt"])
    except Exception as e:  # nectar's own error type carries the detail
        raise ValueError(f"{where}: bad 'prompt': {e}") from None


def trained_reward_template(experiment, section) -> tuple[str, str, Optional[str]]:
    """(template, tokenizer, note) the reward model of `section` (a RewardModelSection) must be fed with: the ones
    it was trained with when its export says so, else the section's own.

    "stage:NAME": the rm stage NAME's model.template and model.tokenizer (so chaining our own RM into an RL stage
    renders replies as that RM saw its training data). A Hugging Face directory whose tokenizer_config.json carries a
    chat_template equal to one of ours (`convert` writes data.templates.jinja_template of the stage's template): that
    template. note: one line saying what overrode the section's setting, or None."""
    template, tokenizer, path = section.template, section.tokenizer, section.path or ""
    origin = None
    if path.startswith("stage:"):
        stage = next((st for st in experiment.stages if st.name == path[len("stage:"):]), None)
        if stage is not None:  # that stage's model section, or the experiment's when the stage leaves it unset
            model = stage.model or experiment.model
            template, tokenizer, origin = model.template, model.tokenizer, f"stage {path[6:]!r}"
    elif os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        import json

        try:
            with open(os.path.join(path, "tokenizer_config.json")) as f:
                jinja = json.load(f).get("chat_template")
        except (OSError, ValueError):
            jinja = None
        named = [name for name in TEMPLATES if isinstance(jinja, str) and jinja == jinja_template(name)]
        if named:
            template, origin = named[0], f"{path}/tokenizer_config.json"
    changed = [f"{what} {new!r} (the config says {old!r})" for what, new, old in
               (("template", template, section.template), ("tokenizer", tokenizer, section.tokenizer)) if new != old]
    note = f"reward_model: using the {' and the '.join(changed)} it was trained with ({origin})" if changed else None
    return template, tokenizer, note


def right_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id lists to [B, length] (tokens, mask); longer rows keep their last `length` ids."""
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, ids in enumerate(rows):
        ids = list(ids)[-length:]
        tokens[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
    return tokens, mask


_score = jax.jit(models.score, static_argnames=("config", "constrain"))


@dataclasses.dataclass
class RewardScorer:
    """A frozen reward model with its own tokenizer and chat template: scores (conversation, reply text) pairs.

    Inputs are right padded to a multiple of `pad_multiple` tokens (fewer compiled shapes) and left truncated to
    max_length (keeping the reply's end, where the score is read). With a `place` (sharding.BatchPlacement) the
    (conversation, reply) pairs are this process's rows of a global batch: every process pads to the same length and
    the scores come back for the local rows.
    """
    config: ModelConfig
    params: Params
    tokenizer: Any
    template: str
    max_length: int
    pad_multiple: int = 32
    place: Any = None

    def encode(self, conversations: Sequence[Conversation], replies: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Reward-model inputs (tokens, attention_mask) [B, T], right padded."""
        ids = [self.tokenizer.encode_chat(list(c) + [{"role": "assistant", "content": r}], template=self.template,
                                          add_generation_prompt=False) for c, r in zip(conversations, replies)]
        longest = max(len(x) for x in ids)
        if self.place is not None:  # every process's rows go into one global array: one length for all
            longest = self.place.max(longest)
        length = min(self.max_length, -(-longest // self.pad_multiple) * self.pad_multiple)
        tokens, mask = right_pad(ids, length, self.tokenizer.pad_id)
        models.check_token_ids(tokens, self.config.vocab_size, f"reward model input ({self.template} template)")
        return tokens, mask

    def __call__(self, conversations: Sequence[Conversation], replies: Sequence[str], constrain=None,
                 batch: int = 0) -> np.ndarray:
        """Raw reward-model scores [B] float32. constrain: the mesh's activation constraint (models.score); batch:
        global rows per scoring call (0 = all in one; memory only, see row_calls)."""
        tokens, mask = self.encode(conversations, replies)
        out = []
        for rows in row_calls(len(tokens), batch, self.place):
            t, m = tokens[rows], mask[rows]
            if self.place is None:
                out.append(np.asarray(_score(self.params, self.config, t, m, constrain)))
            else:
                out.append(self.place.local(_score(self.params, self.config, *self.place.put(t, m), constrain)))
        return np.concatenate(out)


def scale_scores(raw: np.ndarray, moments: dict, reward_clip: float, scale: bool,
                 every_row: Callable = np.asarray) -> tuple[np.ndarray, dict]:
    """(scores [B] float32, new moments) in trlx's order (accelerate_ppo_trainer.make_experience at the Starling
    fork's commit 0fb4e1e, lines 366-379): clip the raw RM scores to +-reward_clip, fold the CLIPPED scores into the
    running moments, then divide by the running std (scale=True; nothing is clipped after the division).
    every_row: local rows -> every row of the global batch (BatchPlacement.whole with several processes), so the
    moments are those of the whole chunk on every process (trlx all-reduces them)."""
    clipped = np.clip(np.asarray(raw, np.float32), -reward_clip, reward_clip)
    new = obj_kl.running_moments_update(moments, jnp.asarray(every_row(clipped)))
    new = {k: float(v) for k, v in new.items()}
    std = float(obj_kl.running_std(new)) if scale else 1.0
    return (clipped / std).astype(np.float32), new


class RolloutSource:
    """The rl stage's BatchSource: next_batch(state) samples a chunk with the current policy, scores it with the
    reward model, and returns the experience batch (see rlaif.make_experience) plus per-rollout "stat_*" rows.

    Host state (saved in checkpoints): the prompt stream's position, the chunk counter (the sampling key is
    fold_in(seed key, chunk)), the running moments of the RM score and the (adaptive) KL coefficient.

    Several processes (`place`, a sharding.BatchPlacement): each reads its rows of the global chunk of prompts;
    generation, scoring and the experience pass run on the global batch; the running moments and the KL controller
    are updated from every row of the chunk (gathered across processes, as trlx all-reduces them), so they are the
    same on every process and equal to a one-process run's.
    """

    # the per-rollout statistics rows of every batch ([B] float32 each; the step averages them into its metrics)
    STAT_KEYS = ("stat_reward", "stat_scaled_reward", "stat_kl", "stat_kl_coef", "stat_response_length")

    @property
    def stat_keys(self) -> tuple[str, ...]:
        """The "stat_*" keys next_batch returns (plus stat_true_reward where the data source has a true utility)."""
        return self.STAT_KEYS + (("stat_true_reward",) if self.true_utility is not None else ())

    def __init__(self, *, prompts, conversations: Sequence[Conversation], config: ModelConfig, tokenizer,
                 template: str, scorer: RewardScorer, experience_fn: Callable, objective, rollout, seed: int,
                 true_utility: Optional[Callable[[Conversation, str], float]] = None, constrain=None, place=None,
                 group: int = 1, group_rows: Optional[Sequence[int]] = None):
        """prompts: an iterator of RL prompt batches (prompt_tokens [B, P] left padded, prompt_mask, prompt_id [B])
        with get_state/set_state (data.pipelines' "rl" dataset); conversations[prompt_id] is the prompt's
        conversation (for re-rendering it for the reward model). group: each prompt of a batch is repeated `group`
        times in a row (GRPO/RLOO sample G replies per prompt; the rows of a group are consecutive). group_rows
        (several processes, with group > 1): the prompt batches are the whole chunk's prompts, and this process keeps
        rows group_rows of the repeated chunk (its rows of the global chunk, place.rows)."""
        self.prompts, self.conversations = prompts, list(conversations)
        self.config, self.tokenizer, self.template = config, tokenizer, template
        self.scorer, self.experience_fn, self.objective, self.rollout = scorer, experience_fn, objective, rollout
        self.seed, self.true_utility, self.place, self.group = seed, true_utility, place, group
        self.group_rows = None if group_rows is None else np.asarray(group_rows, np.int64)
        self.constrain = constrain  # sharding.activation_constraint: generation split over the mesh's batch axes
        self.chunk = 0
        self.kl_coef = float(objective.kl_coef)
        self.moments = {k: float(v) for k, v in obj_kl.running_moments_init().items()}

    def experience(self, state, tokens, attention_mask, response_mask, scores) -> dict:
        """make_experience of this chunk: the policy/reference/critic forward in calls of rollout.generation_batch
        rows (memory only: every row's forward is its own), then the rewards and advantages over the whole chunk."""
        place, fn = self.place, self.experience_fn
        put = place.put if place is not None else (lambda *a: a)
        calls = row_calls(len(tokens), self.rollout.generation_batch, place)
        if len(calls) == 1:
            out = fn.forward(state.params, state.frozen, *put(tokens, attention_mask))
        else:
            local = place.local if place is not None else np.asarray
            parts = [jax.tree.map(local, fn.forward(state.params, state.frozen,
                                                    *put(tokens[rows], attention_mask[rows]))) for rows in calls]
            out = dict(zip(parts[0], put(*(np.concatenate([p[k] for p in parts]) for k in parts[0]))))
        return fn.finish(out, *put(response_mask, scores), jnp.float32(self.kl_coef))

    def get_state(self) -> dict:
        return {"prompts": self.prompts.get_state(), "chunk": self.chunk, "kl_coef": self.kl_coef,
                "moments": dict(self.moments)}

    def set_state(self, state: dict) -> None:
        self.prompts.set_state(state["prompts"])
        self.chunk, self.kl_coef = int(state["chunk"]), float(state["kl_coef"])
        self.moments = {k: float(v) for k, v in state["moments"].items()}

    def next_batch(self, state) -> dict:
        p = next(self.prompts)
        if self.group > 1:
            p = {k: np.repeat(np.asarray(v), self.group, axis=0) for k, v in p.items()}
            if self.group_rows is not None:
                p = {k: v[self.group_rows] for k, v in p.items()}
        ids = np.asarray(p["prompt_id"])
        conversations = [self.conversations[i] for i in ids]
        prompt_tokens, prompt_mask = np.asarray(p["prompt_tokens"]), np.asarray(p["prompt_mask"])
        key = jax.random.fold_in(jax.random.key(self.seed), self.chunk)
        r = self.rollout
        s = generate_replies(policy_parts(state.params, state.frozen), self.config, self.tokenizer, self.template,
                             (prompt_tokens, prompt_mask), key, r.max_new_tokens, temperature=r.temperature,
                             top_k=r.top_k, top_p=r.top_p, repeat=self.group, batch_size=r.generation_batch,
                             constrain=self.constrain, place=self.place)
        raw = self.scorer(conversations, s.texts, self.constrain, r.generation_batch)  # this process's rows
        whole = self.place.whole if self.place is not None else np.asarray  # every row of the chunk
        o = self.objective
        scores, self.moments = scale_scores(raw, self.moments, o.reward_clip, o.scale_reward, every_row=whole)
        tokens = np.concatenate([prompt_tokens, s.tokens], axis=1)
        attention_mask = np.concatenate([prompt_mask, s.mask], axis=1)
        exp = self.experience(state, tokens, attention_mask, s.mask, scores)
        kl_all = whole(exp["kl"])
        exp = {k: self.place.local(v) for k, v in exp.items()} if self.place is not None else jax.device_get(exp)
        batch = {"tokens": tokens, "attention_mask": attention_mask, "response_mask": s.mask.astype(np.int32),
                 "old_logprobs": exp["old_logprobs"], "ref_logprobs": exp["ref_logprobs"],
                 "old_values": exp["old_values"], "advantages": exp["advantages"], "returns": exp["returns"],
                 "stat_reward": raw.astype(np.float32), "stat_scaled_reward": scores, "stat_kl": exp["kl"],
                 "stat_kl_coef": np.full(len(ids), self.kl_coef, np.float32),
                 "stat_response_length": s.mask.sum(axis=1).astype(np.float32)}
        if self.true_utility is not None:
            batch["stat_true_reward"] = np.array([self.true_utility(c, t) for c, t in zip(conversations, s.texts)],
                                                 np.float32)
        self.kl_coef = float(obj_kl.update_kl_coef(self.kl_coef, float(np.mean(kl_all)), len(kl_all),
                                                   o.kl_target, o.kl_horizon))
        self.chunk += 1
        return batch
