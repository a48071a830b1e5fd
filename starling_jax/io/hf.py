"""Hugging Face safetensors directories <-> (ModelConfig, params), in both directions.

Supported classes: MistralForCausalLM, LlamaForCausalLM and Mistral/LlamaForSequenceClassification with num_labels=1
(score.weight becomes params["score"], config.head = "score"). config.json may be transformers 4 style (rope_theta)
or 5 style (rope_parameters). Weights come from model.safetensors or model-0000i-of-0000n.safetensors plus
model.safetensors.index.json; pickled checkpoints (.bin/.pt) are refused, never unpickled. A directory that carries
digests.json (one `starling-jax convert` wrote) is checked against it before anything is read (starling_jax.digests):
a file damaged since is an HFFormatError naming it.

Loading reads one tensor at a time through safetensors' memory map, and each device's shard straight from the file
(`jax.make_array_from_callback` reads only the slice a device needs), so host memory stays near one tensor. With
`quantize` the layers' matrices are quantized on the host as they are read, one layer at a time, and only their codes
and scales are placed (load's docstring).

Layout: HF stores each Linear as [out, in]; we store [in, ...] with heads split out (wq [L, D, H, E], wo [L, H, E, D]),
and layers stacked on a leading axis. `_LAYOUT` records, per parameter, which of our axes each HF dimension flattens
(row-major), which is all that is needed to go either way and to read any rectangular slice.

Why this file is long (~520 lines): loading and saving read one name-and-layout table (_LAYOUT, _entries), so both
directions stay beside it, and loading checks the directory, each tensor and the digests before it reads a byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from typing import Any, Optional

import jax
import ml_dtypes  # noqa: F401  registers numpy's "bfloat16" dtype, so safetensors' numpy framework can read BF16
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from starling_jax import digests, models
from starling_jax.config import MeshConfig
from starling_jax.errors import InputError
from starling_jax.io import hub
from starling_jax.models import ModelConfig, Params
from starling_jax.models import quantize as quantization
from starling_jax.parallel import sharding


ARCHITECTURES = {  # HF class name -> (our architecture, our head)
    "MistralForCausalLM": ("mistral", "lm"),
    "LlamaForCausalLM": ("llama", "lm"),
    "MistralForSequenceClassification": ("mistral", "score"),
    "LlamaForSequenceClassification": ("llama", "score"),
}
HF_CLASS = {v: k for k, v in ARCHITECTURES.items()}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # HF's "5GB"

# (our path, HF name with {i} for the layer, HF dims -> our per-layer axes). Per-layer axes exclude the layer axis.
_LAYOUT = (
    (("embed",), "model.embed_tokens.weight", ((0,), (1,))),
    (("layers", "attn_norm"), "model.layers.{i}.input_layernorm.weight", ((0,),)),
    (("layers", "wq"), "model.layers.{i}.self_attn.q_proj.weight", ((1, 2), (0,))),
    (("layers", "wk"), "model.layers.{i}.self_attn.k_proj.weight", ((1, 2), (0,))),
    (("layers", "wv"), "model.layers.{i}.self_attn.v_proj.weight", ((1, 2), (0,))),
    (("layers", "wo"), "model.layers.{i}.self_attn.o_proj.weight", ((2,), (0, 1))),
    (("layers", "mlp_norm"), "model.layers.{i}.post_attention_layernorm.weight", ((0,),)),
    (("layers", "w_gate"), "model.layers.{i}.mlp.gate_proj.weight", ((1,), (0,))),
    (("layers", "w_up"), "model.layers.{i}.mlp.up_proj.weight", ((1,), (0,))),
    (("layers", "w_down"), "model.layers.{i}.mlp.down_proj.weight", ((1,), (0,))),
    (("final_norm",), "model.norm.weight", ((0,),)),
    (("lm_head",), "lm_head.weight", ((1,), (0,))),
    (("score",), "score.weight", ((1,), (0,))),
)
# Buffers some older checkpoints carry that hold nothing we need (RoPE is recomputed from theta).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class HFFormatError(InputError):
    """A Hugging Face directory we cannot read: the message says what is wrong, where, and what to do."""


# ----------------------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from a parsed HF config.json (transformers 4 or 5 style)."""
    archs = hf.get("architectures") or []
    by_type = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}
    arch = archs[0] if archs else by_type.get(hf.get("model_type"))
    if arch not in ARCHITECTURES:
        raise HFFormatError(f"{where}: unsupported architecture {arch!r} (architectures={archs}, model_type="
                            f"{hf.get('model_type')!r}); supported: {', '.join(ARCHITECTURES)}")
    family, head = ARCHITECTURES[arch]

    def get(key, default=None):
        v = hf.get(key, default)
        return default if v is None else v

    problems = []
    if get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu' is supported)")
    for key in ("attention_bias", "mlp_bias"):
        if get(key, False):
            problems.append(f"{key}=true (bias terms are not supported)")
    # transformers 5 keeps theta and any scaling in rope_parameters; 4 uses top-level rope_theta and rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (only plain RoPE is supported)")
    if head == "score":
        n_labels = len(hf["id2label"]) if hf.get("id2label") else get("num_labels", 2)  # 2 is HF's default
        if n_labels != 1:
            problems.append(f"{arch} with {n_labels} labels (a reward model needs num_labels=1)")
    if problems:
        raise HFFormatError(f"{where}: unsupported config: " + "; ".join(problems))

    eos = get("eos_token_id", 2)
    n_heads = hf["num_attention_heads"]
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=n_heads, num_kv_heads=get("num_key_value_heads", n_heads),
            head_dim=get("head_dim", hf["hidden_size"] // n_heads), mlp_dim=hf["intermediate_size"],
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))),
            sliding_window=get("sliding_window") if family == "mistral" else None,
            max_seq_len=get("max_position_embeddings", 4096), tie_embeddings=bool(get("tie_word_embeddings", False)),
            architecture=family, head=head, pad_token_id=hf.get("pad_token_id"),
            bos_token_id=get("bos_token_id", 1), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )
    except KeyError as e:
        raise HFFormatError(f"{where}: missing required field {e.args[0]!r}") from None


