"""QLoRA storage of a frozen base (models/quantize.py): NF4 levels against the paper's construction, quantize ->
dequantize against a direct numpy reference with its error bounds, the forward and the decode path with a quantized
base against the same with the dequantized weights, shardings by the logical-axis rules, the stage trees, and bad
input."""

import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compiled
from starling_jax import models
from starling_jax.generation import sampling
from starling_jax.models import quantize
from starling_jax.parallel import sharding
from starling_jax.config import MeshConfig

# tiny's input dimensions: hidden 64, head_dim 16, mlp 128: blocks of 16 divide them all
TINY_Q = models.get_preset("tiny").replace(vocab_size=128, pad_token_id=0, eos_token_id=2, attention="dense",
                                           quantize_block=16)


def test_nf4_levels_are_qlora_normal_quantiles():
    """QLoRA (arXiv:2305.14314, Sec. 3 and Appendix E; bitsandbytes create_normal_map(offset=0.9677083)): 8 quantiles
    of N(0, 1) for the positive half, 7 for the negative, an exact zero, normalized to [-1, 1]."""
    from scipy.stats import norm
    offset = 0.9677083
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([positive, [0.0], negative]))
    levels = levels / np.max(levels)
    np.testing.assert_allclose(quantize.NF4, levels, rtol=0, atol=2e-7)
    assert quantize.NF4[7] == 0.0 and quantize.NF4[0] == -1.0 and quantize.NF4[15] == 1.0


def _nf4_reference(w: np.ndarray, axis: int, block: int):
    """Direct numpy NF4: per block absmax, nearest level by argmin (ties to the lower level), codes [..] uint8."""
    w = np.moveaxis(w.astype(np.float64), axis, -1)
    blocks = w.reshape(*w.shape[:-1], -1, block)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    normed = blocks / np.where(absmax > 0, absmax, 1)
    codes = np.argmin(np.abs(normed[..., None] - quantize.NF4.astype(np.float64)), axis=-1)
    deq = quantize.NF4.astype(np.float64)[codes] * absmax
    back = lambda a: np.moveaxis(a.reshape(w.shape), -1, axis)
    return back(codes), back(deq), back(np.broadcast_to(absmax, blocks.shape))


