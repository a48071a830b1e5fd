"""Experiment config: loading, typed --set overrides, validation messages, JSON round trip, stage resolution."""

import dataclasses
import json

import pytest

from starling_jax.algorithms.apa import APAOptions
from starling_jax.algorithms.dpo import DPOOptions
from starling_jax.algorithms.ppo import PPOOptions
from starling_jax.algorithms.reward_model import PlackettLuceOptions
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
            Stage("rm", PlackettLuceOptions(),
                  model=ModelSection(config=PRESETS["tiny"].replace(head="score"))),
            Stage("rl", APAOptions(), model=ModelSection(path="stage:sft")),
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
        validate(exp, num_devices=6)  # batch 16 (rl: the minibatch of 8 rollouts) does not split over 6 devices
    fields = {"sft": "train.batch_size", "rm": "train.batch_size", "rl": "rollout.minibatch_size"}
    assert [f"stage {n!r}: {f}" in str(e.value) for n, f in fields.items()] == [True] * 3, str(e.value)


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
        Stage("rl", APAOptions()),
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
    exp = Experiment(name="x", objective=PPOOptions())
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
    assert [n for n, _ in stages_of(Experiment(name="x", objective=DPOOptions()))] == ["dpo"]
    (name, cfg), = stages_of(Experiment(name="x", data=DataConfig(max_length=64), checkpoint=CheckpointConfig(keep=1)))
    assert name == "sft" and cfg.data.max_length == 64 and cfg.checkpoint.keep == 1


# Typed options per algorithm: each algorithm's options are its own type (registered with it), with constrained
# fields; the objective's name chooses the type.