def config_to_hf(config: ModelConfig) -> dict:
    """A transformers-5-style config.json dict that from_pretrained loads as the matching *ForCausalLM or
    *ForSequenceClassification class. rope_theta is also written at the top level for transformers 4 readers."""
    c = config
    if c.architecture == "llama" and c.sliding_window is not None:
        raise HFFormatError(f"cannot save a llama-architecture model with sliding_window={c.sliding_window}: HF Llama "
                            f"has no sliding window; use architecture='mistral'")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token = getattr(c, name)
        if token is not None and not 0 <= token < c.vocab_size:
            raise HFFormatError(f"cannot save: config.{name}={token} is outside the vocabulary [0, {c.vocab_size}) "
                                f"(transformers would refuse it); set it with config.replace({name}=...)")
    hf = {
        "architectures": [HF_CLASS[(c.architecture, c.head)]], "model_type": c.architecture,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.rms_norm_eps, "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
        "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id, "dtype": c.param_dtype,
        "attention_dropout": 0.0, "initializer_range": c.init_std, "use_cache": True,
    }
    if c.architecture == "mistral":
        hf["sliding_window"] = c.sliding_window
    else:
        hf.update(attention_bias=False, mlp_bias=False)
    if c.head == "score":
        hf.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return hf


# ----------------------------------------------------------------------------------------------------------------------
# Name and layout mapping


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: tuple[str, ...]  # our key path
    hf_name: str  # with {i} for stacked layers
    groups: tuple[tuple[int, ...], ...]  # HF dim d flattens our per-layer axes groups[d] (row-major)
    shape: tuple[int, ...]  # our full shape (with the layer axis for stacked entries)
    stacked: bool

    @property
    def layer_shape(self):
        return self.shape[1:] if self.stacked else self.shape

    @property
    def hf_shape(self):
        return tuple(math.prod(self.layer_shape[a] for a in g) for g in self.groups)

    def names(self):
        n = self.shape[0] if self.stacked else 1
        return [self.hf_name.format(i=i) for i in range(n)]


