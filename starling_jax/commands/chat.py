"""`starling-jax generate` and `starling-jax chat`: replies from a checkpoint, rendered in a chat template.

    starling-jax generate CHECKPOINT --prompt "Hi" [--prompt "..."] [--max-new-tokens 256] [--temperature 0.7]
    starling-jax chat CHECKPOINT                # interactive; /reset starts over, /exit (or Ctrl-D) quits

CHECKPOINT is a local Hugging Face directory (config.json + safetensors, e.g. one made by `starling-jax convert`) or a
starling_jax stage export: WORKDIR/<stage>/export, WORKDIR/<stage>, or WORKDIR (its newest finished language-model
stage, or --stage NAME). The tokenizer is the HF directory's own when it has one, else --tokenizer (default
openchat-3.5). The chat template is the checkpoint's own (the Jinja chat_template of its tokenizer_config.json or
chat_template.jinja, rendered as transformers does) unless --template names a built-in (openchat_3.5, chatml, ...);
without one it is openchat_3.5. Generation stops at the template's stop tokens (<|im_end|>, <|end_of_turn|>) and EOS,
and the reply is cut at its stop strings ("GPT4 Correct User:").

Prompt lengths are padded (on the left) up to a multiple of --length-bucket, so a chat compiles once per bucket, not
once per turn.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional, Sequence

import jax

from starling_jax import digests
from starling_jax.data import load_tokenizer
from starling_jax.errors import InputError
from starling_jax.generation import sampling
from starling_jax.generation.replies import generate_replies
from starling_jax.io import hub
from starling_jax.models import ModelConfig
from starling_jax.stages.export import load_weights

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Loading a checkpoint.


def _export_dir(path: str, stage: Optional[str]) -> Optional[str]:
    """The stage export directory that `path` names (an export, a stage directory or a workdir), or None."""
    def is_export(d):
        return all(os.path.isfile(os.path.join(d, f)) for f in ("summary.json", "model_config.json"))

    if stage is not None:
        path = os.path.join(path, stage)
    if is_export(path):
        return path
    if is_export(os.path.join(path, "export")):
        return os.path.join(path, "export")
    if stage is not None or not os.path.isdir(path):
        return None
    found = []  # a workdir: its finished stages that have a language-model head, newest first
    for name in sorted(os.listdir(path)):
        d = os.path.join(path, name, "export")
        if is_export(d):
            try:
                digests.verify(d, select=lambda rel: rel == "model_config.json")  # load_export checks the rest
                with open(os.path.join(d, "model_config.json"), encoding="utf-8") as f:
                    head = json.load(f).get("head", "lm")
            except digests.DigestMismatch as e:
                raise InputError(f"{e}; delete {d} and run the stage again") from None
            except (ValueError, AttributeError) as e:
                raise InputError(f"{d}/model_config.json: damaged ({e}); delete {d} and run the stage again") from None
            if head == "lm":
                found.append((os.path.getmtime(os.path.join(d, "summary.json")), d))
    return max(found)[1] if found else None


def load_checkpoint(path: str, stage: Optional[str] = None, dtype: Optional[str] = None
                    ) -> tuple[ModelConfig, dict, Optional[str]]:
    """(config, params, tokenizer path or None) of a HF directory (or hub id "hf:ORG/NAME[@REV]") or a stage export
    (see the module doc)."""

    path = hub.resolve(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    # A run's WORKDIR holds a config.json too (the experiment's): a HF directory is one with weight files.
    weights = os.path.isdir(path) and any(f.endswith((".safetensors", ".bin", ".pt")) for f in os.listdir(path))
    if os.path.isfile(os.path.join(path, "config.json")) and weights:
        config, params = load_weights(path, dtype=dtype)
        has_tok = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
        tokenizer = path if has_tok else None
    else:
        export = _export_dir(path, stage)
        if export is None:
            raise FileNotFoundError(
                f"{path!r} is neither a Hugging Face directory (no config.json) nor a starling_jax stage export "
                f"(WORKDIR/<stage>/export with summary.json and model_config.json)"
                + (f" for stage {stage!r}" if stage else " holding a finished language-model stage"))
        config, params = load_weights(export, dtype=dtype)
        log.info("loaded stage export %s", export)
        tokenizer = None
    if config.head != "lm":
        raise InputError(f"{path}: this is a reward model (head {config.head!r}); generation needs a language model "
                         f"(an SFT/RL stage or a *ForCausalLM directory)")
    return config, params, tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and streamed text.


def printable_prefix(text: str, stop_strings: Sequence[str]) -> int:
    """How much of a growing reply can be shown now: not a trailing partial UTF-8 character (decoded as U+FFFD) and
    not a tail that may be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for k in range(min(end, max((len(s) for s in stop_strings), default=0)), 0, -1):
        if any(s.startswith(text[end - k:end]) for s in stop_strings):
            return end - k
    return end


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> Optional[int]:
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else None


