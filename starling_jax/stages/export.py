"""A trained stage -> a complete Hugging Face directory (`starling-jax convert WORKDIR[/STAGE] OUT`).

    starling-jax convert runs/tiny_starling/policy hf/tiny_policy      # a policy (an rl stage: the hydra merged)
    starling-jax convert runs/tiny_starling/rm hf/tiny_rm              # a reward model (*ForSequenceClassification)
    starling-jax convert runs/tiny_starling hf/final [--stage NAME]    # default: the experiment's last finished stage
    starling-jax convert runs/lora_run/policy peft/policy --adapters   # a LoRA stage's adapters as a PEFT directory

The directory holds what fschat, vLLM, transformers and `starling-jax generate|chat|eval` read:
  config.json + model.safetensors      the weights (hf.save); bos/eos/pad ids from the stage's tokenizer
  tokenizer.model | tokenizer.json     the stage's tokenizer (data.tokenizer.save_hf_tokenizer)
  tokenizer_config.json                with `chat_template`: the template the stage trained with, as Jinja
                                       (data.templates.jinja_template), so apply_chat_template renders like we do
  special_tokens_map.json
  generation_config.json               (language models) eos_token_id = the template's stop ids (+ EOS)

The stage's tokenizer and template come from WORKDIR/config.json (the experiment the run saved), so a reward model
exported from Starling's recipe carries its own Llama-2 format while the policy carries OpenChat's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import jax

from starling_jax import models
from starling_jax.config import Experiment, MeshConfig
from starling_jax.data import load_tokenizer
from starling_jax.data.templates import jinja_template
from starling_jax.data.tokenizer import save_hf_tokenizer
from starling_jax.io import hf, peft
from starling_jax.models import lora
from starling_jax.parallel import sharding
from starling_jax.stages.experiment import load_experiment, stages_of
from starling_jax.step.checkpoint import load_adapters, load_export


@dataclasses.dataclass(frozen=True)
class StageRef:
    """A finished stage of a run: where it is and the resolved config it trained with."""
    workdir: str
    name: str
    export_dir: str
    config: Experiment  # the stage's resolved experiment (model section: tokenizer, template)


def _is_export(d: str) -> bool:
    return all(os.path.isfile(os.path.join(d, f)) for f in ("summary.json", "model_config.json"))


def is_stage_source(path: str) -> bool:
    """Whether `path` is a run's WORKDIR, a stage directory in one, or a stage export (not a HF directory)."""
    if not os.path.isdir(path):
        return False
    if _is_export(path) or _is_export(os.path.join(path, "export")):
        return True
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "stages" in data and "architectures" not in data


def resolve_stage(path: str, stage: Optional[str] = None) -> StageRef:
    """The finished stage that `path` names: a stage export, a stage directory, or a WORKDIR (its `stage`, default
    the experiment's last finished stage)."""
    path = os.path.abspath(path)
    if _is_export(path):
        stage_dir = os.path.dirname(path)
    elif _is_export(os.path.join(path, "export")):
        stage_dir = path
    else:
        stage_dir = None
    if stage_dir is not None:
        workdir, name = os.path.dirname(stage_dir), os.path.basename(stage_dir)
        if stage is not None and stage != name:
            raise ValueError(f"{path} is stage {name!r}, but --stage {stage} was given")
    else:
        workdir, name = path, stage
    cfg = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"{path}: no experiment config at {cfg} (expected a run's WORKDIR, WORKDIR/<stage> or "
                                f"WORKDIR/<stage>/export, as written by `starling-jax run`)")
    exp = load_experiment(cfg)
    stages = stages_of(exp)
    names = [n for n, _ in stages]
    if name is None:
        done = [n for n in names if _is_export(os.path.join(workdir, n, "export"))]
        if not done:
            raise FileNotFoundError(f"{workdir}: no finished stage (none of {', '.join(names)} has an export/); "
                                    f"train it first: starling-jax run {cfg} --workdir {workdir}")
        name = done[-1]
    found = [c for n, c in stages if n == name]
    if not found:
        raise ValueError(f"{workdir}: the experiment has no stage {name!r}; stages: {', '.join(names)}")
    export_dir = os.path.join(workdir, name, "export")
    if not _is_export(export_dir):
        raise FileNotFoundError(f"{export_dir}: stage {name!r} has not finished (no summary.json); train it first")
    return StageRef(workdir=workdir, name=name, export_dir=export_dir, config=found[0])


