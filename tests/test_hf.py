"""hf.load / hf.save: round trips through transformers' from_pretrained, sharded files, config.json styles, every
error message, the convert CLI, and loading straight into shards on 8 simulated CPU devices."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import compiled
from cpu_env import cpu_env
from starling_jax.io import hf
from starling_jax import models
from starling_jax.commands.cli import main as cli_main

torch.set_num_threads(1)
VOCAB = 128
MISTRAL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, sliding_window=6, rms_norm_eps=1e-5, max_position_embeddings=128)
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128, pad_token_id=0)


def _hf_dir(path, cls=transformers.MistralForCausalLM, **kw):
    """A tiny random transformers model saved with save_pretrained; returns the model."""
    cfg_cls = transformers.MistralConfig if cls.__name__.startswith("Mistral") else transformers.LlamaConfig
    base = MISTRAL if cfg_cls is transformers.MistralConfig else LLAMA
    torch.manual_seed(0)
    model = cls(cfg_cls(**{**base, **kw})).eval()
    model.save_pretrained(path)
    return model


def _random_params(config, seed):
    """Random params straight from models.param_specs (numpy: avoids compiling jax.random for every shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda spec: (1.0 + 0.1 * rng.standard_normal(spec.shape) if spec.init == "ones"
                      else 0.05 * rng.standard_normal(spec.shape)).astype(spec.dtype),
        models.param_specs(config), is_leaf=lambda x: isinstance(x, models.ParamSpec))


def _tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(1, VOCAB, shape).astype(np.int32)


def _torch_out(model, tokens, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()


def _edit_json(path, **changes):
    with open(path) as f:
        d = json.load(f)
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k, None)
        else:
            d[k] = v
    with open(path, "w") as f:
        json.dump(d, f)


_DROP = object()


# ----------------------------------------------------------------------------------------------------------------------
# Round trips


def test_save_then_transformers_from_pretrained_same_logits_causal_lm(tmp_path):
    config = models.PRESETS["tiny"].replace(vocab_size=VOCAB, pad_token_id=0, eos_token_id=2, rope_theta=50000.0,
                                            rms_norm_eps=1e-6)
    params = _random_params(config, 1)
    hf.save(str(tmp_path), config, params)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(model).__name__ == "MistralForCausalLM" and model.config.sliding_window == 32
    tokens = _tokens((2, 40))  # 40 > window 32
    mask = np.ones_like(tokens)
    ref = _torch_out(model, tokens, mask)
    ours = np.asarray(compiled.forward(params, config, tokens, mask))
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4
    config2, params2 = hf.load(str(tmp_path))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_save_then_transformers_from_pretrained_same_scores_sequence_classification(tmp_path):
    config = models.PRESETS["llama2-7b"].replace(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                                 num_kv_heads=2, head_dim=8, mlp_dim=48, head="score")
    params = _random_params(config, 2)
    hf.save(str(tmp_path), config, params)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    tokens = _tokens((3, 12), seed=3)
    mask = (np.arange(12)[None] < np.array([[12], [7], [2]])).astype(np.int32)
    tokens = np.where(mask > 0, tokens, 0)  # right padding with pad_token_id 0
    ref = _torch_out(model, tokens, mask)[:, 0]
    ours = np.asarray(compiled.score(params, config, tokens, mask))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_tied_embeddings_and_transformers4_style_config(tmp_path):
    model = _hf_dir(tmp_path, transformers.LlamaForCausalLM, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 20000.0})
    # Rewrite config.json the way transformers 4 wrote it: top-level rope_theta, torch_dtype, rope_scaling null.
    _edit_json(tmp_path / "config.json", rope_parameters=_DROP, dtype=_DROP, rope_theta=20000.0,
               torch_dtype="float32", rope_scaling=None)
    config, params = hf.load(str(tmp_path))
    assert config.tie_embeddings and "lm_head" not in params and config.rope_theta == 20000.0
    tokens = _tokens((1, 10), seed=4)
    mask = np.ones_like(tokens)
    ref = _torch_out(model, tokens, mask)
    assert np.abs(np.asarray(compiled.forward(params, config, tokens, mask)) - ref).max() / np.abs(ref).max() <= 1e-4
    # Saving keeps the tie: no lm_head.weight in the file, and transformers ties it back.
    hf.save(str(tmp_path / "resaved"), config, params)
    assert "lm_head.weight" not in load_file(str(tmp_path / "resaved" / "model.safetensors"))
    resaved = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "resaved")).eval()
    np.testing.assert_allclose(_torch_out(resaved, tokens, mask), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_mistral_sliding_window_null_and_pad_token(tmp_path):
    _hf_dir(tmp_path, sliding_window=None, pad_token_id=3)
    config, _ = hf.load(str(tmp_path))
    assert config.sliding_window is None and config.pad_token_id == 3 and config.architecture == "mistral"


def test_sharded_save_and_load(tmp_path):
    config = models.PRESETS["tiny"].replace(vocab_size=VOCAB, pad_token_id=0, eos_token_id=2, head="score")
    params = _random_params(config, 3)
    files = hf.save(str(tmp_path / "a"), config, params, max_shard_bytes=40_000)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with open(tmp_path / "a" / hf.INDEX_FILE) as f:
        index = json.load(f)
    sizes = [os.path.getsize(tmp_path / "a" / s) for s in shards]
    assert set(index["weight_map"].values()) == set(shards) and len(index["weight_map"]) == 2 + 2 * 9 + 1
    assert index["metadata"]["total_size"] == 4 * models.count_params(params)
    assert max(sizes) < 40_000 + 4096  # each shard holds at most max_shard_bytes of tensors (+ its json header)
    config2, params2 = hf.load(str(tmp_path / "a"))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "a")).eval()
    np.testing.assert_array_equal(model.score.weight.detach().numpy(), np.asarray(params["score"]).T)
    # Re-saving unsharded into the same directory removes the stale shards and index.
    hf.save(str(tmp_path / "a"), config, params)
    assert sorted(os.listdir(tmp_path / "a")) == ["config.json", "model.safetensors"]


