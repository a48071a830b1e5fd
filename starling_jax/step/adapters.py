"""LoRA in a stage (model.lora): the trees of a stage that trains adapters instead of layers, and the views through
which the one forward (step/hydra.py, step/losses.py) reads them unchanged.

Trees (the full-layer ones are in step/hydra.py and step/losses.py):
  trainable = {"lora": the adapters of the top N layers (N = model.trainable_top_layers, 0 = all):
                       {projection: {"a" [N, *in, r], "b" [N, r, *out]}} (models/lora.py),
               "score": a reward model's score head (rm stages: it trains in full),
               "critic": the value head (rl stages with a critic; a "layers" critic's copied layers train in full)}
  frozen    = {"trunk": embeddings + the layers below the top N + the LM head,
               "base": the top N layers' base weights + the final norm}
Only `trainable` gets gradients and optimiser state, so the optimiser keeps moments for the adapters (and heads) alone,
and a checkpoint of such a stage holds them alone (stages/loop.py). The policy is base + adapters (models.lora.attach:
no array copied); the reference policy of DPO and the rl kind is the base alone: no copy of any weight.

views() maps the trees to the full-layer layout, {"policy": base + adapters, "critic"} and {"trunk", "reference":
base}, so every loss, hydra_forward, sampling call and evaluation runs the same code with or without adapters; a tree
without "lora" passes through untouched (the full-layer stages compute exactly what they did).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from starling_jax import models
from starling_jax.config import LoraConfig
from starling_jax.models import ModelConfig, Params
from starling_jax.models import lora as model_lora
from starling_jax.parallel.sharding import respec

HEADS = ("score", "critic")  # the full-trained heads a LoRA stage's trainable tree may hold beside its adapters


def options(lora: LoraConfig, config: ModelConfig, top_layers: int = 0) -> model_lora.LoraOptions:
    """models.lora.LoraOptions of the lora section: every layer of the top `top_layers` (0 = all) when lora.layers is
    None, else those indices (validation keeps them inside the top)."""
    n = config.num_layers
    top = top_layers or n
    layers = tuple(lora.layers) if lora.layers is not None else (None if top == n else tuple(range(n - top, n)))
    return model_lora.LoraOptions(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=tuple(lora.targets),
                                  layers=layers)


def configure(config: ModelConfig, lora: Optional[LoraConfig], top_layers: int = 0) -> ModelConfig:
    """The model config that runs the adapters (lora_scale, lora_dropout); `config` itself without a lora section."""
    return config if lora is None else model_lora.configure(config, options(lora, config, top_layers))


def plain(config: ModelConfig) -> ModelConfig:
    """`config` without adapters: the architecture of a merged export."""
    return config.replace(lora_scale=None, lora_dropout=0.0)


def is_lora(trainable: Params) -> bool:
    return isinstance(trainable, dict) and "lora" in trainable


def init_trees(params: Params, config: ModelConfig, lora: LoraConfig, key: jax.Array, top_layers: int = 0,
               heads: Params = None) -> tuple[Params, Params]:
    """(trainable, frozen) of a LoRA stage (the module docstring) from the model's full params. heads: the heads that
    train in full ({"score": ...} taken from params for a reward model, {"critic": a fresh value head} for the rl
    kind), by name -> array tree, or the name alone as {"score": None} to take it from params."""
    n = models.num_stacked(params["layers"])  # the layer matrices may be stored quantized already (hf.load)
    top, trunk = models.split_params(params, top_layers, train_head=False)
    trunk = dict(trunk)
    trainable = {}
    for name, tree in (heads or {}).items():
        trainable[name] = trunk.pop(name) if tree is None else tree
    adapters = model_lora.init(config, options(lora, config, top_layers), key)
    cut = n - (top_layers or n)
    trainable["lora"] = jax.tree.map(lambda a: a[cut:], adapters) if cut else adapters
    # frozen weights in the compute dtype (models.frozen_storage: the same forwards, half the memory under bf16), their
    # layers quantized when config.quantize says so (QLoRA, models.quantized_base): the policy (base + adapters) and
    # the reference (the base) read the same codes, so they are equal at step 0
    frozen = {"trunk": models.quantized_base(trunk, config), "base": models.quantized_base(top, config)}
    return trainable, models.frozen_storage(frozen, config)


def tree_specs(config: ModelConfig, lora: LoraConfig, trainable, frozen, heads: Params = None) -> tuple[Params, Params]:
    """ParamSpecs of init_trees' trees (their own shapes, the logical axes of the weights they come from; the
    adapters shard like their base weights, models.lora.specs), for sharding.param_shardings. heads: name -> the
    ParamSpec tree of each full-trained head (default: the model's own)."""
    model = models.param_specs(config)
    specs_t = {"lora": model_lora.specs(config, options(lora, config)), **{k: model[k] for k in HEADS if k in model},
               **(heads or {})}
    base = models.quantized_specs(model, config)  # quantized arrays shard by their weights' axes (QLoRA)
    return respec(trainable, specs_t), respec(frozen, {"trunk": base, "base": base})


def policy(trainable: Params, frozen: Params) -> Params:
    """The trained top of the model: the base's top layers and final norm with the adapters attached, plus a reward
    model's score head (the tree full-layer training keeps as its trainable part)."""
    top = model_lora.attach(frozen["base"], trainable["lora"])
    return {**top, **{k: v for k, v in trainable.items() if k not in ("lora", "critic")}}


def views(trainable: Params, frozen: Params) -> tuple[Params, Params]:
    """(trainable, frozen) in the full-layer layout of step/hydra.py: {"policy": base + adapters, "critic"} and
    {"trunk", "reference": the base}. Trees without adapters come back as they are."""
    if not is_lora(trainable):
        return trainable, frozen
    view = {"policy": policy(trainable, frozen)}
    if "critic" in trainable:
        view["critic"] = trainable["critic"]
    return view, {"trunk": frozen["trunk"], "reference": frozen["base"]}


def data_loss(loss_fn, dropout: bool = True):
    """A data algorithm's loss_fn(params, frozen, batch, rng) over a LoRA stage's trees: it sees the trained top
    (policy()) as its params and {"trunk", "reference": the base} as frozen. dropout False: the rng never reaches the
    adapters (evaluation)."""
    def loss(trainable, frozen, batch, rng):
        params, view = views(trainable, frozen)
        return loss_fn(params["policy"], view, batch, rng if dropout else None)
    return loss


def merged(trainable: Params, frozen: Params, config: ModelConfig) -> Params:
    """The full params of the trained model with the adapters folded into their weights (models.lora.merge), in the
    model's parameter dtype: what later stages load ("stage:NAME") and `convert` writes."""
    dt = jnp.dtype(config.param_dtype)
    frozen = models.quantize.dequantize_tree(frozen, dt)  # a quantized base (QLoRA) folds in dequantized
    widen = lambda tree: jax.tree.map(lambda a: a if a.dtype == dt else a.astype(dt), tree)
    # the base back in the parameter dtype first (exact), so the fold is rounded once, to the exported dtype
    top = model_lora.merge(widen(policy(trainable, frozen)), config)
    return widen(models.merge_params(top, widen(frozen["trunk"])))


def full_adapters(trainable: Params, config: ModelConfig) -> Params:
    """The adapters over all L layers (zeros below the top N, which carry none): the layout of models.lora and of a
    PEFT export (models.lora's layers_to_transform writes only the adapted layers)."""
    adapters = trainable["lora"]
    n = jax.tree.leaves(adapters)[0].shape[0]
    cut = config.num_layers - n
    if not cut:
        return adapters
    return jax.tree.map(lambda a: jnp.concatenate([jnp.zeros((cut, *a.shape[1:]), a.dtype), a]), adapters)
