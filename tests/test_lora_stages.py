"""LoRA in every stage kind (model.lora, step/adapters.py): the trees hold adapters (+ a reward model's score head, the
critic) as the trainable part and the base as the frozen part; step 0 computes exactly the base model's numbers; the
base never changes; the reference of DPO and the rl kind is the base (equal to a plain forward of the original
weights); the optimiser state covers the trainable part alone; checkpoints hold no base weights and a resume equals
an uninterrupted run; a later stage (and `convert`) gets the adapters folded into the weights."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compiled
from fake_rollout import fake_chunk
from starling_jax import models
from starling_jax.algorithms import options
from starling_jax.config import (CheckpointConfig, DataConfig, Experiment, LoggingConfig, LoraConfig, MeshConfig,
                                 ModelSection, ObjectiveConfig, OptimConfig, RewardModelSection, RolloutConfig, Stage,
                                 TrainConfig)
from starling_jax.parallel import sharding
from starling_jax.stages.kinds import rlaif
from starling_jax.stages.kinds.data import data_setup
from starling_jax.step import adapters, hydra
from starling_jax.step.state import init_state, make_optimizer

CFG = models.PRESETS["tiny"].replace(num_layers=3, vocab_size=300, pad_token_id=0, eos_token_id=2)
LORA = LoraConfig(rank=4, alpha=8.0)
B, P, N, T = 8, 6, 5, 12


def _equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _size(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@pytest.fixture(scope="module")
def params():
    return models.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def rollout():
    return fake_chunk(CFG.vocab_size, [0, 1, 2, 0, 3, 1, 0, 2], [5, 1, 3, 5, 2, 4, 5, 1], P, N)


def _base_logprobs(params, rollout):
    """Independent reference: a plain forward of the original weights; logits at P-1+j predict reply token j."""
    logits = compiled.forward(params, CFG, rollout["tokens"], rollout["attention_mask"])
    return np.asarray(models.token_logprobs(logits[:, P - 1:P + N - 1], rollout["tokens"][:, P:]))


# ----------------------------------------------------------------------------------------------------------------------
# The rl kind: APA, PPO, GRPO, RLOO.

# grpo and rloo take the same LoRA path (no critic, the policy's adapters alone; they differ only in the group
# baseline, tests/test_group_objectives.py): one group objective here, on the trunk split (top 2) that apa-0 lacks
# (the day-to-day tier keeps the group case; the critic cases take 10-15 s each on the 2-core CPU)
@pytest.mark.parametrize("name,top,critic", [pytest.param("apa", 0, "mlp", marks=pytest.mark.slow),
                                             pytest.param("ppo", 2, "mlp", marks=pytest.mark.slow), ("grpo", 2, "mlp"),
                                             pytest.param("apa", 2, "layers", marks=pytest.mark.slow)])
def test_rl_update_trains_adapters_over_a_fixed_base(params, rollout, name, top, critic):
    """critic "layers": the critic's own copy of the top layer trains in full beside the policy's adapters."""
    layers = 1 if critic == "layers" else 0
    critic_options = dict(value_head=critic, value_head_layers=layers)
    extra = {"apa": dict(apa_lambda=1.0, value_clip=None, **critic_options),
             "ppo": dict(value_clip=0.2, **critic_options)}.get(name, dict(group_size=4))
    obj = options(name, kl_coef=0.1, **extra)
    run = adapters.configure(CFG, LORA, top)
    trainable, frozen = hydra.init_rl_params(params, run, jax.random.key(2), top, value_head_kind=critic,
                                             value_head_layers=layers, lora=LORA)
    if critic == "layers":  # a copy of the base's top layer, without adapters
        assert "lora" not in trainable["critic"]["layers"]
        assert _equal(trainable["critic"]["layers"], jax.tree.map(lambda a: a[-1:], params["layers"]))
    assert sorted(trainable) == ["critic", "lora"] and sorted(frozen) == ["base", "trunk"]
    assert jax.tree.leaves(trainable["lora"])[0].shape[0] == (top or CFG.num_layers)
    exp_fn, loss_fn = rlaif.build_rl_functions(run, obj, P)
    ex = exp_fn(trainable, frozen, rollout["tokens"], rollout["attention_mask"], rollout["response_mask"],
                rollout["scores"], jnp.float32(0.1))
    base = _base_logprobs(params, rollout)
    mask = rollout["response_mask"] > 0
    # step 0 is the base model exactly, and the reference is the base (no copy: the very arrays of frozen["base"])
    np.testing.assert_array_equal(np.asarray(ex["old_logprobs"])[mask], np.asarray(ex["ref_logprobs"])[mask])
    np.testing.assert_allclose(np.asarray(ex["ref_logprobs"])[mask], base[mask], atol=2e-5)
    assert hydra.reference_parts(frozen)[0] is frozen["base"]

    batch = {k: rollout[k] for k in ("tokens", "attention_mask", "response_mask")}
    batch.update({k: ex[k] for k in ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns")})
    optimizer = make_optimizer(OptimConfig(learning_rate=3e-3, weight_decay=0.0), 8, trainable)
    state = init_state(trainable, optimizer, jax.random.key(3), frozen)
    # the optimiser's state covers the trainable tree alone: adapters + critic, two moments each (+ a few scalars)
    assert 0 <= _size(state.opt_state) - 2 * _size(trainable) < 8, (_size(state.opt_state), _size(trainable))
    before_frozen, before_lora = jax.device_get(state.frozen), jax.device_get(trainable["lora"])
    before_critic = jax.device_get(trainable["critic"])
    loss_jit = jax.jit(loss_fn)  # compiled once for the loss before and after the update
    l0 = float(loss_jit(state.params, state.frozen, batch)[0])
    step = jax.jit(rlaif.make_rl_step(loss_fn, optimizer, epochs=3, minibatch_size=B), donate_argnums=(0,))
    state, metrics = step(state, batch)
    l1 = float(loss_jit(state.params, state.frozen, batch)[0])
    assert l1 < l0, (l0, l1)
    assert _equal(state.frozen, before_frozen)  # the base: bit-identical
    assert not _equal(state.params["lora"], before_lora)
    after = jax.jit(hydra.hydra_forward, static_argnums=(2, 5))(state.params, state.frozen, run, rollout["tokens"],
                                                                 rollout["attention_mask"], P)
    np.testing.assert_allclose(np.asarray(after["ref_logprobs"])[mask], base[mask], atol=2e-5)
    assert not np.allclose(np.asarray(after["logprobs"])[mask], base[mask], atol=1e-4)  # the policy moved
    if critic == "layers" or name in ("apa", "ppo"):
        assert not _equal(state.params["critic"], before_critic)  # the critic trains (in full)


def test_rl_sampling_from_adapters_equals_the_merged_policy(params, rollout):
    """sampling.generate from the (base + adapters, trunk) pair gives what the merged weights give."""
    from starling_jax.generation import sampling

    run = adapters.configure(CFG, LORA, 2)
    trainable, frozen = hydra.init_rl_params(params, run, jax.random.key(2), 2, lora=LORA)
    # adapters that change the model: b drawn instead of zero
    keys = iter(jax.random.split(jax.random.key(9), 64))
    trainable = {**trainable, "lora": jax.tree.map(lambda a: 0.05 * jax.random.normal(next(keys), a.shape),
                                                   trainable["lora"])}
    merged = adapters.merged(trainable, frozen, run)
    assert "lora" not in merged["layers"]
    prompts, mask = rollout["tokens"][:, :P], rollout["attention_mask"][:, :P]
    got = sampling.generate(hydra.policy_parts(trainable, frozen), run, prompts, mask, jax.random.key(3), N)
    want = sampling.generate(merged, CFG, prompts, mask, jax.random.key(3), N)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# The data kinds: SFT, RM (K-wise and pairwise), DPO.

def _stage_config(objective: str, lora, top=0, head="lm"):
    return Experiment(name="t", model=ModelSection(config=CFG.replace(head=head), trainable_top_layers=top, lora=lora),
                      mesh=MeshConfig(fsdp=1), objective=options(objective, **({"dpo_beta": 0.5} if objective == "dpo" else {})),
                      optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0),
                      train=TrainConfig(steps=6, batch_size=B),
                      data=DataConfig(max_length=T, max_prompt_length=4, max_responses=3))


def _batch(objective: str):
    rng = np.random.default_rng(5)
    tok = lambda *s: rng.integers(3, CFG.vocab_size, s).astype(np.int32)
    mask = lambda *s: (np.arange(T) < rng.integers(T // 2, T + 1, s)[..., None]).astype(np.int32)
    if objective == "sft":
        m = mask(B)
        return {"tokens": tok(B, T) * m, "attention_mask": m, "loss_mask": (m * (np.arange(T) >= 4)).astype(np.float32)}
    if objective == "dpo":
        out = {}
        for side in ("chosen", "rejected"):
            m = mask(B)
            out.update({f"{side}_tokens": tok(B, T) * m, f"{side}_attention_mask": m,
                        f"{side}_loss_mask": (m * (np.arange(T) >= 4)).astype(np.float32)})
        return out
    m = mask(B, 3)
    return {"tokens": tok(B, 3, T) * m, "attention_mask": m, "ranks": np.tile(np.arange(1, 4, dtype=np.int32), (B, 1)),
            "response_mask": np.ones((B, 3), np.int32)}


def _setup(objective, lora, top, params):
    head = "score" if objective.startswith("rm_") else "lm"
    c = _stage_config(objective, lora, top, head)
    mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
    return data_setup(c, CFG.replace(head=head), jax.tree.map(jnp.copy, params), mesh, jax.random.key(4))


@pytest.fixture(scope="module")
def rm_params(params):
    p = {k: v for k, v in params.items() if k != "lm_head"}
    return {**p, "score": 0.02 * jax.random.normal(jax.random.key(7), (CFG.hidden_size, 1))}


# sft on the trunk split (top 2) is the path dpo-2 takes with one sequence instead of two (the same
# adapters.data_loss wrapper and trunk/base trees): sft runs on top 0 only
@pytest.mark.parametrize("objective,top", [("sft", 0), ("rm_plackett_luce", 0),
                                           pytest.param("rm_bradley_terry", 2, marks=pytest.mark.slow),  # >10 s each
                                           pytest.param("dpo", 0, marks=pytest.mark.slow), ("dpo", 2)])
def test_data_stage_trains_adapters_over_a_fixed_base(params, rm_params, objective, top):
    p = rm_params if objective.startswith("rm_") else params
    batch = _batch(objective)
    full, lora = _setup(objective, None, top, p), _setup(objective, LORA, top, p)
    st = lora.state
    want = sorted(["lora"] + (["score"] if objective.startswith("rm_") else []))
    assert sorted(st.params) == want and sorted(st.frozen) == ["base", "trunk"]
    # step 0: exactly the loss (and metrics) of full-layer training from the same weights
    l_full, m_full = jax.jit(full.loss)(full.state.params, full.state.frozen, batch, jax.random.key(0))
    lora_loss = jax.jit(lora.loss)
    l_lora, m_lora = lora_loss(st.params, st.frozen, batch, jax.random.key(0))
    assert float(l_lora) == float(l_full), (float(l_lora), float(l_full))
    for k in m_full:
        assert float(m_lora[k]) == float(m_full[k]), k
    frozen_before = jax.device_get(st.frozen)
    head_before = jax.device_get(st.params.get("score"))
    step = jax.jit(lora.update, donate_argnums=(0,))
    losses = []
    for _ in range(6):
        st, metrics = step(st, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
    assert _equal(st.frozen, frozen_before)  # the base: bit-identical
    if objective.startswith("rm_"):
        assert not _equal(st.params["score"], head_before)  # the score head trains in full
    if objective == "dpo":  # the reference is the base: its log-probs are the original model's
        ref = _dpo_reference_mean(p, batch)
        _, m_now = lora_loss(st.params, st.frozen, batch, None)
        got = float(m_now["logps_chosen"]) - float(m_now["rewards_chosen"]) / 0.5
        np.testing.assert_allclose(got, ref, rtol=1e-4)
        assert abs(float(m_now["logps_chosen"]) - ref) > 1e-3  # while the policy moved


def _dpo_reference_mean(params, batch) -> float:
    logits = compiled.forward(params, CFG, batch["chosen_tokens"], batch["chosen_attention_mask"])
    lp = models.token_logprobs(logits[:, :-1], batch["chosen_tokens"][:, 1:])
    return float(jnp.mean(jnp.sum(lp * batch["chosen_loss_mask"][:, 1:], axis=-1)))


def test_lora_trees_shard_like_their_weights(params):
    """On a mesh the adapters of a projection split along the base weight's axes, the rank axis stays whole."""
    c = dataclasses.replace(_stage_config("sft", LORA), mesh=MeshConfig(fsdp=4, tensor=2))
    mesh = sharding.make_mesh(c.mesh)
    setup = data_setup(c, CFG, jax.tree.map(jnp.copy, params), mesh, jax.random.key(4))
    a, b = setup.state.params["lora"]["wq"]["a"], setup.state.params["lora"]["wq"]["b"]
    assert a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert b.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)


