"""GGUF (llama.cpp) -> a Hugging Face directory: config.json, model.safetensors, tokenizer.json,
tokenizer_config.json (with the file's chat template) and generation_config.json.

    starling-jax convert model.gguf OUT [--dtype float32|bfloat16|float16]

Supported: the llama architecture family as llama.cpp writes it (general.architecture "llama": Llama 1/2/3, Mistral,
SmolLM/SmolLM2, ...), with tokenizers of model "gpt2" (byte-level BPE with merges) or "llama" (SentencePiece BPE with
scores). Tensors are dequantized with the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K and whatever
else it supports) one at a time. llama.cpp stores the rows of attn_q / attn_k permuted (its RoPE pairs adjacent
dimensions, HF's pairs the two halves): that permutation is undone here, so the result loads in transformers and in
`starling_jax.io.hf` with the same logits as transformers' own GGUF loader.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import numpy as np

from starling_jax.errors import InputError
from starling_jax.io import hf
from starling_jax.models import ModelConfig

SUPPORTED_ARCHITECTURES = ("llama",)
_TOKEN_CONTROL = 3  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
_TOKEN_USER_DEFINED = 4
_TOKEN_BYTE = 6

# (GGUF name with {i}, HF name with {i})
_TENSORS = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)
# Pre-tokenizer split patterns of llama.cpp's `tokenizer.ggml.pre` names (the regexes of the original HF tokenizers).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre name -> (split digits one by one first, split regex)
_PRE_TOKENIZERS = {
    "default": (False, _GPT2_SPLIT), "gpt-2": (False, _GPT2_SPLIT), "gpt2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT), "starcoder": (True, _GPT2_SPLIT), "refact": (True, _GPT2_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT), "llama-v3": (False, _LLAMA3_SPLIT), "llama-bpe": (False, _LLAMA3_SPLIT),
    "smaug-bpe": (False, _LLAMA3_SPLIT), "qwen2": (False, _QWEN2_SPLIT),
}


class GGUFError(InputError):
    """A GGUF file we cannot convert: the message says what and why."""


def is_gguf(path: str) -> bool:
    """True when `path` is a file starting with the GGUF magic."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _reader(path: str):
    try:
        import gguf
    except ImportError:
        raise GGUFError("reading GGUF needs the `gguf` package: pip install gguf") from None
    if not is_gguf(path):
        raise GGUFError(f"{path}: not a GGUF file (no GGUF magic)")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on truncated or corrupt files
        raise GGUFError(f"{path}: cannot read GGUF: {type(e).__name__}: {e}") from None


def read_metadata(reader) -> dict[str, Any]:
    """{key: value} of a GGUFReader's metadata (strings decoded, arrays as lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


# ----------------------------------------------------------------------------------------------------------------------
# config


def hf_config(meta: dict, tensor_names: set[str], where: str) -> dict:
    """A transformers config.json (LlamaForCausalLM) from llama.cpp metadata."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{where}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
                        f": Llama, Mistral, SmolLM and other files llama.cpp writes as 'llama')")

    def get(key, default=None, required=True):
        v = meta.get(f"{arch}.{key}", default)
        if v is None and required:
            raise GGUFError(f"{where}: missing metadata {arch}.{key}")
        return v

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // n_heads))
    rope_dim = get("rope.dimension_count", head_dim)
    if int(rope_dim) != head_dim:
        raise GGUFError(f"{where}: partial RoPE (rope.dimension_count={rope_dim}, head dim {head_dim}) is not supported")
    if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise GGUFError(f"{where}: rope scaling {meta[f'{arch}.rope.scaling.type']!r} is not supported")
    if f"{arch}.expert_count" in meta and int(meta[f"{arch}.expert_count"]) > 0:
        raise GGUFError(f"{where}: mixture-of-experts models are not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(get("vocab_size", len(tokens) if tokens else None))
    tied = "output.weight" not in tensor_names
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")), "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads, "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": int(get("context_length", 4096)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)), "tie_word_embeddings": tied,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "use_cache": True,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    cfg["rope_parameters"] = {"rope_theta": cfg["rope_theta"], "rope_type": "default"}
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# tensors


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time row permutation of q_proj / k_proj ([heads * head_dim, in]).

    llama.cpp reorders each head's rows from HF's rotate-half layout (first half, second half) to interleaved pairs
    (row 2j = HF row j, row 2j+1 = HF row j + head_dim/2); this puts them back.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (the inverse of unpermute_qk), used by tests that write GGUF files."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in HF's [out, in] layout (GGUF lists dims innermost first)."""
    from gguf import GGMLQuantizationType, quants

    shape = tuple(int(d) for d in reversed(tensor.shape))
    qtype = GGMLQuantizationType(tensor.tensor_type)
    try:
        data = quants.dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise GGUFError(f"tensor {tensor.name}: quantization {qtype.name} is not supported by the gguf package "
                        f"installed here") from None
    return np.asarray(data, np.float32).reshape(shape)