def load_weights(path: str, dtype: Optional[str] = None, mesh=None, rules=None):
    """The one way to load a model from a directory: (ModelConfig, params) of a stage export (summary.json +
    model_config.json, step.checkpoint.load_export) or a Hugging Face directory (io.hf.load). dtype: cast the
    parameters (and the compute dtype: float32 for float32, else bfloat16) when it differs from theirs. mesh: place
    each parameter in its shards as it is read (rules: the logical-axis rules, default MeshConfig().rules)."""
    if not _is_export(path):
        return hf.load(path, dtype=dtype, mesh=mesh, rules=rules)
    shardings = None
    if mesh is not None:
        rules = MeshConfig().rules if rules is None else rules

        def shardings(config):
            return sharding.param_shardings(models.param_specs(config), mesh, rules)
    config, params, _ = load_export(path, shardings)
    if dtype is not None and dtype != config.param_dtype:
        params = jax.tree.map(lambda a: a.astype(dtype), params)
        config = config.replace(param_dtype=dtype, dtype="float32" if dtype == "float32" else "bfloat16")
    return config, params


def _pad_for(tokenizer, stop_ids, head: str) -> int:
    """The pad id to declare. A reward model's HF class scores the last token that is not pad, so pad must never end
    a scored conversation: when the tokenizer pads with a stop token (OpenChat pads with <|end_of_turn|>), declare
    another special token that never appears in rendered text."""
    if head != "score" or tokenizer.pad_id not in stop_ids:
        return tokenizer.pad_id
    for s in ("<|pad_0|>", "<pad>", "<unk>"):
        if s in tokenizer.special_tokens and tokenizer.special_tokens[s] not in stop_ids:
            return tokenizer.special_tokens[s]
    raise ValueError(f"tokenizer {tokenizer.name}: pads with a stop token and has no other pad token (<|pad_0|>, "
                     f"<pad>, <unk>): transformers' sequence-classification head could not find the scored token")


def export_hf(ref: StageRef, out: str, dtype: Optional[str] = None,
              max_shard_bytes: Optional[int] = None) -> dict:
    """Write the complete HF directory of a finished stage (see the module doc). Returns a description (class,
    parameter count, files, template, stop ids)."""
    m = ref.config.model
    tokenizer = load_tokenizer(m.tokenizer)
    template = tokenizer.template(m.template)
    config, params = load_weights(ref.export_dir, dtype)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"stage {ref.name}: tokenizer {m.tokenizer} has {tokenizer.vocab_size} ids but the model "
                         f"only {config.vocab_size} embedding rows")
    stop_ids = tokenizer.stop_ids(template)
    pad = _pad_for(tokenizer, stop_ids, config.head)
    config = config.replace(bos_token_id=tokenizer.bos_id, eos_token_id=stop_ids[0], pad_token_id=pad)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    files = hf.save(out, config, params, **kwargs)
    files += save_hf_tokenizer(tokenizer, out, chat_template=jinja_template(template), pad=pad,
                               model_max_length=config.max_seq_len)
    if config.head == "lm":
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(stop_ids), "pad_token_id": pad}
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
        files.append("generation_config.json")
    return {"output": out, "stage": ref.name, "class": hf.HF_CLASS[(config.architecture, config.head)],
            "parameters": models.count_params(params), "dtype": config.param_dtype, "template": template.name,
            "tokenizer": m.tokenizer, "stop_ids": list(stop_ids), "files": files}


def export_peft(ref: StageRef, out: str) -> dict:
    """Write a LoRA stage's adapters (export/adapters, step/adapters.py) as a PEFT directory (io/peft.py save:
    adapter_config.json + adapter_model.safetensors; a reward model's score head as peft's SEQ_CLS modules_to_save)
    for the base the stage started from, named in base_model_name_or_path: its Hugging Face directory or Hub id, or
    for "stage:NAME" that stage's directory in the run (convert it to get the base peft loads them onto). Returns a
    description (files, rank, targets, base)."""
    tree, meta = load_adapters(ref.export_dir)
    with open(os.path.join(ref.export_dir, "model_config.json")) as f:
        config = models.ModelConfig(**json.load(f))
    section = meta["lora"]
    layers = tuple(section["layers"])
    options = lora.LoraOptions(rank=section["rank"], alpha=section["alpha"], dropout=section["dropout"],
                               targets=tuple(section["targets"]),
                               layers=None if len(layers) == config.num_layers else layers)
    path = meta["base"].get("path")
    if path is None:
        base = None
    elif path.startswith("stage:"):
        base = os.path.join(ref.workdir, path[len("stage:"):])
    else:
        base = path[len("hf:"):] if path.startswith("hf:") else path
    adapted = {"layers": {"lora": tree["lora"]}, **{k: v for k, v in tree.items() if k == "score"}}
    files = peft.save(out, config, adapted, options, base_model_name_or_path=base)
    return {"output": out, "stage": ref.name, "files": files, "rank": options.rank,
            "targets": list(options.targets), "base": base or "a random init"}
