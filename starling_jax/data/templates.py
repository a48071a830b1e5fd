"""Chat templates: render neutral messages into text parts for a tokenizer.

A conversation is a list of messages {"role": "user" | "assistant", "content": str} (no system prompt: Starling's
templates have none). A template renders it into `parts`: (text, is_assistant) pairs whose concatenation is the exact
prompt string of the reference implementation. Special tokens appear in that text literally ("<|end_of_turn|>") and
the tokenizer turns them into single ids. `is_assistant` marks what an SFT loss trains on: an assistant reply and the
token that closes it, so the model learns to stop.

A checkpoint's own Hugging Face chat template (Jinja, from tokenizer_config.json or chat_template.jinja) is a
`JinjaTemplate`, rendered as transformers' apply_chat_template renders it; `Tokenizer.template("auto")` picks it when
the tokenizer has one. The named templates above stay for Starling's exact formats and as overrides.

Re-rendering for a reward model with another template is just rendering the same messages with that template
(`render(messages + [{"role": "assistant", "content": reply}], rm_template, add_generation_prompt=False)`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Optional, Sequence

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
    strip_content: bool = False  # strip each turn's text of surrounding whitespace before rendering it


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

# The conversion in the authors' RL trainer (thwu1/trlx examples/hh/utils.py from_openchat_to_llama at 0fb4e1e):
# each turn's text stripped, "[INST] {user} [/INST] {assistant}</s>" turns joined by one space, after the tokenizer's
# BOS: "[INST] u1 [/INST] a1</s> [INST] u2 [/INST] a2</s>".
LLAMA2_TRAINER = ChatTemplate(
    name="llama2_trainer",
    user_prefix="[INST] ", user_suffix="",
    assistant_prefix="[/INST]", assistant_lead=" ", assistant_suffix="</s>",
    separator=" ", add_bos=True, required_special=("</s>",), stop_tokens=("</s>",), strip_content=True,
    source="Starling RL trainer's OpenChat -> Llama-2 conversion (thwu1/trlx examples/hh/utils.py)",
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


def get_template(name: "str | ChatTemplate | JinjaTemplate") -> "ChatTemplate | JinjaTemplate":
    if isinstance(name, (ChatTemplate, JinjaTemplate)):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def check_messages(messages: Sequence[Message], where: str = "messages", allow_system: bool = False) -> None:
    """Raise ValueError unless messages alternate user/assistant starting with user, with string contents (after one
    leading system message when allow_system: a Jinja template's system prompt)."""
    if not messages:
        raise ValueError(f"{where}: empty conversation")
    first = 1 if allow_system and isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}[{i}]: a message needs 'role' and 'content', got {m!r}")
        if i < first:
            if not isinstance(m["content"], str):
                raise ValueError(f"{where}[{i}].content: expected str, got {type(m['content']).__name__}")
            continue
        want = "user" if (i - first) % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"{where}[{i}].role: expected {want!r} (turns alternate, user first), got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}[{i}].content: expected str, got {type(m['content']).__name__}")