@pytest.mark.parametrize("name,shape", [("wq", (2, 64, 4, 16)), ("wo", (2, 4, 16, 64)), ("w_down", (128, 64))])
def test_nf4_quantize_dequantize_against_numpy(name, shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.02
    w.reshape(-1)[:3] = 0.0  # exact zeros stay zero
    axis = len(shape) + quantize.INPUT_AXES[name][-1]
    q = quantize.quantize(jnp.asarray(w), name, "nf4", 16)
    assert q["nf4"].dtype == jnp.uint8 and q["absmax"].dtype == jnp.float32
    assert q["nf4"].shape == tuple(d // 2 if i == axis else d for i, d in enumerate(shape))
    assert q["absmax"].shape == tuple(d // 16 if i == axis else d for i, d in enumerate(shape))
    codes, deq_ref, absmax = _nf4_reference(w, axis, 16)
    packed = np.asarray(q["nf4"])
    unpacked = np.stack([packed >> 4, packed & 15], axis=axis + 1).reshape(shape)  # first of a pair: high nibble
    np.testing.assert_array_equal(unpacked, codes)
    deq = np.asarray(quantize.dequantize(q, jnp.float32))
    np.testing.assert_allclose(deq, deq_ref, rtol=1e-6, atol=0)
    assert np.all(deq.reshape(-1)[:3] == 0.0)
    # bit for bit the table's float32 level times the block's float32 absmax, then one cast (jitted, as a layer reads it)
    scale = np.repeat(np.asarray(q["absmax"]), 16, axis=axis)
    table = quantize.NF4[codes] * scale
    for dtype in (jnp.float32, jnp.bfloat16):
        got = np.asarray(jax.jit(quantize.dequantize, static_argnums=1)(q, dtype))
        want = np.asarray(jnp.asarray(table).astype(dtype))
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), dtype
    # the error is at most half the widest gap between adjacent levels, times the block's absmax
    half_gap = np.max(np.diff(quantize.NF4)) / 2
    assert np.all(np.abs(deq - w) <= half_gap * absmax * (1 + 1e-6))
    assert np.mean(np.abs(deq - w)) < 0.1 * np.mean(np.abs(w))


def test_nf4_packing_order_and_ties():
    """Values on the levels themselves come back exactly; two codes a byte, the first in the high nibble; a value
    exactly halfway between two levels takes the lower (bitsandbytes' strict > comparisons)."""
    w = np.tile(quantize.NF4, 2).reshape(32, 1)  # one input axis of 32, block 16: absmax 1 in both blocks
    q = quantize.quantize(jnp.asarray(w), "w_down", "nf4", 16)
    np.testing.assert_array_equal(np.asarray(q["nf4"])[:8, 0], [(2 * i << 4) | (2 * i + 1) for i in range(8)])
    np.testing.assert_array_equal(np.asarray(quantize.dequantize(q, jnp.float32)), w)
    mid = np.float32((quantize.NF4[9] + quantize.NF4[10]) / 2)
    w2 = np.zeros((16, 1), np.float32)
    w2[0], w2[1] = 1.0, mid
    assert int(np.asarray(quantize.quantize(jnp.asarray(w2), "w_down", "nf4", 16)["nf4"])[0, 0]) == (15 << 4) | 9


def test_int8_per_channel_against_numpy():
    w = np.random.default_rng(1).standard_normal((2, 4, 16, 64)).astype(np.float32)
    w[0, :, :, 5] = 0.0  # an all-zero output channel
    q = quantize.quantize(jnp.asarray(w), "wo", "int8", 64)
    scale = np.abs(w).max(axis=(1, 2), keepdims=True) / 127
    scale = np.where(scale > 0, scale, 1)
    np.testing.assert_allclose(np.asarray(q["scale"]), scale, rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(q["int8"]), np.clip(np.round(w / scale), -127, 127))
    deq = np.asarray(quantize.dequantize(q, jnp.float32))
    assert np.all(np.abs(deq - w) <= scale / 2 * (1 + 1e-6)) and np.all(deq[0, :, :, 5] == 0)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_forward_and_decode_with_a_quantized_base_equal_the_dequantized_weights(scheme):
    """The quantized base, dequantized per layer inside the scan (training forward) and per layer in the decode
    loop (fused q/k/v and gate/up), gives what the dense dequantized weights give."""
    config = TINY_Q.replace(quantize=scheme)
    params = models.init_params(config, jax.random.key(0))
    qparams = models.quantized_base(params, config)
    assert models.quantize.is_quantized(qparams["layers"]["wq"]) and not models.quantize.is_quantized(
        qparams["layers"]["attn_norm"])
    assert qparams["embed"] is params["embed"] and qparams["lm_head"] is params["lm_head"]  # left dense
    dense = {**qparams, "layers": quantize.dequantize_tree(qparams["layers"], jnp.float32)}
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 3, 128)
    mask = jnp.ones_like(tokens).at[0, :3].set(0)
    np.testing.assert_array_equal(np.asarray(compiled.forward(qparams, config, tokens, mask)),
                                  np.asarray(compiled.forward(dense, config, tokens, mask)))
    out_q = sampling.generate(qparams, config, tokens, mask, jax.random.key(2), 5, temperature=0.0)
    out_d = sampling.generate(dense, config, tokens, mask, jax.random.key(2), 5, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out_q[0]), np.asarray(out_d[0]))
    np.testing.assert_allclose(np.asarray(out_q[2]), np.asarray(out_d[2]), rtol=1e-5, atol=1e-5)
    # and close to the unquantized model: relative RMS of the logits' change (nf4 ~0.1 on these random weights)
    ref = np.asarray(compiled.forward(params, config, tokens, mask))
    change = np.asarray(compiled.forward(qparams, config, tokens, mask)) - ref
    assert np.sqrt(np.mean(change ** 2) / np.mean(ref ** 2)) < {"nf4": 0.2, "int8": 0.02}[scheme]


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_a_quantized_tree_counts_the_weights_it_stores(scheme):
    """count_params (the parameter counts of plan and the data stage's FLOPs per token) counts a quantized matrix's
    weights, not its codes (nf4 packs two a byte) and scales: the same count as the dense tree, from arrays or shapes."""
    params = models.init_params(TINY_Q, jax.random.key(0))
    stored = quantize.quantize_base(params, scheme, TINY_Q.quantize_block)
    assert models.count_params(stored) == models.count_params(params)
    assert models.count_params(jax.eval_shape(lambda: stored)) == models.count_params(params)