def _entries(config: ModelConfig) -> list[_Entry]:
    """The tensors `config` has, in HF order, with our shapes from models.param_specs."""
    specs = models.param_specs(config)
    out = []
    for path, name, groups in _LAYOUT:
        node = specs
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            out.append(_Entry(path, name, groups, tuple(node.shape), path[0] == "layers"))
    return out


def _to_hf(x: np.ndarray, groups) -> np.ndarray:
    """One layer's array in our layout -> the HF tensor."""
    flat = [a for g in groups for a in g]
    return x.transpose(flat).reshape([math.prod(x.shape[a] for a in g) for g in groups])


def _read_block(tensor_slice, groups, layer_shape, index) -> np.ndarray:
    """Our per-layer array's block `index` (one slice per our axis), reading only the HF rows/columns it covers.

    An HF dim that flattens axes (a0, a1, ...) is read over whole trailing sub-blocks: the range [start(a0) * stride,
    stop(a0) * stride); the trailing axes are then sliced locally (a no-op unless a mesh splits e.g. head_dim).
    """
    hf_ranges, block_shape, local = [], [], []
    for g in groups:
        stride = math.prod(layer_shape[a] for a in g[1:])
        s0 = index[g[0]]
        hf_ranges.append(slice(s0.start * stride, s0.stop * stride))
        block_shape += [s0.stop - s0.start] + [layer_shape[a] for a in g[1:]]
        local += [slice(None)] + [index[a] for a in g[1:]]
    block = tensor_slice[tuple(hf_ranges)].reshape(block_shape)[tuple(local)]
    flat = [a for g in groups for a in g]
    return block.transpose(np.argsort(flat))


def _normalize(index, shape) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def _safe_open(file: str):
    """safe_open, with a damaged file (truncated, bad header) reported as an HFFormatError naming it."""
    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as e:
        raise HFFormatError(f"{file}: corrupt or truncated safetensors file ({e}); re-download or re-convert "
                            f"it") from None


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFFormatError(f"{path}: invalid JSON: {e}") from None


def verify_digests(path: str) -> None:
    """Check a directory's files against its digests.json, if it has one (a directory from the Hub or transformers
    has none, and is read as it is)."""
    if not os.path.isdir(path):
        return
    try:
        digests.verify(path)
    except digests.DigestMismatch as e:
        raise HFFormatError(f"{e}; re-convert or re-copy the directory (if you edited the file on purpose, delete "
                            f"{os.path.join(path, digests.MANIFEST)})") from None


