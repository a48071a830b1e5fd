"""The data-driven stage kinds "sft", "rm" and "dpo": a model, the objective's loss, a grain pipeline, held-out
evaluation. (The "rl" kind lives in stages/kinds/rlaif.py.)

Trees follow step/losses.py: params = the trainable part (models.split_params), frozen = {"trunk": the rest} plus,
for DPO, {"reference": a copy of the trainable part at the start}. A reward-model stage that starts from a language
model ("stage:sft" or an HF causal-LM directory, as Starling-RM-7B started from Llama-2-7B-chat) drops the LM head and
gets a fresh Linear(hidden, 1) score head.
"""

from __future__ import annotations

from typing import Optional

import jax

from starling_jax import models
from starling_jax.algorithms import registry
from starling_jax.config import Experiment
from starling_jax.data import formats, load_tokenizer, pipelines
from starling_jax.metrics.ranking import RankingAccumulator, make_reward_fn
from starling_jax.models import ModelConfig, Params
from starling_jax.parallel import sharding
from starling_jax.stages.program import (LastEvaluation, StageContext, StageProgram, StageSetup, adapter_export,
                                         base_pointer, is_abstract, layers_note, load_model, register_stage_kind)
from starling_jax.step import adapters, losses
from starling_jax.step.state import abstract_state, create_state, make_optimizer, state_shardings
from starling_jax.step.step import make_train_step


class GrainBatches:
    """A BatchSource over a grain dataset (numpy batches; the step places them on the mesh). The first batch's token
    ids are checked against the model's vocabulary (a bad id would gather garbage silently on an accelerator)."""

    def __init__(self, dataset, vocab_size: int, where: str):
        self._iter = iter(dataset)
        self.vocab_size, self.where = vocab_size, where
        self.checked = False

    def next_batch(self, state) -> dict:
        batch = next(self._iter)
        if not self.checked:
            for k, v in batch.items():
                if k.endswith("tokens"):
                    models.check_token_ids(v, self.vocab_size, where=f"{self.where} batch[{k!r}]")
            self.checked = True
        return batch

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


def data_setup(c: Experiment, model_config: ModelConfig, params: Params, mesh, key: jax.Array) -> StageSetup:
    """The trees, shardings, optimiser and step of a data-driven stage (sft, rm, dpo) from full model params given as
    arrays (training: placed in their shards) or ShapeDtypeStructs (planning). See program.StageSetup."""
    algorithm = registry.get(c.objective.name)
    rules = c.mesh.rules
    abstract = is_abstract(params)
    top, train_head, lora = c.model.trainable_top_layers, c.model.train_lm_head, c.model.lora
    run_config = adapters.configure(model_config, lora, top)  # model_config itself without adapters

    if lora is None:
        def split(p):
            return losses.stage_params(p, top, train_head, algorithm.reference, model_config)
        trainable, frozen = jax.eval_shape(split, params) if abstract else split(params)
        specs_t, specs_f = losses.stage_specs(model_config, top, train_head, algorithm.reference)
    else:  # adapters (+ a reward model's score head) train; the base is frozen and is DPO's reference (no copy)
        heads = {"score": None} if algorithm.head == "score" else {}

        def split(p):
            return adapters.init_trees(p, run_config, lora, jax.random.fold_in(key, 1), top, heads)
        trainable, frozen = jax.eval_shape(split, params) if abstract else split(params)
        specs_t, specs_f = adapters.tree_specs(run_config, lora, trainable, frozen)
    shard_t = sharding.param_shardings(specs_t, mesh, rules)
    shard_f = sharding.param_shardings(specs_f, mesh, rules)
    if not abstract:
        trainable, frozen = jax.device_put(trainable, shard_t), jax.device_put(frozen, shard_f)
    total = c.train.steps  # one optimiser update per step
    optimizer = make_optimizer(c.optim, total, trainable)
    empty = abstract_state(trainable, optimizer, frozen)
    shard_state = state_shardings(optimizer, empty, shard_t, shard_f, mesh)
    state = empty if abstract else create_state(trainable, optimizer, key, frozen, shard_state)
    loss = algorithm.loss(c.objective, run_config, sharding.activation_constraint(mesh, rules))
    if lora is not None:
        loss = adapters.data_loss(loss)
    batch = algorithm.batch(c.train.batch_size, c.data.max_length, c.data.max_responses)
    trained = (f"trainable: {layers_note(top, model_config.num_layers)}" + (", head" if train_head else ", head frozen")
               if lora is None else f"trainable: LoRA adapters (rank {lora.rank}, {', '.join(lora.targets)}) on "
               f"{layers_note(top, model_config.num_layers)}" + (" + the score head" if algorithm.head == "score"
                                                                  else "") + "; the base is frozen")
    notes = (f"objective {c.objective.name}: global batch {c.train.batch_size} x {c.data.max_length} tokens"
             + (f" x K={c.data.max_responses}" if algorithm.kind == "rm" else "") + f", grad_accum {c.train.grad_accum}",
             trained)
    return StageSetup(state=state, state_shardings=shard_state, optimizer=optimizer, total_updates=total,
                      update=make_train_step(loss, optimizer, c.train.grad_accum, algorithm.weight_of), loss=loss,
                      batch=batch,
                      batch_shardings=sharding.batch_shardings(batch, mesh, rules), notes=notes)


