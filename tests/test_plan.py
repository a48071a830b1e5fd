"""`starling-jax plan --json` on a tiny experiment (8 simulated CPU devices from tests/conftest.py)."""

import json
import textwrap

import jax
import numpy as np
import pytest

from starling_jax import cli, plan

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")

# Tiny model: V=128, D=64, L=2, H=4, K=2, E=16, F=128; SFT on 16 rows of 32 tokens, 2 micro-batches.
EXPERIMENT = textwrap.dedent('''
    from starling_jax.config import DataConfig, Experiment, MeshConfig, ModelSection, ObjectiveConfig, TrainConfig
    from starling_jax.models import PRESETS

    def get_config():
        model = PRESETS["tiny"].replace(vocab_size=128, pad_token_id=0, eos_token_id=2)
        return Experiment(name="tiny_plan", model=ModelSection(config=model), mesh=MeshConfig(data=2, fsdp=2, tensor=2),
                          data=DataConfig(max_length=32), objective=ObjectiveConfig(name="sft"),
                          train=TrainConfig(batch_size=16, grad_accum=2))
''')


def _expected_flops(V=128, D=64, L=2, H=4, K=2, E=16, F=128, B=16, T=32):
    """Matmul FLOPs of one SFT step, by hand: forward 2 * (weights) per token, backward twice that; attention
    scores and mixing 2 * T * T * H * E each per row and layer; the LM head sees T - 1 positions."""
    layer_weights = D * H * E * 2 + D * K * E * 2 + 3 * D * F
    dense = 6 * L * layer_weights * B * T + 6 * D * V * B * (T - 1)
    attention = 3 * L * B * (2 * 2 * T * T * H * E)
    return dense + attention


@needs8
def test_plan_json_bytes_add_up_and_match_memory_analysis(tmp_path, capsys):
    path = tmp_path / "tiny_plan.py"
    path.write_text(EXPERIMENT)
    assert cli.main(["plan", str(path), "--devices", "8", "--json", "--step-time", "0.5", "--peak-flops", "1e9"]) == 0
    report = json.loads(capsys.readouterr().out)
    b = report["per_device_bytes"]
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert b["total"] == b["params"] + b["optimizer"] + b["other"] + b["batch"] + b["temp"] + b["output_not_aliased"]
    mem = report["memory_analysis"]
    # what we account for as inputs is exactly what XLA allocates as the step's arguments
    assert b["params"] + b["optimizer"] + b["frozen"] + b["step_and_rng"] + b["batch"] == mem["argument_size_in_bytes"]
    assert b["temp"] == mem["temp_size_in_bytes"] > 0
    assert mem["alias_size_in_bytes"] >= b["params"] + b["optimizer"]  # the donated state is updated in place

    # params by hand: every matrix is split 4 ways (fsdp x tensor), the norms are replicated; float32
    norms = 2 * 2 * 64 + 64
    matrices = 128 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
    assert b["params"] == 4 * (matrices // 4 + norms)
    assert report["param_counts"] == {"trainable": matrices + norms, "frozen": 0}
    # Adam's two moments shard like the params; the rest is the step count
    assert 2 * b["params"] <= b["optimizer"] <= 2 * b["params"] + 16
    # batch: tokens, attention_mask (int32) and loss_mask (float32), 16 x 32, split over data x fsdp = 4
    assert b["batch"] == 3 * 16 * 32 * 4 // 4

    assert report["flops_per_step"] == _expected_flops()
    assert report["flops_per_device"] == pytest.approx(_expected_flops() / 8)
    assert report["mfu"] == pytest.approx(_expected_flops() / 8 / (0.5 * 1e9))
    text = plan.format_report(report)
    assert "optimizer state" in text and "temporaries (XLA)" in text and "MFU at 0.5 s/step" in text


def test_plan_reexecutes_itself_on_simulated_devices(tmp_path):
    """A process with one CPU device asked to plan for 2 re-executes with --xla_force_host_platform_device_count=2."""
    import os
    import subprocess
    import sys

    path = tmp_path / "tiny_plan.py"
    path.write_text(EXPERIMENT)  # its mesh (2, 2, 2) needs 8 devices; --mesh overrides it
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "STARLING_PLAN_REEXEC")}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-m", "starling_jax.cli", "plan", str(path), "--devices", "2", "--json",
                          "--mesh", "data=2,fsdp=1,tensor=1", "--set", "data.max_length=8"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["devices"] == 2 and report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}