def _check_directory(path: str) -> tuple[dict, dict[str, str]]:
    """(parsed config.json, {tensor name: safetensors file}) or a clear error."""
    if not os.path.isdir(path):
        raise HFFormatError(f"{path}: not a directory (expected a local Hugging Face model directory with config.json "
                            f"and *.safetensors)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise HFFormatError(f"{path}: no config.json")
    hf_cfg = _read_json(cfg_path)
    if not isinstance(hf_cfg, dict):
        raise HFFormatError(f"{cfg_path}: expected a JSON object of config fields")
    index_path, single = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
    if os.path.isfile(index_path):
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFFormatError(f"{index_path}: no 'weight_map' of tensor name -> file")
        for file in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, file)):
                raise HFFormatError(f"{index_path}: lists shard {file!r}, which is not in {path}")
        return hf_cfg, {k: os.path.join(path, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        with _safe_open(single) as f:
            return hf_cfg, {k: single for k in f.keys()}
    pickled = sorted(n for n in os.listdir(path) if n.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise HFFormatError(
            f"{path}: only pickled checkpoints ({', '.join(pickled)}); starling_jax never unpickles (a pickle can run "
            f"arbitrary code). Convert once to safetensors in an environment you trust, e.g.\n"
            f"  python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained('{path}')"
            f".save_pretrained('{path}-safetensors')\"\n"
            f"(use AutoModelForSequenceClassification for a reward model) and load '{path}-safetensors'.")
    raise HFFormatError(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}")


def _check_tensors(entries: list[_Entry], config: ModelConfig, shapes: dict[str, tuple], path: str) -> None:
    """Every expected tensor present with its shape, nothing unexpected: else one error naming them all."""
    expected = {}
    for e in entries:
        for n in e.names():
            expected[n] = e.hf_shape
    ignorable = {"lm_head.weight"} if config.tie_embeddings else set()  # some tied checkpoints still store it
    missing = [n for n in expected if n not in shapes]
    unexpected = [n for n in shapes if n not in expected and n not in ignorable and not _IGNORED.fullmatch(n)]
    misshaped = [n for n in expected if n in shapes and tuple(shapes[n]) != expected[n]]
    problems = []
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        if n in misshaped and shapes[n][1:] == expected[n][1:]:
            problems.append(f"vocab mismatch: config.json has vocab_size={config.vocab_size} but {n} has "
                            f"{shapes[n][0]} rows")
    problems += [f"tensor {n} has shape {list(shapes[n])}, expected {list(expected[n])} from config.json"
                 for n in misshaped]
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:8])}"
                        f"{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:8])}"
                        f"{' ...' if len(unexpected) > 8 else ''} (is config.json's architecture right?)")
    if problems:
        hf_class = HF_CLASS[(config.architecture, config.head)]
        raise HFFormatError(f"{path}: checkpoint does not match config.json ({hf_class}): " + "; ".join(problems))


