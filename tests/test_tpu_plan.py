"""Compiling for TPU pods from this CPU host with libtpu's TPU compiler (the `[tpu]` extra; compile only, no TPU):
the sharded RL step, generation and reward scoring with Pallas splash attention, and `plan --target`."""

import dataclasses
import textwrap

import jax
import pytest

from starling_jax.commands import plan
from starling_jax.parallel import sharding
from starling_jax.models import attention_ops

# Tiny bf16 model with attention="auto" (splash on TPU): APA with a reward model, prompts of 8 tokens, 4 new tokens.
RL_EXPERIMENT = textwrap.dedent('''
    from starling_jax.algorithms.apa import APAOptions
    from starling_jax.config import (DataConfig, Experiment, MeshConfig, ModelSection, RewardModelSection,
                                     RolloutConfig, TrainConfig)
    from starling_jax.models import PRESETS

    def get_config():
        model = PRESETS["tiny"].replace(vocab_size=128, pad_token_id=0, eos_token_id=2, dtype="bfloat16",
                                        attention="auto")
        return Experiment(name="tiny_rl_tpu", model=ModelSection(config=model, trainable_top_layers=1),
                          reward_model=RewardModelSection(config=model.replace(head="score")),
                          mesh=MeshConfig(data=2, fsdp=2, tensor=2), data=DataConfig(max_prompt_length=8),
                          objective=APAOptions(), train=TrainConfig(batch_size=8),
                          rollout=RolloutConfig(prompts_per_step=8, max_new_tokens=4, epochs=1, minibatch_size=8))
''')


def _load(tmp_path, text=RL_EXPERIMENT, name="tiny_rl_tpu.py"):
    from starling_jax.stages.experiment import load_experiment
    path = tmp_path / name
    path.write_text(text)
    return load_experiment(str(path))


@pytest.mark.slow
def test_sharded_rl_step_generation_and_reward_scoring_compile_for_a_tpu_pod_with_splash(tmp_path):
    """On v5e:2x4 (8 chips) with data, fsdp and tensor axes of 2: the APA update step, the rollout's generate call,
    reward-model scoring and the experience pass compile with the TPU compiler. Every self-attention forward is the
    splash kernel (a Mosaic custom call) under shard_map; without shard_map XLA refuses to partition it."""
    from starling_jax.stages.experiment import stages_of
    exp = _load(tmp_path)
    (_, cfg), = stages_of(exp)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, distributed=False))
    mesh = sharding.make_mesh(cfg.mesh, plan.tpu_devices("v5e:2x4"))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    parts = plan.stage_setup(cfg, mesh)
    calls = {"update": (parts.jit(mesh), (parts.state, parts.batch))}
    for name, call in parts.between_steps.items():
        fn = jax.jit(call.fn, in_shardings=(*call.resident_shardings, *call.input_shardings))
        calls[name] = fn, (*call.resident, *call.inputs)
    kernels = {}
    for name, (fn, args) in calls.items():
        with attention_ops.compiling_for("tpu"):
            lowered = fn.lower(*args)
        kernels[name] = lowered.as_text().count("tpu_custom_call")
        assert lowered.compile().memory_analysis().argument_size_in_bytes > 0, name
    # update: forward and backward kernels (trunk forward, top layer); reward model and experience pass: forwards;
    # generate: the prefill writes a cache (not self-attention over one run: blockwise), decode steps are dense
    assert kernels["update"] >= 2 and kernels["reward_model"] >= 1 and kernels["experience"] >= 1
    assert kernels["generate"] == 0


# Tiny float32 SFT model (V=128, D=64, L=2, H=4, K=2, E=16, F=128) on 16 rows of 32 tokens, fsdp 2 x tensor 2; dense
# attention, so tests/test_plan.py's FLOPs formula holds.
SFT_EXPERIMENT = textwrap.dedent('''
    from starling_jax.config import DataConfig, Experiment, MeshConfig, ModelSection, ObjectiveConfig, TrainConfig
    from starling_jax.models import PRESETS

    def get_config():
        model = PRESETS["tiny"].replace(vocab_size=128, pad_token_id=0, eos_token_id=2, attention="dense")
        return Experiment(name="tiny_tpu_plan", model=ModelSection(config=model),
                          mesh=MeshConfig(data=1, fsdp=2, tensor=2), data=DataConfig(max_length=32),
                          objective=ObjectiveConfig(name="sft"), train=TrainConfig(batch_size=16, grad_accum=2))
''')


