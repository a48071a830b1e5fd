"""stages.program.load_model: with model.path (a Hugging Face directory or "stage:NAME") the checkpoint decides the
architecture and a stated model.config how the model runs and is stored (param_dtype, dtype, remat, attention, ...);
a config left at its default runs the checkpoint as it is; a stated architecture that is not the checkpoint's is one
line, from validation (config.json, an earlier stage's config) and from loading. Small models, no compilation."""

import dataclasses

import jax
import ml_dtypes
import numpy as np
import pytest

from starling_jax.algorithms import options
from starling_jax.config import (ConfigError, Experiment, ModelSection, ObjectiveConfig, RewardModelSection, Stage,
                                 TrainConfig)
from starling_jax.errors import InputError
from starling_jax.io import hf
from starling_jax.models import ModelConfig, ParamSpec, param_specs
from starling_jax.models.config import ARCHITECTURE_FIELDS, RUN_FIELDS
from starling_jax.stages.experiment import stages_of
from starling_jax.stages.program import StageContext, StageExport, load_model
from starling_jax.stages.validation import validate

# The checkpoint: stored in bfloat16, as OpenChat-3.5 and Llama-2 are on the Hub.
ARCH = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                   sliding_window=6, max_seq_len=512, pad_token_id=0)
STORED = ARCH.replace(param_dtype="bfloat16", dtype="bfloat16")
# What a recipe states (starling_alpha_apa's policy: fp32 master weights, bf16 compute, full remat), and more
RUN = dict(param_dtype="float32", dtype="bfloat16", remat="full", scan_unroll=2, attention="dense",
           attention_block=64, init_std=0.05)


def _params(config: ModelConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.dtype(s.dtype)),
                        param_specs(config), is_leaf=lambda x: isinstance(x, ParamSpec))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(a bf16 Hugging Face directory of ARCH, its params as numpy)."""
    path = str(tmp_path_factory.mktemp("ckpt") / "bf16")
    params = _params(STORED)
    hf.save(path, STORED, params)
    return path, params


def _ctx(tmp_path, exports=None):
    exp = Experiment(name="load")
    return StageContext(experiment=exp, config=exp, stage_name="s", workdir=str(tmp_path), mesh=None,
                        load_stage=lambda name: exports[name])


def _same(a, b, dtype=None):
    """Every leaf equal (after casting b to `dtype`), bit for bit."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        y = np.asarray(y) if dtype is None else np.asarray(y).astype(dtype)
        assert np.asarray(x).dtype == y.dtype and np.array_equal(np.asarray(x), y)


def test_the_field_lists_split_every_model_config_field():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    rest = fields - set(RUN_FIELDS) - set(ARCHITECTURE_FIELDS)
    assert rest == {"head", "tie_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "lora_scale",
                    "lora_dropout"}
    assert not set(RUN_FIELDS) & set(ARCHITECTURE_FIELDS)


def test_a_stated_config_decides_how_a_hf_checkpoint_runs(checkpoint, tmp_path):
    path, saved = checkpoint
    assert hf.load(path)[0].param_dtype == "bfloat16"  # what the section used to get
    stated = ARCH.replace(**RUN)
    config, params = load_model(_ctx(tmp_path), ModelSection(config=stated, path=path), jax.random.key(0))
    assert config == stated  # the architecture from config.json, every run-time field from the section
    for f in RUN:
        assert getattr(config, f) == RUN[f], f
    _same(params, saved, np.float32)  # read into float32: the bf16 values exactly
    # a reward-model section likewise (bf16 storage, f32 compute, int8 frozen layers); the head is the checkpoint's
    # (an rm stage converts an LM itself)
    rm = ARCH.replace(head="score", param_dtype="bfloat16", dtype="float32", quantize="int8", remat="dots")
    config, params = load_model(_ctx(tmp_path), RewardModelSection(config=rm, path=path), jax.random.key(0))
    assert config == rm.replace(head="lm")
    _same(params, saved)


def test_a_default_config_runs_the_checkpoint_as_it_is(checkpoint, tmp_path):
    path, saved = checkpoint
    config, params = load_model(_ctx(tmp_path), ModelSection(path=path), jax.random.key(0))
    assert not ModelSection(path=path).stated_config() and ModelSection(config=ARCH, path=path).stated_config()
    assert config == hf.load(path)[0] == STORED  # the checkpoint's bf16 storage and compute, remat none
    _same(params, saved)