# ----------------------------------------------------------------------------------------------------------------------
# Whole stages through the loop: checkpoints, resume, later stages, convert.

def _tiny_lora_experiment(steps=4, every=2, seed=0, extra_stages=False):
    tiny = models.PRESETS["tiny"]
    data = DataConfig(source="synthetic", synthetic_prompts=64, max_length=48, max_prompt_length=32, max_responses=3)
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "up"))
    stages = [Stage(name="sft", objective=ObjectiveConfig(name="sft"),
                    model=ModelSection(config=tiny, tokenizer="openchat-3.5", template="openchat_3.5", lora=lora),
                    train=TrainConfig(steps=steps, batch_size=8, seed=seed))]
    if extra_stages:
        stages += [
            Stage(name="rm", objective=options("rm_plackett_luce"),
                  model=ModelSection(config=tiny.replace(head="score"), path="stage:sft", tokenizer="openchat-3.5",
                                     template="openchat_3.5", lora=lora, trainable_top_layers=1),
                  train=TrainConfig(steps=2, batch_size=8)),
            Stage(name="policy", objective=options("apa", value_clip=None),
                  model=ModelSection(config=tiny, path="stage:sft", tokenizer="openchat-3.5", template="openchat_3.5",
                                     lora=lora),
                  rollout=RolloutConfig(prompts_per_step=8, max_new_tokens=4, minibatch_size=8, epochs=1,
                                        eval_prompts=8),
                  train=TrainConfig(steps=2, batch_size=8))]
    return Experiment(
        name="tiny_lora", model=stages[0].model, data=data,
        reward_model=RewardModelSection(config=tiny.replace(head="score"), path="stage:rm", tokenizer="openchat-3.5",
                                        template="openchat_3.5", max_length=64) if extra_stages else None,
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=0, schedule="constant"),
        checkpoint=CheckpointConfig(every=every, keep=5), logging=LoggingConfig(every=1, tensorboard=False,
                                                                                 progress=False),
        stages=tuple(stages))


