"""Mesh, logical-axis rules and sharded execution on 8 simulated CPU devices (tests/conftest.py sets the flag)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from starling_jax import models
from starling_jax.parallel import sharding
from starling_jax.config import MeshConfig, ObjectiveConfig
from starling_jax import algorithms
from starling_jax.step import losses

CFG = models.PRESETS["tiny"].replace(vocab_size=128, pad_token_id=0, eos_token_id=2)
DEFAULT_RULES = sharding.rules_dict(MeshConfig())

# What the default rules must give each parameter, written out by hand (embed -> fsdp; heads, kv_heads, mlp,
# vocab -> tensor; layers, head_dim, norms replicated).
EXPECTED = {
    "embed": P("tensor", "fsdp"),
    "layers/attn_norm": P(None, None), "layers/mlp_norm": P(None, None),
    "layers/wq": P(None, "fsdp", "tensor", None), "layers/wk": P(None, "fsdp", "tensor", None),
    "layers/wv": P(None, "fsdp", "tensor", None), "layers/wo": P(None, "tensor", None, "fsdp"),
    "layers/w_gate": P(None, "fsdp", "tensor"), "layers/w_up": P(None, "fsdp", "tensor"),
    "layers/w_down": P(None, "tensor", "fsdp"),
    "final_norm": P(None), "lm_head": P("fsdp", "tensor"),
}

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")


def _flat(tree):
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree.leaves_with_path(tree)}


def test_mesh_shape_resolves_minus_one_and_rejects_bad_sizes():
    assert sharding.mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    assert sharding.mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="not divisible by the fixed axes"):
        sharding.mesh_shape(MeshConfig(data=3, fsdp=-1, tensor=1), 8)
    with pytest.raises(ValueError, match="16 devices, but 8 are available"):
        sharding.mesh_shape(MeshConfig(data=2, fsdp=4, tensor=2), 8)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.mesh_shape(MeshConfig(data=-1, fsdp=-1, tensor=1), 8)


@needs8
def test_every_parameter_gets_the_sharding_the_rules_say():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    shardings = _flat(sharding.param_shardings(models.param_specs(CFG), mesh, DEFAULT_RULES))
    assert {k: s.spec for k, s in shardings.items()} == EXPECTED
    # created directly in those shards, with the values of a single-device init (same random bits; the float
    # transform may round differently once fused, hence 1 ulp of slack)
    params = sharding.init_sharded(models.param_specs(CFG), jax.random.key(0), CFG.init_std, mesh, DEFAULT_RULES)
    reference = _flat(jax.jit(models.init_params, static_argnums=0)(CFG, jax.random.key(0)))
    for name, array in _flat(params).items():
        assert array.sharding.spec == EXPECTED[name], name
        np.testing.assert_allclose(np.asarray(array), np.asarray(reference[name]), rtol=1e-6, atol=1e-8,
                                   err_msg=name)
    wq = params["layers"]["wq"]  # [L, D, H, E] split 2 x 2 over (embed, heads)
    assert wq.addressable_shards[0].data.shape == (CFG.num_layers, CFG.hidden_size // 2, CFG.num_heads // 2,
                                                   CFG.head_dim)
    # the value head's specs follow the same rules; batches split their leading axis over (data, fsdp)
    vh = _flat(sharding.param_shardings(models.value_head_specs(CFG, "mlp"), mesh, DEFAULT_RULES))
    assert vh["w1"].spec == P("fsdp", "tensor") and vh["b2"].spec == P(None)
    bs = sharding.batch_shardings({"tokens": np.zeros((8, 3, 5), np.int32)}, mesh, DEFAULT_RULES)
    assert bs["tokens"].spec == P(("data", "fsdp"), None, None)


@needs8
def test_bad_rules_fail_early_naming_parameter_shape_axis_and_mesh_size():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    specs = models.param_specs(CFG)
    collide = {**DEFAULT_RULES, "heads": "fsdp"}
    with pytest.raises(ValueError) as e:
        sharding.param_shardings(specs, mesh, collide)
    msg = str(e.value)
    # leaves are visited in sorted key order: wo [L, H, E, D] is the first to use fsdp for both heads and embed
    assert "layers/wo" in msg and "(2, 4, 16, 64)" in msg and "'fsdp'" in msg and "'embed'" in msg
    assert "'heads'" in msg and "used twice" in msg

    mesh18 = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))  # 2 kv heads cannot split 8 ways
    with pytest.raises(ValueError) as e:
        sharding.param_shardings(specs, mesh18, DEFAULT_RULES)
    msg = str(e.value)
    assert "layers/wk" in msg and "(2, 64, 2, 16)" in msg and "'kv_heads'" in msg and "tensor=8" in msg
    assert "not divisible" in msg

    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        sharding.param_shardings(specs, mesh, {**DEFAULT_RULES, "mlp": "model"})
    with pytest.raises(ValueError, match="no rule for logical axis 'vocab'"):
        sharding.param_shardings(specs, mesh, {k: v for k, v in DEFAULT_RULES.items() if k != "vocab"})
    with pytest.raises(ValueError, match=r"batch\['tokens'\].*size 6.*data=2 x fsdp=2 = 4"):
        sharding.batch_shardings({"tokens": np.zeros((6, 4), np.int32)}, mesh, DEFAULT_RULES)
    with pytest.raises(ValueError, match="has two rules"):
        sharding.rules_dict((("embed", "fsdp"), ("embed", None)))


def _batch(rng, B=8, T=16):
    mask = np.ones((B, T), np.int32)
    mask[1, :5] = 0  # a left-padded row
    mask[2, 11:] = 0  # a right-padded row
    return {"tokens": rng.integers(3, CFG.vocab_size, (B, T)).astype(np.int32), "attention_mask": mask,
            "loss_mask": ((rng.random((B, T)) > 0.3) & (mask > 0)).astype(np.float32)}


def _logits_loss_grads(params, batch, constrain):
    loss_fn = algorithms.build_loss(ObjectiveConfig(name="sft"), CFG, constrain)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, {"trunk": {}}, batch, jax.random.key(0))
    h = models.embed_tokens(params, CFG, batch["tokens"])
    h, _ = models.run_layers(params["layers"], CFG, h, batch["attention_mask"], constrain=constrain)
    logits = models.lm_logits(params, CFG, models.final_norm(params, CFG, h))
    return logits, loss, grads


def _assert_close(a, b, name, rel=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    assert np.abs(a - b).max() <= rel * scale, f"{name}: max abs diff {np.abs(a - b).max():.3g} vs scale {scale:.3g}"


@functools.lru_cache(maxsize=1)
def _single_device_reference():
    batch = _batch(np.random.default_rng(0))
    params = jax.jit(models.init_params, static_argnums=0)(CFG, jax.random.key(1))
    return params, batch, jax.jit(lambda p, b: _logits_loss_grads(p, b, None))(params, batch)


@needs8
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])
def test_forward_loss_and_gradients_on_a_mesh_equal_single_device(shape):
    params, batch, want = _single_device_reference()

    mesh = sharding.make_mesh(MeshConfig(*shape))
    specs = models.param_specs(CFG)
    p_sh = sharding.param_shardings(specs, mesh, DEFAULT_RULES)
    b_sh = sharding.batch_shardings(batch, mesh, DEFAULT_RULES)
    fn = jax.jit(lambda p, b: _logits_loss_grads(p, b, sharding.activation_constraint(mesh, DEFAULT_RULES)),
                 in_shardings=(p_sh, b_sh), out_shardings=(b_sh["tokens"], sharding.replicated(mesh), p_sh))
    got = fn(jax.device_put(params, p_sh), sharding.put_batch(batch, b_sh))

    assert got[2]["layers"]["wq"].sharding.spec == EXPECTED["layers/wq"]  # gradients keep the parameters' layout
    _assert_close(got[0], want[0], "logits")
    _assert_close(got[1], want[1], "loss")
    for name, g in _flat(got[2]).items():
        _assert_close(g, _flat(want[2])[name], f"grad {name}")


def test_process_rows_and_put_batch_on_one_process():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    batch = {"x": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    shardings = sharding.batch_shardings(batch, mesh, DEFAULT_RULES)
    assert sharding.process_rows(shardings["x"], 8) == list(range(8))  # one process reads every row
    out = sharding.put_batch(batch, shardings)
    np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
    assert len(out["x"].addressable_shards) == jax.device_count()
    place = sharding.BatchPlacement(mesh, DEFAULT_RULES)
    assert place.parts == jax.device_count() and place.global_size(8) == 8 and place.rows(8) == list(range(8))
    y = place.put(batch["x"])
    np.testing.assert_array_equal(place.local(y), batch["x"])
    np.testing.assert_array_equal(place.whole(y), batch["x"])
    np.testing.assert_array_equal(place.local(jax.jit(lambda a: a * 2, out_shardings=sharding.replicated(mesh))(y)),
                                  batch["x"] * 2)  # resharded over the batch before taking the rows
    assert place.max(5) == 5


@needs8
def test_jitted_sharded_step_keeps_layouts_donates_state_and_matches_the_loss():
    from starling_jax.config import OptimConfig
    from starling_jax.step.state import abstract_state, create_state, make_optimizer, state_shardings
    from starling_jax.step.step import jit_step, make_train_step

    params, batch, want = _single_device_reference()
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    t_specs, f_specs = losses.stage_specs(CFG, 1)  # train the top layer; the trunk is frozen
    trainable, frozen = losses.stage_params(jax.tree.map(jnp.copy, params), 1)
    opt = make_optimizer(OptimConfig(learning_rate=1e-3), 10, trainable)
    shardings = state_shardings(opt, abstract_state(trainable, opt, frozen),
                                sharding.param_shardings(t_specs, mesh, DEFAULT_RULES),
                                sharding.param_shardings(f_specs, mesh, DEFAULT_RULES), mesh)
    state = create_state(jax.device_put(trainable, shardings.params), opt, jax.random.key(0),
                         jax.device_put(frozen, shardings.frozen), shardings)
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")["layers"]["w_up"]  # Adam's first moment: the param's shards
    assert mu.sharding.spec == EXPECTED["layers/w_up"] and mu.addressable_shards[0].data.shape == (1, 16, 128)
    b_sh = sharding.batch_shardings(batch, mesh, DEFAULT_RULES)
    step = jit_step(make_train_step(algorithms.build_loss(ObjectiveConfig(name="sft"), CFG,
                                                      sharding.activation_constraint(mesh, DEFAULT_RULES)), opt, 2),
                    mesh, shardings, b_sh)
    old = state
    state, metrics = step(state, sharding.put_batch(batch, b_sh))
    assert old.params["layers"]["wq"].is_deleted()  # donated: the new state reuses its buffers
    _assert_close(metrics["loss"], want[1], "loss")
    assert state.params["layers"]["wq"].sharding.spec == EXPECTED["layers/wq"]
    assert state.frozen["trunk"]["embed"].sharding.spec == EXPECTED["embed"]


@pytest.mark.slow  # 110 s at load ~22: over ~10 s quiet
@needs8
def test_sharded_generation_equals_unsharded_and_keeps_the_cache_split():
    """sampling.generate with the mesh's activation constraint (data=2, fsdp=2, tensor=2: batch over data x fsdp,
    kv heads over tensor) gives the tokens and log-probs of a single-device run, greedy and sampled, over a rolling
    cache (window 8 < prompt + new tokens); prefill's KV cache comes out split over batch and kv heads."""
    from starling_jax.generation import sampling

    config = CFG.replace(init_std=0.3, sliding_window=8)  # peaked logits: no near-ties for greedy to split on
    params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(3))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 128, size=(4, 12)).astype(np.int32)
    mask = np.ones((4, 12), np.int32)
    mask[1, :5] = 0
    mask[3, :2] = 0
    tokens[mask == 0] = 0
    mesh = sharding.make_mesh(MeshConfig(2, 2, 2))
    constrain = sharding.activation_constraint(mesh, DEFAULT_RULES)
    p_sh = sharding.param_shardings(models.param_specs(config), mesh, DEFAULT_RULES)
    b_sh = sharding.batch_shardings({"t": tokens}, mesh, DEFAULT_RULES)["t"]
    sharded = (jax.device_put(params, p_sh), jax.device_put(tokens, b_sh), jax.device_put(mask, b_sh))
    for temperature in (0.0, 1.0):
        want = sampling.generate(params, config, tokens, mask, jax.random.key(5), 10, temperature=temperature)
        got = sampling.generate(sharded[0], config, sharded[1], sharded[2], jax.random.key(5), 10,
                                temperature=temperature, constrain=constrain)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
        np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), rtol=1e-5, atol=1e-5)
    _, cache = jax.jit(lambda p, t, m: sampling.prefill(p, config, t, m, 8, constrain))(*sharded)
    assert cache["k"][0].sharding.is_equivalent_to(NamedSharding(mesh, P(None, ("data", "fsdp"), None, "tensor")), 5)
    assert cache["k"][0].addressable_shards[0].data.shape == (1, 1, 8, 1, config.head_dim)


def test_launch_reads_flags_then_jax_environment_and_rejects_bad_input(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert not sharding.Launch().explicit
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:5")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    got = sharding.Launch(process_id=1).resolved()
    assert (got.coordinator, got.num_processes, got.process_id) == ("127.0.0.1:5", 4, 1)  # a flag wins
    monkeypatch.setenv("JAX_PROCESS_ID", "x")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='x' is not an integer"):
        sharding.Launch().resolved()
    monkeypatch.delenv("JAX_PROCESS_ID")
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    # every error below is raised before jax.distributed.initialize is called
    with pytest.raises(ValueError, match="given but not num_processes / process_id"):
        sharding.initialize_distributed(MeshConfig())
    with pytest.raises(ValueError, match=r"process id 2 is not in \[0, 2\)"):
        sharding.initialize_distributed(MeshConfig(), sharding.Launch(num_processes=2, process_id=2))
    with pytest.raises(ValueError, match="heartbeat_timeout_s must be >= 1"):
        sharding.initialize_distributed(MeshConfig(), sharding.Launch(num_processes=2, process_id=0,
                                                                      heartbeat_timeout_s=0))
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    sharding.initialize_distributed(MeshConfig())  # not distributed: nothing to do
