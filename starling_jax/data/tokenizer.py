"""Tokenizers: SentencePiece (.model) or Hugging Face tokenizers (tokenizer.json), plus added special tokens.

Rules, matching the reference (Hugging Face "legacy" Llama/Mistral) tokenizers:
- a special token written in text ("<|end_of_turn|>", "<s>", "</s>", ...) becomes its single id;
- the text between special tokens is encoded segment by segment, so text after a special token starts a new
  SentencePiece segment (it gets SentencePiece's leading "▁" again);
- encode(text) adds no BOS unless asked; encode_chat adds it when the template says so.

Names: "openchat-3.5" (Mistral's SentencePiece model from mistral-common plus <|end_of_turn|> = 32000 and
<|pad_0|> = 32001; eos = pad = end_of_turn = 32000, vocab 32002) and "mistral-7b-v0.1" (the bare model, vocab 32000,
pad = unk = 0). Any path to a SentencePiece .model, an HF tokenizer.json, or a directory holding one of them (its
added_tokens.json / tokenizer_config.json name extra special tokens and bos/eos/pad).

Why this file is long (~420 lines): two backends (SentencePiece, HF tokenizers) behind one Tokenizer whose
special-token splitting and chat encoding must match the reference tokenizers exactly, plus writing them back for an
HF export; the parts share the special-token table.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Iterable, Optional, Sequence

import numpy as np

from starling_jax.data import templates as templates_lib
from starling_jax.errors import InputError
from starling_jax.io import hub

OPENCHAT_SPECIAL = {"<|end_of_turn|>": 32000, "<|pad_0|>": 32001}
KNOWN_TOKENIZERS = ("openchat-3.5", "mistral-7b-v0.1")  # names load_tokenizer knows besides paths


def mistral_model_path() -> str:
    """Path of Mistral-7B-v0.1's SentencePiece model shipped inside mistral-common."""
    import mistral_common
    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    if not os.path.exists(path):
        raise FileNotFoundError(f"mistral-common has no {path}; install mistral-common>=1.5")
    return path


