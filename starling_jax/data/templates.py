"""Chat templates: render neutral messages into text parts for a tokenizer.

A conversation is a list of messages {"role": "user" | "assistant", "content": str} (no system prompt: Starling's
templates have none). A template renders it into `parts`: (text, is_assistant) pairs whose concatenation is the exact
prompt string of the reference implementation. Special tokens appear in that text literally ("<|end_of_turn|>") and
the tokenizer turns them into single ids. `is_assistant` marks what an SFT loss trains on: an assistant reply and the
token that closes it, so the model learns to stop.

Re-rendering for a reward model with another template is just rendering the same messages with that template
(`render(messages + [{"role": "assistant", "content": reply}], rm_template, add_generation_prompt=False)`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

Message = dict  # {"role": "user" | "assistant", "content": str}


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """One chat format, as data.

    A user turn renders as `user_prefix + content + user_suffix`; an assistant turn as
    `assistant_prefix + assistant_lead + content + assistant_suffix`, where `assistant_lead + content + assistant_suffix`
    is the trained (assistant) part. Turns are joined by `separator`. A generation prompt is `assistant_prefix`.
    """
    name: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_lead: str  # text the model itself writes before the reply (OpenChat: the space after "Assistant:")
    assistant_suffix: str
    separator: str = ""
    add_bos: bool = True  # the tokenizer puts its BOS id first
    required_special: tuple[str, ...] = ()  # special tokens the tokenizer must encode as single ids
    stop_tokens: tuple[str, ...] = ()  # generation stops at these special tokens (their ids from the tokenizer)
    stop_strings: tuple[str, ...] = ()  # ... and at these strings in the decoded text
    source: str = ""


OPENCHAT_3_5 = ChatTemplate(
    name="openchat_3.5",
    user_prefix="GPT4 Correct User: ", user_suffix="<|end_of_turn|>",
    assistant_prefix="GPT4 Correct Assistant:", assistant_lead=" ", assistant_suffix="<|end_of_turn|>",
    add_bos=True, required_special=("<|end_of_turn|>",), stop_tokens=("<|end_of_turn|>",),
    stop_strings=("GPT4 Correct User:", "GPT4 Correct Assistant:"),
    source="openchat/openchat_3.5 model card; fschat conversation template 'openchat_3.5'",
)

OPENCHAT_3_5_CODE = dataclasses.replace(
    OPENCHAT_3_5, name="openchat_3.5_code", user_prefix="Code User: ", assistant_prefix="Code Assistant:",
    stop_strings=("Code User:", "Code Assistant:"), source="openchat/openchat_3.5 model card (coding mode)",
)

# Starling-RM-7B-alpha's model card scores "<s>[INST] {user} </s> [/INST] {assistant}</s>": the BOS is in the text
# (the card's tokenizer call adds a second one; we keep one). `</s>` after the user turn is part of that format.
LLAMA2_STARLING_RM = ChatTemplate(
    name="llama2",
    user_prefix="<s>[INST] ", user_suffix=" </s> [/INST]",
    assistant_prefix="", assistant_lead=" ", assistant_suffix="</s>",
    add_bos=False, required_special=("<s>", "</s>"), stop_tokens=("</s>",),
    source="berkeley-nest/Starling-RM-7B-alpha model card",
)

# The conversion in the authors' RL trainer: "[INST] {user} [/INST] {assistant}</s>" after the tokenizer's BOS.
LLAMA2_TRAINER = ChatTemplate(
    name="llama2_trainer",
    user_prefix="[INST] ", user_suffix=" [/INST]",
    assistant_prefix="", assistant_lead=" ", assistant_suffix="</s>",
    add_bos=True, required_special=("</s>",), stop_tokens=("</s>",),
    source="Starling RL trainer's OpenChat -> Llama-2 conversion",
)

# Starling-RM-34B (Yi-34B-Chat): ChatML, turns separated by a newline, no BOS.
CHATML = ChatTemplate(
    name="chatml",
    user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>",
    assistant_prefix="<|im_start|>assistant\n", assistant_lead="", assistant_suffix="<|im_end|>",
    separator="\n", add_bos=False, required_special=("<|im_start|>", "<|im_end|>"), stop_tokens=("<|im_end|>",),
    stop_strings=("<|im_start|>",),
    source="Nexusflow/Starling-RM-34B model card; fschat conversation template 'Yi-34b-chat'",
)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t for t in (OPENCHAT_3_5, OPENCHAT_3_5_CODE, LLAMA2_STARLING_RM, LLAMA2_TRAINER, CHATML)
}


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    if isinstance(name, ChatTemplate):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def check_messages(messages: Sequence[Message], where: str = "messages") -> None:
    """Raise ValueError unless messages alternate user/assistant starting with user, with string contents."""
    if not messages:
        raise ValueError(f"{where}: empty conversation")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}[{i}]: a message needs 'role' and 'content', got {m!r}")
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"{where}[{i}].role: expected {want!r} (turns alternate, user first), got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}[{i}].content: expected str, got {type(m['content']).__name__}")


def render(messages: Sequence[Message], template: str | ChatTemplate = "openchat_3.5",
           add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
    """Render a conversation into (text, is_assistant) parts.

    add_generation_prompt=True ends with the assistant prefix (the conversation must end with a user turn); False
    renders every message (use it for a full conversation ending with the reply to be scored or trained on).
    """
    t = get_template(template)
    check_messages(messages)
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise ValueError("add_generation_prompt=True needs the conversation to end with a user message")
    parts: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        if i > 0 and t.separator:
            parts.append((t.separator, False))
        if m["role"] == "user":
            parts.append((t.user_prefix + m["content"] + t.user_suffix, False))
        else:
            if t.assistant_prefix:
                parts.append((t.assistant_prefix, False))
            parts.append((t.assistant_lead + m["content"] + t.assistant_suffix, True))
    if add_generation_prompt:
        if t.separator:
            parts.append((t.separator, False))
        if t.assistant_prefix:
            parts.append((t.assistant_prefix, False))
    return parts


def render_text(messages: Sequence[Message], template: str | ChatTemplate = "openchat_3.5",
                add_generation_prompt: bool = True) -> str:
    """The rendered conversation as one string (without the BOS the tokenizer adds when template.add_bos)."""
    return "".join(text for text, _ in render(messages, template, add_generation_prompt))


def _jinja_literal(text: str) -> str:
    """`text` as a Jinja string literal (Jinja unescapes it like Python: backslashes, quotes, newlines)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return "'" + escaped + "'"