def test_stage_trees_with_a_quantized_trunk():
    """A stage's trees with a quantized trunk (losses.stage_params): the trunk stores codes, the trainable top and
    the reference stay dense, and merge_params gives back dense weights (the dequantized trunk)."""
    from starling_jax.step import losses
    config = TINY_Q.replace(quantize="nf4")
    params = models.init_params(config, jax.random.key(0))
    trainable, frozen = losses.stage_params(params, 1, True, reference=True, config=config)
    assert frozen["trunk"]["layers"]["wq"]["nf4"].dtype == jnp.uint8
    assert frozen["reference"]["layers"]["wq"].dtype == jnp.float32  # equal to the trainable top at the start
    specs_t, specs_f = losses.stage_specs(config, 1, True, reference=True)
    assert specs_f["trunk"]["layers"]["wq"]["nf4"].shape == frozen["trunk"]["layers"]["wq"]["nf4"].shape
    merged = models.merge_params(trainable, frozen["trunk"])
    assert merged["layers"]["wq"].shape == params["layers"]["wq"].shape
    np.testing.assert_array_equal(np.asarray(merged["layers"]["wq"][0]), np.asarray(
        quantize.dequantize(frozen["trunk"]["layers"]["wq"], jnp.float32)[0]))
    none = TINY_Q  # quantize="none": the trees are what they always were
    t0, f0 = losses.stage_params(params, 1, True, reference=True, config=none)
    assert jax.tree.structure(f0) == jax.tree.structure(losses.stage_params(params, 1, True, True)[1])
    assert models.quantized_specs(models.param_specs(none), none) == models.param_specs(none)


def test_quantized_arrays_shard_by_the_weights_logical_axes():
    """On fsdp 4 x tensor 2: codes and absmax split like the weight (the absmax's block axis over fsdp with the
    weight's input axis), the int8 scale replicated along its size-1 input axes; a block count the mesh axis does not
    divide is one error naming the stored array."""
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    rules = MeshConfig().rules
    config = TINY_Q.replace(quantize="nf4")
    sh = sharding.param_shardings(models.quantized_specs(models.param_specs(config), config), mesh, rules)
    wq = sh["layers"]["wq"]
    assert tuple(wq["nf4"].spec) == (None, "fsdp", "tensor", None) == tuple(wq["absmax"].spec)
    assert tuple(sh["layers"]["wo"]["absmax"].spec) == (None, "tensor", None, "fsdp")
    params = models.quantized_base(models.init_params(config, jax.random.key(0)), config)
    placed = jax.device_put(params, sh)
    # each device's codes and absmax cover the same input rows: dequantizing the shards = the shards of the whole
    whole = quantize.dequantize(params["layers"]["w_up"], jnp.float32)
    fn = jax.jit(lambda q: quantize.dequantize(q, jnp.float32), out_shardings=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, "fsdp", "tensor")))
    np.testing.assert_array_equal(np.asarray(fn(placed["layers"]["w_up"])), np.asarray(whole))
    int8 = config.replace(quantize="int8")
    sh8 = sharding.param_shardings(models.quantized_specs(models.param_specs(int8), int8), mesh, rules)
    assert tuple(sh8["layers"]["wq"]["scale"].spec) == (None, None, "tensor", None)
    # fsdp 8: hidden 64 splits (8 each) and so do its codes (32 bytes), but not its 4 blocks of 16
    mesh8 = sharding.make_mesh(MeshConfig(data=1, fsdp=8, tensor=1), jax.devices()[:8])
    with pytest.raises(ValueError, match=r"layers/w_gate/absmax \(shape \(2, 4, 128\).*dimension 1 of "
                                         r"size 4 \(logical axis 'embed'\) is not divisible by mesh axis fsdp=8"):
        sharding.param_shardings(models.quantized_specs(models.param_specs(config), config), mesh8, rules)


