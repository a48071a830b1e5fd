"""LoRA adapters (models/lora.py) <-> PEFT adapter directories (adapter_config.json + adapter_model.safetensors), the
format `PeftModel.from_pretrained` loads onto a Hugging Face base and `save_pretrained` writes.

Names and layout: the adapter of our projection wq in layer i is peft's
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]
(k_proj, v_proj, o_proj under self_attn; gate_proj, up_proj, down_proj under mlp), where in / out flatten our
axes row-major exactly as io/hf.py flattens the base weight (HF's q/k rows use the same rotate-half RoPE layout as
ours, so neither the base nor the adapters need a permutation): A = a[i] reshaped [in, r] and transposed,
B = b[i] reshaped [r, out] and transposed. peft's forward is W x + (alpha / r) * B A dropout(x), ours the same.

Reading validates against the base the adapters go onto (its ModelConfig): options peft has that we do not run
(DoRA, biases, per-module rank or alpha patterns, modules_to_save other than a reward model's score head, ...),
target modules that are not one of the seven projections, tensors missing, unexpected or shaped for another base
each end in one line naming the file (and tensor). Only safetensors are read; a directory with only
adapter_model.bin is refused, never unpickled.

A reward model (head "score") is peft's SEQ_CLS task: its score head trains in full beside the adapters
(modules_to_save), saved as `base_model.model.score.weight` [1, D].
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers numpy's "bfloat16" dtype for safetensors' numpy reader
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from starling_jax.errors import InputError
from starling_jax.models import ModelConfig, Params, lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED = ("adapter_model.bin", "adapter_model.pt")
_MODULE = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
           "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
_PREFIX = "base_model.model.model.layers."
_TENSOR = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight")
# adapter_config.json fields for variants we do not run: each must be absent or empty/false/null.
_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication",
                "lora_bias", "use_qalora", "target_parameters", "trainable_token_indices", "exclude_modules",
                "alora_invocation_tokens", "use_bdlora", "monteclora_config", "velora_config", "kasa_config")
TASK_TYPES = {"lm": "CAUSAL_LM", "score": "SEQ_CLS"}
# A reward model's scalar head trains in full beside the adapters: peft's SEQ_CLS task keeps it in modules_to_save
# (["classifier", "score"]) and saves it under this name, [1, D].
SCORE_TENSOR = "base_model.model.score.weight"
SEQ_CLS_MODULES = ("classifier", "score")


class PeftFormatError(InputError):
    """A PEFT adapter directory we cannot read or write: one line naming the file (and tensor) and what to do."""


def module_name(proj: str, layer: int) -> str:
    """The HF module path of our projection `proj` in layer `layer` (model.layers.{i}.self_attn.q_proj ...)."""
    return f"model.layers.{layer}.{_MODULE[proj]}"


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def save(path: str, config: ModelConfig, adapters: Params, options: lora.LoraOptions,
         base_model_name_or_path: Optional[str] = None) -> list[str]:
    """Write `adapters` ({proj: {"a", "b"}} or adapted params) made with `options` for the base `config` as a PEFT
    LoRA directory; returns the files written. Only options.layers are written (layers_to_transform); any other
    layer must be all zero, as lora.init leaves it (else nothing would carry it: an error, not a silent drop).
    A reward model (config.head "score") is written as peft's SEQ_CLS task with its score head (modules_to_save):
    pass the adapted params, which carry it."""
    score = None
    if config.head == "score":
        if "score" not in adapters:
            raise PeftFormatError(f"{path}: a reward model's PEFT directory carries its score head: pass the adapted "
                                  f"params (with 'score'), not the adapters alone")
        score = np.asarray(jax.device_get(adapters["score"]))
        if score.shape != (config.hidden_size, 1):
            raise PeftFormatError(f"{path}: params['score'] has shape {list(score.shape)}, expected "
                                  f"{[config.hidden_size, 1]}")
    if "layers" in adapters:
        adapters = lora.adapters_of(adapters)
    projs = lora.validate(config, options)
    expected = lora.specs(config, options)
    if set(adapters) != set(projs):
        raise PeftFormatError(f"{path}: the adapters target {sorted(adapters)} but the options name {list(projs)}")
    layers = lora.layer_mask(config, options)
    tensors = {}
    for p in projs:
        a, b = (np.asarray(jax.device_get(adapters[p][k])) for k in ("a", "b"))
        if a.shape != expected[p]["a"].shape or b.shape != expected[p]["b"].shape:
            raise PeftFormatError(f"{path}: adapter {p} has shapes a {list(a.shape)}, b {list(b.shape)}; options and "
                                  f"config give {list(expected[p]['a'].shape)}, {list(expected[p]['b'].shape)}")
        if (a[~layers].any() or b[~layers].any()):
            raise PeftFormatError(f"{path}: adapter {p} is nonzero in layers {np.flatnonzero(~layers).tolist()}, "
                                  f"which lora.layers leaves out; fix the options (layers) before exporting")
        r = a.shape[-1]
        for i in np.flatnonzero(layers):
            name = module_name(p, int(i))
            tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    if score is not None:
        tensors[SCORE_TENSOR] = np.ascontiguousarray(score.T)
    hf_config = {
        "peft_type": "LORA", "task_type": TASK_TYPES[config.head], "base_model_name_or_path": base_model_name_or_path,
        "r": options.rank, "lora_alpha": options.alpha, "lora_dropout": options.dropout,
        "target_modules": [lora.HF_NAMES[p] for p in projs],
        "layers_to_transform": None if options.layers is None else sorted(int(i) for i in options.layers),
        "use_rslora": options.rslora, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None if score is None else list(SEQ_CLS_MODULES),
        "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    return [CONFIG_FILE, WEIGHTS_FILE]


# ----------------------------------------------------------------------------------------------------------------------
# Reading


def _read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise PeftFormatError(f"{path}: not a directory (expected a PEFT adapter directory with {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE})")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise PeftFormatError(f"{path}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftFormatError(f"{file}: invalid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise PeftFormatError(f"{file}: expected a JSON object of adapter settings")
    return cfg


def _targets(cfg: dict, config: ModelConfig, file: str) -> dict[str, np.ndarray]:
    """{proj: [L] bool, the layers peft puts an adapter on}, by peft's own matching rules."""
    targets = cfg.get("target_modules")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and (not isinstance(layers, list) or not all(
            isinstance(i, int) and 0 <= i < config.num_layers for i in layers)):
        raise PeftFormatError(f"{file}: layers_to_transform={layers!r} is not a list of layer indices in [0, "
                              f"{config.num_layers}) of this base (made for another base?)")
    if cfg.get("layers_pattern") not in (None, "layers", ["layers"]):
        raise PeftFormatError(f"{file}: layers_pattern={cfg['layers_pattern']!r} is not this base's 'layers'")
    in_layers = np.zeros(config.num_layers, bool)
    in_layers[list(range(config.num_layers)) if layers is None else layers] = True
    names = {(p, i): module_name(p, i) for p in lora.projections(lora.LoraOptions()) for i in range(config.num_layers)}
    if targets == "all-linear" or targets == ["all-linear"]:
        hit = {key: True for key in names}
    elif isinstance(targets, str):
        hit = {key: re.fullmatch(targets, n) is not None for key, n in names.items()}
        if not any(hit.values()):
            raise PeftFormatError(f"{file}: target_modules={targets!r} matches none of this base's projections "
                                  f"({', '.join(lora.HF_NAMES.values())})")
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        def matches(t, n):
            return n == t or n.endswith("." + t)
        for t in targets:
            if not any(matches(t, n) for n in names.values()):
                raise PeftFormatError(f"{file}: target module {t!r} is not one of this base's projections "
                                      f"({', '.join(lora.HF_NAMES.values())}); adapters on other modules (embeddings, "
                                      f"lm_head, another architecture's names) are not supported")
        hit = {key: any(matches(t, n) for t in targets) for key, n in names.items()}
    else:
        raise PeftFormatError(f"{file}: target_modules={targets!r} must be a list of module names, a regex or "
                              f"'all-linear'")
    out = {}
    for (p, i), h in hit.items():
        if h and in_layers[i]:
            out.setdefault(p, np.zeros(config.num_layers, bool))[i] = True
    return out