class Session:
    """A model, its tokenizer and a chat template, with the sampling options of the CLI."""

    system: Optional[str] = None  # a system message put before every conversation (--system)

    def __init__(self, args):

        self.config, self.params, tok_path = load_checkpoint(args.checkpoint, args.stage, args.dtype)
        self.tokenizer = load_tokenizer(tok_path or args.tokenizer)
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise InputError(f"tokenizer {self.tokenizer.name} has {self.tokenizer.vocab_size} ids but the model's "
                             f"embedding has {self.config.vocab_size} rows: pass the model's own --tokenizer")
        if args.max_new_tokens >= self.config.max_seq_len:
            raise InputError(f"--max-new-tokens {args.max_new_tokens}: the model's context is "
                             f"{self.config.max_seq_len} tokens, so at most {self.config.max_seq_len - 1} new tokens "
                             f"leave room for a prompt")
        self.template = self.tokenizer.template(args.template)
        self.system = getattr(args, "system", None)
        self.stop_ids = self.tokenizer.stop_ids(self.template)
        self.stop_strings = self.template.stop_strings
        self.args = args
        self.key = jax.random.key(args.seed)

    def _options(self) -> dict:
        a = self.args
        return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                    stop_ids=self.stop_ids)

    def prompt_ids(self, messages) -> list[int]:
        if self.system:
            messages = [{"role": "system", "content": self.system}] + list(messages)
        ids = self.tokenizer.encode_chat(messages, template=self.template)
        room = self.config.max_seq_len - self.args.max_new_tokens
        if room < 1:  # Session checks this up front; never slice with a negative room
            raise InputError(f"--max-new-tokens {self.args.max_new_tokens} leaves no room for a prompt in the model's "
                             f"{self.config.max_seq_len}-token context")
        if len(ids) > room:  # keep the most recent context
            log.warning("conversation of %d tokens cut to its last %d", len(ids), room)
            ids = ids[-room:]
        return ids

    def _next_key(self):
        self.key, key = jax.random.split(self.key)
        return key

    def generate(self, prompts: Sequence[str]) -> list[str]:
        """One reply per single-turn prompt, generated together as one left-padded batch."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        r = generate_replies(self.params, self.config, self.tokenizer, self.template,
                             [system + [{"role": "user", "content": p}] for p in prompts], self._next_key(),
                             self.args.max_new_tokens, temperature=self.args.temperature, top_k=self.args.top_k,
                             top_p=self.args.top_p, length_bucket=self.args.length_bucket,
                             room=self.config.max_seq_len - self.args.max_new_tokens)
        if r.truncated:
            log.warning("%d prompts cut to their last %d tokens", r.truncated,
                        self.config.max_seq_len - self.args.max_new_tokens)
        return [t.strip() for t in r.texts]

    def stream_reply(self, messages, write) -> str:
        """Generate the assistant's reply to `messages`, calling write(text) with each new piece as it comes."""
        tokens, mask = sampling.left_pad([self.prompt_ids(messages)], self.tokenizer.pad_id, self.args.length_bucket)
        ids: list[int] = []
        shown = 0
        text = ""
        for tok, live, _ in sampling.stream(self.params, self.config, tokens, mask, self._next_key(),
                                            **self._options()):
            if not live[0] or int(tok[0]) in self.stop_ids:
                break
            ids.append(int(tok[0]))
            text = self.tokenizer.decode(ids).lstrip()
            cut = _cut_at_stop(text, self.stop_strings)
            if cut is not None:
                text = text[:cut]
                break
            end = printable_prefix(text, self.stop_strings)
            if end > shown:
                write(text[shown:end])
                shown = end
        text = text.rstrip()
        if len(text) > shown:
            write(text[shown:])
        return text