def _tensor_plan(reader, cfg: dict, where: str) -> list[tuple[str, Any]]:
    """[(HF name, GGUF tensor)] in HF order; a clear error on missing or unknown tensors."""
    by_name = {t.name: t for t in reader.tensors}
    plan, missing = [], []
    for gg, name in _TENSORS:
        layers = range(cfg["num_hidden_layers"]) if "{i}" in gg else [None]
        for i in layers:
            g = gg.format(i=i)
            if g in by_name:
                plan.append((name.format(i=i), by_name.pop(g)))
            elif not (g == "output.weight" and cfg["tie_word_embeddings"]):
                missing.append(g)
    by_name.pop("rope_freqs.weight", None)  # llama3 rope-scaling factors: refused above via the metadata
    if missing:
        raise GGUFError(f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if by_name:
        raise GGUFError(f"{where}: tensors this converter does not know (not a plain llama-family model?): "
                        f"{sorted(by_name)[:5]}")
    return plan


# ----------------------------------------------------------------------------------------------------------------------
# tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece-BPE vocabulary: every split of a token into two vocabulary pieces,
    ordered by the merged token's score (higher first), then by the pieces' ids (HF's slow->fast conversion rule)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for t, i in vocab.items():
        if len(t) < 2:
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                merges.append((scores[i], vocab[a], vocab[b], a, b))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(a, b) for _, _, _, a, b in merges]


def build_tokenizer(meta: dict, where: str):
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's reading of the file's tokenizer metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError(f"{where}: no tokenizer.ggml.tokens (a GGUF without a vocabulary)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        if not merges:
            raise GGUFError(f"{where}: byte-level BPE vocabulary without tokenizer.ggml.merges")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in _PRE_TOKENIZERS:
            raise GGUFError(f"{where}: pre-tokenizer {pre!r} is not known here (known: {sorted(_PRE_TOKENIZERS)})")
        digits, split = _PRE_TOKENIZERS[pre]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
        tok.decoder = decoders.ByteLevel()
        alphabet = set(_bytes_to_unicode().values())
        # A control token spelled outside the byte alphabet is a llama.cpp mislabel; it cannot be matched anyway.
        special = [i for i, ty in enumerate(types) if ty == _TOKEN_CONTROL and set(tokens[i]) <= alphabet]
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if not scores:
            raise GGUFError(f"{where}: SentencePiece vocabulary without tokenizer.ggml.scores")
        unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
        normal = [t if ty not in (_TOKEN_CONTROL, _TOKEN_BYTE, 2) else "\0" for t, ty in zip(tokens, types)]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(normal, scores), unk_token=tokens[unk],
                                   fuse_unk=True, byte_fallback=True))
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                              + [normalizers.Replace(" ", "▁")])
        decs = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(decs + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        special = [i for i, ty in enumerate(types) if ty in (_TOKEN_CONTROL, 2)]
    else:
        raise GGUFError(f"{where}: tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama')")
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, ty in enumerate(types) if ty == _TOKEN_USER_DEFINED]
    if user:
        tok.add_tokens(user)
    return tok


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json: special tokens by name, BOS/EOS flags and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    def name(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    out = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name("bos_token_id"),
        "eos_token": name("eos_token_id"), "unk_token": name("unknown_token_id"), "pad_token": name("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length", 4096)),
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": tokens[i], "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False}
                                 for i, ty in enumerate(types) if ty == _TOKEN_CONTROL},
    }
    if meta.get("tokenizer.chat_template"):
        out["chat_template"] = meta["tokenizer.chat_template"]
    return out


