"""`starling-jax plan --json` on a tiny experiment (8 simulated CPU devices from tests/conftest.py)."""

import json
import textwrap

import jax
import numpy as np
import pytest

from starling_jax.commands import cli, plan

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


@pytest.mark.slow  # 8-device programs: 75-145 s each at load ~22, over ~10 s quiet
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
    # what we account for as inputs is what XLA allocates as the step's arguments, less the inputs the step never
    # reads (jit prunes them): the previous update's learning rate in inject_hyperparams' state, a float32
    inputs = b["params"] + b["optimizer"] + b["frozen"] + b["step_and_rng"] + b["batch"]
    assert inputs - 4 == mem["argument_size_in_bytes"]
    assert b["temp"] == mem["temp_size_in_bytes"] > 0
    assert mem["alias_size_in_bytes"] >= b["params"] + b["optimizer"]  # the donated state is updated in place

    # params by hand: every matrix is split 4 ways (fsdp x tensor), the norms are replicated; float32
    norms = 2 * 2 * 64 + 64
    matrices = 128 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
    assert b["params"] == 4 * (matrices // 4 + norms)
    assert report["param_counts"] == {"trainable": matrices + norms, "frozen": 0}
    # Adam's two moments shard like the params; the rest is scalars (counts, inject_hyperparams' learning rate etc.)
    assert 2 * b["params"] <= b["optimizer"] <= 2 * b["params"] + 64
    # batch: tokens, attention_mask (int32) and loss_mask (float32), 16 x 32, split over data x fsdp = 4
    assert b["batch"] == 3 * 16 * 32 * 4 // 4

    assert report["flops_per_step"] == _expected_flops()
    assert report["flops_per_device"] == pytest.approx(_expected_flops() / 8)
    assert report["mfu"] == pytest.approx(_expected_flops() / 8 / (0.5 * 1e9))
    text = plan.format_report(report)
    assert "optimizer state" in text and "temporaries (compiler)" in text and "MFU at 0.5 s/step" in text
    assert "figures from the XLA:CPU on 8 CPU devices" in text and "roofline" not in text and "fit" not in report


@pytest.mark.slow
def test_plan_reexecutes_itself_on_simulated_devices(tmp_path):
    """A process with one CPU device asked to plan for 2 re-executes with --xla_force_host_platform_device_count=2."""
    import os
    import subprocess
    import sys

    path = tmp_path / "tiny_plan.py"
    path.write_text(EXPERIMENT)  # its mesh (2, 2, 2) needs 8 devices; --mesh overrides it
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "STARLING_PLAN_REEXEC")}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-m", "starling_jax.commands.cli", "plan", str(path), "--devices", "2", "--json",
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
    from starling_jax.stages.experiment import load_experiment
    with pytest.raises(KeyError, match="no stage 'rl'; its stages: sft"):
        plan.plan_experiment(load_experiment(str(path)), jax.devices()[:1], stage="rl")


RL_EXPERIMENT = textwrap.dedent('''
    from starling_jax.algorithms.apa import APAOptions
    from starling_jax.config import (DataConfig, Experiment, MeshConfig, ModelSection, RewardModelSection,
                                     RolloutConfig, TrainConfig)
    from starling_jax.models import PRESETS

    def get_config():
        model = PRESETS["tiny"].replace(vocab_size=128, pad_token_id=0, eos_token_id=2)
        return Experiment(name="tiny_rl_plan", model=ModelSection(config=model, trainable_top_layers=1),
                          reward_model=RewardModelSection(config=model.replace(head="score")),
                          mesh=MeshConfig(data=1, fsdp=-1, tensor=1), data=DataConfig(max_prompt_length=8),
                          objective=APAOptions(), train=TrainConfig(batch_size=8),
                          rollout=RolloutConfig(prompts_per_step=8, max_new_tokens=4, epochs=1, minibatch_size=8))
''')