def test_a_stage_export_runs_as_the_section_states(tmp_path):
    exported = ARCH.replace(quantize="int8", remat="dots")  # the earlier stage's own run-time choices
    source = _params(exported, seed=1)
    exports = {"sft": StageExport(config=exported, params=jax.tree.map(jax.numpy.asarray, source), summary={})}
    stated = ARCH.replace(**{**RUN, "param_dtype": "bfloat16"})
    config, params = load_model(_ctx(tmp_path, exports), ModelSection(config=stated, path="stage:sft"),
                                jax.random.key(0))
    assert config == stated
    _same(params, source, ml_dtypes.bfloat16)  # cast into the section's param_dtype
    # a default section: the export as it was (today's behaviour: stored unquantized), a copy that is not the export
    config, params = load_model(_ctx(tmp_path, exports), ModelSection(path="stage:sft"), jax.random.key(0))
    assert config == exported.replace(quantize="none")
    _same(params, source)
    assert all(a is not b for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(exports["sft"].params)))


def test_a_stated_architecture_that_is_not_the_checkpoints_is_one_line(checkpoint, tmp_path):
    path, _ = checkpoint
    wrong = ARCH.replace(num_layers=3, hidden_size=64, **RUN)
    with pytest.raises(InputError) as e:
        load_model(_ctx(tmp_path), ModelSection(config=wrong, path=path), jax.random.key(0))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"stage 's': model.config is not the architecture of model.path={path!r}: hidden_size=64 "
                          f"(checkpoint: 32), num_layers=3 (checkpoint: 2); state the checkpoint's architecture in "
                          f"model.config")
    exports = {"rm": StageExport(config=ARCH.replace(head="score"), params=None, summary={})}
    with pytest.raises(InputError, match=r"reward_model.config is not the architecture of reward_model.path='stage:"
                                         r"rm': sliding_window=None \(checkpoint: 6\);"):
        load_model(_ctx(tmp_path, exports),
                   RewardModelSection(config=ARCH.replace(head="score", sliding_window=None), path="stage:rm"),
                   jax.random.key(0))


def test_validation_compares_a_stated_architecture_with_the_checkpoints(checkpoint, tmp_path):
    path, _ = checkpoint
    good = Experiment(name="v", model=ModelSection(config=ARCH.replace(**RUN), path=path))
    validate(good)
    validate(Experiment(name="v", model=ModelSection(path=path)))  # a default config states no architecture
    with pytest.raises(ConfigError) as e:
        validate(Experiment(name="v", model=ModelSection(config=ARCH.replace(num_layers=3, rope_theta=1e6),
                                                         path=path)))
    assert (f"stage 'sft': model.config: is not the architecture of model.path={path!r} (its config.json): "
            f"num_layers=3 (checkpoint: 2), rope_theta=1000000.0 (checkpoint: 10000.0); state the checkpoint's "
            f"architecture in model.config") in str(e.value)
    # a config.json that does not read is left to loading, which names the file
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    validate(Experiment(name="v", model=ModelSection(config=ARCH.replace(num_layers=3), path=str(broken))))


def test_validation_compares_a_stage_path_with_the_earlier_stages_model():
    lm = ARCH
    stages = (Stage("sft", ObjectiveConfig(name="sft"), model=ModelSection(config=lm)),
              # an rm stage turns the LM into a reward model: another head, the same architecture
              Stage("rm", options("rm_plackett_luce"), model=ModelSection(config=lm.replace(head="score"),
                                                                           path="stage:sft")),
              Stage("rl", options("apa"), model=ModelSection(config=lm.replace(remat="full"), path="stage:sft")))
    exp = Experiment(name="chain", stages=stages, train=TrainConfig(steps=10, batch_size=16),
                     reward_model=RewardModelSection(config=lm.replace(head="score"), path="stage:rm"))
    validate(exp)
    names = [n for n, _ in stages_of(exp)]
    assert names == ["sft", "rm", "rl"]
    bad = dataclasses.replace(exp, reward_model=RewardModelSection(config=lm.replace(head="score", num_kv_heads=4),
                                                                   path="stage:rm"),
                              stages=(*stages[:2], dataclasses.replace(
                                  stages[2], model=ModelSection(config=lm.replace(mlp_dim=128), path="stage:sft"))))
    with pytest.raises(ConfigError) as e:
        validate(bad)
    msg = str(e.value)
    assert ("stage 'rl': model.config: is not the architecture of model.path='stage:sft' (the export of stage "
            "'sft'): mlp_dim=128 (checkpoint: 64);") in msg
    assert ("stage 'rl': reward_model.config: is not the architecture of reward_model.path='stage:rm' (the export of "
            "stage 'rm'): num_kv_heads=4 (checkpoint: 2);") in msg
    assert msg.count("is not the architecture") == 2