def load(path: str, dtype: Optional[str] = None, mesh: Optional[jax.sharding.Mesh] = None, rules=None,
         quantize: str = "none", quantize_block: int = 64) -> tuple[ModelConfig, Params]:
    """Load a local HF safetensors directory as (ModelConfig, params).

    dtype: parameter storage dtype ("float32" | "bfloat16" | "float16"); None keeps the checkpoint's (config.json's
    dtype/torch_dtype, else the embedding's). The compute dtype (config.dtype) is float32 for float32 parameters and
    bfloat16 otherwise; change it with config.replace(dtype=...).
    mesh, rules: place each parameter straight into its shards, per starling_jax.parallel.sharding.param_shardings(
    models.param_specs(config), mesh, rules) (rules default to MeshConfig().rules; pass the experiment's
    mesh.rules); without a mesh everything goes to the default device.
    quantize, quantize_block: "int8" or "nf4" stores the layers' matrices (models.quantize.MATRICES) quantized while
    they are read, for a model whose layers never train (a QLoRA base, a frozen reward model): each layer is read
    dense on the host in `dtype`, quantized there (_quantize_layer) and only its codes and scales are placed, in the
    shards of models.quantized_specs. No device ever holds a dense matrix stack, and the host holds one dense layer
    plus the codes of one matrix stack waiting to be placed (each process quantizes whole layers, as the scales span
    the input axes, and places its own devices' shards). The arrays equal models.quantized_base of the dense load,
    bit for bit; the returned config says how they are stored (config.quantize). "none": everything dense.
    """

    path = hub.resolve(path)  # "hf:ORG/NAME[@REV]" -> its local snapshot
    verify_digests(path)
    hf_cfg, files = _check_directory(path)
    config = config_from_hf(hf_cfg, where=os.path.join(path, "config.json"))
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(_safe_open(f)) for f in sorted(set(files.values()))}
        names_in = {f: set(h.keys()) for f, h in handles.items()}
        slices = {}
        for name, file in files.items():
            if name not in names_in[file]:
                raise HFFormatError(f"{path}: {INDEX_FILE} puts {name} in {os.path.basename(file)}, which lacks it")
            slices[name] = handles[file].get_slice(name)
        stored = slices["model.embed_tokens.weight"].get_dtype() if "model.embed_tokens.weight" in slices else "F32"
        param_dtype = dtype or hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or SAFETENSORS_DTYPES.get(stored)
        if param_dtype not in ("float32", "bfloat16", "float16"):
            raise HFFormatError(f"{path}: cannot store parameters as {param_dtype!r} (stored dtype {stored}); pass "
                                f"dtype='float32' or 'bfloat16'")
        config = config.replace(param_dtype=param_dtype, dtype="float32" if param_dtype == "float32" else "bfloat16")
        try:
            config = config.replace(quantize=quantize, quantize_block=quantize_block)
        except ValueError as e:  # a scheme this checkpoint's widths cannot take: ModelConfig says why and what to do
            raise HFFormatError(f"{path}: cannot store its layers quantized: "
                                f"{str(e).removeprefix('invalid ModelConfig: ')}") from None
        entries = _entries(config)
        _check_tensors(entries, config, {n: tuple(s.get_shape()) for n, s in slices.items()}, path)
        shardings = _shardings(config, mesh, rules)
        params: Params = {}
        for e in entries:
            sharding = shardings[e.path[0]] if len(e.path) == 1 else shardings[e.path[0]][e.path[1]]
            if e.stacked and e.path[-1] in quantization.INPUT_AXES and config.quantize != "none":
                array = _load_quantized(e, slices, np.dtype(param_dtype), sharding, config)
            else:
                array = _load_entry(e, slices, np.dtype(param_dtype), sharding)
            node = params
            for k in e.path[:-1]:
                node = node.setdefault(k, {})
            node[e.path[-1]] = array
    return config, params


def _shardings(config: ModelConfig, mesh, rules) -> Params:
    specs = models.quantized_specs(models.param_specs(config), config)  # param_specs unless config.quantize
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, specs, is_leaf=models.transformer.is_spec)

    return sharding.param_shardings(specs, mesh, MeshConfig().rules if rules is None else rules)


def _load_entry(e: _Entry, slices, dtype: np.dtype, sharding) -> jax.Array:
    """One parameter, each device's block read from the file(s) on demand (identical blocks are read once)."""
    blocks: dict[tuple, np.ndarray] = {}

    def read(index) -> np.ndarray:
        index = _normalize(index, e.shape)
        key = tuple((s.start, s.stop) for s in index)
        if key not in blocks:
            if e.stacked:
                out = np.empty([s.stop - s.start for s in index], dtype)
                for j, i in enumerate(range(index[0].start, index[0].stop)):
                    out[j] = _read_block(slices[e.hf_name.format(i=i)], e.groups, e.layer_shape, index[1:])
            else:
                out = _read_block(slices[e.hf_name], e.groups, e.layer_shape, index).astype(dtype, copy=False)
            blocks[key] = out
        return blocks[key]

    return jax.make_array_from_callback(e.shape, sharding, read)


def _load_quantized(e: _Entry, slices, dtype: np.dtype, shardings: dict, config: ModelConfig) -> dict:
    """A stacked layer matrix stored as config.quantize says: each layer read whole (the scales span its input axes)
    in `dtype`, quantized on the host into the stacked codes and scales, which are then placed shard by shard."""
    name, scheme, block = e.path[-1], config.quantize, config.quantize_block
    stored = quantization.storage_shapes(name, e.shape, scheme, block)
    host = {k: np.empty(shape, dt) for k, (shape, dt, _) in stored.items()}
    whole = tuple(slice(0, n) for n in e.layer_shape)
    for i in range(e.shape[0]):
        layer = _read_block(slices[e.hf_name.format(i=i)], e.groups, e.layer_shape, whole).astype(dtype, copy=False)
        for k, v in _quantize_layer(layer, name, scheme, block).items():
            host[k][i] = v
        del layer
    return {k: jax.make_array_from_callback(a.shape, shardings[k], lambda index, a=a: a[index])
            for k, a in host.items()}