def jinja_template(template: str | ChatTemplate) -> str:
    """A Jinja chat template (the `chat_template` of a Hugging Face tokenizer_config.json) that renders like `render`:
    transformers' `apply_chat_template(messages, tokenize=False)` returns `render_text(messages)` prefixed with the
    tokenizer's bos_token when the template adds one. Roles must alternate user/assistant from a user turn (anything
    else raises, as in `check_messages`)."""
    t = get_template(template)
    lit = _jinja_literal
    sep = f"{{% if not loop.first %}}{{{{ {lit(t.separator)} }}}}{{% endif %}}" if t.separator else ""
    gen_sep = f"{{{{ {lit(t.separator)} }}}}" if t.separator else ""
    return (
        ("{{ bos_token }}" if t.add_bos else "")
        + "{% for message in messages %}"
        + "{% if (message['role'] == 'user') != loop.index0 is even or message['role'] not in ('user', 'assistant') %}"
        + "{{ raise_exception('Conversation roles must alternate user/assistant/user/... starting with user') }}"
        + "{% endif %}"
        + sep
        + "{% if message['role'] == 'user' %}"
        + f"{{{{ {lit(t.user_prefix)} + message['content'] + {lit(t.user_suffix)} }}}}"
        + "{% else %}"
        + f"{{{{ {lit(t.assistant_prefix + t.assistant_lead)} + message['content'] + {lit(t.assistant_suffix)} }}}}"
        + "{% endif %}"
        + "{% endfor %}"
        + f"{{% if add_generation_prompt %}}{gen_sep}{{{{ {lit(t.assistant_prefix)} }}}}{{% endif %}}"
    )