# ----------------------------------------------------------------------------------------------------------------------
# Command line.


def _add_common(parser) -> None:
    parser.add_argument("checkpoint", help="HF directory, or a starling_jax WORKDIR / stage / stage export directory")
    parser.add_argument("--stage", default=None, help="stage name inside a WORKDIR (default: newest finished LM stage)")
    parser.add_argument("--tokenizer", default="openchat-3.5",
                        help="tokenizer name or path, when the checkpoint has none (default openchat-3.5)")
    parser.add_argument("--template", default="auto",
                        help="chat template: 'auto' (default) = the checkpoint's own (its tokenizer's Jinja "
                             "chat_template), else openchat_3.5; or a built-in name to override it")
    parser.add_argument("--system", default=None,
                        help="a system message (only with a checkpoint's own template; built-ins have none)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="parameter dtype (default: the checkpoint's)")
    parser.add_argument("--length-bucket", type=int, default=64,
                        help="pad prompt lengths up to a multiple of this (fewer compilations)")


def check_options(args) -> None:
    """The sampling options' ranges, checked before any model is loaded (the context length is checked by Session)."""
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if not args.temperature >= 0:  # also catches nan
        problems.append(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p {args.top_p}: must be in (0, 1] (1 = off)")
    if args.top_k < 0:
        problems.append(f"--top-k {args.top_k}: must be >= 0 (0 = off)")
    if args.length_bucket < 1:
        problems.append(f"--length-bucket {args.length_bucket}: must be >= 1")
    if problems:
        raise InputError("; ".join(problems))


def add_generate_arguments(parser) -> None:
    _add_common(parser)
    parser.add_argument("--prompt", action="append", default=[],
                        help="a user message (repeat for a batch); '-' reads one prompt per line from stdin")
    parser.add_argument("--json", action="store_true", help="print one JSON object {prompt, reply} per line")


def generate_cli(args) -> int:
    check_options(args)
    prompts = []
    for p in args.prompt:
        prompts += [line for line in sys.stdin.read().splitlines() if line.strip()] if p == "-" else [p]
    if not prompts:
        print("starling-jax generate: give at least one --prompt", file=sys.stderr)
        return 2
    session = Session(args)
    for prompt, reply in zip(prompts, session.generate(prompts)):
        if args.json:
            print(json.dumps({"prompt": prompt, "reply": reply}, ensure_ascii=False))
        else:
            print(f">>> {prompt}\n{reply}\n")
    return 0


def add_chat_arguments(parser) -> None:
    _add_common(parser)


def chat_cli(args, input_fn=input, out=None) -> int:
    out = out or sys.stdout
    check_options(args)
    session = Session(args)
    print(f"chatting with {args.checkpoint} ({session.template.name}); /reset starts over, /exit quits", file=out)
    messages: list[dict] = []
    while True:
        try:
            line = input_fn("User: ")
        except EOFError:
            print(file=out)
            return 0
        line = line.strip()
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = []
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        print("Assistant: ", end="", file=out, flush=True)
        reply = session.stream_reply(messages, lambda s: print(s, end="", file=out, flush=True))
        print(file=out, flush=True)
        messages.append({"role": "assistant", "content": reply})


add_arguments = add_generate_arguments
cli = generate_cli
