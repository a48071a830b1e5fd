"""PEFT adapter directories (io/peft.py) against peft itself, fp32 on tiny random Llama / Mistral models:

- ours -> peft: the base written by io/hf.save, our random adapters (nonzero B) by io/peft.save; transformers +
  `PeftModel.from_pretrained` give our adapted logits (rel <= 2e-5), and peft's merge_and_unload gives the weights
  of our merged export (lora.merge + hf.save), whose transformers logits are the same;
- peft -> ours: a directory peft's save_pretrained wrote (get_peft_model with random B) gives our forward = peft's;
- a reward model (peft's SEQ_CLS task: adapters + its score head in modules_to_save), both ways;
- `starling-jax convert BASE OUT --peft ADAPTER` writes the merged model;
- directories for another base, unknown target modules, missing tensors, pickles: one-line errors.
Relative error = max |ours - ref| / max |ref|.
"""

import json
import os
import shutil

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import compiled
from starling_jax import models
from starling_jax.commands import cli
from starling_jax.io import hf
from starling_jax.io import peft as peft_io
from starling_jax.models import lora

torch.set_num_threads(1)  # the test machine is shared
V, T = 128, 12
LLAMA = models.ModelConfig(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                           mlp_dim=96, sliding_window=None, architecture="llama", pad_token_id=0, init_std=0.1)
MISTRAL = LLAMA.replace(architecture="mistral", sliding_window=8, rope_theta=1e6)
OPTIONS = {  # every projection in every layer; a subset of projections on one layer, with rsLoRA
    "llama": lora.LoraOptions(rank=4, alpha=8.0),
    "mistral": lora.LoraOptions(rank=3, alpha=5.0, targets=("q", "v", "o", "down"), layers=(1,), rslora=True),
}
CONFIGS = {"llama": LLAMA, "mistral": MISTRAL}


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(3, V, (2, T)).astype(np.int32)


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def _ours(family, seed=0):
    """(base config, configured config, base params, adapters with nonzero A and B on the chosen layers)."""
    config, options = CONFIGS[family], OPTIONS[family]
    base = models.init_params(config, jax.random.key(seed))
    adapters = lora.init(config, options, jax.random.key(seed + 1))
    mask = lora.layer_mask(config, options)
    rng = np.random.default_rng(seed)
    adapters = {p: {"a": ab["a"], "b": (0.3 * rng.standard_normal(ab["b"].shape) *
                                        mask.reshape(-1, *[1] * (ab["b"].ndim - 1))).astype(np.float32)}
                for p, ab in adapters.items()}
    return config, lora.configure(config, options), base, jax.tree.map(jax.numpy.asarray, adapters)


@pytest.fixture(scope="module", params=["llama", "mistral"])
def exported(request, tmp_path_factory):
    """Our base (HF directory), our adapters (PEFT directory) and peft's model over them."""
    family = request.param
    config, adapted_config, base, adapters = _ours(family)
    root = tmp_path_factory.mktemp(family)
    hf.save(str(root / "base"), config, base)
    files = peft_io.save(str(root / "adapter"), config, adapters, OPTIONS[family], base_model_name_or_path="base")
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = peft.PeftModel.from_pretrained(_hf_model(str(root / "base")), str(root / "adapter")).eval()
    return dict(family=family, root=root, config=config, adapted_config=adapted_config, base=base, adapters=adapters,
                peft_model=peft_model)


