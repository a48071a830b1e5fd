"""The data-driven stage kinds "sft", "rm" and "dpo": a model, the objective's loss, a grain pipeline, held-out
evaluation. (The "rl" kind lives in train/rlaif.py.)

Trees follow train/losses.py: params = the trainable part (models.split_params), frozen = {"trunk": the rest} plus,
for DPO, {"reference": a copy of the trainable part at the start}. A reward-model stage that starts from a language
model ("stage:sft" or an HF causal-LM directory, as Starling-RM-7B started from Llama-2-7B-chat) drops the LM head and
gets a fresh Linear(hidden, 1) score head.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from starling_jax import models, sharding
from starling_jax.data import load_tokenizer
from starling_jax.data import pipelines
from starling_jax.eval.ranking import RankingAccumulator, make_reward_fn
from starling_jax.models import ModelConfig
from starling_jax.train import losses
from starling_jax.train.program import StageContext, StageProgram, load_model, register_stage_kind
from starling_jax.train.state import abstract_state, create_state, make_optimizer, state_shardings
from starling_jax.train.step import jit_step, make_train_step
from starling_jax.models import Params



class GrainBatches:
    """A BatchSource over a grain dataset (numpy batches; the step places them on the mesh)."""

    def __init__(self, dataset):
        self._iter = iter(dataset)

    def next_batch(self, state) -> dict:
        return next(self._iter)

    def get_state(self) -> dict:
        return self._iter.get_state()

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state)


def to_reward_model(config: ModelConfig, params: Params, key: jax.Array) -> tuple[ModelConfig, Params]:
    """A language model -> a reward model: drop the LM head, add a score head Linear(D, 1) ~ normal(init_std)."""
    config = config.replace(head="score", tie_embeddings=False)
    params = {k: v for k, v in params.items() if k != "lm_head"}
    params["score"] = models.init_from_specs({"score": models.param_specs(config)["score"]}, key,
                                             config.init_std)["score"]
    return config, params


def _count(tree, skip=("embed",)) -> int:
    """Parameters that do matmul work per token (embedding lookups do none)."""
    return models.count_params({k: v for k, v in tree.items() if k not in skip}) if tree else 0


def _place(tree, shardings_tree):
    return jax.device_put(tree, shardings_tree)


def build_data_stage(ctx: StageContext, kind: str) -> StageProgram:
    c = ctx.config
    obj = c.objective.name
    mesh = ctx.mesh if ctx.mesh is not None else sharding.make_mesh(c.mesh)
    rules = c.mesh.rules
    init_key, head_key, state_key, eval_key = jax.random.split(jax.random.key(c.train.seed), 4)

    # The rows first: a bad data file is reported before minutes of model loading and compilation.
    splits = pipelines.load_splits(c.data)
    train_rows, heldout_rows, report = splits.train, splits.heldout, splits.report
    model_config, params = load_model(ctx, c.model, init_key)
    if kind == "rm" and model_config.head != "score":
        model_config, params = to_reward_model(model_config, params, head_key)
    if kind != "rm" and model_config.head != "lm":
        raise ValueError(f"stage {ctx.stage_name!r}: objective {obj!r} needs a language model (head 'lm'), but "
                         f"model.path={c.model.path!r} holds a {model_config.head!r} head")
    tokenizer = load_tokenizer(c.model.tokenizer)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"stage {ctx.stage_name!r}: tokenizer {c.model.tokenizer!r} has {tokenizer.vocab_size} ids "
                         f"but the model's embedding has {model_config.vocab_size} rows")

    # Trees, shardings, optimiser, state.
    top, train_head = c.model.trainable_top_layers, c.model.train_lm_head
    trainable, frozen = losses.stage_params(obj, params, top, train_head)
    del params
    specs_t, specs_f = losses.stage_specs(obj, model_config, top, train_head)
    shard_t = sharding.param_shardings(specs_t, mesh, rules)
    shard_f = sharding.param_shardings(specs_f, mesh, rules)
    trainable, frozen = _place(trainable, shard_t), _place(frozen, shard_f)
    optimizer = make_optimizer(c.optim, c.train.steps, trainable)
    shard_state = state_shardings(optimizer, abstract_state(trainable, optimizer, frozen), shard_t, shard_f, mesh)
    state = create_state(trainable, optimizer, state_key, frozen, shard_state)

    # Data: the global batches are the same whatever the number of processes; this process reads only the rows its
    # devices hold (sharding.process_rows) and put_batch assembles the global arrays.
    batch_abstract = losses.batch_spec(obj, c.train.batch_size, c.data.max_length, c.data.max_responses)
    shard_batch = sharding.batch_shardings(batch_abstract, mesh, rules)
    my_rows = sharding.process_rows(next(iter(shard_batch.values())), c.train.batch_size)
    sharding.describe_rows(ctx.stage_name, my_rows, c.train.batch_size)
    pipe_kind = "rm" if kind == "rm" else kind
    train_ds = pipelines.dataset_for(pipe_kind, train_rows, tokenizer, c.data, c.train.batch_size,
                                     template=c.model.template, seed=c.data.shuffle_seed + c.train.seed,
                                     process_rows=my_rows, report=report)

    loss_fn = losses.build_loss(c.objective, model_config, sharding.activation_constraint(mesh, rules))
    jitted = jit_step(make_train_step(loss_fn, optimizer, c.train.grad_accum), mesh, shard_state, shard_batch)
    vocab = model_config.vocab_size
    checked = []

    def step(state, batch):
        if not checked:  # once: a bad id would gather garbage silently on an accelerator
            for k, v in batch.items():
                if k.endswith("tokens"):
                    models.check_token_ids(v, vocab, where=f"stage {ctx.stage_name!r} batch[{k!r}]")
            checked.append(True)
        return jitted(state, sharding.put_batch(batch, shard_batch))

    # Held-out evaluation: the objective's loss (weighted by its "weight" metric) and, for reward models, ranking
    # metrics against the observed rankings. The loop's periodic eval reads the tuning split when there is one, the
    # final summary the held-out (reporting) split and the unseen split.
    def heldout(num_batches: Optional[int], rows=heldout_rows):
        if not rows:
            return []
        ds = pipelines.dataset_for(pipe_kind, rows, tokenizer, c.data, c.train.batch_size, template=c.model.template,
                                   shuffle=False, num_epochs=1, process_rows=my_rows)
        out = []
        for b in ds:
            if num_batches is not None and len(out) >= num_batches:
                break
            out.append(b)
        return out

    eval_loss = jax.jit(lambda st, b: loss_fn(st.params, st.frozen, b, eval_key))
    reward_fn = make_reward_fn(model_config) if kind == "rm" else None
    merge = jax.jit(lambda st: models.merge_params(st.params, st.frozen["trunk"]))

    def evaluate_on(state, batches) -> Optional[dict]:
        if not batches:
            return None
        total, weight = 0.0, 0.0
        ranking = RankingAccumulator()
        full = merge(state) if reward_fn is not None else None
        for b in batches:
            placed = sharding.put_batch(b, shard_batch)
            loss, metrics = eval_loss(state, placed)
            w = float(metrics.get("weight", 1.0))
            total, weight = total + float(loss) * w, weight + w
            if reward_fn is not None:
                ranking.add(reward_fn(full, placed["tokens"], placed["attention_mask"]), placed["ranks"],
                            placed["response_mask"])
        out = {"loss": total / max(weight, 1e-9)}
        if reward_fn is not None:
            out.update(ranking.result())
        return out

    eval_batches = heldout(c.train.eval_batches, splits.tuning or heldout_rows)

    def evaluate(state):
        return evaluate_on(state, eval_batches)

    def finish(state, workdir):
        result = evaluate_on(state, heldout(None)) or {}
        summary = {f"heldout_{k}": v for k, v in result.items()}
        summary["heldout_rows"] = len(heldout_rows)
        if splits.unseen:
            summary.update({f"unseen_{k}": v for k, v in (evaluate_on(state, heldout(None, splits.unseen)) or {}).items()})
            summary["unseen_rows"] = len(splits.unseen)
        summary["data"] = report.summary() if hasattr(report, "summary") else str(report)
        return summary

    def export(state):
        return merge(state)

    trained = _count(trainable)
    frozen_work = _count(frozen.get("trunk", {})) + _count(frozen.get("reference", {}))
    return StageProgram(
        state=state, step=step, batches=GrainBatches(train_ds), export=export, model_config=model_config,
        evaluate=evaluate, finish=finish, flops_per_token=6.0 * trained + 2.0 * frozen_work)


@register_stage_kind("sft")
def build_sft(ctx: StageContext) -> StageProgram:
    return build_data_stage(ctx, "sft")


@register_stage_kind("rm")
def build_rm(ctx: StageContext) -> StageProgram:
    return build_data_stage(ctx, "rm")


@register_stage_kind("dpo")
def build_dpo(ctx: StageContext) -> StageProgram:
    return build_data_stage(ctx, "dpo")
