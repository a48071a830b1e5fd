"""Compiling for TPU pods from this CPU host with libtpu's TPU compiler (the `[tpu]` extra; compile only, no TPU):
the sharded RL step, generation and reward scoring with Pallas splash attention, and `plan --target`."""

import dataclasses
import textwrap

import jax
import pytest

from starling_jax import plan, sharding
from starling_jax.models import attention_ops

# Tiny bf16 model with attention="auto" (splash on TPU): APA with a reward model, prompts of 8 tokens, 4 new tokens.
RL_EXPERIMENT = textwrap.dedent('''
    from starling_jax.config import (DataConfig, Experiment, MeshConfig, ModelSection, ObjectiveConfig,
                                     RewardModelSection, RolloutConfig, TrainConfig)
    from starling_jax.models import PRESETS

    def get_config():
        model = PRESETS["tiny"].replace(vocab_size=128, pad_token_id=0, eos_token_id=2, dtype="bfloat16",
                                        attention="auto")
        return Experiment(name="tiny_rl_tpu", model=ModelSection(config=model, trainable_top_layers=1),
                          reward_model=RewardModelSection(config=model.replace(head="score")),
                          mesh=MeshConfig(data=2, fsdp=2, tensor=2), data=DataConfig(max_prompt_length=8),
                          objective=ObjectiveConfig(name="apa"), train=TrainConfig(batch_size=8),
                          rollout=RolloutConfig(prompts_per_step=8, max_new_tokens=4, epochs=1, minibatch_size=8))
''')


def _load(tmp_path, text=RL_EXPERIMENT, name="tiny_rl_tpu.py"):
    from starling_jax.config_loading import load_experiment
    path = tmp_path / name
    path.write_text(text)
    return load_experiment(str(path))


@pytest.mark.slow
def test_sharded_rl_step_generation_and_reward_scoring_compile_for_a_tpu_pod_with_splash(tmp_path):
    """On v5e:2x4 (8 chips) with data, fsdp and tensor axes of 2: the APA update step, the rollout's generate call,
    reward-model scoring and the experience pass compile with the TPU compiler. Every self-attention forward is the
    splash kernel (a Mosaic custom call) under shard_map; without shard_map XLA refuses to partition it."""
    from starling_jax.config_loading import stages_of
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