def test_peft_loads_our_adapters_with_our_logits(exported):
    e = exported
    toks = _tokens()
    ours = np.asarray(compiled.forward(lora.attach(e["base"], e["adapters"]), e["adapted_config"], toks))
    ref = _torch_logits(e["peft_model"], toks)
    base_only = np.asarray(compiled.forward(e["base"], e["config"], toks))
    assert _rel(base_only, ref) > 1e-3  # the adapters change the logits, so the check below sees them
    assert _rel(ours, ref) <= 2e-5
    cfg = json.loads((e["root"] / "adapter" / "adapter_config.json").read_text())
    o = OPTIONS[e["family"]]
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["task_type"]) == (o.rank, o.alpha, o.rslora,
                                                                                  "CAUSAL_LM")
    assert cfg["layers_to_transform"] == (None if o.layers is None else list(o.layers))
    names = set(load_file(str(e["root"] / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names
    assert ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names) == (o.layers is None)


def test_merged_export_equals_peft_merge(exported):
    """lora.merge + hf.save: a plain HF directory with peft's merge_and_unload weights and its logits."""
    e = exported
    out = str(e["root"] / "merged")
    hf.save(out, e["config"], lora.merge(lora.attach(e["base"], e["adapters"]), e["adapted_config"]))
    ours = load_file(os.path.join(out, "model.safetensors"))
    merged_model = peft.PeftModel.from_pretrained(_hf_model(str(e["root"] / "base")),
                                                  str(e["root"] / "adapter")).merge_and_unload()
    theirs = {k: v.detach().numpy() for k, v in merged_model.state_dict().items()}
    assert set(ours) == set(theirs)
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=0, atol=2e-6, err_msg=k)
    toks = _tokens(1)
    assert _rel(_torch_logits(_hf_model(out), toks), _torch_logits(e["peft_model"], toks)) <= 2e-5


def test_round_trip_through_our_reader(exported):
    e = exported
    options, adapters = peft_io.load(str(e["root"] / "adapter"), e["config"])
    o = OPTIONS[e["family"]]
    assert (options.rank, options.alpha, options.rslora, options.layers) == (o.rank, o.alpha, o.rslora, o.layers)
    assert lora.projections(options) == lora.projections(o)
    for p in adapters:
        for k in ("a", "b"):
            np.testing.assert_array_equal(np.asarray(adapters[p][k]), np.asarray(e["adapters"][p][k]))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_importing_a_directory_peft_saved(family, tmp_path):
    """peft's own save_pretrained (get_peft_model, random B) onto transformers' base: our forward equals peft's."""
    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0)
    hc = (transformers.LlamaConfig(**kw) if family == "llama"
          else transformers.MistralConfig(sliding_window=8, **kw))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hc, attn_implementation="eager").eval()
    model.save_pretrained(tmp_path / "base")
    lc = (peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, target_modules="all-linear")
          if family == "llama" else
          peft.LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=["k_proj", "up_proj"],
                          layers_to_transform=[0], use_rslora=True))
    peft_model = peft.get_peft_model(model, lc).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    config, base = hf.load(str(tmp_path / "base"))
    adapted_config, params, options = peft_io.apply(str(tmp_path / "adapter"), config, base)
    toks = _tokens(2)
    ours = np.asarray(compiled.forward(params, adapted_config, toks))
    ref = _torch_logits(peft_model, toks)
    assert _rel(np.asarray(compiled.forward(base, config, toks)), ref) > 1e-3
    assert _rel(ours, ref) <= 2e-5
    assert options.layers == (None if family == "llama" else (0,))


def test_convert_cli_merges_a_peft_directory(exported, tmp_path, capsys):
    e = exported
    out = str(tmp_path / "merged")
    assert cli.main(["convert", str(e["root"] / "base"), out, "--peft", str(e["root"] / "adapter")]) == 0
    assert "PEFT adapter" in capsys.readouterr().out
    config, params = hf.load(out)
    toks = _tokens(3)
    ref = np.asarray(compiled.forward(lora.attach(e["base"], e["adapters"]), e["adapted_config"], toks))
    assert _rel(np.asarray(compiled.forward(params, config, toks)), ref) <= 2e-5


def test_reward_model_adapters_both_ways(tmp_path):
    """A reward model (SEQ_CLS): adapters + a retrained score head under peft's AutoModelForSequenceClassification give
    our rewards, read back equal; and a SEQ_CLS directory peft saved gives peft's rewards under our reader."""
    config = LLAMA.replace(head="score")
    options = lora.LoraOptions(rank=4, alpha=8.0, targets=("q", "v", "down"))
    base = models.init_params(config, jax.random.key(5))
    adapters = lora.init(config, options, jax.random.key(6))
    adapters = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(7), a.shape), adapters)
    params = {**lora.attach(base, adapters), "score": 0.5 * jax.random.normal(jax.random.key(8), base["score"].shape)}
    adapted_config = lora.configure(config, options)
    hf.save(str(tmp_path / "base"), config, base)
    peft_io.save(str(tmp_path / "adapter"), config, params, options)
    cls = transformers.AutoModelForSequenceClassification
    peft_model = peft.PeftModel.from_pretrained(
        cls.from_pretrained(str(tmp_path / "base"), dtype=torch.float32, attn_implementation="eager").eval(),
        str(tmp_path / "adapter")).eval()
    toks = _tokens(4)
    mask = np.ones_like(toks)
    ours = np.asarray(compiled.score(params, adapted_config, toks, mask))
    ref = _torch_logits(peft_model, toks)[:, 0]
    assert _rel(np.asarray(compiled.score(base, config, toks, mask)), ref) > 1e-2
    assert _rel(ours, ref) <= 2e-5
    back_config, back, _ = peft_io.apply(str(tmp_path / "adapter"), config, base)
    np.testing.assert_array_equal(np.asarray(back["score"]), np.asarray(params["score"]))
    np.testing.assert_array_equal(np.asarray(compiled.score(back, back_config, toks, mask)), ours)
    with pytest.raises(peft_io.PeftFormatError, match=r"task_type='SEQ_CLS' does not fit this base \(head 'lm'"):
        peft_io.load(str(tmp_path / "adapter"), LLAMA)
    # peft's own SEQ_CLS directory (random B, its freshly drawn score head)
    hc = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_labels=1,
                                  pad_token_id=0, max_position_embeddings=256)
    torch.manual_seed(1)
    model = cls.from_config(hc, attn_implementation="eager").eval()
    model.save_pretrained(tmp_path / "hf_rm")
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                        target_modules=["o_proj", "gate_proj"], task_type="SEQ_CLS"))
    with torch.no_grad():
        theirs.base_model.model.score.modules_to_save["default"].weight.normal_()
    theirs.eval().save_pretrained(tmp_path / "peft_rm")
    rm_config, rm_base = hf.load(str(tmp_path / "hf_rm"))
    rm_adapted_config, rm_params, _ = peft_io.apply(str(tmp_path / "peft_rm"), rm_config, rm_base)
    ref = _torch_logits(theirs, toks)[:, 0]
    assert _rel(np.asarray(compiled.score(rm_base, rm_config, toks, mask)), ref) > 1e-2
    assert _rel(np.asarray(compiled.score(rm_params, rm_adapted_config, toks, mask)), ref) <= 2e-5