@pytest.mark.slow  # 8-device programs: 75-145 s each at load ~22, over ~10 s quiet
@needs8
def test_plan_rl_update_and_rollout(tmp_path):
    from starling_jax.stages.experiment import load_experiment

    path = tmp_path / "tiny_rl_plan.py"
    path.write_text(RL_EXPERIMENT)
    exp = load_experiment(str(path))
    D, V, L = 64, 128, 2
    layer = D * 64 * 2 + D * 32 * 2 + 3 * D * 128  # wq, wo, wk, wv, w_gate, w_up, w_down
    norms = 2 * D  # attn_norm, mlp_norm per layer

    r = plan.plan_experiment(exp, jax.devices()[:8])
    b, mem = r["per_device_bytes"], r["memory_analysis"]
    # XLA prunes the one input this step never reads: ref_logprobs (APA has no KL term in its loss), 1 row x 4 tokens
    # x float32 per device
    assert b["params"] + b["optimizer"] + b["frozen"] + b["step_and_rng"] + b["batch"] - 16 == mem["argument_size_in_bytes"]
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
    assert gb["total"] == (gb["params"] + gb["optimizer"] + gb["other"] + gb["batch"] + gb["temp"]
                           + gb["output_not_aliased"])


@pytest.mark.slow  # 8-device programs: 75-145 s each at load ~22, over ~10 s quiet
@needs8
def test_plan_rollout_holds_the_train_state(tmp_path):
    """The rollout phase keeps the whole train state (trainable layers, critic, Adam moments, trunk, reference) and
    the reward model on the devices while its calls run; the plan adds the largest call (generate, reward model,
    experience forward, advantages) to them, each compiled with the arguments the stage passes."""
    from starling_jax.stages.experiment import load_experiment

    path = tmp_path / "tiny_rl_plan.py"
    path.write_text(RL_EXPERIMENT)
    exp = load_experiment(str(path))
    b = plan.plan_experiment(exp, jax.devices()[:8])["per_device_bytes"]
    g = plan.plan_rollout(exp, jax.devices()[:8])
    gb = g["per_device_bytes"]
    state = b["params"] + b["optimizer"] + b["frozen"] + b["step_and_rng"]  # the update plan's state
    assert gb["state"] == state and gb["optimizer"] == b["optimizer"] > 0
    assert gb["state"] == gb["params"] + gb["optimizer"] + gb["critic"] + gb["frozen"] + gb["step_and_rng"]
    assert gb["critic"] > 0 and gb["frozen"] > 0  # the MLP value head; the reference's top layer, norm and head
    calls = g["calls"]
    assert set(calls) == {"generate", "reward_model", "experience", "advantages"}
    for call in calls.values():
        c = call["per_device_bytes"]
        assert c["total"] == state + gb["extra"] + c["batch"] + c["temp"] + c["output_not_aliased"]
    assert gb["total"] == max(c["per_device_bytes"]["total"] for c in calls.values())
    assert gb["total"] >= state + gb["extra"] + gb["temp"]
    assert g["largest_call"] in calls and gb["temp"] == calls[g["largest_call"]]["per_device_bytes"]["temp"]
    # each call is compiled on what the stage hands it: generate reads the policy's (top, trunk) pair, the prompts
    # (8 x 8 int32 tokens and mask, one row per device) and a key (2 x uint32, replicated); the experience pass the
    # whole state's params and frozen trees and the chunk; the reward model its params and the chunk's tokens
    gen = calls["generate"]
    assert gen["per_device_bytes"]["batch"] == 2 * 8 * 4 + 8
    assert gen["memory_analysis"]["argument_size_in_bytes"] == gb["params"] + gen["per_device_bytes"]["batch"]
    exp_args = calls["experience"]["memory_analysis"]["argument_size_in_bytes"]
    assert exp_args <= b["params"] + b["frozen"] + calls["experience"]["per_device_bytes"]["batch"] + 4
    rm = calls["reward_model"]
    assert rm["memory_analysis"]["argument_size_in_bytes"] == gb["extra"] + rm["per_device_bytes"]["batch"]
    text = plan.format_report(g)
    assert "call generate:" in text and "largest call" in text