QUANT_EXPERIMENT = textwrap.dedent('''
    from starling_jax.algorithms import options
    from starling_jax.config import (DataConfig, Experiment, MeshConfig, ModelSection, RewardModelSection,
                                     RolloutConfig, TrainConfig)
    from starling_jax.models import PRESETS

    def get_config():
        model = PRESETS["tiny"].replace(vocab_size=128, pad_token_id=0, eos_token_id=2, dtype="bfloat16",
                                        attention="dense", quantize=QUANTIZE, quantize_block=16, remat="full")
        return Experiment(name="tiny_rl_nf4", model=ModelSection(config=model, trainable_top_layers=1),
                          reward_model=RewardModelSection(config=model.replace(head="score")),
                          mesh=MeshConfig(data=1, fsdp=-1, tensor=1), data=DataConfig(max_prompt_length=8),
                          objective=options("apa"), train=TrainConfig(batch_size=8),
                          rollout=RolloutConfig(prompts_per_step=8, max_new_tokens=4, epochs=1, minibatch_size=8))
''')


@pytest.mark.slow
def test_rl_plan_with_a_quantized_trunk_and_reward_model(tmp_path):
    """plan (update step and rollout phase) of an APA stage whose trunk and reward model are stored in nf4: the
    frozen state and the reward model hold uint8 codes, and take less memory than stored densely."""
    from starling_jax.commands import plan
    from starling_jax.stages.experiment import load_experiment
    reports = {}
    for scheme in ("none", "nf4"):
        path = tmp_path / f"tiny_rl_{scheme}.py"
        path.write_text(QUANT_EXPERIMENT.replace("QUANTIZE", repr(scheme)))
        exp = load_experiment(str(path))
        devices = jax.devices()[:1]
        reports[scheme] = (plan.plan_experiment(exp, devices), plan.plan_rollout(exp, devices))
        if scheme == "nf4":
            cfg = _only_stage(exp)
            parts = plan.stage_setup(cfg, sharding.make_mesh(cfg.mesh, devices))
            assert parts.state.frozen["trunk"]["layers"]["wq"]["nf4"].dtype == jnp.uint8
            assert parts.resident["reward_model"][0]["layers"]["w_up"]["nf4"].dtype == jnp.uint8
    for i in range(2):
        dense, nf4 = reports["none"][i]["per_device_bytes"], reports["nf4"][i]["per_device_bytes"]
        assert nf4["frozen" if i == 0 else "params"] < dense["frozen" if i == 0 else "params"]
        assert nf4["extra"] < dense["extra"]  # the reward model


def _only_stage(exp):
    from starling_jax.stages.experiment import stages_of
    (_, cfg), = stages_of(exp)
    return dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, distributed=False))


