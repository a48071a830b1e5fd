"""Tokenizers and chat templates against independent references: fschat's conversation templates, the model cards'
strings, and transformers/tokenizers tokenizers built offline from the same files."""

import json
import shutil

import pytest

from starling_jax.data import load_tokenizer, render_text
from starling_jax.data.tokenizer import mistral_model_path

MULTI = [
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "I am a bot. Ünïcode ok\nsecond line"},
    {"role": "user", "content": "Write code:\nx = 1 "},
]
# transformers converts the SentencePiece model to a BPE that merges runs of spaces differently ("a  b"); we follow
# SentencePiece itself (as mistral-common does), so texts compared with transformers avoid runs of spaces and
# mistral-common is the reference for those. The same holds for a space right after a special token ("</s> [/INST]"):
# SentencePiece encodes the segment " [/INST]" with its own dummy prefix ("▁", "▁[").
SPACES = ["Write  code:\n  x = 1  ", "a  b", "\n   x", "x  "]


@pytest.fixture(scope="module")
def openchat():
    return load_tokenizer("openchat-3.5")


@pytest.fixture(scope="module")
def hf_openchat(tmp_path_factory):
    """transformers' Llama tokenizer (legacy, as OpenChat ships it) from the same .model, plus the added tokens."""
    from transformers import AutoTokenizer
    d = tmp_path_factory.mktemp("hf_openchat")
    shutil.copy(mistral_model_path(), d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.add_special_tokens({"additional_special_tokens": ["<|end_of_turn|>", "<|pad_0|>"]})
    assert tok.convert_tokens_to_ids(["<|end_of_turn|>", "<|pad_0|>"]) == [32000, 32001]
    return tok


def _fschat(name, messages, generation_prompt=True):
    from fastchat.conversation import get_conv_template
    conv = get_conv_template(name)
    for m in messages:
        conv.append_message(conv.roles[0 if m["role"] == "user" else 1], m["content"])
    if generation_prompt:
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def test_openchat_ids_and_specials(openchat):
    assert openchat.vocab_size == 32002
    assert (openchat.bos_id, openchat.eos_id, openchat.pad_id, openchat.end_of_turn_id) == (1, 32000, 32000, 32000)
    assert openchat.encode("<|end_of_turn|>", parse_special=True) == [32000]
    assert openchat.encode("a<|pad_0|>b", parse_special=True).count(32001) == 1
    # content never yields control ids: by default the strings stay text
    assert 32000 not in openchat.encode("<|end_of_turn|>") and 2 not in openchat.encode("a </s>")
    bare = load_tokenizer("mistral-7b-v0.1")
    assert (bare.vocab_size, bare.bos_id, bare.eos_id, bare.pad_id, bare.end_of_turn_id) == (32000, 1, 2, 0, None)
    # The bare Mistral tokenizer splits the string into pieces; asking it for the OpenChat template is an error.
    assert len(bare.encode("<|end_of_turn|>")) > 1
    with pytest.raises(ValueError, match="needs '<\\|end_of_turn\\|>'.*mistral-7b-v0.1"):
        bare.encode_chat(MULTI, "openchat_3.5")


@pytest.mark.parametrize("messages", [MULTI[:1], MULTI])
def test_openchat_render_matches_fschat(messages):
    assert render_text(messages, "openchat_3.5") == _fschat("openchat_3.5", messages)
    full = messages + [{"role": "assistant", "content": "Sure."}]
    assert render_text(full, "openchat_3.5", add_generation_prompt=False) == _fschat("openchat_3.5", full, False)
    assert render_text(MULTI[:1], "openchat_3.5") == \
        "GPT4 Correct User: Hello, who are you?<|end_of_turn|>GPT4 Correct Assistant:"


def test_code_variant():
    assert render_text(MULTI[:1], "openchat_3.5_code") == \
        "Code User: Hello, who are you?<|end_of_turn|>Code Assistant:"


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_openchat_tokens_match_transformers(openchat, hf_openchat, generation_prompt):
    messages = MULTI if generation_prompt else MULTI + [{"role": "assistant", "content": "spaced reply."}]
    text = render_text(messages, "openchat_3.5", generation_prompt)
    ours = openchat.encode_chat(messages, "openchat_3.5", generation_prompt)
    assert ours == hf_openchat(text)["input_ids"]
    assert ours[0] == 1 and ours.count(32000) == len(messages)
    # Text after a special token starts a new segment: "GPT4" after <|end_of_turn|> is encoded like at the start.
    gpt4 = openchat.encode("GPT4")
    k = ours.index(32000)
    assert ours[k + 1:k + 1 + len(gpt4)] == gpt4 == ours[1:1 + len(gpt4)]
    for s in ("plain text", "<|end_of_turn|>x<|pad_0|>y", "<s>[INST] hi </s>", "tabs\tand\nnewlines  ", "é漢字🙂"):
        assert openchat.encode(s, parse_special=True) == hf_openchat(s, add_special_tokens=False)["input_ids"], s


def test_plain_text_matches_mistral_common(openchat):
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
    ref = SentencePieceTokenizer(mistral_model_path())
    for s in SPACES + ["Hello world", "é漢字🙂 ok", "GPT4 Correct User: hi"]:
        assert openchat.encode(s, add_bos=True) == ref.encode(s, bos=True, eos=False), s
        assert openchat.decode(openchat.encode(s)) == ref.decode(ref.encode(s, bos=False, eos=False))
    # Special tokens split the text; each piece is encoded on its own, as a new SentencePiece segment.
    text = "a<|end_of_turn|> b</s> [/INST]<|pad_0|>c"
    want = (ref.encode("a", bos=False, eos=False) + [32000] + ref.encode(" b", bos=False, eos=False) + [2]
            + ref.encode(" [/INST]", bos=False, eos=False) + [32001] + ref.encode("c", bos=False, eos=False))
    assert openchat.encode(text, parse_special=True) == want


def test_loss_mask_marks_every_assistant_turn(openchat):
    messages = MULTI + [{"role": "assistant", "content": "Final answer."}]
    ids, mask = openchat.encode_chat(messages, add_generation_prompt=False, return_loss_mask=True)
    assert len(ids) == len(mask)
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(contents)
    for run, content in zip(runs, contents):
        assert run[-1] == 32000  # the closing <|end_of_turn|> is trained: the model learns to stop
        assert openchat.decode(run, skip_special=False) == content + "<|end_of_turn|>"
    # The generation prompt is a token prefix of the full conversation, so sampling continues what SFT trained.
    prompt = openchat.encode_chat(messages[:-1])
    assert ids[:len(prompt)] == prompt and mask[len(prompt)] == 1 and not any(mask[len(prompt) - 8:len(prompt)])


def test_decode_and_stop_ids(openchat):
    ids = openchat.encode("Hello world<|end_of_turn|>GPT4", parse_special=True)
    assert openchat.decode(ids) == "Hello worldGPT4"
    assert openchat.decode(ids, skip_special=False) == "Hello world<|end_of_turn|>GPT4"
    with pytest.raises(ValueError, match="id 32002 at position 1"):
        openchat.decode([1, 32002])
    assert openchat.stop_ids("openchat_3.5") == (32000,)


def test_llama2_starling_rm_card_format():
    conv = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi, how can I help you?"}]
    text = render_text(conv, "llama2", add_generation_prompt=False)
    assert text == "<s>[INST] Hello? </s> [/INST] Hi, how can I help you?</s>"  # the Starling-RM-7B-alpha card
    llama = load_tokenizer("mistral-7b-v0.1")  # same SentencePiece format as Llama-2 (bos 1, eos 2, pad = unk 0)
    ids = llama.encode_chat(conv, "llama2", add_generation_prompt=False)
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
    ref = SentencePieceTokenizer(mistral_model_path())
    assert ids == ([1] + ref.encode("[INST] Hello? ", bos=False, eos=False) + [2]
                   + ref.encode(" [/INST] Hi, how can I help you?", bos=False, eos=False) + [2])
    assert ids[0] == 1 and ids.count(1) == 1 and ids[-1] == 2
    assert render_text(conv, "llama2_trainer", False) == "[INST] Hello? [/INST] Hi, how can I help you?</s>"


def test_openchat_sample_rerendered_for_the_reward_model(openchat):
    """The RL engineer's path: policy tokens -> text -> RM template."""
    reply_ids = openchat.encode_chat(MULTI[:1] + [{"role": "assistant", "content": "I am Starling."}],
                                     add_generation_prompt=False)[len(openchat.encode_chat(MULTI[:1])):]
    reply = openchat.decode(reply_ids)
    assert reply == "I am Starling."
    rm_text = render_text(MULTI[:1] + [{"role": "assistant", "content": reply}], "llama2", False)
    assert rm_text == "<s>[INST] Hello, who are you? </s> [/INST] I am Starling.</s>"


def _chatml_tokenizer_json(path):
    """A small HF tokenizer.json (trained BPE) with Yi's ChatML special tokens, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["hello there, how are you today?", "I am fine, thank you.", "user assistant says hi"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


def test_chatml_matches_fschat_and_tokenizers(tmp_path):
    from transformers import PreTrainedTokenizerFast
    conv = MULTI[:1]
    assert render_text(conv, "chatml") == _fschat("Yi-34b-chat", conv)
    full = conv + [{"role": "assistant", "content": "Hi! How can I help you today?"}]
    # The Starling-RM-34B card's sample, no trailing newline.
    assert render_text(full, "chatml", False) == (
        "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\nHi! How can I help you today?"
        "<|im_end|>")
    path = _chatml_tokenizer_json(tmp_path / "tokenizer.json")
    ours = load_tokenizer(str(path))
    ref = PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert ours.special_tokens["<|im_end|>"] == ref.convert_tokens_to_ids("<|im_end|>")
    text = render_text(full, "chatml", False)
    ids, mask = ours.encode_chat(full, "chatml", add_generation_prompt=False, return_loss_mask=True)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    trained = [i for i, m in zip(ids, mask) if m]
    assert ours.decode(trained, skip_special=False) == "Hi! How can I help you today?<|im_end|>"
    assert ours.stop_ids("chatml")[0] == ours.special_tokens["<|im_end|>"]


def test_hf_directory_with_added_tokens_equals_openchat(tmp_path, openchat):
    """A directory as OpenChat ships it (tokenizer.model + added_tokens.json + config) loads as openchat-3.5."""
    shutil.copy(mistral_model_path(), tmp_path / "tokenizer.model")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|end_of_turn|>": 32000, "<|pad_0|>": 32001}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_turn|>",
                                                                "pad_token": "<|end_of_turn|>"}))
    tok = load_tokenizer(str(tmp_path))
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.end_of_turn_id) == (32002, 32000, 32000, 32000)
    assert tok.encode_chat(MULTI) == openchat.encode_chat(MULTI)
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        load_tokenizer(str(tmp_path / "missing"))


def test_template_errors():
    from starling_jax.data import render
    with pytest.raises(ValueError, match="unknown chat template 'gpt4'"):
        render(MULTI, "gpt4")
    with pytest.raises(ValueError, match=r"messages\[1\].role: expected 'assistant'"):
        render([MULTI[0], MULTI[0]])
    with pytest.raises(ValueError, match="end with a user message"):
        render(MULTI[:2])


def test_sentencepiece_model_with_user_defined_specials(tmp_path):
    """A Yi-like SentencePiece .model (no dummy prefix, <|im_start|>/<|im_end|> user-defined, <|endoftext|> control),
    trained here in a second; the ChatML rendering splits exactly at its special tokens."""
    import io
    import sentencepiece as spm
    buf = io.BytesIO()
    corpus = ["hello there, how are you today?", "I am fine, thank you.", "user assistant says hi"] * 30
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=320, model_type="bpe", byte_fallback=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], control_symbols=["<|endoftext|>"],
        add_dummy_prefix=False, minloglevel=2)
    path = tmp_path / "yi_like.model"
    path.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tok = load_tokenizer(str(path))
    assert tok.special_tokens["<|im_start|>"] == 4 and tok.special_tokens["<|endoftext|>"] == 3
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    conv = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "I am fine."}]
    ids = tok.encode_chat(conv, "chatml", add_generation_prompt=False)
    want = ([4] + sp.encode("user\nhello there") + [5] + sp.encode("\n") + [4] + sp.encode("assistant\nI am fine.")
            + [5])
    assert ids == want
    assert tok.encode("x<|endoftext|>", parse_special=True) == sp.encode("x") + [3]  # parsed: a control piece's id
    assert 3 not in tok.encode("x<|endoftext|>")  # content: stays text