def render(messages: Sequence[Message], template: "str | ChatTemplate | JinjaTemplate" = "openchat_3.5",
           add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
    """Render a conversation into (text, is_assistant) parts.

    add_generation_prompt=True ends with the assistant prefix (the conversation must end with a user turn); False
    renders every message (use it for a full conversation ending with the reply to be scored or trained on).
    """
    text, assistant, _ = layout(messages, template, add_generation_prompt, assistant_spans=True)
    parts, pos = [], 0
    for a, b in assistant:
        if a > pos:
            parts.append((text[pos:a], False))
        parts.append((text[a:b], True))
        pos = b
    if pos < len(text):
        parts.append((text[pos:], False))
    return parts


def layout(messages: Sequence[Message], template, add_generation_prompt: bool = True, assistant_spans: bool = True
           ) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """(rendered text, assistant spans, content spans): character ranges [a, b) of the text.

    Assistant spans are what SFT trains on (a reply and the scaffolding closing it); content spans are the messages'
    own text, in which special-token strings must stay text (only the template's scaffolding yields control ids).
    """
    if isinstance(template, JinjaTemplate):
        return template.layout(messages, add_generation_prompt, assistant_spans)
    t = get_template(template)
    check_messages(messages)
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise ValueError("add_generation_prompt=True needs the conversation to end with a user message")
    text, assistant, content = "", [], []

    def put(piece: str, is_content: bool = False):
        nonlocal text
        if is_content and piece:
            content.append((len(text), len(text) + len(piece)))
        text += piece

    for i, m in enumerate(messages):
        if i > 0:
            put(t.separator)
        body = m["content"].strip() if t.strip_content else m["content"]
        if m["role"] == "user":
            put(t.user_prefix), put(body, True), put(t.user_suffix)
        else:
            put(t.assistant_prefix)
            start = len(text)
            put(t.assistant_lead), put(body, True), put(t.assistant_suffix)
            assistant.append((start, len(text)))
    if add_generation_prompt:
        put(t.separator)
        put(t.assistant_prefix)
    return text, assistant, content


def render_text(messages: Sequence[Message], template: "str | ChatTemplate | JinjaTemplate" = "openchat_3.5",
                add_generation_prompt: bool = True) -> str:
    """The rendered conversation as one string (without the BOS the tokenizer adds when template.add_bos)."""
    return layout(messages, template, add_generation_prompt, assistant_spans=False)[0]


# ----------------------------------------------------------------------------------------------------------------------
# A checkpoint's own Jinja chat template (tokenizer_config.json "chat_template" / chat_template.jinja)


def _compile_jinja(source: str):
    """Compile like transformers' apply_chat_template: a sandboxed, immutable environment with trim_blocks and
    lstrip_blocks, loop controls, a non-escaping tojson, raise_exception and strftime_now, and {% generation %}
    blocks rendered as their body."""
    import datetime

    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


@dataclasses.dataclass(frozen=True)
class JinjaTemplate:
    """A Hugging Face chat template (Jinja source), rendered exactly as transformers' apply_chat_template does.

    variables: the tokenizer's special-token strings the template may use (bos_token, eos_token, unk_token,
    pad_token). Messages may start with one system message. stop_tokens: the special tokens that close an assistant
    turn (found by rendering a probe conversation), where generation stops.
    """
    name: str
    source: str
    variables: tuple[tuple[str, str], ...] = ()
    stop_tokens: tuple[str, ...] = ()
    stop_strings: tuple[str, ...] = ()
    add_bos: bool = False  # the template writes any BOS itself ({{ bos_token }})
    required_special: tuple[str, ...] = ()

    def render_text(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        check_messages(messages, allow_system=True)
        compiled = _compiled(self.source)
        return compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **dict(self.variables))

    def layout(self, messages, add_generation_prompt=True, assistant_spans=True):
        """See `layout`. Content spans: message i's text starts where a sentinel put in its place appears when the
        conversation is rendered again (the rendering before it must be the same). Assistant spans come from rendering
        prefixes of the conversation: reply i is what messages[:i+1] adds to messages[:i] with a generation prompt."""
        if add_generation_prompt and messages and messages[-1].get("role") != "user":
            raise ValueError("add_generation_prompt=True needs the conversation to end with a user message")
        text = self.render_text(messages, add_generation_prompt)
        content, assistant = [], []
        for i, m in enumerate(messages):
            body = m["content"]
            if body:
                probe = [dict(x) for x in messages]
                probe[i]["content"] = _SENTINEL
                try:
                    probed = self.render_text(probe, add_generation_prompt)
                    at = probed.find(_SENTINEL)
                except Exception:
                    at = -1
                if at >= 0 and probed[:at] != text[:at]:
                    at = -1
                span = None
                if at >= 0:
                    for piece in (body, body.strip(), body.lstrip(), body.rstrip()):
                        if piece and text.startswith(piece, at):
                            span = (at, at + len(piece))
                            break
                if span is None:
                    raise ValueError(f"chat template {self.name}: message {i} ({m['role']}) does not appear verbatim "
                                     f"in the rendering, so its text cannot be told from the template's scaffolding")
                content.append(span)
            if assistant_spans and m["role"] == "assistant":
                start = self._prefix(messages[:i], True)
                end = self._prefix(messages[:i + 1], False)
                if start is None or end is None or not end.startswith(start) or not text.startswith(end):
                    raise ValueError(f"chat template {self.name}: rendering is not prefix-stable at message {i} "
                                     f"(an earlier turn renders differently once later turns follow), so the "
                                     f"assistant spans for SFT loss masks cannot be derived from it")
                assistant.append((len(start), len(end)))
        return text, assistant, content

    def _prefix(self, messages, add_generation_prompt):
        if not messages or (add_generation_prompt and messages[-1]["role"] != "user"):
            return None if messages else ""
        try:
            return self.render_text(messages, add_generation_prompt)
        except Exception:
            return None


_SENTINEL = "\ue000\ue001content\ue001\ue000"  # private-use characters: no template writes them


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    return _compile_jinja(source)


def jinja_from_tokenizer_config(source: str, name: str, variables: dict, special_tokens: Sequence[str],
                                eos: Optional[str] = None) -> JinjaTemplate:
    """A JinjaTemplate with its stop tokens: the special tokens the template writes right after an assistant reply
    (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Llama 2's </s>), plus the tokenizer's EOS."""
    variables = {k: v for k, v in variables.items() if v is not None}
    t = JinjaTemplate(name=name, source=source, variables=tuple(sorted(variables.items())))
    stops = []
    probe = "\ue000PROBE\ue001"
    try:
        text = t.render_text([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], False)
    except Exception:
        text = ""
    after = text[text.find(probe) + len(probe):] if probe in text else ""
    tail = after.lstrip()
    for s in sorted(special_tokens, key=len, reverse=True):
        if tail.startswith(s):
            stops.append(s)
            break
    if eos and eos not in stops:
        stops.append(eos)
    return dataclasses.replace(t, stop_tokens=tuple(stops))


def _jinja_literal(text: str) -> str:
    """`text` as a Jinja string literal (Jinja unescapes it like Python: backslashes, quotes, newlines)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return "'" + escaped + "'"


def jinja_template(template: str | ChatTemplate) -> str:
    """A Jinja chat template (the `chat_template` of a Hugging Face tokenizer_config.json) that renders like `render`:
    transformers' `apply_chat_template(messages, tokenize=False)` returns `render_text(messages)` prefixed with the
    tokenizer's bos_token when the template adds one. Roles must alternate user/assistant from a user turn (anything
    else raises, as in `check_messages`). A checkpoint's own JinjaTemplate is returned as its source."""
    t = get_template(template)
    if isinstance(t, JinjaTemplate):
        return t.source
    lit = _jinja_literal
    sep = f"{{% if not loop.first %}}{{{{ {lit(t.separator)} }}}}{{% endif %}}" if t.separator else ""
    gen_sep = f"{{{{ {lit(t.separator)} }}}}" if t.separator else ""
    content = "(message['content'] | trim)" if t.strip_content else "message['content']"
    return (
        ("{{ bos_token }}" if t.add_bos else "")
        + "{% for message in messages %}"
        + "{% if (message['role'] == 'user') != loop.index0 is even or message['role'] not in ('user', 'assistant') %}"
        + "{{ raise_exception('Conversation roles must alternate user/assistant/user/... starting with user') }}"
        + "{% endif %}"
        + sep
        + "{% if message['role'] == 'user' %}"
        + f"{{{{ {lit(t.user_prefix)} + {content} + {lit(t.user_suffix)} }}}}"
        + "{% else %}"
        + f"{{{{ {lit(t.assistant_prefix + t.assistant_lead)} + {content} + {lit(t.assistant_suffix)} }}}}"
        + "{% endif %}"
        + "{% endfor %}"
        + f"{{% if add_generation_prompt %}}{gen_sep}{{{{ {lit(t.assistant_prefix)} }}}}{{% endif %}}"
    )