@needs8
@pytest.mark.slow
def test_plan_counts_and_shards_the_layer_critic(tmp_path):
    """value_head="layers": the planned trainable state holds the critic's own copy of the top layers (+ norm +
    Linear(D, 1), no bias) instead of the MLP head, sharded like the model's layers, with Adam moments for it."""
    from starling_jax.parallel import sharding
    from starling_jax.stages.experiment import load_experiment, stages_of

    path = tmp_path / "tiny_rl_plan.py"
    path.write_text(RL_EXPERIMENT.replace('APAOptions()', 'APAOptions(value_head="layers", value_head_layers=2)'))
    exp = load_experiment(str(path))
    D, V = 64, 128
    layer = D * 64 * 2 + D * 32 * 2 + 3 * D * 128 + 2 * D  # with its two norms
    r = plan.plan_experiment(exp, jax.devices()[:8])
    assert r["param_counts"]["trainable"] == (layer + D + D * V) + (2 * layer + D + D)  # policy + critic
    assert r["param_counts"]["frozen"] == V * D + layer + (layer + D + D * V)
    b = r["per_device_bytes"]
    assert 2 * b["params"] <= b["optimizer"] < 2 * b["params"] + 64  # Adam's two moments of every trainable leaf
    assert any("a copy of the top 2 layers" in n for n in r["notes"])

    (_, cfg), = stages_of(exp)
    setup = plan.stage_setup(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:8]))
    shard = setup.state_shardings.params
    for name in shard["policy"]["layers"]:
        assert shard["critic"]["layers"][name].spec == shard["policy"]["layers"][name].spec, name
    assert shard["critic"]["final_norm"].spec == shard["policy"]["final_norm"].spec
    assert setup.state.params["critic"]["layers"]["wq"].shape == (2, D, 4, 16)


def _specs(tree):
    return jax.tree.map(lambda s: s.spec, tree, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


@needs8
@pytest.mark.parametrize("objective", [pytest.param("sft", marks=pytest.mark.slow), "apa"])  # sft: as above
def test_plan_builds_the_training_stage_setup(tmp_path, objective):
    """The planner and the training stage call the same setup: equal optimiser schedule (length and values), state
    shapes and shardings, batch layout. The rl schedule spans steps x updates per step (epochs x minibatches)."""
    from starling_jax.algorithms import options
    from starling_jax.config import (DataConfig, Experiment, MeshConfig, ModelSection, RewardModelSection,
                                     RolloutConfig, TrainConfig)
    from starling_jax.stages.experiment import stages_of
    from starling_jax.models import PRESETS
    from starling_jax.stages.program import StageContext, build_program

    model = PRESETS["tiny"]
    exp = Experiment(name="same_setup", model=ModelSection(config=model, trainable_top_layers=1),
                     reward_model=RewardModelSection(config=model.replace(head="score")),
                     mesh=MeshConfig(data=2, fsdp=-1, tensor=1),
                     data=DataConfig(synthetic_prompts=64, max_length=32, max_prompt_length=16),
                     objective=options(objective), train=TrainConfig(steps=5, batch_size=8),
                     rollout=RolloutConfig(prompts_per_step=8, max_new_tokens=4, epochs=3, minibatch_size=4,
                                           eval_prompts=4))
    (name, cfg), = stages_of(exp)
    ctx = StageContext(experiment=exp, config=cfg, stage_name=name, workdir=str(tmp_path), mesh=None,
                       load_stage=lambda n: None)
    trained = build_program(ctx).setup
    from starling_jax.parallel import sharding
    planned = plan.stage_setup(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:8]))
    want = 5 * 3 * (8 // 4) if objective == "apa" else 5
    assert trained.total_updates == planned.total_updates == want
    for t in (0, 1, want // 2, want - 1, want):
        assert float(trained.optimizer.schedule(t)) == float(planned.optimizer.schedule(t)), t
    assert _shapes(trained.state) == _shapes(planned.state)
    assert _specs(trained.state_shardings) == _specs(planned.state_shardings)
    # the training batch adds the rollout source's per-rollout "stat_*" rows; the rest is the planned layout
    same = [k for k in trained.batch if not k.startswith("stat_")]
    assert _shapes({k: trained.batch[k] for k in same}) == _shapes(planned.batch)
    assert {k: trained.batch_shardings[k].spec for k in same} == _specs(planned.batch_shardings)


def test_jaxpr_flops_counts_a_pallas_kernel_per_grid_point():
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    def kernel(x_ref, w_ref, o_ref):
        o_ref[...] = jnp.dot(x_ref[...], w_ref[...])

    def f(x, w):  # x [32, 128] in 4 blocks of 8 rows, each times w [128, 64]
        return pl.pallas_call(kernel, grid=(4,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0)),
                                                           pl.BlockSpec((128, 64), lambda i: (0, 0))],
                              out_specs=pl.BlockSpec((8, 64), lambda i: (i, 0)),
                              out_shape=jax.ShapeDtypeStruct((32, 64), jnp.float32), interpret=True)(x, w)

    x, w = jax.ShapeDtypeStruct((32, 128), jnp.float32), jax.ShapeDtypeStruct((128, 64), jnp.float32)
    assert plan.jaxpr_flops(jax.make_jaxpr(f)(x, w).jaxpr) == 4 * 2 * 8 * 128 * 64
