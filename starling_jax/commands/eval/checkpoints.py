"""Loading what an evaluation runs: a policy or a reward model with its OWN tokenizer, chat template and stop ids.

A checkpoint is a run's stage (WORKDIR, WORKDIR/<stage>, WORKDIR/<stage>/export: the tokenizer and template are the
stage's, from WORKDIR/config.json) or a Hugging Face directory (its tokenizer files; its template is the one of ours
whose Jinja form (`templates.jinja_template`) equals the directory's `chat_template`, which is what `starling-jax
convert` writes, else the `template` argument).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from starling_jax.data import get_template, load_tokenizer
from starling_jax.data.templates import TEMPLATES, jinja_template
from starling_jax.errors import InputError
from starling_jax.stages import export as export_lib


@dataclasses.dataclass
class Checkpoint:
    """A loaded model and how to talk to it."""
    path: str
    name: str  # a model id for answer files (the stage or directory name)
    config: Any  # ModelConfig
    params: Any
    tokenizer: Any  # data.Tokenizer
    template: Any  # data.templates.ChatTemplate
    tokenizer_name: str = ""  # what load_tokenizer loaded it from

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.tokenizer.stop_ids(self.template)

    @property
    def is_reward_model(self) -> bool:
        return self.config.head == "score"


def _is_hf_dir(path: str) -> bool:
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    return any(f.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt")) for f in os.listdir(path))


def hf_model_kind(path: str) -> Optional[str]:
    """"policy" / "reward model" for a Hugging Face model directory, None for anything else."""
    if not (os.path.isdir(path) and _is_hf_dir(path)):
        return None
    try:
        with open(os.path.join(path, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return "reward model" if any("SequenceClassification" in a for a in archs) else "policy"


def template_of_hf_dir(path: str) -> Optional[str]:
    """The name of our template whose Jinja form is the directory's chat_template, or None."""
    cfg = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg) as f:
            chat_template = json.load(f).get("chat_template")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    for name, t in TEMPLATES.items():
        if chat_template == jinja_template(t):
            return name
    return None


def load_checkpoint(path: str, *, stage: Optional[str] = None, tokenizer: Optional[str] = None,
                    template: Optional[str] = None, dtype: Optional[str] = None, mesh=None, rules=None,
                    want: Optional[str] = None) -> Checkpoint:
    """A policy or reward model from a run's stage or a HF directory (see the module doc). tokenizer / template
    override the checkpoint's own. want: "lm" or "score" to insist on a head (a clear error otherwise). mesh: place
    the parameters in their shards on it (rules default to MeshConfig().rules)."""

    if not os.path.exists(path):
        raise InputError(f"checkpoint {path}: does not exist")
    if os.path.isdir(path) and _is_hf_dir(path):
        config, params = export_lib.load_weights(path, dtype=dtype, mesh=mesh, rules=rules)
        has_tok = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
        tok_name = tokenizer or (path if has_tok else None)
        if tok_name is None:
            raise InputError(f"{path}: no tokenizer files (tokenizer.json / tokenizer.model); pass --tokenizer NAME")
        tmpl_name = template or template_of_hf_dir(path) or "auto"  # "auto": the directory's own Jinja template
        name = os.path.basename(os.path.normpath(path))
    elif export_lib.is_stage_source(path):
        ref = export_lib.resolve_stage(path, stage)
        config, params = export_lib.load_weights(ref.export_dir, dtype=dtype, mesh=mesh, rules=rules)
        tok_name = tokenizer or ref.config.model.tokenizer
        tmpl_name = template or ref.config.model.template
        name = f"{os.path.basename(ref.workdir)}-{ref.name}"
    else:
        raise InputError(f"{path}: neither a Hugging Face model directory (config.json + *.safetensors) nor a "
                         f"starling_jax run (WORKDIR with config.json, WORKDIR/<stage> or its export/)")
    if want == "lm" and config.head != "lm":
        raise InputError(f"{path}: a reward model (head {config.head!r}); this needs a policy (a language model)")
    if want == "score" and config.head != "score":
        raise InputError(f"{path}: a language model (head {config.head!r}); this needs a reward model (a score head: "
                         f"an rm stage or a *ForSequenceClassification directory)")
    tok = load_tokenizer(tok_name)
    if tok.vocab_size > config.vocab_size:
        raise InputError(f"{path}: tokenizer {tok_name} has {tok.vocab_size} ids but the model has "
                         f"{config.vocab_size} embedding rows; pass the model's own --tokenizer")
    if hasattr(tok, "template"):  # resolves "auto" to the checkpoint's own (Jinja) chat template
        chat_template = tok.template(tmpl_name)
    elif tmpl_name == "auto":
        raise InputError(f"{path}: its chat_template is not one of ours (or it has none); pass --template NAME "
                         f"(openchat_3.5, llama2, chatml, ...)")
    else:
        chat_template = get_template(tmpl_name)
    return Checkpoint(path=path, name=name, config=config, params=params, tokenizer=tok, template=chat_template,
                      tokenizer_name=tok_name)
