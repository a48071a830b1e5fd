"""A new data stage kind is one module: its batch format (data.formats.register_format), its stage kind with a config
check (stages.kinds.data.register_data_kind) and its algorithm (algorithms.registry.register). Nothing else changes:
config validation runs its check, the pipeline makes its batches, the loop trains it and evaluates it.

The toy kind "median" fine-tunes on each row's median-ranked answer (a kind that needs three answers per row)."""

import dataclasses
import json
import math

import numpy as np
import pytest

from starling_jax.algorithms import registry
from starling_jax.algorithms.sft import build_loss as sft_loss
from starling_jax.config import ConfigError, ObjectiveConfig, TrainConfig
from starling_jax.data import formats, load_tokenizer, nectar, pipelines, synthetic
from starling_jax.stages import kinds, program
from starling_jax.stages.experiment import load_experiment, stages_of
from starling_jax.stages.validation import validate
from starling_jax.stages.kinds.data import register_data_kind
from starling_jax.stages.loop import run_experiment
from starling_jax.step import losses

# -- the toy kind's module --------------------------------------------------------------------------------------------


def median_examples(rows, tokenizer, template, lengths, report):
    out = []
    for r in rows:
        median = r["responses"][int(np.argsort(r["ranks"], kind="stable")[len(r["ranks"]) // 2])]
        tokens, loss = formats.encode_example(tokenizer, r["messages"], median, template, lengths.max_length,
                                                lengths.max_prompt_length, report, all_turns_loss=False)
        out.append({"tokens": tokens, "loss_mask": loss})
    return out


def median_collate(pad_id, lengths):
    def pad(a, fill):
        return np.pad(a, (0, lengths.max_length - len(a)), constant_values=fill)

    def collate(xs):
        return {"tokens": np.stack([pad(x["tokens"], pad_id) for x in xs]).astype(np.int32),
                "attention_mask": np.stack([pad(np.ones(len(x["tokens"]), np.int32), 0) for x in xs]),
                "loss_mask": np.stack([pad(x["loss_mask"], 0.0) for x in xs]).astype(np.float32)}
    return collate


def check_median(c, algorithm, earlier):
    if c.data.max_responses < 3:
        return [("data.max_responses", f"the median answer needs at least 3 answers per row, got "
                                       f"{c.data.max_responses}")]
    return []


def register_median_kind():
    formats.register_format(formats.BatchFormat(
        "median", examples=median_examples, collate=median_collate,
        padding=lambda e: {**e, "loss_mask": np.zeros_like(e["loss_mask"])}))
    register_data_kind("median", check=check_median)
    registry.register(registry.Algorithm(name="median_sft", kind="median", head="lm", loss=sft_loss,
                                         batch=losses.lm_batch, summary="SFT on each row's median-ranked answer"))

# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def median_kind():
    register_median_kind()
    yield
    del registry.ALGORITHMS["median_sft"], program.STAGE_KINDS["median"], formats.FORMATS["median"]


def _experiment(**data):
    exp = load_experiment("tiny_sft")
    return dataclasses.replace(exp, objective=ObjectiveConfig(name="median_sft"),
                               data=dataclasses.replace(exp.data, synthetic_prompts=64, **data),
                               train=TrainConfig(steps=3, batch_size=8, eval_every=0, eval_batches=1, seed=0),
                               logging=dataclasses.replace(exp.logging, every=1))


@pytest.mark.slow  # a whole stage: ~10 s on the 2-core CPU
def test_a_data_kind_registered_in_one_module_is_validated_batched_and_trained(median_kind, tmp_path):
    assert "median" in kinds.names()
    exp = _experiment()
    assert [n for n, _ in stages_of(exp)] == ["median"]  # a single stage is named after its kind
    validate(exp, num_devices=1)
    with pytest.raises(ConfigError, match="data.max_responses: the median answer needs at least 3 answers"):
        validate(_experiment(max_responses=2), num_devices=1)

    # its batches hold each row's median-ranked answer, in the format's layout
    rows = synthetic.make_rows(4, seed=0)
    parsed, _ = nectar.parse_rows(rows)
    tok = load_tokenizer(exp.model.tokenizer)
    batch = next(iter(pipelines.make_dataset("median", parsed, tok, 4, template=exp.model.template, max_length=72,
                                             max_prompt_length=56, shuffle=False, num_epochs=1)))
    assert {k: v.shape for k, v in batch.items()} == {"tokens": (4, 72), "attention_mask": (4, 72),
                                                      "loss_mask": (4, 72)}
    r = parsed[0]
    median = r["responses"][int(np.argsort(r["ranks"], kind="stable")[len(r["ranks"]) // 2])]
    reply = batch["tokens"][0][batch["loss_mask"][0] > 0]
    assert median[:12] and median[:12] in tok.decode(reply.tolist())

    summary = run_experiment(exp, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "median" / "metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in train)
    assert math.isfinite(summary["median"]["heldout_loss"])