def _run(exp, workdir):
    from starling_jax.stages.loop import run_experiment
    return run_experiment(exp, str(workdir))


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.slow
def test_lora_checkpoints_hold_adapters_only_and_resume_exactly(tmp_path):
    from starling_jax.step.checkpoint import load_adapters, load_export

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _run(_tiny_lora_experiment(steps=4), whole)
    _run(_tiny_lora_experiment(steps=2), cut)  # the same first two steps (constant learning rate)
    shutil.rmtree(cut / "sft" / "export")  # as if killed after checkpoint 2
    _run(_tiny_lora_experiment(steps=4), cut)  # resumes from checkpoint 2
    for d in (whole, cut):
        assert sorted(os.listdir(d / "sft" / "checkpoints")) == ["2", "4"]
    _, p_whole, _ = load_export(str(whole / "sft" / "export"))
    _, p_cut, _ = load_export(str(cut / "sft" / "export"))
    assert _equal(p_whole, p_cut)
    loss = lambda d: [json.loads(line)["loss"] for line in open(d / "sft" / "metrics.jsonl") if '"loss"' in line]
    assert loss(whole) == loss(cut)

    saved, meta = load_adapters(str(whole / "sft" / "export"))
    assert sorted(saved) == ["lora"]
    adapters_tree = saved["lora"]
    assert meta["lora"]["targets"] == ["q", "v", "up"] and meta["base"]["path"] is None
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(adapters_tree))
    base_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(p_whole))
    state_bytes = _dir_bytes(whole / "sft" / "checkpoints" / "4" / "state")
    # the adapters, Adam's two moments, counters and orbax's metadata: nothing of the 2M-parameter base
    assert state_bytes < 3 * adapter_bytes + 300_000, (state_bytes, adapter_bytes)
    assert state_bytes < 0.05 * base_bytes, (state_bytes, base_bytes)
    # the export is the base with the adapters folded in
    base = models.init_params(models.PRESETS["tiny"], jax.random.split(jax.random.key(0), 4)[0])
    run = adapters.configure(models.PRESETS["tiny"], _tiny_lora_experiment().model.lora)
    want = models.lora.merge(models.lora.attach(base, adapters_tree), run)
    for got, w in zip(jax.tree.leaves(p_whole), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(w), atol=1e-6)