@contextlib.contextmanager
def _reading(path: str, what: str):
    """Any error while a library parses a tokenizer file becomes one InputError naming the file."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:  # sentencepiece: OSError/RuntimeError; tokenizers: a bare Exception; json: ValueError
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise InputError(f"{path}: cannot read this {what} ({detail}); re-download it, or pass another "
                         f"--tokenizer / model.tokenizer") from e


class _SentencePieceBackend:
    def __init__(self, path: str):
        import sentencepiece as spm
        with _reading(path, "SentencePiece model"):
            self.sp = spm.SentencePieceProcessor(model_file=path)
        self.path = path
        self.size = self.sp.get_piece_size()
        self._specials = None

    def specials(self) -> dict[str, int]:
        """Control, unknown and user-defined pieces (e.g. Yi's <|im_start|>): HF treats their strings as special
        tokens, and control pieces never come out of SentencePiece's own encoding of text."""
        if self._specials is None:
            from sentencepiece import sentencepiece_model_pb2 as pb
            proto = pb.ModelProto()
            proto.ParseFromString(self.sp.serialized_model_proto())
            kinds = (pb.ModelProto.SentencePiece.CONTROL, pb.ModelProto.SentencePiece.UNKNOWN,
                     pb.ModelProto.SentencePiece.USER_DEFINED)
            self._specials = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in kinds}
        return self._specials

    def encode_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and their [begin, end) character spans in `text`."""
        proto = self.sp.encode(text, return_type="proto")
        ids = [p.id for p in proto.pieces]
        if text.isascii():
            return ids, [(p.begin, p.end) for p in proto.pieces]
        # SentencePiece spans are UTF-8 byte offsets: map them back to characters.
        byte_to_char = np.zeros(len(text.encode("utf-8")) + 1, np.int64)
        pos = 0
        for ci, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            byte_to_char[pos:pos + n] = ci
            pos += n
        byte_to_char[pos] = len(text)
        spans = [(int(byte_to_char[p.begin]), int(byte_to_char[p.end])) for p in proto.pieces]
        return ids, spans

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)


class _HFBackend:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer
        with _reading(path, "tokenizer.json"):
            self.tok = HFTokenizer.from_file(path)
        # Special tokens are recognised by Tokenizer (only in a template's scaffolding), never by the backend.
        self.tok.encode_special_tokens = True
        self.path = path
        self.size = self.tok.get_vocab_size(with_added_tokens=True)

    def specials(self) -> dict[str, int]:
        return {tok.content: i for i, tok in self.tok.get_added_tokens_decoder().items() if tok.special}

    def encode_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(i)


class Tokenizer:
    """Text <-> token ids with single-id special tokens and chat rendering.

    Attributes: name, vocab_size (embedding rows the ids need), bos_id, eos_id, pad_id, end_of_turn_id (None when the
    tokenizer has no <|end_of_turn|>), special_tokens {string: id}.
    """

    def __init__(self, backend, name: str, added: Optional[dict[str, int]] = None, bos: Optional[str] = None,
                 eos: Optional[str] = None, pad: Optional[str] = None):
        self._backend = backend
        self.name = name
        added = dict(added or {})
        for tok, i in added.items():
            if i < backend.size and tok not in backend.specials():
                raise ValueError(f"tokenizer {name}: added token {tok!r} id {i} collides with the base vocabulary "
                                 f"(size {backend.size}, piece {backend.id_to_piece(i)!r})")
        self.special_tokens: dict[str, int] = {**backend.specials(), **added}
        self.vocab_size = max([backend.size] + [i + 1 for i in self.special_tokens.values()])
        self._id_to_special = {i: s for s, i in self.special_tokens.items()}
        # Longest first so that no special token is split by a shorter one that is its prefix.
        names = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(s) for s in names)) if names else None
        self.bos_id = self._lookup(bos, ("<s>", "<|startoftext|>", "<bos>"))
        self.eos_id = self._lookup(eos, ("</s>", "<|endoftext|>", "<eos>"))
        self.end_of_turn_id = self.special_tokens.get("<|end_of_turn|>")
        self.chat_template = None  # the checkpoint's own Jinja template (templates.JinjaTemplate), set by load_tokenizer
        self.pad_id = self._lookup(pad, ("<unk>", "<pad>"))
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0

    def _lookup(self, given: Optional[str], candidates: Sequence[str]) -> Optional[int]:
        if given is not None:
            if given not in self.special_tokens:
                raise ValueError(f"tokenizer {self.name}: {given!r} is not one of its special tokens "
                                 f"{sorted(self.special_tokens)}")
            return self.special_tokens[given]
        for c in candidates:
            if c in self.special_tokens:
                return self.special_tokens[c]
        return None

    def __repr__(self):
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, end_of_turn={self.end_of_turn_id})")

    def token_id(self, special: str) -> int:
        if special not in self.special_tokens:
            raise ValueError(f"tokenizer {self.name} has no special token {special!r}; it has "
                             f"{sorted(self.special_tokens)}")
        return self.special_tokens[special]

    # -- encoding ------------------------------------------------------------------------------------------------
    def _encode_with_spans(self, text: str, spans_wanted: bool = True, parse_special: bool = True,
                           protected: Sequence[tuple[int, int]] = ()) -> tuple[list[int], list[tuple[int, int]]]:
        """Split on special-token strings (parse_special; none inside a `protected` character range), encode each
        text segment on its own; spans are character offsets in `text`."""
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        matches = list(self._special_re.finditer(text)) if self._special_re and parse_special else []
        if protected:
            matches = [m for m in matches if not any(a < m.end() and m.start() < b for a, b in protected)]
        for m in matches + [None]:
            end = m.start() if m is not None else len(text)
            if end > pos and spans_wanted:
                seg_ids, seg_spans = self._backend.encode_spans(text[pos:end])
                ids += seg_ids
                spans += [(pos + a, pos + b) for a, b in seg_spans]
            elif end > pos:
                ids += self._backend.encode(text[pos:end])
            if m is not None:
                ids.append(self.special_tokens[m.group()])
                spans.append((m.start(), m.end()))
                pos = m.end()
        return ids, spans

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in it ("</s>", "<|im_end|>") stay text unless parse_special:
        content (messages, answers, replies, prompts) never yields control ids; only a template's scaffolding does."""
        ids, _ = self._encode_with_spans(text, spans_wanted=False, parse_special=parse_special)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def encode_batch(self, texts: Iterable[str], add_bos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos) for t in texts]

    def template(self, template=None):
        """The chat template `template` names: "auto" (or None) is this tokenizer's own (the checkpoint's Jinja
        chat_template) when it has one, else openchat_3.5; a built-in name or a template object is used as is."""
        if template is None or template == "auto":
            return self.chat_template if self.chat_template is not None else templates_lib.get_template("openchat_3.5")
        return templates_lib.get_template(template)

    def encode_chat(self, messages: Sequence[dict], template=None, add_generation_prompt: bool = True,
                    return_loss_mask: bool = False):
        """Token ids of a rendered conversation (template: see `template`; default "auto").

        Special tokens come only from the template's scaffolding: special-token strings inside message contents are
        encoded as text. return_loss_mask=True returns (ids, loss_mask) with loss_mask[t] = 1 where token t belongs to
        an assistant reply or the scaffolding closing it (e.g. <|end_of_turn|>): what SFT trains on, every turn of a
        multi-turn chat.
        """
        t = self.template(template)
        for s in t.required_special:
            if s not in self.special_tokens:
                raise ValueError(f"chat template {t.name!r} needs {s!r} as a single special token, but tokenizer "
                                 f"{self.name} has none (its special tokens: {sorted(self.special_tokens)})")
        text, assistant_spans, content = templates_lib.layout(messages, t, add_generation_prompt,
                                                              assistant_spans=return_loss_mask)
        ids, spans = self._encode_with_spans(text, spans_wanted=return_loss_mask, protected=content)
        if t.add_bos:
            if self.bos_id is None:
                raise ValueError(f"chat template {t.name!r} starts with BOS but tokenizer {self.name} has no BOS")
            ids = [self.bos_id] + ids
            spans = [(0, 0)] + spans
        if not return_loss_mask:
            return ids
        assistant = np.zeros(len(text) + 1, bool)
        for a, b in assistant_spans:
            assistant[a:b] = True
        # A token trains when its first character is assistant text (a BOS or empty span never trains).
        mask = [int(b < e and assistant[b]) for b, e in spans]
        return ids, mask

    # -- decoding ------------------------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ids. Special tokens are dropped (skip_special) or written as their strings."""
        ids = [int(i) for i in ids]
        for k, i in enumerate(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"tokenizer {self.name}: id {i} at position {k} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        out: list[str] = []
        run: list[int] = []
        for i in ids + [None]:
            if i is not None and i not in self._id_to_special:
                run.append(i)
                continue
            if run:
                out.append(self._backend.decode(run))
                run = []
            if i is not None and not skip_special:
                out.append(self._id_to_special[i])
        return "".join(out)

    def stop_ids(self, template=None) -> tuple[int, ...]:
        """Generation stop ids for a template (those of its stop tokens this tokenizer has) plus EOS."""
        t = self.template(template)
        ids = [self.special_tokens[s] for s in t.stop_tokens if s in self.special_tokens]
        if self.eos_id is not None and self.eos_id not in ids:
            ids.append(self.eos_id)
        return tuple(ids)


def _hf_dir_config(directory: str) -> tuple[dict[str, int], dict]:
    """added_tokens.json and tokenizer_config.json of an HF tokenizer directory (either may be absent)."""
    added: dict[str, int] = {}
    config: dict = {}
    path = os.path.join(directory, "added_tokens.json")
    if os.path.exists(path):
        with _reading(path, "added_tokens.json"), open(path, encoding="utf-8") as f:
            added = {str(k): int(v) for k, v in json.load(f).items()}
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(path):
        with _reading(path, "tokenizer_config.json"), open(path, encoding="utf-8") as f:
            config = json.load(f)
            for i, tok in (config.get("added_tokens_decoder") or {}).items():
                added.setdefault(tok["content"] if isinstance(tok, dict) else str(tok), int(i))
    return added, config


def _token_name(value) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """A Tokenizer by name ("openchat-3.5", "mistral-7b-v0.1") or path (.model, tokenizer.json, or a directory)."""
    if name_or_path == "openchat-3.5":
        return Tokenizer(_SentencePieceBackend(mistral_model_path()), "openchat-3.5", added=OPENCHAT_SPECIAL,
                         eos="<|end_of_turn|>", pad="<|end_of_turn|>")
    if name_or_path == "mistral-7b-v0.1":
        return Tokenizer(_SentencePieceBackend(mistral_model_path()), "mistral-7b-v0.1")
    if name_or_path.startswith("hf:"):
        name_or_path = hub.resolve(name_or_path)
    path = name_or_path
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer {path!r}: neither a known name ('openchat-3.5', 'mistral-7b-v0.1') nor "
                                f"an existing path to a .model file, a tokenizer.json or a directory holding one")
    added: dict[str, int] = {}
    config: dict = {}
    if os.path.isdir(path):
        added, config = _hf_dir_config(path)
        for fname in ("tokenizer.json", "tokenizer.model"):
            if os.path.exists(os.path.join(path, fname)):
                path = os.path.join(path, fname)
                break
        else:
            raise FileNotFoundError(f"tokenizer directory {name_or_path!r} holds neither tokenizer.json nor "
                                    f"tokenizer.model")
    if path.endswith(".json"):
        backend = _HFBackend(path)
        added = {}  # tokenizer.json already carries its added tokens
    else:
        backend = _SentencePieceBackend(path)
        added = {k: v for k, v in added.items() if v >= backend.size}
    tok = Tokenizer(backend, name_or_path, added=added, bos=_token_name(config.get("bos_token")),
                    eos=_token_name(config.get("eos_token")), pad=_token_name(config.get("pad_token")))
    if os.path.isdir(name_or_path):
        source = _chat_template_source(name_or_path, config)
        if source is not None:
            variables = {k: _token_name(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
            eos = _token_name(config.get("eos_token")) or tok._id_to_special.get(tok.eos_id)
            tok.chat_template = templates_lib.jinja_from_tokenizer_config(
                source, f"{name_or_path} (its chat template)", variables, list(tok.special_tokens), eos)
    return tok


def _chat_template_source(directory: str, config: dict) -> Optional[str]:
    """The directory's Jinja chat template: chat_template.jinja (transformers 5), else tokenizer_config.json's
    chat_template (a string, or a list of named templates of which "default" is used)."""
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read()
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


# ----------------------------------------------------------------------------------------------------------------------
# Writing a Hugging Face tokenizer directory.


def save_hf_tokenizer(tokenizer: Tokenizer, directory: str, chat_template: Optional[str] = None,
                      pad: Optional[int] = None, model_max_length: Optional[int] = None) -> list[str]:
    """Write the files transformers' AutoTokenizer (and load_tokenizer) read for `tokenizer` into `directory`:
    its model file (tokenizer.model for SentencePiece, tokenizer.json for HF tokenizers, copied as is),
    tokenizer_config.json (class, bos/eos/pad/unk, every added special token, `chat_template` when given) and
    special_tokens_map.json. pad: the pad id to declare (default tokenizer.pad_id). Returns the file names written.

    A SentencePiece tokenizer is declared as a "legacy" LlamaTokenizer (what Mistral and OpenChat ship): special-token
    strings become single ids, the text between them is encoded segment by segment, and BOS is added by the template
    (`{{ bos_token }}`), not by apply_chat_template."""
    import shutil

    os.makedirs(directory, exist_ok=True)
    backend = tokenizer._backend
    source = getattr(backend, "path", None)
    if source is None or not os.path.isfile(source):
        raise ValueError(f"tokenizer {tokenizer.name}: no model file to copy (backend {type(backend).__name__})")
    sentencepiece = isinstance(backend, _SentencePieceBackend)
    model_file = "tokenizer.model" if sentencepiece else "tokenizer.json"
    shutil.copyfile(source, os.path.join(directory, model_file))

    def name(i: Optional[int]) -> Optional[str]:
        return None if i is None else tokenizer._id_to_special.get(i)

    pad = tokenizer.pad_id if pad is None else pad
    specials = {"bos_token": name(tokenizer.bos_id), "eos_token": name(tokenizer.eos_id), "pad_token": name(pad),
                "unk_token": "<unk>" if "<unk>" in tokenizer.special_tokens else None}
    decoder = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True}
               for s, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])}
    config = {
        "tokenizer_class": "LlamaTokenizer" if sentencepiece else "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder, **specials,
        "add_bos_token": bool(sentencepiece and tokenizer.bos_id is not None), "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": model_max_length or int(1e30),
    }
    if sentencepiece:
        config.update(legacy=True, add_prefix_space=None, sp_model_kwargs={}, spaces_between_special_tokens=False)
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    extra = sorted((s for s, i in tokenizer.special_tokens.items() if i >= backend.size),
                   key=tokenizer.special_tokens.get)
    special_map = {k: v for k, v in specials.items() if v is not None}
    if extra:
        special_map["additional_special_tokens"] = extra
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f, indent=2, ensure_ascii=False)
    return [model_file, "tokenizer_config.json", "special_tokens_map.json"]