@pytest.mark.slow
def test_plan_target_v5e_report_agrees_with_the_formulas(tmp_path, capsys):
    """`plan --target v5e:2x2 --json`: the TPU compiler's figures; parameter and optimizer bytes by hand; the inputs
    equal the compiler's argument bytes; the fit against v5e's 16 GiB; the roofline from the chip table."""
    import json

    from starling_jax.commands import cli
    from tests.test_plan import _expected_flops

    path = tmp_path / "tiny_tpu_plan.py"
    path.write_text(SFT_EXPERIMENT)
    assert cli.main(["plan", str(path), "--target", "v5e:2x2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["platform"] == "tpu" and r["target"] == "v5e-4" and r["devices"] == 4
    assert r["compiler"].startswith(f"TPU compiler (libtpu {plan.libtpu_version()}) for v5e-4 (v5e:2x2, 4 TPU v5")
    b, mem = r["per_device_bytes"], r["memory_analysis"]
    norms = 2 * 2 * 64 + 64  # replicated, float32
    matrices = 128 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)  # split 4 ways (fsdp x tensor)
    assert b["params"] == 4 * (matrices // 4 + norms)
    assert 2 * b["params"] <= b["optimizer"] <= 2 * b["params"] + 64  # Adam's two moments + scalars
    assert b["batch"] == 3 * 16 * 32 * 4 // 2  # tokens, attention_mask, loss_mask over fsdp = 2
    # the compiler's argument bytes: our inputs less the learning rate the step never reads (pruned, as on CPU), with
    # TPU's tiling: each array's last two dimensions padded to (8, 128) (here a [2, 64] norm takes 2 x 8 x 128)
    inputs = b["params"] + b["optimizer"] + b["frozen"] + b["step_and_rng"] + b["batch"] - 4
    assert inputs < mem["argument_size_in_bytes"] < inputs + 4 * 8 * 128 * 4 * 40  # 40 arrays of at most 4 tiles
    assert r["compiled_bytes"] == mem["argument_size_in_bytes"] + mem["temp_size_in_bytes"] + \
        mem["output_size_in_bytes"] - mem["alias_size_in_bytes"]
    assert b["temp"] == mem["temp_size_in_bytes"] and b["total"] == sum(
        b[k] for k in ("params", "optimizer", "other", "batch", "temp", "output_not_aliased"))
    assert r["flops_per_step"] == _expected_flops() and r["cost_analysis"]["bytes_accessed"] > 0
    assert r["fit"] == {"hbm_per_device_bytes": 16 * 2 ** 30, "fits": True,
                        "headroom_bytes": 16 * 2 ** 30 - max(b["total"], r["compiled_bytes"])}
    roof = r["roofline"]
    moved = max(r["cost_analysis"]["bytes_accessed"], mem["argument_size_in_bytes"] + mem["output_size_in_bytes"])
    step = max(_expected_flops() / 4 / 197e12, moved / 819e9)
    assert roof["step_seconds_lower_bound"] == pytest.approx(step)
    assert roof["mfu_upper_bound"] == pytest.approx(_expected_flops() / 4 / (step * 197e12))
    assert "fits in 16.00 GiB" in plan.format_report(r) and "roofline: step >=" in plan.format_report(r)


@pytest.mark.slow
def test_plan_rollout_on_v5e_compiles_generation_and_reward_scoring(tmp_path):
    """--rollout on v5e:2x2 (fsdp 4): generate (KV cache) and reward-model scoring (splash) compile for TPU; the
    phase total is the resident state + reward model + the largest call's own bytes."""
    exp = _load(tmp_path)
    target = plan.parse_target("v5e-4")
    mesh = dataclasses.replace(exp.mesh, data=1, fsdp=4, tensor=1)
    g = plan.plan_rollout(exp, plan.target_devices(target), mesh, target=target)
    assert {"generate", "reward_model"} <= set(g["calls"]) and g["platform"] == "tpu"
    gb = g["per_device_bytes"]
    for call in g["calls"].values():
        c = call["per_device_bytes"]
        assert c["total"] == gb["state"] + gb["extra"] + c["batch"] + c["temp"] + c["output_not_aliased"]
    assert gb["total"] == max(c["per_device_bytes"]["total"] for c in g["calls"].values())
    assert g["fit"]["fits"] and g["libtpu"] == plan.libtpu_version()


@pytest.mark.slow  # libtpu compiles both phases of two targets: ~14 s on the 2-core CPU
def test_plan_one_chip_targets_compile_with_libtpu(tmp_path, capsys):
    """v5e-1 and v6e-1 (one chip, one host smaller than libtpu's default 2x2 host): the TPU compiler compiles the step
    for a 1-device mesh and the report checks it against that one chip's HBM."""
    import json

    from starling_jax.commands import cli

    path = tmp_path / "tiny_tpu_plan.py"
    path.write_text(SFT_EXPERIMENT)
    for name, topology, hbm in (("v5e-1", "v5e:1x1", 16), ("v6e-1", "v6e:1x1", 32)):
        assert plan.parse_target(name) == plan.parse_target(topology) and plan.parse_target(name).chips == 1
        assert cli.main(["plan", str(path), "--target", name, "--mesh", "fsdp=1,tensor=1", "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["platform"] == "tpu" and r["devices"] == 1 and r["target"] == name
        assert r["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
        assert r["compiler"].startswith(f"TPU compiler (libtpu {plan.libtpu_version()}) for {name} ({topology}, 1 ")
        assert r["memory_analysis"]["argument_size_in_bytes"] >= r["per_device_bytes"]["params"] > 0
        assert r["fit"]["fits"] and r["fit"]["hbm_per_device_bytes"] == hbm * 2 ** 30
    for name in ("v5p-1", "v5p-2", "v4-1"):  # v4 and v5p have no slice below 4 chips
        with pytest.raises(plan.InputError, match="is not a known slice"):
            plan.parse_target(name)


@pytest.mark.slow
def test_plan_search_reports_the_largest_size_that_fits_one_chip(tmp_path, capsys):
    """--search KEY=V1,V2,...: one TPU compile per value in increasing order, stopping at the first the chip cannot
    hold (here a batch of 2^20 rows: the TPU compiler's RESOURCE_EXHAUSTED; 2^21 after it is never tried), and the
    largest value that fits."""
    import json

    from starling_jax.commands import cli

    path = tmp_path / "tiny_tpu_plan.py"
    path.write_text(SFT_EXPERIMENT)
    args = ["plan", str(path), "--target", "v5e-1", "--mesh", "fsdp=1,tensor=1"]
    assert cli.main(args + ["--search", "train.batch_size=2097152,1048576,16,4096", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [row["value"] for row in r["results"]] == [16, 4096, 1048576]  # increasing; stops after a misfit
    assert [row["fits"] for row in r["results"]] == [True, True, False]
    assert r["largest_that_fits"] == 4096 and r["target"] == "v5e-1" and r["libtpu"] == plan.libtpu_version()
    assert "RESOURCE_EXHAUSTED" in r["results"][-1]["note"] and len(r["reports"]) == 2
    assert r["results"][0]["total_gib"] < r["results"][1]["total_gib"] <= 16
    assert cli.main(args + ["--search", "train.batch_size=1048576"]) == 2
    out = capsys.readouterr().out
    assert "largest train.batch_size that fits on v5e-1: None" in out
    assert cli.main(["plan", str(path), "--devices", "1", "--search", "train.batch_size=8"]) == 2
    assert "give a TPU --target" in capsys.readouterr().err
    assert cli.main(args + ["--search", "train.batch_size=big"]) == 2
    assert "expected KEY=N1,N2,... with integers" in capsys.readouterr().err


def test_plan_bad_targets_say_what_to_do_in_one_line(tmp_path, capsys, monkeypatch):
    from starling_jax.commands import cli

    path = tmp_path / "tiny_tpu_plan.py"
    path.write_text(SFT_EXPERIMENT)
    assert cli.main(["plan", str(path), "--target", "v5e-3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'v5e-3' is not a known slice" in err
    assert "v5e-8 (v5e:2x4)" in err and "v5p-8 (v5p:2x2x1)" in err and "v6e-8" in err and "v4-8" in err
    assert plan.parse_target("V5P-16") == plan.parse_target("v5p:2x2x2")
    assert plan.parse_target("cpu:4").cpu_devices == 4 and plan.parse_target("v5e-8").chips == 8
    monkeypatch.setattr(plan, "libtpu_version", lambda: None)
    assert cli.main(["plan", str(path), "--target", "v5e-8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "libtpu, which is not installed: pip install -e '.[tpu]'" in err
    assert cli.main(["plan", str(path)]) == 2 and "give --target" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_that_does_not_fit_says_by_how_much(tmp_path, capsys):
    """1024 rows of 16384 tokens on v5e-4: the TPU compiler runs out of HBM; one line says by how much and what
    would help."""
    from starling_jax.commands import cli

    path = tmp_path / "tiny_tpu_plan.py"
    path.write_text(SFT_EXPERIMENT)
    assert cli.main(["plan", str(path), "--target", "v5e-4", "--set", "data.max_length=16384", "--set",
                     "train.batch_size=1024", "--set", "train.grad_accum=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit on v5e-4 (16 GiB per chip)" in err
    assert "exceeds available HBM" in err and "estimate:" in err and "grad_accum" in err
