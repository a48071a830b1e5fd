"""`starling-jax convert WORKDIR[/STAGE] OUT`: a finished stage becomes a complete Hugging Face directory that
transformers loads with the same logits / scores and whose chat template renders like ours."""

import json
import os

import jax
import numpy as np
import pytest

from starling_jax.commands import cli
from starling_jax.stages import export
from starling_jax.io import hf
from starling_jax import models
from starling_jax.data import load_tokenizer
from starling_jax.data.templates import jinja_template, render_text, TEMPLATES

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Texts without runs of spaces or a space right after a special token: there transformers' BPE conversion of the
# SentencePiece model tokenizes differently from SentencePiece itself (see tests/test_data_tokenizer.py).
CHAT = [{"role": "user", "content": "Hello, who are you? Ünïcode ok"},
        {"role": "assistant", "content": "I am a bot.\nSecond line"},
        {"role": "user", "content": "Write one word."}]


@pytest.fixture(scope="module")
def run(random_run):
    """The session's random-weight run (tests/conftest.py): these tests only read it."""
    return random_run


@pytest.fixture(scope="module")
def policy_dir(run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf") / "policy")
    assert cli.main(["convert", os.path.join(run, "policy"), out]) == 0
    return out


@pytest.fixture(scope="module")
def rm_dir(run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf") / "rm")
    assert cli.main(["convert", os.path.join(run, "rm", "export"), out]) == 0
    return out


def test_jinja_templates_render_like_ours():
    from transformers.utils.chat_template_utils import _compile_jinja_template
    for name, t in TEMPLATES.items():
        compiled = _compile_jinja_template(jinja_template(t))
        for messages, gen in ((CHAT, True), (CHAT[:2], False), ([{"role": "user", "content": "it's \\n 'q'"}], True)):
            want = ("<s>" if t.add_bos else "") + render_text(messages, t, gen)
            assert compiled.render(messages=messages, add_generation_prompt=gen, bos_token="<s>") == want, name
        with pytest.raises(Exception, match="alternate"):
            compiled.render(messages=[{"role": "assistant", "content": "x"}], add_generation_prompt=True,
                            bos_token="<s>")


@pytest.mark.slow
def test_policy_export_loads_in_transformers(run, policy_dir, rm_dir):
    files = set(os.listdir(policy_dir))
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json"} <= files
    ref = export.resolve_stage(os.path.join(run, "policy"))
    from starling_jax.step.checkpoint import load_export
    config, params, _ = load_export(ref.export_dir)

    model = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    tokens = np.array([[1, 415, 2936, 9060, 285, 1142, 32000, 28705]], np.int32)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(models.forward(params, config, tokens))
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-4)

    tok = transformers.AutoTokenizer.from_pretrained(policy_dir)
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == "<s>" + render_text(CHAT, "openchat_3.5")
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    ours_ids = load_tokenizer("openchat-3.5").encode_chat(CHAT, "openchat_3.5")
    assert ids == ours_ids
    assert load_tokenizer(policy_dir).encode_chat(CHAT, "openchat_3.5") == ours_ids  # our reader agrees

    gen = json.load(open(os.path.join(policy_dir, "generation_config.json")))
    assert gen["eos_token_id"] == [32000] and gen["bos_token_id"] == 1
    assert transformers.GenerationConfig.from_pretrained(policy_dir).eos_token_id == [32000]
    # eval reads it with the stage's own template, recognised from the Jinja chat_template
    from starling_jax.commands.eval.checkpoints import load_checkpoint
    ck = load_checkpoint(policy_dir, want="lm")
    assert ck.template.name == "openchat_3.5" and ck.stop_ids == (32000,)
    assert load_checkpoint(rm_dir, want="score").template.name == "llama2"
    # and it reads back into starling_jax unchanged
    config2, params2 = hf.load(policy_dir)
    assert jax.tree_util.tree_all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, params2))


@pytest.mark.slow
def test_reward_model_export_scores_like_ours(run, rm_dir):
    ref = export.resolve_stage(os.path.join(run, "rm"))
    from starling_jax.step.checkpoint import load_export
    config, params, _ = load_export(ref.export_dir)
    assert "generation_config.json" not in os.listdir(rm_dir)
    tok = transformers.AutoTokenizer.from_pretrained(rm_dir)
    ours = load_tokenizer("mistral-7b-v0.1")
    convs = [CHAT[:2], [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]]
    texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    assert texts == [render_text(c, "llama2", add_generation_prompt=False) for c in convs]  # BOS is in the text
    rows = [ours.encode_chat(c, "llama2", add_generation_prompt=False) for c in convs]
    T = max(map(len, rows))
    pad = json.load(open(os.path.join(rm_dir, "config.json")))["pad_token_id"]
    tokens = np.full((2, T), pad, np.int32)
    mask = np.zeros((2, T), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, 1
    model = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(models.score(params, config, tokens, mask)), theirs, atol=2e-5, rtol=1e-4)


def test_openchat_reward_model_declares_a_pad_that_never_ends_a_conversation():
    tok = load_tokenizer("openchat-3.5")
    stop = tok.stop_ids("openchat_3.5")
    assert tok.pad_id in stop  # OpenChat pads with <|end_of_turn|>, which ends every reply
    assert export._pad_for(tok, stop, "score") == 32001 and export._pad_for(tok, stop, "lm") == 32000


def test_a_converted_stage_carries_the_digests_of_every_file(policy_dir, rm_dir):
    from starling_jax import digests
    for d in (policy_dir, rm_dir):
        listed = digests.read_manifest(d)
        assert set(listed) == set(os.listdir(d)) - {digests.MANIFEST}
        assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(listed)
        assert digests.verify(d)


def test_workdir_source_picks_the_last_finished_stage(run):
    assert export.resolve_stage(run).name == "policy"
    assert export.resolve_stage(run, "sft").name == "sft"
    with pytest.raises(ValueError, match="no stage 'nope'"):
        export.resolve_stage(run, "nope")