def test_convert_cli_preset_and_dtype(tmp_path, capsys):
    assert cli_main(["convert", "preset:tiny", str(tmp_path / "f32"), "--head", "score", "--seed", "1"]) == 0
    assert "MistralForSequenceClassification" in capsys.readouterr().out
    assert cli_main(["convert", str(tmp_path / "f32"), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    c32, p32 = hf.load(str(tmp_path / "f32"))
    c16, p16 = hf.load(str(tmp_path / "bf16"))
    assert c16 == c32.replace(param_dtype="bfloat16", dtype="bfloat16")
    assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"
    np.testing.assert_array_equal(np.asarray(p16["score"], np.float32),
                                  np.asarray(np.asarray(p32["score"]).astype("bfloat16"), np.float32))


# ----------------------------------------------------------------------------------------------------------------------
# Errors


def _rewrite_weights(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_error_unknown_architecture(tmp_path):
    _hf_dir(tmp_path)
    _edit_json(tmp_path / "config.json", architectures=["GPT2LMHeadModel"])
    with pytest.raises(hf.HFFormatError, match=r"config.json: unsupported architecture 'GPT2LMHeadModel'.*supported: "
                                               r"MistralForCausalLM"):
        hf.load(str(tmp_path))


def test_error_missing_tensor(tmp_path):
    _hf_dir(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf.HFFormatError, match=r"missing tensors \(1\): model.layers.1.mlp.up_proj.weight"):
        hf.load(str(tmp_path))


def test_error_unexpected_tensor(tmp_path):
    _hf_dir(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))
    with pytest.raises(hf.HFFormatError, match=r"unexpected tensors \(1\): model.layers.0.self_attn.q_proj.bias"):
        hf.load(str(tmp_path))


def test_error_misshaped_tensor_names_both_shapes(tmp_path):
    _hf_dir(tmp_path)
    wrong = np.zeros((32, 48), np.float32)  # [in, out] instead of HF's [out, in]
    _rewrite_weights(tmp_path, lambda t: t.update({"model.layers.0.mlp.gate_proj.weight": wrong}))
    with pytest.raises(hf.HFFormatError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \[32, 48\], "
                                               r"expected \[48, 32\]"):
        hf.load(str(tmp_path))


def test_error_vocab_mismatch(tmp_path):
    _hf_dir(tmp_path)
    _edit_json(tmp_path / "config.json", vocab_size=130)
    with pytest.raises(hf.HFFormatError, match=r"vocab mismatch: config.json has vocab_size=130 but "
                                               r"model.embed_tokens.weight has 128 rows"):
        hf.load(str(tmp_path))


def test_error_pickle_only_checkpoint_is_never_opened(tmp_path):
    _hf_dir(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle: load must refuse before reading it")
    with pytest.raises(hf.HFFormatError, match=r"(?s)only pickled checkpoints \(pytorch_model.bin\); starling_jax "
                                               r"never unpickles.*save_pretrained"):
        hf.load(str(tmp_path))


def test_error_directory_problems(tmp_path):
    with pytest.raises(hf.HFFormatError, match="not a directory"):
        hf.load(str(tmp_path / "nope"))
    with pytest.raises(hf.HFFormatError, match="no config.json"):
        hf.load(str(tmp_path))
    config = models.PRESETS["tiny"].replace(vocab_size=VOCAB, pad_token_id=0, eos_token_id=2)
    files = hf.save(str(tmp_path / "s"), config, _random_params(config, 0), max_shard_bytes=100_000)
    index_path = tmp_path / "s" / hf.INDEX_FILE
    _edit_json(index_path, weight_map={**json.load(open(index_path))["weight_map"], "model.norm.weight": files[1]})
    with pytest.raises(hf.HFFormatError, match=rf"puts model.norm.weight in {files[1]}, which lacks it"):
        hf.load(str(tmp_path / "s"))
    os.remove(tmp_path / "s" / files[2])
    with pytest.raises(hf.HFFormatError, match=rf"lists shard '{files[2]}', which is not in"):
        hf.load(str(tmp_path / "s"))


def test_error_unsupported_configs(tmp_path):
    _hf_dir(tmp_path, transformers.LlamaForSequenceClassification, num_labels=2)
    with pytest.raises(hf.HFFormatError, match=r"LlamaForSequenceClassification with 2 labels \(a reward model needs "
                                               r"num_labels=1\)"):
        hf.load(str(tmp_path))
    _edit_json(tmp_path / "config.json", id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
               rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    with pytest.raises(hf.HFFormatError, match=r"rope type 'llama3' \(only plain RoPE is supported\)"):
        hf.load(str(tmp_path))


def test_error_save_params_do_not_match_config(tmp_path):
    config = models.PRESETS["tiny"].replace(vocab_size=VOCAB, pad_token_id=0, eos_token_id=2)
    params = _random_params(config, 0)
    bad = {**params, "layers": {**params["layers"], "wk": params["layers"]["wq"]}}
    with pytest.raises(hf.HFFormatError, match=r"params\['layers'\]\['wk'\] has shape \[2, 64, 4, 16\], expected "
                                               r"\[2, 64, 2, 16\]"):
        hf.save(str(tmp_path), config, bad)
    with pytest.raises(hf.HFFormatError, match=r"missing params\['lm_head'\]"):
        hf.save(str(tmp_path), config, {k: v for k, v in params.items() if k != "lm_head"})
    with pytest.raises(hf.HFFormatError, match="HF Llama has no sliding window"):
        hf.save(str(tmp_path), config.replace(architecture="llama"), params)


# ----------------------------------------------------------------------------------------------------------------------
# Straight into shards on a mesh (8 simulated CPU devices; a subprocess because the device count is fixed at start-up)

_MESH_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from starling_jax.io import hf
    from starling_jax import models
    from starling_jax.parallel import sharding
    from starling_jax.config import MeshConfig
    assert jax.device_count() == 8, jax.devices()
    mesh_config = MeshConfig(data=1, fsdp=4, tensor=2)
    mesh = sharding.make_mesh(mesh_config)
    read_sizes = []  # elements of every block read from the files
    real_read_block = hf._read_block
    def spy(*args):
        out = real_read_block(*args)
        read_sizes.append(out.size)
        return out
    hf._read_block = spy
    config, params = hf.load(sys.argv[1], mesh=mesh, rules=mesh_config.rules)
    hf._read_block = real_read_block
    # Each distinct device block is read once and blocks tile each array: nothing is read twice, none whole.
    assert sum(read_sizes) == models.count_params(params), (sum(read_sizes), models.count_params(params))
    assert max(read_sizes) == params["embed"].size // 8, (max(read_sizes), params["embed"].shape)
    _, ref = hf.load(sys.argv[1])
    want = sharding.param_shardings(models.param_specs(config), mesh, mesh_config.rules)
    def check(path, x, r, s):
        name = jax.tree_util.keystr(path)
        assert x.sharding.is_equivalent_to(s, x.ndim), (name, x.sharding, s)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(r), err_msg=name)
        if x.sharding.spec != s.spec:
            raise AssertionError(name)
    jax.tree.map_with_path(check, params, ref, want)
    split = [k for k, x in jax.tree.leaves_with_path(params)
             if x.addressable_shards[0].data.shape != x.shape]
    assert len(split) >= 8, split  # most weights really are split across devices
    _, default_rules = hf.load(sys.argv[1], mesh=mesh)  # rules=None: MeshConfig's default rules
    assert all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(default_rules),
                                                        jax.tree.leaves(params)))
    print("sharded ok", len(split))
""")


@pytest.mark.slow
def test_load_straight_into_shards_on_8_cpu_devices(tmp_path):
    _hf_dir(tmp_path, num_key_value_heads=2)
    env = cpu_env(8)
    proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded ok" in proc.stdout