def _quantize_layer(layer: np.ndarray, name: str, scheme: str, block: int) -> dict[str, np.ndarray]:
    """One layer's matrix -> its stored arrays as numpy: models.quantize.quantize itself (the function quantized_base
    applies), compiled for and run on the host's CPU device (the first local device when JAX has no CPU backend)."""
    try:
        device = jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        device = jax.local_devices()[0]
    out = quantization.quantize(jax.device_put(layer, device), name, scheme, block)
    return {k: np.asarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Saving


def save(path: str, config: ModelConfig, params: Params, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write config.json and safetensors (several files + model.safetensors.index.json when the tensors exceed
    max_shard_bytes, like HF) that transformers' from_pretrained loads with the same logits. Tensors keep the params'
    dtype. Returns the files written. Host memory: one parameter plus one shard's tensors at a time."""
    entries = _entries(config)
    arrays = _check_params(entries, config, params)
    os.makedirs(path, exist_ok=True)
    hf_config = config_to_hf(config)
    hf_config["dtype"] = str(np.dtype(jax.tree.leaves(params)[0].dtype))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)

    # Plan shards from the shapes alone (their count is in every file name), then gather one parameter at a time.
    shards: list[list[tuple[_Entry, int, str]]] = [[]]
    size, total = 0, 0
    for e in entries:
        itemsize = np.dtype(arrays[e.path].dtype).itemsize
        for i, n in enumerate(e.names()):
            nbytes = math.prod(e.hf_shape) * itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((e, i, n))
            size += nbytes
            total += nbytes
    files = ([SINGLE_FILE] if len(shards) == 1
             else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    host: dict[tuple, np.ndarray] = {}
    for file, shard in zip(files, shards):
        tensors = {}
        for e, i, n in shard:
            if e.path not in host:
                host = {e.path: np.asarray(jax.device_get(arrays[e.path]))}  # drop the previous parameter
            x = host[e.path]
            tensors[n] = np.ascontiguousarray(_to_hf(x[i] if e.stacked else x, e.groups))
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    written = ["config.json", *files]
    if len(files) > 1:
        weight_map = {n: file for file, shard in zip(files, shards) for _, _, n in shard}
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        written.append(INDEX_FILE)
    # Remove weights of an earlier save into the same directory, which would otherwise shadow or mix with these.
    for stale in os.listdir(path):
        if stale not in written and re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", stale):
            os.remove(os.path.join(path, stale))
    return written


def _check_params(entries: list[_Entry], config: ModelConfig, params: Params) -> dict[tuple, Any]:
    """{our path: array} with every shape checked against the config; a clear error otherwise."""
    out, problems = {}, []
    for e in entries:
        node = params
        for k in e.path:
            node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            problems.append(f"missing params[{']['.join(map(repr, e.path))}]")
        elif tuple(node.shape) != e.shape:
            problems.append(f"params[{']['.join(map(repr, e.path))}] has shape {list(node.shape)}, expected "
                            f"{list(e.shape)} from the config")
        else:
            out[e.path] = node
    known = {e.path for e in entries}
    for key, _ in jax.tree.flatten_with_path(params)[0]:
        p = tuple(getattr(k, "key", k) for k in key)
        if p not in known:
            problems.append(f"unexpected params[{']['.join(map(repr, p))}] (config.head={config.head!r}, "
                            f"tie_embeddings={config.tie_embeddings})")
    if problems:
        raise HFFormatError("save: params do not match the config: " + "; ".join(problems))
    return out