@pytest.mark.slow
def test_resume_over_another_base_is_one_clear_error(tmp_path, monkeypatch):
    from starling_jax.errors import InputError

    _run(_tiny_lora_experiment(steps=2), tmp_path)
    shutil.rmtree(tmp_path / "sft" / "export")
    with pytest.raises(InputError, match=r"LoRA adapters were trained on the base \(a random init, seed 0\), but "
                                         r"model\.path now loads \(a random init, seed 1\)"):
        _run(_tiny_lora_experiment(steps=4, seed=1), tmp_path)


@pytest.mark.slow
def test_lora_pipeline_sft_rm_apa_and_convert(tmp_path):
    """SFT -> K-wise RM (adapters on the top layer + score head) -> APA, all with LoRA, each later stage loading the
    earlier one's merged export; `convert` writes the merged HF directory and, with --adapters, a PEFT directory."""
    from starling_jax.commands import cli
    from starling_jax.io import hf

    summary = _run(_tiny_lora_experiment(steps=2, every=0, extra_stages=True), tmp_path)
    assert set(summary) == {"sft", "rm", "policy"}
    assert "rm_score_after" in summary["policy"]
    out = tmp_path / "hf_policy"
    assert cli.main(["convert", str(tmp_path / "policy"), str(out)]) == 0
    from starling_jax.step.checkpoint import load_export
    _, exported, _ = load_export(str(tmp_path / "policy" / "export"))
    _, loaded = hf.load(str(out))
    assert _equal(loaded, exported)
    peft_dir = tmp_path / "peft_policy"
    assert cli.main(["convert", str(tmp_path / "policy"), str(peft_dir), "--adapters"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(peft_dir))
    config = json.load(open(peft_dir / "adapter_config.json"))
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["base_model_name_or_path"] == str(tmp_path / "sft")  # the stage the policy started from
    # read back (io/peft.py): the very adapters the stage trained
    from starling_jax.io import peft
    from starling_jax.step.checkpoint import load_adapters
    saved, _ = load_adapters(str(tmp_path / "policy" / "export"))
    options, read = peft.load(str(peft_dir), models.PRESETS["tiny"])
    assert options.targets == ("q", "v", "up") or set(read) == {"wq", "wv", "w_up"}
    assert _equal(read, saved["lora"])
    # a reward model's directory carries its score head (peft's SEQ_CLS modules_to_save)
    rm_dir = tmp_path / "peft_rm"
    assert cli.main(["convert", str(tmp_path / "rm"), str(rm_dir), "--adapters"]) == 0
    rm_config = json.load(open(rm_dir / "adapter_config.json"))
    assert rm_config["task_type"] == "SEQ_CLS" and rm_config["layers_to_transform"] == [1]


@pytest.mark.slow
def test_qlora_rl_stage_from_checkpoints_reads_its_layers_quantized_with_the_same_metrics(tmp_path, monkeypatch):
    """An APA stage with an nf4 LoRA policy and an nf4 reward model, both from Hugging Face directories: both are read
    quantized (hf.load(quantize="nf4")), and every metric of its steps equals today's path (each read dense, then
    quantized where the stage's trees are made), bit for bit."""
    from starling_jax.io import hf
    tiny = models.PRESETS["tiny"]
    nf4 = dict(quantize="nf4", quantize_block=8)  # blocks fsdp 8 splits: hidden 64 = 8 blocks
    for name, config in (("policy_hf", tiny), ("rm_hf", tiny.replace(head="score"))):
        hf.save(str(tmp_path / name), config, models.init_params(config, jax.random.key(len(name))))
    exp = Experiment(
        name="tiny_qlora_rl", data=DataConfig(source="synthetic", synthetic_prompts=64, max_prompt_length=32),
        model=ModelSection(config=tiny.replace(**nf4), path=str(tmp_path / "policy_hf"), tokenizer="openchat-3.5",
                           template="openchat_3.5", lora=LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "up"))),
        reward_model=RewardModelSection(config=tiny.replace(head="score", **nf4), path=str(tmp_path / "rm_hf"),
                                        tokenizer="openchat-3.5", template="openchat_3.5", max_length=64),
        objective=options("apa", value_clip=None),
        rollout=RolloutConfig(prompts_per_step=8, max_new_tokens=4, minibatch_size=8, epochs=1, eval_prompts=8),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=0, schedule="constant"),
        train=TrainConfig(steps=2, batch_size=8), checkpoint=CheckpointConfig(every=0),
        logging=LoggingConfig(every=1, tensorboard=False, progress=False))
    load, reads = hf.load, []

    def recording_load(path, *args, quantize="none", **kwargs):
        reads.append((os.path.basename(path), quantize))
        return load(path, *args, quantize=quantize, **kwargs)

    def dense_load(path, *args, quantize="none", **kwargs):  # today's path: every checkpoint read dense
        return load(path, *args, **kwargs)
    monkeypatch.setattr(hf, "load", recording_load)
    _run(exp, tmp_path / "quantized")
    assert reads == [("policy_hf", "nf4"), ("rm_hf", "nf4")]
    monkeypatch.setattr(hf, "load", dense_load)
    _run(exp, tmp_path / "dense")

    def metrics(run):
        (file,) = (tmp_path / run).glob("*/metrics.jsonl")
        rows = [json.loads(line) for line in open(file)]
        timing = ("time", "per_s", "sec", "wall")
        return [{k: v for k, v in row.items() if not any(t in k for t in timing)} for row in rows]
    quantized, dense = metrics("quantized"), metrics("dense")
    assert any("loss" in row for row in quantized) and quantized == dense, (quantized, dense)


