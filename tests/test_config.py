"""Experiment config: loading, typed --set overrides, validation messages, JSON round trip, stage resolution."""

import dataclasses
import json

import pytest

from starling_jax.config import (CheckpointConfig, ConfigError, DataConfig, Experiment, ModelSection, ObjectiveConfig,
                                 OptimConfig, RewardModelSection, Stage, TrainConfig)
from starling_jax.stages.experiment import apply_overrides, from_dict, load_experiment, stages_of, to_dict
from starling_jax.stages.validation import validate
from starling_jax.models import PRESETS


def staged() -> Experiment:
    return Experiment(
        name="staged",
        stages=(
            Stage("sft", ObjectiveConfig(name="sft")),
            Stage("rm", ObjectiveConfig(name="rm_plackett_luce"),
                  model=ModelSection(config=PRESETS["tiny"].replace(head="score"))),
            Stage("rl", ObjectiveConfig(name="apa"), model=ModelSection(path="stage:sft")),
        ),
        reward_model=RewardModelSection(path="stage:rm"),
        train=TrainConfig(steps=10, batch_size=16),
    )


def test_overrides_parse_types():
    exp = apply_overrides(Experiment(name="x"), [
        "train.steps=7", "optim.learning_rate=3e-5", "logging.tensorboard=false", "model.template=chatml",
        "model.config.num_layers=3", "optim.grad_clip=None", "mesh.rules=[['batch', 'data'], ['embed', None]]",
        "checkpoint.keep=1_0", "model.config.sliding_window=none",
    ])
    assert exp.train.steps == 7 and isinstance(exp.train.steps, int)
    assert exp.optim.learning_rate == 3e-5
    assert exp.logging.tensorboard is False
    assert exp.model.template == "chatml"
    assert exp.model.config.num_layers == 3 and exp.model.config.hidden_size == PRESETS["tiny"].hidden_size
    assert exp.optim.grad_clip is None
    assert exp.mesh.rules == (("batch", "data"), ("embed", None))
    assert exp.checkpoint.keep == 10
    assert exp.model.config.sliding_window is None


def test_override_preset_and_optional_section():
    exp = apply_overrides(Experiment(name="x"), ["model.config=llama2-7b", "reward_model.max_length=512"])
    assert exp.model.config == PRESETS["llama2-7b"]
    # the None reward_model section starts from its defaults
    assert exp.reward_model == RewardModelSection(max_length=512)


