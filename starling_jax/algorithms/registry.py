"""The registry of training algorithms (ObjectiveConfig.name -> Algorithm, with the type of its options); the stage
kinds that train them are registered beside their own type, in stages/program.py.

An algorithm is registered once, in its own module under starling_jax/algorithms/ (every module there is imported by
starling_jax.algorithms, so a new file is all it takes):

    register(Algorithm(name="dpo", kind="dpo", head="lm", loss=build_dpo_loss, batch=pair_batch, reference=True,
                       options=DPOOptions))

Everything that used to be a table keyed by the objective name reads the record instead: the config's choices and
checks (stages/validation.py), the stage kinds (stages/kinds/data.py, rlaif.py), the planner (commands/plan.py), the
docs.

This module imports nothing of the project but errors.py and config.py (the ObjectiveConfig base of every options
type): it is a dictionary with checks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Optional

from starling_jax.config import ObjectiveConfig
from starling_jax.errors import did_you_mean

Head = Literal["lm", "score"]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One training algorithm: what the stage kind `kind` needs to train it.

    name:      the ObjectiveConfig.name that selects it.
    kind:      the stage kind that trains it ("sft", "rm", "dpo", "rl", or any registered kind). Data-driven kinds
               also use it as the data pipeline's name (data/pipelines.py dataset_for).
    head:      the head of the model it trains: "lm" (language model) or "score" (reward model).
    loss:      what the kind calls to get the loss; its signature is the kind's contract:
               data kinds (sft, rm, dpo): loss(objective, model_config, mesh_rules) -> loss_fn(params, frozen, batch,
                 rng) -> (loss, metrics with "weight"), where mesh_rules is a sharding.MeshRules or None;
               rl kind: loss(out, batch, objective) -> (policy loss, metrics), `out` the policy's hydra_forward
                 outputs on the minibatch ("logprobs", "values", "hidden" [B, N, ...]) and `batch` the minibatch of
                 experience (tokens, masks, old_logprobs, ref_logprobs, old_values, advantages, returns). The loss
                 is a mean of per-token or per-reply terms of the rows alone (minibatch-wide statistics belong in
                 `advantages`); metrics are means over the valid response tokens, plus "weight": what the loss
                 averages over (valid tokens, or replies), by which micro-batches combine (train.grad_accum). With a
                 critic the loss is a token mean (the value loss is one).
    batch:     data kinds: batch(batch_size, seq_len, num_responses) -> {key: jax.ShapeDtypeStruct}, the global
               batch layout (the planner compiles against it; the loss checks its keys). The rl kind's layout is
               the kind's own (stages/kinds/rlaif.py experience_spec).
    reference: the stage keeps a frozen copy of the trainable part taken at its start (DPO; every RL algorithm).
    advantages: rl kind: advantages(rewards, values, mask, objective, group_size, scores, logprobs, ref_logprobs,
               kl_coef) -> (advantages, returns), all [B, N] float32 (called with keywords); `rewards` are the
               per-token shaped rewards (the k1 KL penalty on every token, the RM score added at the last one),
               `values` the critic's, `scores` [B] the scaled RM scores. None = GAE (objectives.gae) with the critic.
    critic:    rl kind: the loss adds vf_coef * value_loss (the critic trains); False = critic-free (GRPO, RLOO).
    group_size: rl kind: group_size(objective) -> rollouts sampled per prompt (consecutive rows) from the
               ObjectiveConfig's options; None = 1.
    check:     check(stage_config) -> [(field, message)]: the algorithm's own checks that need more than its options
               (the model's size, another section), run by validation after every field's type and constraints.
    options:   the type of its options: a frozen dataclass deriving from config.ObjectiveConfig whose fields are
               typed (Literal choices) and annotated with a pydantic Field (ranges and a description), defined in the
               algorithm's own module; ObjectiveConfig itself for an algorithm without options. The stage kind
               fixes a base: rl algorithms derive from algorithms.RLOptions (the rollouts' KL and reward shaping),
               those with a critic from algorithms.CriticOptions.
    weight_of: data kinds: weight_of(metric name) -> the count ("weight" or a summed "num_*" metric of the loss) that
               the metric is a mean over, by which micro-batches combine it (train.grad_accum; step.step
               accumulate_gradients); None = every metric is a mean over the loss's "weight".
    summary:   one line for docs and error messages.
    """
    name: str
    kind: str
    head: Head
    loss: Optional[Callable[..., Any]]  # None for a kind that trains nothing (feedback)
    batch: Optional[Callable[[int, int, int], dict]] = None
    reference: bool = False
    advantages: Optional[Callable[..., Any]] = None
    critic: bool = True
    group_size: Optional[Callable[[Any], int]] = None
    check: Optional[Callable[[Any], list]] = None
    options: type = ObjectiveConfig
    weight_of: Optional[Callable[[str], str]] = None
    summary: str = ""


ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Add `algorithm` under algorithm.name. Registering a second, different algorithm under a taken name is an
    error (re-importing the same module registers an equal record again, which is allowed)."""
    if algorithm.head not in ("lm", "score"):
        raise ValueError(f"algorithm {algorithm.name!r}: head must be 'lm' or 'score', got {algorithm.head!r}")
    o = algorithm.options
    if not (isinstance(o, type) and issubclass(o, ObjectiveConfig) and o.__dataclass_params__.frozen):
        raise ValueError(f"algorithm {algorithm.name!r}: options must be a frozen dataclass deriving from "
                         f"ObjectiveConfig, got {o!r}")
    old = ALGORITHMS.get(algorithm.name)
    if old is not None and old != algorithm:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered (kind {old.kind!r})")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get(name: str) -> Algorithm:
    """The algorithm registered as `name`; a KeyError names the close matches otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; {did_you_mean(name, sorted(ALGORITHMS))}") from None


def options(name: str, **values) -> ObjectiveConfig:
    """The options of algorithm `name` (its registered type) with `values` set and the rest at their defaults."""
    return get(name).options(name=name, **values)


def options_error(objective: ObjectiveConfig) -> Optional[str]:
    """Why `objective` is not the options of the algorithm its name selects (its registered type), or None. An
    unknown name is get()'s error, not this one."""
    algorithm = ALGORITHMS.get(objective.name)
    if algorithm is None or type(objective) is algorithm.options:
        return None
    want = algorithm.options
    return (f"objective {objective.name!r} takes {want.__name__} ({want.__module__}), got {type(objective).__name__}; "
            f"write {want.__name__}(...) or algorithms.options({objective.name!r}, ...)")


def switch(objective: ObjectiveConfig, name: str, **values) -> ObjectiveConfig:
    """Algorithm `name`'s options holding the values of `objective` (another algorithm's options) that were set away
    from their defaults and that `name` takes too (e.g. an rl stage's KL settings when trading APA for GRPO), `name`'s
    own defaults for the rest (GRPO's kl_in is not RLOO's), and `values` on top. The options `name` does not take
    are left behind."""
    target = get(name).options
    shared = {f.name for f in dataclasses.fields(target)} - {"name"}
    kept = {f.name: getattr(objective, f.name) for f in dataclasses.fields(objective)
            if f.name in shared and getattr(objective, f.name) != f.default}
    return target(**{**kept, **values, "name": name})


def names() -> list[str]:
    return sorted(ALGORITHMS)


def of_kind(kind: str) -> list[str]:
    """Names of the algorithms a stage kind trains."""
    return sorted(n for n, a in ALGORITHMS.items() if a.kind == kind)
