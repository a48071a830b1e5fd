"""model.path / CLI checkpoints as Hub ids ("hf:ORG/NAME[@REV]"), resolved offline from a cache this test builds in
the standard Hugging Face cache layout (models--ORG--NAME/refs/main -> snapshots/<commit>/...)."""

import os

import numpy as np
import pytest

pytest.importorskip("huggingface_hub")
pytest.importorskip("gguf")

from starling_jax.commands import cli  # noqa: E402
from starling_jax.io import hf, hub
from starling_jax import models
from starling_jax.io import gguf as sj_gguf  # noqa: E402
from starling_jax.commands.chat import load_checkpoint  # noqa: E402
from starling_jax.data import load_tokenizer  # noqa: E402
from tests.test_gguf import write_tiny_gguf  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """An offline cache holding org/tiny (a tiny llama with a ChatML tokenizer) and org/pickled (.bin only)."""
    root = tmp_path / "hub"
    snap = root / "models--org--tiny" / "snapshots" / COMMIT
    write_tiny_gguf(tmp_path / "t.gguf")
    sj_gguf.convert(str(tmp_path / "t.gguf"), str(snap))
    (root / "models--org--tiny" / "refs").mkdir(parents=True)
    (root / "models--org--tiny" / "refs" / "main").write_text(COMMIT)
    bad = root / "models--org--pickled" / "snapshots" / COMMIT
    bad.mkdir(parents=True)
    (bad / "config.json").write_text("{}")
    (bad / "pytorch_model.bin").write_bytes(b"not opened")
    (root / "models--org--pickled" / "refs").mkdir(parents=True)
    (root / "models--org--pickled" / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return snap


def test_hub_id_resolves_offline_and_loads_like_a_directory(cache):
    assert hub.resolve("hf:org/tiny") == str(cache)
    assert hub.resolve(f"hf:org/tiny@{COMMIT}") == str(cache)
    assert hub.resolve("local/dir") == "local/dir"
    config, params = hf.load("hf:org/tiny")
    ref_config, ref_params = hf.load(str(cache))
    assert config == ref_config
    np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(ref_params["embed"]))
    tok = load_tokenizer("hf:org/tiny")
    assert tok.chat_template is not None and tok.chat_template.stop_tokens == ("<|im_end|>",)
    c, _, tok_path = load_checkpoint("hf:org/tiny")
    assert tok_path == str(cache) and c.num_layers == 2


def test_hub_errors_are_one_line(cache, capsys):
    with pytest.raises(hub.HubError, match="not in the cache"):
        hub.resolve("hf:org/absent")
    with pytest.raises(hub.HubError, match="no .safetensors"):
        hub.resolve("hf:org/pickled")
    with pytest.raises(hub.HubError, match="expected hf:ORG/NAME"):
        hub.resolve("hf:no-slash")
    assert cli.main(["generate", "hf:org/absent", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "hf:org/absent" in err and "Traceback" not in err


def test_generate_from_hub_id_with_its_own_template(cache, capsys):
    assert cli.main(["generate", "hf:org/tiny", "--prompt", "hello", "--max-new-tokens", "3", "--temperature", "0",
                     "--length-bucket", "8"]) == 0
    assert ">>> hello" in capsys.readouterr().out


def test_config_accepts_hub_ids(cache):
    from starling_jax import config as cfg
    from starling_jax.stages.validation import validate
    model = cfg.ModelSection(config=models.get_preset("tiny"), path="hf:org/tiny", tokenizer="hf:org/tiny")
    validate(cfg.Experiment(name="hub", model=model))
    with pytest.raises(cfg.ConfigError, match="model.path.*expected hf:ORG/NAME"):
        validate(cfg.Experiment(name="hub", model=cfg.ModelSection(path="hf:nope")))


def test_validation_reads_a_cached_hub_config_for_a_stated_architecture(cache):
    """A stated model.config is compared with the hub id's config.json when the cache holds it (never downloaded)."""
    from starling_jax import config as cfg
    from starling_jax.stages.validation import validate
    arch, _ = hf.load(str(cache))
    assert hub.cached_file("hf:org/tiny", "config.json") == str(cache / "config.json")
    assert hub.cached_file("hf:org/absent", "config.json") is None
    model = cfg.ModelSection(config=arch.replace(remat="full"), path="hf:org/tiny", tokenizer="hf:org/tiny")
    validate(cfg.Experiment(name="hub", model=model))
    wrong = cfg.ModelSection(config=arch.replace(num_heads=2 * arch.num_heads), path="hf:org/tiny",
                             tokenizer="hf:org/tiny")
    with pytest.raises(cfg.ConfigError, match=rf"model.config: is not the architecture of model.path='hf:org/tiny' "
                                              rf"\(its config.json\): num_heads={2 * arch.num_heads} \(checkpoint: "
                                              rf"{arch.num_heads}\)"):
        validate(cfg.Experiment(name="hub", model=wrong))