def test_a_quantization_the_base_cannot_take_is_one_line(tmp_path, capsys):
    from starling_jax.commands import cli
    for scheme, block, message in (
            ("'int4'", 16, "quantize='int4' is not a quantization the base can take: use one of none, int8, nf4"),
            ("'nf4'", 64, "quantize='nf4' with quantize_block=64: head_dim=16 not divisible by the block size")):
        path = tmp_path / "bad.py"
        path.write_text(QUANT_EXPERIMENT.replace("QUANTIZE", scheme).replace("quantize_block=16",
                                                                             f"quantize_block={block}"))
        assert cli.main(["plan", str(path), "--devices", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    path.write_text(QUANT_EXPERIMENT.replace("QUANTIZE", "'none'"))
    assert cli.main(["plan", str(path), "--devices", "1", "--set", "model.config.quantize=nf8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quantize='nf8' is not a quantization the base can take" in err, err


@pytest.mark.slow  # ~15 s on the 2-core CPU
def test_lora_on_a_quantized_base_equals_lora_on_the_dequantized_base():
    """QLoRA: adapters (non-zero B) on the nf4 base give the logits they give on the dense dequantized base, in the
    scanned forward and in generation; with B = 0 the adapted model is the quantized base exactly."""
    from starling_jax.models import lora
    opts = lora.LoraOptions(rank=4, alpha=8.0)
    config = lora.configure(TINY_Q.replace(quantize="nf4"), opts)
    base = models.quantized_base(models.init_params(config, jax.random.key(0)), config)
    adapters = lora.init(config, opts, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 3, 128)
    mask = jnp.ones_like(tokens)
    np.testing.assert_array_equal(np.asarray(compiled.forward(lora.attach(base, adapters), config, tokens, mask)),
                                  np.asarray(compiled.forward(base, config, tokens, mask)))
    adapters = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape, a.dtype), adapters)
    dense = {**base, "layers": quantize.dequantize_tree(base["layers"], jnp.float32)}
    q, d = lora.attach(base, adapters), lora.attach(dense, adapters)
    np.testing.assert_array_equal(np.asarray(compiled.forward(q, config, tokens, mask)),
                                  np.asarray(compiled.forward(d, config, tokens, mask)))
    out_q = sampling.generate(q, config, tokens, mask, jax.random.key(4), 4, temperature=0.0)
    out_d = sampling.generate(d, config, tokens, mask, jax.random.key(4), 4, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out_q[0]), np.asarray(out_d[0]))
    # gradients reach the adapters through the dequantized base
    grads = jax.jit(jax.grad(lambda a: jnp.mean(models.forward(lora.attach(base, a), config, tokens, mask))))(adapters)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


def test_lora_stage_trees_store_the_base_quantized():
    """A LoRA stage (step/adapters.py) over an nf4 model: the trunk's and the base's layers are stored as codes, sharded
    by their quantized specs; policy (base + zero adapters) and reference (the base) give the same logits; the merged
    export folds the adapters into the dequantized base."""
    from starling_jax.config import LoraConfig
    from starling_jax.step import adapters
    config = TINY_Q.replace(quantize="nf4")
    params = models.init_params(config, jax.random.key(0))
    lora = LoraConfig(rank=4, alpha=8.0)
    run = adapters.configure(config, lora, 1)
    trainable, frozen = adapters.init_trees(params, run, lora, jax.random.key(1), 1)
    assert frozen["base"]["layers"]["wq"]["nf4"].dtype == jnp.uint8 == frozen["trunk"]["layers"]["w_up"]["nf4"].dtype
    assert trainable["lora"]["wq"]["a"].dtype == jnp.float32
    specs_t, specs_f = adapters.tree_specs(run, lora, trainable, frozen)
    assert jax.tree.map(lambda s: s.shape, specs_f, is_leaf=models.transformer.is_spec) == jax.tree.map(
        lambda a: a.shape, frozen)
    view_t, view_f = adapters.views(trainable, frozen)
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 3, 128)
    mask = jnp.ones_like(tokens)
    from starling_jax.step.hydra import top_forward, trunk_forward
    shared = trunk_forward(view_f["trunk"], run, tokens, mask)
    h_policy = top_forward(view_t["policy"], view_f["trunk"], shared, run, tokens, mask)
    h_reference = top_forward(view_f["reference"], view_f["trunk"], shared, run, tokens, mask)
    np.testing.assert_array_equal(np.asarray(h_policy), np.asarray(h_reference))
    merged = adapters.merged(trainable, frozen, run)
    expected = jnp.concatenate([quantize.dequantize(frozen["trunk"]["layers"]["wq"], jnp.float32),
                                quantize.dequantize(frozen["base"]["layers"]["wq"], jnp.float32)])
    np.testing.assert_array_equal(np.asarray(merged["layers"]["wq"]), np.asarray(expected))