@pytest.mark.parametrize("override, message", [
    ("stages.rl.objective.apa_lambda=0", "--set stages.rl.objective.apa_lambda=0: must be greater than 0, got 0.0"),
    ("stages.rl.objective.gamma=1.5", "--set stages.rl.objective.gamma=1.5: must be less than or equal to 1, got 1.5"),
    ("stages.rl.objective.value_clip=-1", "value_clip=-1: must be greater than 0, got -1.0"),
    ("stages.rl.objective.kl_horizon=0", "kl_horizon=0: must be greater than or equal to 1, got 0"),
    ("stages.rl.objective.value_head=conv", "--set stages.rl.objective.value_head=conv: bad value for type Literal: "
     "Input should be 'mlp', 'linear' or 'layers'"),
    ("stages.rl.objective.group_size=2", "--set stages.rl.objective.group_size: unknown key 'group_size' in "
     "APAOptions; known: name, kl_coef, "),
    ("stages.rl.objective.group_size=2", "(APAOptions holds the options of objective 'apa'; to train another "
     "algorithm set stages.rl.objective.name first)"),
    ("stages.sft.objective.dpo_beta=0.2", "unknown key 'dpo_beta' in ObjectiveConfig"),
])
def test_objective_option_overrides_are_typed_and_checked(override, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(staged(), [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_objective_option_overrides_set_values():
    exp = apply_overrides(staged(), ["stages.rl.objective.value_clip=none", "stages.rl.objective.kl_target=6",
                                     "stages.rm.objective.pl_normalize=true"])
    stages = dict(stages_of(exp))
    assert stages["rl"].objective == APAOptions(value_clip=None, kl_target=6.0)
    assert stages["rm"].objective == PlackettLuceOptions(pl_normalize=True)


def test_setting_the_objective_name_switches_the_options_type():
    from starling_jax.algorithms.grpo import GRPOOptions
    from starling_jax.algorithms.rloo import RLOOOptions
    exp = apply_overrides(staged(), ["stages.rl.objective.kl_coef=0.2", "stages.rl.objective.name=grpo",
                                     "stages.rl.objective.group_size=2"])
    # the KL setting both algorithms take is kept; GRPO's own defaults for the rest (its KL in the loss, k3)
    assert dict(stages_of(exp))["rl"].objective == GRPOOptions(kl_coef=0.2, group_size=2)
    rloo = dict(stages_of(apply_overrides(exp, ["stages.rl.objective.name=rloo"])))["rl"].objective
    assert rloo == RLOOOptions(kl_coef=0.2, group_size=2) and (rloo.kl_in, rloo.kl_estimator) == ("reward", "k1")
    pairwise = apply_overrides(staged(), ["stages.rm.objective.name=rm_bradley_terry"])
    assert type(dict(stages_of(pairwise))["rm"].objective) is ObjectiveConfig
    with pytest.raises(ConfigError, match=r"--set stages.rl.objective.name=grpo: objective 'grpo' does not take "
                                          r"vf_coef=0.5, apa_lambda=1.0 \(options of 'apa'\); set them to their "
                                          r"defaults first"):
        apply_overrides(staged(), ["stages.rl.objective.apa_lambda=1.0", "stages.rl.objective.vf_coef=0.5",
                                   "stages.rl.objective.name=grpo"])


def test_validate_checks_objective_options_built_in_python():
    def with_rl(objective):
        return dataclasses.replace(staged(), stages=staged().stages[:2] + (Stage("rl", objective,
                                                                                model=ModelSection(path="stage:sft")),))
    validate(with_rl(APAOptions(apa_lambda=1.0)), num_devices=1)
    with pytest.raises(ConfigError, match=r"stages\[2\].objective.apa_lambda: must be greater than 0, got -1"):
        validate(with_rl(APAOptions(apa_lambda=-1)), num_devices=1)
    with pytest.raises(ConfigError, match=r"stages\[2\].objective.value_head: expected Literal, got 'conv'"):
        validate(with_rl(APAOptions(value_head="conv")), num_devices=1)
    # an objective of another algorithm's type (or of none) is named, with what to write instead
    with pytest.raises(ConfigError) as e:
        validate(with_rl(ObjectiveConfig(name="apa")), num_devices=1)
    assert ("stages[2].objective: objective 'apa' takes APAOptions (starling_jax.algorithms.apa), got ObjectiveConfig; "
            "write APAOptions(...) or algorithms.options('apa', ...)") in str(e.value)
    with pytest.raises(ConfigError, match=r"objective 'ppo' takes PPOOptions .*, got APAOptions"):
        validate(with_rl(APAOptions(name="ppo")), num_devices=1)


def test_json_objective_is_built_as_its_options_type():
    d = to_dict(staged())
    assert d["stages"][2]["objective"]["name"] == "apa" and "dpo_beta" not in d["stages"][2]["objective"]
    d["stages"][2]["objective"] = {"name": "apa", "apa_lambda": "1"}
    assert from_dict(d).stages[2].objective == APAOptions(apa_lambda=1.0)
    d["stages"][2]["objective"] = {"name": "apa", "group_size": 2}
    with pytest.raises(ConfigError, match=r"stages\[2\].objective: unknown field\(s\) group_size for APAOptions"):
        from_dict(d)
    d["stages"][2]["objective"] = {"name": "dpo", "dpo_beta": 0}
    with pytest.raises(ConfigError, match=r"stages\[2\].objective.dpo_beta: must be greater than 0, got 0"):
        from_dict(d)


# An objective as configs saved before per-algorithm options held it (every algorithm's settings in one record).
FLAT = {"name": "sft", "dpo_beta": 0.1, "apa_lambda": 0.1, "ppo_clip": 0.2, "value_clip": 0.2, "vf_coef": 1.0,
        "gamma": 1.0, "gae_lambda": 0.95, "kl_coef": 0.01, "kl_target": None, "kl_horizon": 10000,
        "critic_only_above": None, "value_head": "mlp", "value_head_layers": 0, "reward_clip": 10.0,
        "scale_reward": True, "whiten_advantages": False, "pl_normalize": False, "group_size": 4, "kl_in": None,
        "kl_estimator": None, "loss_aggregation": "sequence"}


def test_a_config_saved_with_the_flat_objective_loads_as_typed_options():
    from starling_jax.algorithms.grpo import GRPOOptions
    d = to_dict(staged())
    d["objective"] = dict(FLAT)
    d["stages"][1]["objective"] = {**FLAT, "name": "rm_plackett_luce", "pl_normalize": True}
    # an APA stage's record held PPO's clip and GRPO's group size too: never read by APA, they are left behind
    d["stages"][2]["objective"] = {**FLAT, "name": "apa", "apa_lambda": 1.0, "vf_coef": 0.5, "ppo_clip": 0.3,
                                   "group_size": 8}
    exp = from_dict(d)
    assert exp.objective == ObjectiveConfig()
    assert exp.stages[1].objective == PlackettLuceOptions(pl_normalize=True)
    assert exp.stages[2].objective == APAOptions(apa_lambda=1.0, vf_coef=0.5)
    d["stages"][2]["objective"] = {**FLAT, "name": "grpo", "apa_lambda": 1.0, "kl_coef": 0.2}
    assert from_dict(d).stages[2].objective == GRPOOptions(kl_coef=0.2)  # kl_in None: GRPO's own ("loss", k3)
    # a critic-free stage built (and never trained) the critic it names: only the default one can be dropped
    d["stages"][2]["objective"] = {**FLAT, "name": "grpo", "value_head": "layers", "value_head_layers": 2}
    with pytest.raises(ConfigError, match=r"stages\[2\].objective.value_head: 'layers' in a config saved before "
                                          r"per-algorithm options; objective 'grpo' has no critic"):
        from_dict(d)