def test_stage_overrides_start_from_experiment_section():
    exp = apply_overrides(staged(), ["stages.rm.train.steps=3", "stages.rl.objective.apa_lambda=1.0"])
    rm = dict(stages_of(exp))["rm"]
    assert rm.train.steps == 3 and rm.train.batch_size == 16  # the rest of train comes from the experiment
    assert dict(stages_of(exp))["rl"].objective.apa_lambda == 1.0
    assert dict(stages_of(exp))["sft"].train.steps == 10


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "--set train.stepz: unknown key 'stepz' in TrainConfig; did you mean steps?"),
    ("trian.steps=3", "unknown key 'trian' in Experiment; did you mean train?"),
    ("train.steps=abc", "--set train.steps=abc: bad value for type int"),
    ("logging.progress=maybe", "--set logging.progress=maybe: bad value for type bool: expected true or false"),
    ("optim.learning_rate=fast", "--set optim.learning_rate=fast: bad value for type float"),
    ("model.config=llama3", "unknown model preset 'llama3'"),
    ("train.steps", "expected KEY=VALUE"),
    ("stages.rn.train.steps=3", "no stage named 'rn'; stages: sft, rm, rl"),
    ("train.steps.x=3", "'steps' is a int, it has no field 'x'"),
    ("model=tiny", "cannot be set from text; set its fields"),
    ("train.steps=None", "bad value for type int"),
    ("optim.schedule=cosine_decay", "--set optim.schedule=cosine_decay: bad value for type Literal: Input should be "
     "'cosine', 'linear' or 'constant'"),
    ("data.pairs=some", "Input should be 'best_vs_rest' or 'all'"),
])
def test_override_errors(override, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(staged(), [override])
    assert message in str(e.value)


def test_validate_accepts_defaults_and_staged():
    default = Experiment(name="x")
    assert validate(default, num_devices=1) is default
    exp = staged()
    assert validate(exp, num_devices=8) is exp
    # the same experiments are checked, not waved through: one field off and each is rejected, naming it
    with pytest.raises(ConfigError, match=r"train.steps: must be >= 1, got 0"):
        validate(apply_overrides(default, ["train.steps=0"]), num_devices=1)
    with pytest.raises(ConfigError) as e:
        validate(exp, num_devices=6)  # batch 16 does not split over 6 devices, in any of the three stages
    assert [f"stage {n!r}: train.batch_size" in str(e.value) for n in ("sft", "rm", "rl")] == [True] * 3, str(e.value)


def test_validate_collects_every_problem():
    exp = apply_overrides(Experiment(name="x"), [
        "train.batch_size=12", "train.grad_accum=5", "objective.name=rm_plackett", "data.max_length=1024",
        "train.steps=0", "model.template=vicuna", "model.tokenizer=nope",
        "data.heldout_fraction=1.5", "model.trainable_top_layers=5",
    ])
    with pytest.raises(ConfigError) as e:
        validate(exp, num_devices=8)
    msg = str(e.value)
    expected = [
        "objective.name: unknown objective 'rm_plackett'; did you mean rm_plackett_luce?",
        "train.batch_size: 12 is not divisible by train.grad_accum=5",
        "train.steps: must be >= 1, got 0",
        "data.max_length: 1024 exceeds model.config.max_seq_len=512",
        "model.template: unknown chat template 'vicuna'",
        "model.tokenizer: 'nope' is neither a known tokenizer",
        "data.heldout_fraction: must be in [0, 1), got 1.5",
        "model.trainable_top_layers: 5 is not in [0, 2]",
    ]
    for part in expected:
        assert part in msg, (part, msg)
    assert msg.startswith(f"experiment 'x' has {msg.count(chr(10) + '  - ')} problem(s)")


def test_validate_checks_field_types_of_experiments_built_in_python():
    exp = dataclasses.replace(Experiment(name="x"), optim=OptimConfig(schedule="cosine_decay"))
    with pytest.raises(ConfigError, match=r"optim.schedule: expected Literal, got 'cosine_decay' \(Input should be "
                                          r"'cosine', 'linear' or 'constant'\)"):
        validate(exp, num_devices=1)


def test_validate_mesh_divisibility():
    exp = apply_overrides(Experiment(name="x"), ["train.batch_size=12"])
    with pytest.raises(ConfigError, match=r"micro-batch 12/1 is not divisible by the mesh's data\*fsdp = 8"):
        validate(exp, num_devices=8)
    validate(exp, num_devices=4)  # fsdp = -1 takes the 4 devices: 12 % 4 == 0
    exp = apply_overrides(Experiment(name="x"), ["mesh.data=2", "mesh.fsdp=2"])
    with pytest.raises(ConfigError, match=r"mesh: data\*fsdp\*tensor = 4 but 8 devices are available"):
        validate(exp, num_devices=8)


def test_validate_stage_references():
    bad = dataclasses.replace(staged(), stages=(
        Stage("sft", ObjectiveConfig(name="sft"), model=ModelSection(path="stage:rl")),
        Stage("sft", ObjectiveConfig(name="sft")),
        Stage("rl", ObjectiveConfig(name="apa")),
    ), reward_model=RewardModelSection(path="stage:sft"))
    with pytest.raises(ConfigError) as e:
        validate(bad, num_devices=1)
    msg = str(e.value)
    assert "stages: the name 'sft' is used 2 times" in msg
    assert "stage 'sft': model.path: 'stage:rl' does not name an earlier stage (earlier: none)" in msg
    assert "stage 'rl': reward_model.path: 'stage:sft' is a 'sft' stage, not a reward-model (rm) stage" in msg


def test_validate_heads_and_rl_needs_reward_model():
    exp = Experiment(name="x", objective=ObjectiveConfig(name="rm_bradley_terry"))
    with pytest.raises(ConfigError, match="trains a 'score' head but the model has head='lm'"):
        validate(exp)
    exp = Experiment(name="x", objective=ObjectiveConfig(name="ppo"))
    with pytest.raises(ConfigError, match="objective 'ppo' needs a reward_model section"):
        validate(exp)


def test_json_round_trip_and_unknown_field():
    exp = apply_overrides(staged(), ["stages.rm.train.steps=3", "optim.grad_clip=none"])
    text = json.dumps(to_dict(exp))
    assert from_dict(json.loads(text)) == exp
    d = to_dict(exp)
    d["train"]["stepz"] = 3
    with pytest.raises(ConfigError, match=r"train: unknown field\(s\) stepz for TrainConfig; did you mean steps\?"):
        from_dict(d)


def test_load_experiment(tmp_path, monkeypatch):
    f = tmp_path / "mine.py"
    f.write_text("from starling_jax.config import Experiment, TrainConfig\n"
                 "def get_config():\n    return Experiment(name='mine', train=TrainConfig(steps=3))\n")
    assert load_experiment(str(f)).train.steps == 3
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    f.rename(tmp_path / "experiments" / "mine.py")
    assert load_experiment("mine").name == "mine"  # a bare name -> experiments/NAME.py
    with pytest.raises(FileNotFoundError, match="did you mean mine"):
        load_experiment("mien")
    (tmp_path / "saved.json").write_text(json.dumps(to_dict(staged())))
    assert load_experiment(str(tmp_path / "saved.json")) == staged()
    (tmp_path / "bad.py").write_text("X = 1\n")
    with pytest.raises(ConfigError, match=r"must define get_config\(\)"):
        load_experiment(str(tmp_path / "bad.py"))


def test_single_stage_named_after_kind():
    assert [n for n, _ in stages_of(Experiment(name="x", objective=ObjectiveConfig(name="dpo")))] == ["dpo"]
    (name, cfg), = stages_of(Experiment(name="x", data=DataConfig(max_length=64), checkpoint=CheckpointConfig(keep=1)))
    assert name == "sft" and cfg.data.max_length == 64 and cfg.checkpoint.keep == 1