def test_alpha_qlora_recipe_is_alpha_apa_in_nf4_with_lora():
    """experiments/starling_alpha_qlora.py: both 7B models in nf4, LoRA rank 64 on every projection, alpha's APA
    objective (but the critic), alpha's per-process sizes (one chip = one process), 20,000 updates, each minibatch of
    4 rollouts accumulated over 4 micro-batches of 1 (memory only); it validates on 1 device, and on 8 with the
    v5e-8 sizes its docstring gives, once the local files are swapped for synthetic ones."""
    from starling_jax.config import ConfigError
    from starling_jax.stages.experiment import apply_overrides, load_experiment, stages_of
    from starling_jax.stages.validation import validate
    exp = load_experiment("starling_alpha_qlora")
    local = apply_overrides(exp, ["data.source=synthetic", "model.path=none", "reward_model.path=none",
                                  "model.tokenizer=openchat-3.5", "reward_model.tokenizer=openchat-3.5"])
    assert validate(local, num_devices=1) is local
    pod = apply_overrides(local, ["rollout.prompts_per_step=512", "rollout.minibatch_size=32", "train.batch_size=512",
                                  "rollout.generation_batch=32"])
    assert validate(pod, num_devices=8) is pod  # micro-batches of 32 / 4 = 8 rollouts, one per chip
    with pytest.raises(ConfigError, match=r"rollout.generation_batch: 4: each rollout call's 4 rows are not "
                                          r"divisible by the mesh's data\*fsdp = 8 devices"):
        validate(apply_overrides(pod, ["rollout.generation_batch=4"]), num_devices=8)  # one chip's 4 rows a call
    with pytest.raises(ConfigError, match=r"rollout.minibatch_size: the micro-batch 4/4 is not divisible by the "
                                          r"mesh's data\*fsdp = 8 devices"):
        validate(local, num_devices=8)  # one rollout per micro-batch does not split over 8 chips
    (_, c), = stages_of(exp)
    (_, alpha), = stages_of(load_experiment("starling_alpha_apa"))
    assert c.model.config.quantize == c.reward_model.config.quantize == "nf4"
    assert c.model.config.quantize_block == c.reward_model.config.quantize_block == 64
    assert c.model.config.replace(quantize="none") == alpha.model.config
    assert c.reward_model.config.replace(quantize="none") == alpha.reward_model.config
    assert c.model.lora.rank == 64 and c.model.lora.alpha == 16 and len(c.model.lora.targets) == 7
    assert c.model.trainable_top_layers == 0 and c.model.config.dtype == "bfloat16"
    assert dataclasses.replace(c.objective, value_head="layers", value_head_layers=4) == alpha.objective
    assert (c.rollout.prompts_per_step, c.rollout.minibatch_size, c.rollout.epochs) == (64, 4, 2)
    assert c.train.grad_accum == c.rollout.minibatch_size == 4 and alpha.train.grad_accum == 1  # 1 rollout each
    assert c.train.steps * c.rollout.epochs * c.rollout.prompts_per_step // c.rollout.minibatch_size == 20000
    assert (c.rollout.max_new_tokens, c.data.max_prompt_length, c.reward_model.max_length) == (1024, 1124, 2048)


# ----------------------------------------------------------------------------------------------------------------------
# Quantizing while loading (io/hf.py load(quantize=...)): the arrays of quantizing after a dense load, bit for bit,
# without a dense layer stack on any device.

# a bf16 checkpoint (as OpenChat-3.5 is stored) read into float32 (as the alpha recipes state); blocks of 8 divide
# every input width of tiny (hidden 64, head_dim 16, mlp 128) into a count fsdp 8 divides
LOAD_BLOCK = 8


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    from starling_jax.io import hf
    config = TINY_Q.replace(param_dtype="bfloat16", dtype="bfloat16", quantize_block=LOAD_BLOCK)
    params = models.init_params(config.replace(init_std=0.3), jax.random.key(5))  # wide values: many nf4 codes
    path = str(tmp_path_factory.mktemp("qload") / "bf16")
    hf.save(path, config, params)
    return path


def _fsdp8():
    return sharding.make_mesh(MeshConfig(data=1, fsdp=8, tensor=1), jax.devices()[:8])