@pytest.mark.parametrize("objective,top", [("sft", 0), ("dpo", 2)])
def test_data_stage_over_a_base_read_quantized_equals_quantizing_it_after(tmp_path, params, objective, top):
    """The trees and the step-0 loss of a QLoRA data stage built from a checkpoint read quantized (hf.load(quantize=),
    what the data kind does with model.lora) are those of the same checkpoint read dense and quantized by the trees
    (a trunk split, top 2, slices the quantized stack)."""
    from starling_jax.io import hf
    config = CFG.replace(quantize="nf4", quantize_block=8)
    hf.save(str(tmp_path), CFG, params)
    _, read_quantized = hf.load(str(tmp_path), quantize="nf4", quantize_block=8)
    _, read_dense = hf.load(str(tmp_path))
    assert models.quantize.is_quantized(read_quantized["layers"]["wq"])
    c = _stage_config(objective, LORA, top)
    mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
    new, old = (data_setup(c, config, p, mesh, jax.random.key(4)) for p in (read_quantized, read_dense))
    assert models.quantize.is_quantized(new.state.frozen["base"]["layers"]["wq"])
    assert _equal(new.state.frozen, old.state.frozen) and _equal(new.state.params, old.state.params)
    batch = _batch(objective)
    loss = jax.jit(new.loss)
    assert float(loss(new.state.params, new.state.frozen, batch, jax.random.key(0))[0]) == float(
        loss(old.state.params, old.state.frozen, batch, jax.random.key(0))[0])