def test_jaxpr_flops_counts_every_scan_iteration():
    import jax.numpy as jnp

    def f(ws, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0].sum()

    for layers in (2, 5):
        ws, x = jax.ShapeDtypeStruct((layers, 32, 32), jnp.float32), jax.ShapeDtypeStruct((8, 32), jnp.float32)
        jaxpr = jax.make_jaxpr(jax.grad(f))(ws, x).jaxpr
        # forward h @ w, backward dh @ w.T and h.T @ dh: three [8,32]x[32,32] matmuls per layer
        assert plan.jaxpr_flops(jaxpr) == layers * 3 * 2 * 8 * 32 * 32


def test_parse_mesh_and_unknown_stage(tmp_path):
    assert plan.parse_mesh("data=2,fsdp=-1") == {"data": 2, "fsdp": -1}
    with pytest.raises(ValueError, match="expected data=N,fsdp=N,tensor=N"):
        plan.parse_mesh("model=2")
    path = tmp_path / "tiny_plan.py"
    path.write_text(EXPERIMENT)
    from starling_jax.config import load_experiment
    with pytest.raises(KeyError, match="no stage 'rl'; its stages: sft"):
        plan.plan_experiment(load_experiment(str(path)), jax.devices()[:1], stage="rl")


RL_EXPERIMENT = textwrap.dedent('''
    from starling_jax.config import (DataConfig, Experiment, MeshConfig, ModelSection, ObjectiveConfig,
                                     RewardModelSection, RolloutConfig, TrainConfig)
    from starling_jax.models import PRESETS

    def get_config():
        model = PRESETS["tiny"].replace(vocab_size=128, pad_token_id=0, eos_token_id=2)
        return Experiment(name="tiny_rl_plan", model=ModelSection(config=model, trainable_top_layers=1),
                          reward_model=RewardModelSection(config=model.replace(head="score")),
                          mesh=MeshConfig(data=1, fsdp=-1, tensor=1), data=DataConfig(max_prompt_length=8),
                          objective=ObjectiveConfig(name="apa"), train=TrainConfig(batch_size=8),
                          rollout=RolloutConfig(prompts_per_step=8, max_new_tokens=4, epochs=1, minibatch_size=8))
''')


@needs8
def test_plan_rl_update_and_rollout(tmp_path):
    from starling_jax.config import load_experiment

    path = tmp_path / "tiny_rl_plan.py"
    path.write_text(RL_EXPERIMENT)
    exp = load_experiment(str(path))
    D, V, L = 64, 128, 2
    layer = D * 64 * 2 + D * 32 * 2 + 3 * D * 128  # wq, wo, wk, wv, w_gate, w_up, w_down
    norms = 2 * D  # attn_norm, mlp_norm per layer

    r = plan.plan_experiment(exp, jax.devices()[:8])
    b, mem = r["per_device_bytes"], r["memory_analysis"]
    assert b["params"] + b["optimizer"] + b["frozen"] + b["step_and_rng"] + b["batch"] == mem["argument_size_in_bytes"]
    critic = D * 2 * D + 2 * D + 2 * D + 1  # Starling's MLP value head
    assert r["param_counts"]["trainable"] == layer + norms + D + D * V + critic  # top layer, final norm, head, critic
    assert r["param_counts"]["frozen"] == V * D + (layer + norms) + (layer + norms + D + D * V)  # trunk + reference
    assert r["param_counts"]["reward_model"] == V * D + L * (layer + norms) + D + D
    assert b["extra"] > 0 and b["other"] == b["frozen"] + b["step_and_rng"] + b["extra"]

    g = plan.plan_rollout(exp, jax.devices()[:8])
    gb = g["per_device_bytes"]
    # the full policy, every matrix split 8 ways over fsdp (float32), norms replicated
    assert gb["params"] == 4 * ((V * D * 2 + L * layer) // 8 + L * norms + D)
    assert gb["extra"] == b["extra"] and gb["temp"] == g["memory_analysis"]["temp_size_in_bytes"] > 0
    assert gb["total"] == gb["params"] + gb["other"] + gb["batch"] + gb["temp"] + gb["output_not_aliased"]