def _assert_same_arrays(got, want, placed=True):
    """The same tree, every array equal bit for bit in the same dtype (and, with placed, the same sharding)."""
    (lg, tg), (lw, tw) = jax.tree.flatten_with_path(got), jax.tree.flatten_with_path(want)
    assert tg == tw
    for (key, a), (_, b) in zip(lg, lw):
        assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(key))
        if placed:
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (key, a.sharding, b.sharding)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
@pytest.mark.parametrize("meshed", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_quantized_equals_quantizing_the_dense_load(bf16_checkpoint, scheme, meshed, dtype):
    """hf.load(quantize=...) gives the arrays (and shardings) that today's path gives: the dense load in the same
    dtype, then quantized by the stage (program.quantize_frozen: jitted into the quantized specs' shardings) or by
    the LoRA trees (adapters.init_trees: models.quantized_base, op by op); norms, embedding and head as loaded."""
    from starling_jax.config import Experiment
    from starling_jax.io import hf
    from starling_jax.stages.program import StageContext, quantize_frozen
    mesh = _fsdp8() if meshed else None
    config, dense = hf.load(bf16_checkpoint, dtype=dtype, mesh=mesh)
    qconfig = config.replace(quantize=scheme, quantize_block=LOAD_BLOCK)
    got_config, got = hf.load(bf16_checkpoint, dtype=dtype, mesh=mesh, quantize=scheme, quantize_block=LOAD_BLOCK)
    assert got_config == qconfig
    assert quantize.is_quantized(got["layers"]["w_down"]) and got["layers"]["wq"][scheme].dtype == (
        jnp.uint8 if scheme == "nf4" else jnp.int8)
    exp = Experiment(name="q")
    ctx = StageContext(experiment=exp, config=exp, stage_name="s", workdir="", mesh=mesh, load_stage=None)
    _assert_same_arrays(got, models.quantized_base(dense, qconfig))
    want = quantize_frozen(ctx, qconfig, jax.tree.map(jnp.copy, dense))
    _assert_same_arrays(got, want)
    assert quantize_frozen(ctx, qconfig, got) is got  # already quantized, in these shards: left as it is
    for k in ("embed", "lm_head", "final_norm"):
        _assert_same_arrays(got[k], dense[k])


def test_loading_quantized_never_places_a_dense_layer_stack(bf16_checkpoint, monkeypatch):
    """What hf.load places on devices (jax.make_array_from_callback) and what it quantizes on the host, recorded:
    with quantize every layer matrix is placed as its codes and scales only (one byte or half a byte a weight) and
    each quantizer call sees one layer; the same recorder sees the dense [L, ...] stacks without quantize."""
    from starling_jax.io import hf
    placed, quantized = [], []
    make = jax.make_array_from_callback

    def recording_make(shape, sharding_, callback, *args, **kwargs):
        out = make(shape, sharding_, callback, *args, **kwargs)
        placed.append((tuple(shape), np.dtype(out.dtype)))
        return out

    layer_quantizer = hf._quantize_layer

    def recording_quantize(layer, name, scheme, block):
        quantized.append((name, layer.shape))
        return layer_quantizer(layer, name, scheme, block)
    monkeypatch.setattr(jax, "make_array_from_callback", recording_make)
    monkeypatch.setattr(hf, "_quantize_layer", recording_quantize)
    config, dense = hf.load(bf16_checkpoint, dtype="float32", mesh=_fsdp8())
    stacks = {(tuple(dense["layers"][k].shape), np.dtype("float32")) for k in quantize.MATRICES}
    assert stacks <= set(placed) and not quantized  # the recorder sees the dense stacks
    placed.clear()
    _, q = hf.load(bf16_checkpoint, dtype="float32", mesh=_fsdp8(), quantize="nf4", quantize_block=LOAD_BLOCK)
    assert not stacks & set(placed), placed
    for k in quantize.MATRICES:
        shape = dense["layers"][k].shape
        assert (q["layers"][k]["nf4"].shape, np.dtype("uint8")) in placed
        assert quantized.count((k, shape[1:])) == config.num_layers  # one layer at a time, each once
    dense_bytes = sum(dense["layers"][k].nbytes for k in quantize.MATRICES)
    stored_bytes = sum(a.nbytes for k in quantize.MATRICES for a in q["layers"][k].values())
    assert 4 * stored_bytes == dense_bytes  # 4 bits + a float32 absmax per 8 weights (8 bits a weight), against 32


def test_a_quantization_the_checkpoint_cannot_take_is_one_line(bf16_checkpoint):
    from starling_jax.io import hf
    with pytest.raises(hf.HFFormatError) as e:
        hf.load(bf16_checkpoint, quantize="nf4", quantize_block=48)
    message = str(e.value)
    assert "\n" not in message, message
    assert message.startswith(f"{bf16_checkpoint}: cannot store its layers quantized: "), message
    assert ("quantize='nf4' with quantize_block=48: hidden_size=64, head_dim=16, mlp_dim=128 not divisible by the "
            "block size") in message, message
    with pytest.raises(hf.HFFormatError, match="quantize='int4' is not a quantization the base can take"):
        hf.load(bf16_checkpoint, quantize="int4")