def test_a_stage_from_a_default_section_is_checked_against_its_checkpoint(checkpoint):
    """An earlier stage whose model.config is left at its default exports its checkpoint's architecture."""
    path, _ = checkpoint
    stages = (Stage("sft", ObjectiveConfig(name="sft"), model=ModelSection(path=path)),
              Stage("dpo", options("dpo"), model=ModelSection(config=ARCH.replace(num_layers=4), path="stage:sft")))
    with pytest.raises(ConfigError, match=r"stage 'dpo': model.config: .*\(the export of stage 'sft'\): "
                                          r"num_layers=4 \(checkpoint: 2\)"):
        validate(Experiment(name="chain", stages=stages))
    validate(Experiment(name="chain", stages=(stages[0], dataclasses.replace(
        stages[1], model=ModelSection(config=ARCH.replace(remat="full"), path="stage:sft")))))


def test_hf_weights_are_placed_with_the_experiments_mesh_rules(checkpoint, tmp_path):
    """Straight into the shards the experiment's mesh.rules give (here vocab over fsdp, embed replicated), not the
    default rules' (embed over fsdp)."""
    from starling_jax.config import MeshConfig
    from starling_jax.parallel import sharding
    path, saved = checkpoint
    rules = (("batch", ("data", "fsdp")), ("embed", None), ("heads", "fsdp"), ("kv_heads", "fsdp"), ("mlp", "fsdp"),
             ("vocab", "fsdp"), ("layers", None), ("head_dim", None), ("norm", None))
    exp = Experiment(name="load", mesh=MeshConfig(data=1, fsdp=2, tensor=1, rules=rules))
    mesh = sharding.make_mesh(exp.mesh, jax.devices()[:2])
    ctx = StageContext(experiment=exp, config=exp, stage_name="s", workdir=str(tmp_path), mesh=mesh,
                       load_stage=None)
    config, params = load_model(ctx, ModelSection(config=ARCH, path=path), jax.random.key(0))
    want = sharding.param_shardings(param_specs(config), mesh, rules)
    assert jax.tree.map(lambda a: a.sharding.spec, params) == jax.tree.map(lambda s: s.spec, want)
    assert params["embed"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    _same(params, saved, np.float32)


def test_plan_notes_a_section_whose_path_it_cannot_plan(checkpoint):
    """plan builds the step from model.config: a stated config is what the run loads; a default one is not, and the
    plan says so."""
    from starling_jax.commands import plan
    from starling_jax.parallel import sharding
    path, _ = checkpoint
    for section, noted in ((ModelSection(path=path), True),
                           (ModelSection(config=ARCH.replace(**RUN), path=path), False)):
        (_, cfg), = stages_of(Experiment(name="p", model=section))
        notes = plan.stage_setup(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1])).notes
        assert any(n.startswith(f"note: model.path={path!r} with model.config left at its default: planned as that "
                                f"default config") for n in notes) == noted, notes


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_frozen_layers_are_read_quantized_as_quantizing_after_loading_would(checkpoint, tmp_path, scheme):
    """load_model(frozen_layers=True) with a quantizing config: the checkpoint's layers arrive quantized (hf.load
    quantizes while reading), equal to today's path (a dense load, then quantize_frozen), and quantize_frozen leaves
    them as they are; without frozen_layers, a config of quantize "none" or a stage export: dense, as before."""
    from starling_jax.models.quantize import is_quantized
    from starling_jax.stages.program import quantize_frozen
    path, saved = checkpoint
    rm = ARCH.replace(head="score", param_dtype="float32", dtype="bfloat16", quantize=scheme, quantize_block=8)
    section = RewardModelSection(config=rm, path=path)
    ctx = _ctx(tmp_path, {"rm": StageExport(config=ARCH, params=jax.tree.map(jax.numpy.asarray, saved), summary={})})
    config, params = load_model(ctx, section, jax.random.key(0), frozen_layers=True)
    assert config == rm.replace(head="lm") and is_quantized(params["layers"]["wo"])
    dense_config, dense = load_model(ctx, section, jax.random.key(0))
    assert dense_config == config and not is_quantized(dense["layers"]["wo"])
    _same(params, quantize_frozen(ctx, config, dense))
    assert quantize_frozen(ctx, config, params) is params
    _, plain = load_model(ctx, RewardModelSection(config=rm.replace(quantize="none"), path=path), jax.random.key(0),
                          frozen_layers=True)
    _same(plain, saved, np.float32)
    _, exported = load_model(ctx, dataclasses.replace(section, path="stage:rm"), jax.random.key(0),
                             frozen_layers=True)
    _same(exported, saved, np.float32)