def _write_tokenizer_files(meta: dict, tok, output: str) -> dict:
    os.makedirs(output, exist_ok=True)
    tok_cfg = tokenizer_config(meta)
    with open(os.path.join(output, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2, ensure_ascii=False)
    tok.save(os.path.join(output, "tokenizer.json"))
    return tok_cfg


def convert_tokenizer(path: str, output: str) -> None:
    """Only the tokenizer files (tokenizer.json, tokenizer_config.json with the chat template) of GGUF `path`."""
    meta = read_metadata(_reader(path))
    _write_tokenizer_files(meta, build_tokenizer(meta, path), output)


# ----------------------------------------------------------------------------------------------------------------------
# convert


def convert(path: str, output: str, dtype: Optional[str] = None, max_shard_bytes: int = 5_000_000_000) -> dict:
    """Write the HF directory for GGUF file `path` into `output`. Returns {"config": ModelConfig, "files": [...]}.

    dtype: "float32" | "bfloat16" | "float16" for the safetensors (default float32: dequantized values are exact in
    float32, and a quantized file has no other native dtype).
    """
    from safetensors.numpy import save_file


    dtype = dtype or "float32"
    if dtype not in hf.SAFETENSORS_DTYPES.values():
        raise GGUFError(f"dtype {dtype!r}: choose float32, bfloat16 or float16")
    reader = _reader(path)
    meta = read_metadata(reader)
    cfg = hf_config(meta, {t.name for t in reader.tensors}, path)
    tok = build_tokenizer(meta, path)
    if tok.get_vocab_size(with_added_tokens=True) > cfg["vocab_size"]:
        raise GGUFError(f"{path}: tokenizer has {tok.get_vocab_size()} ids but the model {cfg['vocab_size']}")
    config: ModelConfig = hf.config_from_hf(cfg, where=path)
    plan = _tensor_plan(reader, cfg, path)
    np_dtype = np.dtype(dtype)

    os.makedirs(output, exist_ok=True)
    sizes = [math.prod(int(d) for d in t.shape) * np_dtype.itemsize for _, t in plan]
    shards: list[list[int]] = [[]]
    acc = 0
    for k, n in enumerate(sizes):
        if shards[-1] and acc + n > max_shard_bytes:
            shards.append([])
            acc = 0
        shards[-1].append(k)
        acc += n
    files = ([hf.SINGLE_FILE] if len(shards) == 1
             else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map = {}
    for file, shard in zip(files, shards):
        tensors = {}
        for k in shard:
            name, t = plan[k]
            w = _dequantize(t)
            if name.endswith("q_proj.weight"):
                w = unpermute_qk(w, cfg["num_attention_heads"])
            elif name.endswith("k_proj.weight"):
                w = unpermute_qk(w, cfg["num_key_value_heads"])
            tensors[name] = np.ascontiguousarray(w.astype(np_dtype))
            weight_map[name] = file
        save_file(tensors, os.path.join(output, file), metadata={"format": "pt"})
        del tensors
    written = list(files)
    if len(files) > 1:
        with open(os.path.join(output, hf.INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
        written.append(hf.INDEX_FILE)
    for stale in os.listdir(output):  # weights of an earlier conversion into the same directory
        if stale not in written and stale.startswith("model") and stale.endswith((".safetensors", ".index.json")):
            os.remove(os.path.join(output, stale))

    cfg["dtype"] = dtype
    cfg["torch_dtype"] = dtype
    tok_cfg = _write_tokenizer_files(meta, tok, output)
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    if cfg["pad_token_id"] is not None:
        gen["pad_token_id"] = cfg["pad_token_id"]
    for fname, obj in (("config.json", cfg), ("generation_config.json", gen)):
        with open(os.path.join(output, fname), "w") as f:
            json.dump(obj, f, indent=2)
        written.append(fname)
    written += ["tokenizer.json", "tokenizer_config.json"]
    del tok_cfg
    return {"config": config.replace(param_dtype=dtype), "files": written}