class DataStage:
    """The program of a data-driven stage: a model, the algorithm's loss, a grain pipeline, held-out evaluation.

    Built once from the StageContext; its methods are the StageProgram the loop runs (program()). The loop's periodic
    eval reads the tuning split when there is one, the final summary the held-out (reporting) split and the unseen
    split; for reward models the evaluation adds ranking metrics against the observed rankings.
    """

    def __init__(self, ctx: StageContext):
        c = self.c = ctx.config
        self.algorithm = algorithm = registry.get(c.objective.name)
        self.mesh = mesh = ctx.mesh if ctx.mesh is not None else sharding.make_mesh(c.mesh)
        init_key, head_key, state_key, self.eval_key = jax.random.split(jax.random.key(c.train.seed), 4)

        # The rows first: a bad data file is reported before minutes of model loading and compilation.
        self.splits = pipelines.load_splits(c.data)
        # with adapters every layer is frozen: read quantized when model.config says so (load_model)
        model_config, params = load_model(ctx, c.model, init_key, frozen_layers=c.model.lora is not None)
        if algorithm.head == "score" and model_config.head != "score":
            model_config, params = to_reward_model(model_config, params, head_key)
        if algorithm.head == "lm" and model_config.head != "lm":
            raise ValueError(f"stage {ctx.stage_name!r}: objective {c.objective.name!r} needs a language model (head "
                             f"'lm'), but model.path={c.model.path!r} holds a {model_config.head!r} head")
        self.model_config = model_config
        self.tokenizer = load_tokenizer(c.model.tokenizer)
        if self.tokenizer.vocab_size > model_config.vocab_size:
            raise ValueError(f"stage {ctx.stage_name!r}: tokenizer {c.model.tokenizer!r} has "
                             f"{self.tokenizer.vocab_size} ids but the model's embedding has {model_config.vocab_size} "
                             f"rows")
        self.setup = data_setup(c, model_config, params, mesh, state_key)
        del params
        self.base = base_pointer(ctx, c.model) if c.model.lora is not None else None
        self.update = self.setup.jit(mesh)
        lora = c.model.lora
        if lora is None:
            self.eval_loss = jax.jit(lambda st, b: self.setup.loss(st.params, st.frozen, b, self.eval_key))
            self.merge = jax.jit(lambda st: models.merge_params(st.params, st.frozen["trunk"]))
        else:  # evaluated without adapter dropout; exported (and ranked) with the adapters folded into the weights
            run_config = adapters.configure(model_config, lora, c.model.trainable_top_layers)
            eval_loss = adapters.data_loss(algorithm.loss(c.objective, run_config, sharding.activation_constraint(
                mesh, c.mesh.rules)), dropout=False)
            self.eval_loss = jax.jit(lambda st, b: eval_loss(st.params, st.frozen, b, self.eval_key))
            self.merge = jax.jit(lambda st: adapters.merged(st.params, st.frozen, run_config))
        self.reward_fn = make_reward_fn(model_config) if algorithm.head == "score" else None

        # Data: the global batches are the same whatever the number of processes; this process reads only the rows
        # its devices hold (sharding.process_rows) and put_batch assembles the global arrays.
        self.my_rows = sharding.process_rows(next(iter(self.setup.batch_shardings.values())), c.train.batch_size)
        sharding.describe_rows(ctx.stage_name, self.my_rows, c.train.batch_size)
        train_ds = self._dataset(self.splits.train, seed=c.data.shuffle_seed + c.train.seed, report=self.splits.report)
        self.batches = GrainBatches(train_ds, model_config.vocab_size, f"stage {ctx.stage_name!r}")
        self.eval_split = "tuning" if self.splits.tuning else "heldout"
        self.eval_rows = getattr(self.splits, self.eval_split)
        # one batch past train.eval_batches tells whether they cover the whole split (then finish reuses evaluate())
        more = self.heldout(c.train.eval_batches + 1, self.eval_rows)
        self.eval_batches, self.eval_whole = more[:c.train.eval_batches], len(more) <= c.train.eval_batches
        self.last_eval = LastEvaluation()  # evaluate()'s result (of eval_batches), for finish to reuse

    def _dataset(self, rows, **kwargs):
        c = self.c
        return pipelines.dataset_for(self.algorithm.kind, rows, self.tokenizer, c.data, c.train.batch_size,
                                     template=c.model.template, process_rows=self.my_rows, **kwargs)

    def heldout(self, num_batches: Optional[int], rows=None) -> list:
        """The first num_batches (None: all) evaluation batches of `rows` (default: the held-out split), in order.
        They keep the training batch shape (and shardings): the last one is completed with padding rows that weigh
        nothing in the objective and its metrics (data.formats.padding_example), so every row is evaluated once."""
        rows = self.splits.heldout if rows is None else rows
        if not rows:
            return []
        out = []
        for b in self._dataset(rows, shuffle=False, num_epochs=1, pad_last=True):
            if num_batches is not None and len(out) >= num_batches:
                break
            out.append(b)
        return out

    def step(self, state, batch):
        return self.update(state, sharding.put_batch(batch, self.setup.batch_shardings))

    def evaluate_on(self, state, batches) -> Optional[dict]:
        """The algorithm's loss (weighted by its "weight" metric) over `batches`, plus ranking metrics for an RM."""
        if not batches:
            return None
        total, weight = 0.0, 0.0
        ranking = RankingAccumulator()
        full = self.merge(state) if self.reward_fn is not None else None
        for b in batches:
            placed = sharding.put_batch(b, self.setup.batch_shardings)
            loss, metrics = self.eval_loss(state, placed)
            w = float(metrics.get("weight", 1.0))
            total, weight = total + float(loss) * w, weight + w
            if self.reward_fn is not None:
                ranking.add(self.reward_fn(full, placed["tokens"], placed["attention_mask"]), placed["ranks"],
                            placed["response_mask"])
        out = {"loss": total / max(weight, 1e-9)}
        if self.reward_fn is not None:
            out.update(ranking.result())
        return out

    def evaluate(self, state) -> Optional[dict]:
        # kept under the split's name only when eval_batches are all of it
        what = self.eval_split if self.eval_whole else None
        return self.last_eval.keep(state, what, self.evaluate_on(state, self.eval_batches))

    def _evaluate_split(self, state, split: str) -> Optional[dict]:
        """evaluate_on every batch of the split named `split`; the loop's final evaluate() already measured them with
        this very state when they are the evaluation split and train.eval_batches covers it all (a split of a few
        batches, or no tuning split: the held-out one), and its result is reused instead of measuring them again."""
        kept = self.last_eval.of(state, split)
        if kept is not None:
            return kept
        return self.evaluate_on(state, self.heldout(None, getattr(self.splits, split)))

    def finish(self, state, workdir: str) -> dict:
        splits = self.splits
        if self.c.data.reporting:
            result = self._evaluate_split(state, "heldout") or {}
            summary = {f"heldout_{k}": v for k, v in result.items()}
            summary["heldout_rows"] = len(splits.heldout)
        else:  # a selection run: the tuning split in the reporting split's place (data.reporting)
            result = self._evaluate_split(state, "tuning") or {}
            summary = {f"tuning_{k}": v for k, v in result.items()}
            summary["tuning_rows"] = len(splits.tuning)
        if splits.unseen:
            unseen = self.evaluate_on(state, self.heldout(None, splits.unseen)) or {}
            summary.update({f"unseen_{k}": v for k, v in unseen.items()})
            summary["unseen_rows"] = len(splits.unseen)
        report = splits.report
        summary["data"] = report.summary() if hasattr(report, "summary") else str(report)
        return summary

    def export(self, state) -> Params:
        return self.merge(state)

    def program(self) -> StageProgram:
        state = self.setup.state
        trained = _count(state.params)
        frozen_work = _count(state.frozen.get("trunk", {})) + _count(state.frozen.get("reference", {}))
        # LoRA: the base's top runs forward and backward (its activation gradients, not its weight gradients), and
        # forward once more as DPO's reference
        frozen_work += (2.0 + (1.0 if self.algorithm.reference else 0.0)) * _count(state.frozen.get("base", {}))
        lora = self.c.model.lora
        return StageProgram(state=state, step=self.step, batches=self.batches, export=self.export,
                            model_config=self.model_config, evaluate=self.evaluate, finish=self.finish,
                            flops_per_token=6.0 * trained + 2.0 * frozen_work, setup=self.setup,
                            base=self.base, adapters=None if lora is None else adapter_export(
                                self.c, self.model_config, self.base))


def build_data_stage(ctx: StageContext) -> StageProgram:
    return DataStage(ctx).program()


def check_data(c, algorithm, earlier: dict) -> list[tuple[str, str]]:
    """A data kind's checks of a stage config (validation runs them): the rows must hold the answers its batch
    format needs (a ranking or a pair needs 2)."""
    need = formats.get_format(algorithm.kind).min_responses
    if c.data.max_responses < need:
        return [("data.max_responses", f"a ranking needs at least {need} responses, got {c.data.max_responses}")]
    return []


def register_data_kind(name: str, check=None) -> None:
    """Register stage kind `name` as a data kind: the DataStage program over the batch format registered under the
    same name (data.formats.register_format); its algorithm says the head, loss and reference copy. check(config,
    algorithm, earlier) -> [(field, message)]: the kind's own config checks, after check_data's."""
    def check_kind(c, algorithm, earlier):
        return check_data(c, algorithm, earlier) + (check(c, algorithm, earlier) if check else [])
    register_stage_kind(name, setup=data_setup, check=check_kind)(build_data_stage)


for _kind in ("sft", "rm", "dpo"):  # one builder for the three data-driven kinds; the algorithm says the rest
    register_data_kind(_kind)
