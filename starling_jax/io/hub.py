"""Hugging Face Hub ids as model paths: "hf:ORG/NAME" or "hf:ORG/NAME@REVISION".

    model.path = "hf:HuggingFaceTB/SmolLM2-135M-Instruct"          # config
    starling-jax chat hf:HuggingFaceTB/SmolLM2-135M-Instruct       # CLI (generate, chat, convert, tokenizer paths)

`resolve` downloads the repository's safetensors weights, config and tokenizer files with
huggingface_hub.snapshot_download into the standard cache (HF_HUB_CACHE / HF_HOME) and returns the local snapshot
directory, which then loads like any local directory. Pickled weights (.bin, .pt) are never downloaded. With
HF_HUB_OFFLINE=1 only the cache is read (what tests and air-gapped pods use).
"""

from __future__ import annotations

import os
import re

from starling_jax.errors import InputError

PREFIX = "hf:"
# Weights as safetensors only; configs, tokenizer files and chat templates; never .bin / .pt / .pth / .ckpt.
ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer.model", "*.jinja", "*.txt"]
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(InputError):
    """A hub id that cannot be resolved: the message says which and why."""


def is_hub_id(path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def parse(hub_id: str) -> tuple[str, str | None]:
    """("ORG/NAME", revision or None) of "hf:ORG/NAME[@REVISION]"."""
    body = hub_id[len(PREFIX):]
    repo, _, revision = body.partition("@")
    if not _REPO.match(repo) or (hub_id.count("@") and not revision):
        raise HubError(f"{hub_id!r}: expected hf:ORG/NAME or hf:ORG/NAME@REVISION")
    return repo, revision or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_file(path: str, filename: str) -> str | None:
    """The local copy of `filename` (e.g. "config.json") of hub id `path` when the Hugging Face cache holds it, else
    None; never downloads (validation reads a cached config.json this way)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        repo, revision = parse(path)
        found = try_to_load_from_cache(repo, filename, cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                       revision=revision)
    except (ImportError, HubError, ValueError):
        return None
    return found if isinstance(found, str) else None


def resolve(path: str) -> str:
    """The local directory for `path`: a hub id is downloaded (or found in the cache); anything else is returned."""
    if not is_hub_id(path):
        return path
    repo, revision = parse(path)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise HubError(f"{path}: hub ids need the huggingface_hub package (pip install huggingface_hub)") from None
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        local = snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS, cache_dir=cache,
                                  local_files_only=_offline())
    except LocalEntryNotFoundError:
        where = "offline (HF_HUB_OFFLINE=1) and not in the cache" if _offline() else "not downloadable"
        raise HubError(f"{path}: {where} ({cache or 'the default Hugging Face cache'}); download it once with network "
                       f"access, or use a local directory") from None
    except HfHubHTTPError as e:
        raise HubError(f"{path}: the hub refused the download: {str(e).splitlines()[0]}") from None
    except (OSError, ValueError) as e:
        raise HubError(f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    files = os.listdir(local)
    if "config.json" not in files:
        raise HubError(f"{path}: the snapshot {local} has no config.json (not a transformers model repository?)")
    if not any(f.endswith(".safetensors") for f in files):
        raise HubError(f"{path}: the repository has no .safetensors weights (pickled .bin weights are never "
                       f"downloaded or loaded); convert it to safetensors first")
    return local