# ----------------------------------------------------------------------------------------------------------------------
# Bad directories (no torch needed): one line naming the file and the tensor or field.


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    _, _, _, adapters = _ours("llama")
    peft_io.save(str(root / "good"), LLAMA, adapters, OPTIONS["llama"])
    return root / "good"


def _copy(src, dst, config_edit=None, tensors_edit=None):
    shutil.copytree(src, dst)
    if config_edit:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config_edit(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors_edit:
        t = load_file(str(dst / "adapter_model.safetensors"))
        tensors_edit(t)
        save_file(t, str(dst / "adapter_model.safetensors"))
    return str(dst)


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
BAD = [
    ("another base (hidden size)", None, lambda t: t.update({f"{Q0}.lora_A.weight": np.zeros((4, 32), np.float32)}),
     LLAMA, rf"adapter_model.safetensors: tensor {Q0}.lora_A.weight has shape \[4, 32\], expected \[4, 64\]"),
    ("another base (layers)", lambda c: c.update(layers_to_transform=[5]), None, LLAMA,
     r"adapter_config.json: layers_to_transform=\[5\] is not a list of layer indices in \[0, 2\)"),
    ("another base (fewer layers)", None, None, LLAMA.replace(num_layers=1),
     r"adapter_model.safetensors: unexpected tensor base_model\.model\.model\.layers\.1\.\S+\.weight: not a LoRA "
     r"tensor of this base \(made for another base"),
    ("unknown target module", lambda c: c.update(target_modules=["q_proj", "qkv_proj"]), None, LLAMA,
     r"adapter_config.json: target module 'qkv_proj' is not one of this base's projections"),
    ("embedding target", lambda c: c.update(target_modules=["embed_tokens"]), None, LLAMA,
     r"adapter_config.json: target module 'embed_tokens' is not one of this base's projections"),
    ("missing tensor", None, lambda t: t.pop(f"{Q0}.lora_B.weight"), LLAMA,
     rf"adapter_model.safetensors: missing tensor {Q0}.lora_B.weight"),
    ("foreign tensor", None, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64))}), LLAMA,
     r"unexpected tensor base_model.model.lm_head.lora_A.weight: not a LoRA tensor of this base"),
    ("DoRA", lambda c: c.update(use_dora=True), None, LLAMA, r"adapter_config.json: use_dora=True is a peft variant"),
    ("rank larger than the base", lambda c: c.update(r=65), None, LLAMA, r"lora.rank=65 is larger than q_proj"),
]


@pytest.mark.parametrize("name,config_edit,tensors_edit,config,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_adapter_directories(adapter_dir, tmp_path, name, config_edit, tensors_edit, config, pattern):
    d = _copy(adapter_dir, tmp_path / "bad", config_edit, tensors_edit)
    with pytest.raises(peft_io.PeftFormatError, match=pattern) as e:
        peft_io.load(d, config)
    assert "\n" not in str(e.value) and str(e.value).startswith(d)


def test_pickled_adapter_is_refused(adapter_dir, tmp_path):
    d = _copy(adapter_dir, tmp_path / "bin")
    os.remove(os.path.join(d, "adapter_model.safetensors"))
    with open(os.path.join(d, "adapter_model.bin"), "wb") as f:
        f.write(b"PK\x03\x04 not really a pickle")
    with pytest.raises(peft_io.PeftFormatError, match=r"only a pickled adapter_model.bin; starling_jax never unpickles"):
        peft_io.load(d, LLAMA)


def test_writer_refuses_nonzero_layers_outside_the_options(tmp_path):
    _, _, _, adapters = _ours("llama")
    with pytest.raises(peft_io.PeftFormatError, match=r"nonzero in layers \[0\], which lora.layers leaves out"):
        peft_io.save(str(tmp_path / "x"), LLAMA, adapters, lora.LoraOptions(rank=4, alpha=8.0, layers=(1,)))