def load(path: str, config: ModelConfig) -> tuple[lora.LoraOptions, Params]:
    """Read a PEFT LoRA directory for the base `config` (the converted base's ModelConfig): (options, adapters
    {proj: {"a", "b"}} in config.param_dtype; layers peft leaves alone hold zeros). Attach them with
    lora.attach(base, adapters) and run them with lora.configure(config, options); `apply` does both (and takes a
    reward model's score head from the directory)."""
    options, adapters, _ = _read(path, config)
    return options, adapters


def apply(path: str, config: ModelConfig, base: Params) -> tuple[ModelConfig, Params, lora.LoraOptions]:
    """The PEFT directory's adapters on `base`: (the configured model config, adapted params, options). A reward
    model's directory (SEQ_CLS) that carries its score head replaces the base's."""
    options, adapters, score = _read(path, config)
    params = lora.attach(base, adapters)
    if score is not None:
        params["score"] = score
    return lora.configure(config, options), params, options


def _read(path: str, config: ModelConfig) -> tuple[lora.LoraOptions, Params, Optional[jax.Array]]:
    cfg = _read_config(path)
    file = os.path.join(path, CONFIG_FILE)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PeftFormatError(f"{file}: peft_type={cfg.get('peft_type')!r}; only LORA adapters are supported")
    task = cfg.get("task_type")
    if task not in (None, TASK_TYPES[config.head]):
        raise PeftFormatError(f"{file}: task_type={task!r} does not fit this base (head {config.head!r}: "
                              f"{TASK_TYPES[config.head]}); a causal LM's adapters do not go onto a reward model or "
                              f"back")
    seq_cls = config.head == "score"
    if seq_cls and cfg.get("modules_to_save") and not set(cfg["modules_to_save"]) <= set(SEQ_CLS_MODULES):
        raise PeftFormatError(f"{file}: modules_to_save={cfg['modules_to_save']!r}: only the score head "
                              f"({', '.join(SEQ_CLS_MODULES)}) can be trained in full beside the adapters")
    for key in _UNSUPPORTED:
        if seq_cls and key == "modules_to_save":
            continue
        if cfg.get(key):
            raise PeftFormatError(f"{file}: {key}={cfg[key]!r} is a peft variant starling_jax does not run; only "
                                  f"plain LoRA (with optional rsLoRA) is supported")
    if cfg.get("bias", "none") != "none":
        raise PeftFormatError(f"{file}: bias={cfg['bias']!r}: adapters with bias terms are not supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise PeftFormatError(f"{file}: r={r!r} must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise PeftFormatError(f"{file}: lora_alpha={alpha!r} must be a finite number > 0")
    dropout = cfg.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise PeftFormatError(f"{file}: lora_dropout={dropout!r} must be in [0, 1)")
    chosen = _targets(cfg, config, file)
    if not chosen:
        raise PeftFormatError(f"{file}: target_modules and layers_to_transform select no projection of this base")
    projs = tuple(p for p in lora.projections(lora.LoraOptions()) if p in chosen)
    union = np.any(np.stack(list(chosen.values())), axis=0)
    options = lora.LoraOptions(
        rank=r, alpha=float(alpha), dropout=float(dropout), targets=tuple(lora.HF_NAMES[p] for p in projs),
        layers=None if union.all() else tuple(int(i) for i in np.flatnonzero(union)),
        rslora=bool(cfg.get("use_rslora", False)))
    try:
        specs = lora.specs(config, options)
    except lora.LoraError as e:
        raise PeftFormatError(f"{file}: {e} (made for another base?)") from None

    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        pickled = [n for n in PICKLED if os.path.isfile(os.path.join(path, n))]
        if pickled:
            raise PeftFormatError(f"{path}: only a pickled {pickled[0]}; starling_jax never unpickles (a pickle can run "
                                  f"arbitrary code): re-save it with peft's save_pretrained(safe_serialization=True)")
        raise PeftFormatError(f"{path}: no {WEIGHTS_FILE}")
    try:
        with safe_open(weights, framework="numpy") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise PeftFormatError(f"{weights}: corrupt or truncated safetensors file ({e}); re-save the adapter") from None
    want = {}  # tensor name -> (proj, layer, "A"/"B", shape)
    for p in projs:
        a_shape, b_shape = specs[p]["a"].shape[1:], specs[p]["b"].shape[1:]
        for i in np.flatnonzero(chosen[p]):
            base = f"base_model.model.{module_name(p, int(i))}"
            want[f"{base}.lora_A.weight"] = (p, int(i), "a", (r, math.prod(a_shape[:-1])))
            want[f"{base}.lora_B.weight"] = (p, int(i), "b", (math.prod(b_shape[1:]), r))
    score = stored.pop(SCORE_TENSOR, None) if seq_cls else None
    if score is not None and tuple(score.shape) != (1, config.hidden_size):
        raise PeftFormatError(f"{weights}: tensor {SCORE_TENSOR} has shape {list(score.shape)}, expected "
                              f"{[1, config.hidden_size]} for this base (made for another base?)")
    for name, x in stored.items():
        if name not in want:
            m = _TENSOR.fullmatch(name)
            why = ("its module is not targeted by adapter_config.json" if m and m.group(3) in lora.HF_NAMES.values()
                   and int(m.group(1)) < config.num_layers else "not a LoRA tensor of this base (made for another "
                   "base or model class?)")
            raise PeftFormatError(f"{weights}: unexpected tensor {name}: {why}")
        if tuple(x.shape) != want[name][3]:
            raise PeftFormatError(f"{weights}: tensor {name} has shape {list(x.shape)}, expected {list(want[name][3])} "
                                  f"for this base and r={r} (made for another base?)")
    missing = [n for n in want if n not in stored]
    if missing:
        raise PeftFormatError(f"{weights}: missing tensor {missing[0]} ({len(missing)} missing in all) that "
                              f"adapter_config.json's target_modules / layers_to_transform call for")
    dtype = np.dtype(config.param_dtype)
    arrays = {p: {k: np.zeros(specs[p][k].shape, dtype) for k in ("a", "b")} for p in projs}
    for name, (p, i, k, _) in want.items():
        x = stored[name].astype(np.float32)
        arrays[p][k][i] = (x.T.reshape(specs[p]["a"].shape[1:]) if k == "a"
                           else x.T.reshape(specs[p]["b"].shape[1:])).astype(dtype)
    if score is not None:
        score = jnp.asarray(score.astype(np.float32).T.astype(dtype))
    return options, jax.tree.map(jnp.asarray, arrays), score
