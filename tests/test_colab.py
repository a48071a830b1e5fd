"""The colab/ notebooks, executed headlessly (nbclient + ipykernel) with their parameters shrunk.

Parameters are injected the way papermill does it: a cell assigning the test's values goes right after the cell tagged
"parameters". A last cell appended by the test prints the notebook's variables as JSON, which the test then checks
against independent computations (the synthetic true utility, sampling.generate called here directly).
"""

import dataclasses
import json
import math
import os
import re

import jax
import numpy as np
import pytest

import nbformat  # the test extra needs nbclient, nbformat and ipykernel
from nbclient import NotebookClient

from cpu_env import cpu_env
from starling_jax.io import hf
from starling_jax import models
from starling_jax.generation import sampling
from starling_jax.data import get_template, load_tokenizer, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
RESULT = "RESULT_JSON "


def _execute(name: str, params: dict, dump: str, cwd, timeout: int = 600) -> tuple[dict, "nbformat.NotebookNode"]:
    """Run colab/NAME with `params` injected after its parameters cell and `dump` (an expression giving a JSON-able
    dict) printed by an appended cell; `timeout`: seconds a cell may take. Returns (that dict, the executed
    notebook)."""
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    declared = set(re.findall(r"^([A-Z_]+)\s*=", nb.cells[index].source, re.M))
    unknown = set(params) - declared
    assert not unknown, f"{name}: parameters {unknown} are not in its parameters cell ({sorted(declared)})"
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, injected)
    nb.cells.append(nbformat.v4.new_code_cell(f"import json as _json\nprint({RESULT!r} + _json.dumps({dump}))"))
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    # One CPU device in the kernel (tests/conftest.py simulates 8 in this process for the sharding tests).
    env = cpu_env()
    client = NotebookClient(nb, timeout=timeout, startup_timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)  # raises CellExecutionError (with the cell and traceback) if any cell fails
    printed = [o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream"]
    (line,) = [s for s in "".join(printed).splitlines() if s.startswith(RESULT)]
    return json.loads(line[len(RESULT):]), nb


NOTEBOOKS = sorted(f for f in os.listdir(COLAB) if f.endswith(".ipynb"))


def test_every_notebook_is_executed_here():
    assert NOTEBOOKS == ["chat_with_checkpoint.ipynb", "evaluate.ipynb", "real_model_rlaif.ipynb",
                         "tiny_starling.ipynb"]  # each has its test below; a new notebook gets one too


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_valid_and_saved_without_outputs(name):
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c for c in code if "parameters" in c.metadata.get("tags", [])] == [code[0]]  # one, first: Colab shows it
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{name}: clear outputs before committing"
    for i, c in enumerate(code):  # every cell is Python that compiles (no magics): caught here, before a slow run
        compile(c.source, f"{name} code cell {i}", "exec")


# The main job at its smallest that still runs every stage's code: 2-layer models, 100 synthetic prompts, a few
# steps per stage, one RL step (each stage's time is mostly compilation).
SHRINK = [
    "data.synthetic_prompts=100", "data.max_length=32", "data.max_prompt_length=20", "reward_model.max_length=64",
    "model.config.num_layers=2", "stages.policy.model.config.num_layers=2",
    "stages.policy.model.trainable_top_layers=1", "stages.rm.model.config.num_layers=2",
    "reward_model.config.num_layers=2",
    "stages.sft.train.steps=4", "stages.sft.train.batch_size=4",
    "stages.rm.train.steps=4", "stages.rm.train.batch_size=2",
    "stages.policy.train.steps=1", "stages.policy.train.batch_size=4", "stages.policy.rollout.prompts_per_step=4",
    "stages.policy.rollout.minibatch_size=4", "stages.policy.rollout.eval_prompts=4",
    "stages.policy.rollout.max_new_tokens=6", "logging.every=1", "logging.progress=false",
]


@pytest.mark.slow
def test_tiny_starling_notebook(tmp_path):
    num = 3
    got, nb = _execute(
        "tiny_starling.ipynb",
        dict(WORKDIR="run", OVERRIDES=SHRINK, NUM_SAMPLES=num, MAX_NEW_TOKENS=8),
        '{"summary": summary, "samples": samples, "utilities": utilities, "conversations": conversations}',
        tmp_path)
    with open(tmp_path / "run" / "summary.json") as f:
        on_disk = json.load(f)
    summary = got["summary"]
    assert summary == on_disk and list(summary) == ["sft", "rm", "policy"]
    assert 0.0 <= summary["rm"]["heldout_pair_accuracy"] <= 1.0
    policy = summary["policy"]
    assert policy["steps"] == 1 and policy["objective"] == "apa"  # the overrides reached the run
    for key in ("true_reward_before", "true_reward_after", "rm_score_before", "rm_score_after", "kl_to_reference"):
        assert math.isfinite(policy[key]), (key, policy)
    w = policy["rm_win_rate_vs_initial"]  # RM-judged win rate of the RL policy over the SFT policy
    assert w["n"] == 4 and w["wins"] + w["ties"] + w["losses"] == 4
    assert w["win_rate"] == (w["wins"] + w["ties"] / 2) / 4 and w["win_rate_ci95"][0] <= w["win_rate"]
    assert os.path.getsize(tmp_path / "run" / "policy" / "curves.png") > 1000
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the curves were displayed
    # The sampled replies are scored with the hidden true utility, recomputed here.
    assert len(got["conversations"]) == num and list(got["samples"]) == ["sft", "policy"]
    for stage, texts in got["samples"].items():
        assert len(texts) == num and all(isinstance(t, str) for t in texts)
        want = [synthetic.true_utility(m, t) for m, t in zip(got["conversations"], texts)]
        np.testing.assert_allclose(got["utilities"][stage], want)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random tiny Mistral written as a HF directory (what `starling-jax convert preset:tiny DIR` writes)."""
    config = models.get_preset("tiny")
    params = models.init_params(config, jax.random.key(0))
    path = tmp_path / "ckpt"
    hf.save(str(path), config, params)
    return str(path), params


@pytest.mark.slow
def test_chat_with_checkpoint_notebook(tmp_path, tiny_checkpoint):
    path, params = tiny_checkpoint
    n_new, prompt = 8, "What is the capital of France?"
    got, _ = _execute(
        "chat_with_checkpoint.ipynb",
        dict(CHECKPOINT=path, PROMPT=prompt, MAX_NEW_TOKENS=n_new, NUM_SAMPLES=2, USER_TURNS=["Hi!", "And then?"]),
        '{"prompt_ids": prompt_ids, "greedy_tokens": greedy_tokens, "greedy_reply": greedy_reply, '
        '"sampled": sampled_replies, "streamed": streamed_tokens, "conversation": conversation}',
        tmp_path)
    # Independently: the OpenChat encoding and a greedy sampling.generate on the weights that were saved.
    tokenizer, template = load_tokenizer("openchat-3.5"), get_template("openchat_3.5")
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}], template=template)
    assert got["prompt_ids"] == ids
    config, _ = hf.load(path)
    tokens = np.asarray([ids], np.int32)
    out, mask, _ = sampling.generate(params, config, tokens, np.ones_like(tokens), jax.random.key(0), n_new,
                                     temperature=0.0, stop_ids=tokenizer.stop_ids(template))
    out, mask = np.asarray(out)[0], np.asarray(mask)[0]
    assert got["greedy_tokens"] == out[mask == 1].tolist() and len(got["greedy_tokens"]) > 0
    texts, _ = sampling.apply_stop_strings(tokenizer, out[None], mask[None], template.stop_strings)
    assert got["greedy_reply"] == texts[0].strip() != ""
    assert got["streamed"] == got["greedy_tokens"]  # streaming yields generate's tokens
    assert len(got["sampled"]) == 2 and all(isinstance(t, str) for t in got["sampled"])
    roles = [m["role"] for m in got["conversation"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in got["conversation"][::2]] == ["Hi!", "And then?"]


@pytest.mark.slow
def test_evaluate_notebook(tmp_path):
    """compare on a run of the main job's shape (random weights: the plumbing, not the learning)."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run_fixtures import make_run
    from starling_jax.metrics import stats
    make_run(str(tmp_path / "run"))
    got, _ = _execute("evaluate.ipynb", dict(WORKDIR="run", NUM_PROMPTS=4, MAX_NEW_TOKENS=4, EXPORT_DIR="hf_policy"),
                      '{"result": result, "rows": rows, "prompts": prompts, "info": info}', tmp_path)
    result, rows = got["result"], got["rows"]
    assert result["n"] == 4 and [r["prompt"] for r in rows] == got["prompts"]
    pref = stats.preferences([r["score_a"] for r in rows], [r["score_b"] for r in rows],
                             identical=[r["reply_a"] == r["reply_b"] for r in rows])
    assert result["win_rate"] == pytest.approx(pref.mean())
    assert result["win_rate_ci95"][0] <= result["win_rate"] <= result["win_rate_ci95"][1]
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json"} <= set(
        os.listdir(tmp_path / "hf_policy"))
    assert got["info"]["template"] == "openchat_3.5" and got["info"]["stop_ids"] == [32000]


# experiments/smol_ifeval.py at its smallest that still runs every stage's code on the real SmolLM2: one feedback step
# of 4 prompts x 3 replies (a quarter of the rankings held out by the RM), one RM step, one APA step of 4 rollouts (one
# epoch), replies of 8 tokens in sequences of 104 (the longest task:ifeval prompt is 92 tokens in SmolLM2's template),
# no warmup (so each stage's one step moves its weights). Every stage's time is mostly compilation.
SMOL_SHORT = ["stages.feedback.train.steps=1", "stages.feedback.feedback.prompts_per_step=4",
              "stages.feedback.feedback.k=3", "stages.feedback.feedback.generation_batch=12",
              "stages.feedback.feedback.max_new_tokens=8", "data.max_length=104", "reward_model.max_length=104",
              "stages.rm.data.max_length=104", "stages.rm.data.heldout_fraction=0.25", "stages.rm.train.steps=1",
              "stages.rm.train.batch_size=2", "stages.rm.optim.warmup_steps=0", "stages.policy.train.steps=1",
              "stages.policy.train.batch_size=4", "stages.policy.optim.warmup_steps=0",
              "stages.policy.rollout.prompts_per_step=4", "stages.policy.rollout.minibatch_size=4",
              "stages.policy.rollout.epochs=1", "stages.policy.rollout.max_new_tokens=8",
              "stages.policy.rollout.eval_prompts=4", "logging.every=1", "logging.progress=false"]


@pytest.mark.slow
def test_real_model_rlaif_notebook(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (the packaged GGUF, converted in the notebook's folder) through feedback -> K-wise RM ->
    APA with LoRA on task:ifeval, shortened; the checker's verdicts and the RM's held-out accuracy are recomputed."""
    from starling_jax.data import instructions, pipelines
    from starling_jax.stages.experiment import apply_overrides, load_experiment, stages_of
    from starling_jax.stages.kinds.feedback import rows_path
    monkeypatch.delenv("STARLING_JAX_SMOL_MODEL", raising=False)
    monkeypatch.setenv("STARLING_JAX_SMOL_DIR", str(tmp_path / "smol"))
    got, nb = _execute(
        "real_model_rlaif.ipynb",
        dict(WORKDIR="run", OVERRIDES=SMOL_SHORT, NUM_SAMPLES=2, MAX_NEW_TOKENS=8, HELDOUT_RM_ROWS=2),
        '{"summary": summary, "samples": samples, "utilities": utilities, "conversations": conversations, '
        '"rm_heldout": rm_heldout, "pairs": [float(x) for x in measured["pair_accuracy"]], '
        '"lora": stages["policy"].model.lora.rank, "top": stages["policy"].model.trainable_top_layers, '
        '"model": exp.model.path}',
        tmp_path, timeout=1800)  # one cell runs all three stages on the real model (minutes on a busy CPU)
    assert got["model"] == str(tmp_path / "smol") and os.path.isfile(tmp_path / "smol" / "config.json")
    with open(tmp_path / "run" / "summary.json") as f:
        assert got["summary"] == json.load(f)
    summary = got["summary"]
    assert list(summary) == ["feedback", "rm", "policy"]
    fb = summary["feedback"]
    assert fb["prompts"] == 4 and fb["k"] == 3 and fb["judge"] == "task"
    # the RM's held-out rankings, read again from the feedback rows: its pair accuracy is over their strictly
    # ranked pairs (the checker ties answers that meet the same constraints; a tie is no pair), NaN where none is
    rm_data = dict(stages_of(apply_overrides(load_experiment("smol_ifeval"), SMOL_SHORT)))["rm"].data
    heldout = pipelines.load_splits(dataclasses.replace(rm_data, source=rows_path(str(tmp_path / "run"), "feedback")))
    strict = sum(r["raw_ranks"][i] != r["raw_ranks"][j] for r in heldout.heldout
                 for i in range(len(r["raw_ranks"])) for j in range(i))
    rm = summary["rm"]
    assert rm["heldout_rows"] == len(heldout.heldout) >= 1 and rm["heldout_pairs"] == strict
    assert 0.0 <= rm["heldout_pair_accuracy"] <= 1.0 if strict else math.isnan(rm["heldout_pair_accuracy"])
    said = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert (f"over {strict} strictly ranked pairs" if strict else "none to measure") in said
    policy = summary["policy"]
    assert policy["steps"] == 1 and policy["objective"] == "apa" and policy["eval_split"] == "heldout"
    assert policy["kl_to_reference"] != 0.0  # the adapters moved (B = 0 at the start: the policy was the base)
    assert len(policy["true_rewards_before"]) == len(policy["true_rewards_after"]) == 4
    assert all(0.0 <= u <= 1.0 for u in policy["true_rewards_before"] + policy["true_rewards_after"])
    assert got["lora"] == 8 and got["top"] == 2  # the policy trained adapters on the top 2 layers
    assert len(got["pairs"]) == 2 and got["rm_heldout"]["pair_accuracy"] == pytest.approx(np.nanmean(got["pairs"]))
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the RM curves and the RL curves
    assert list(got["samples"]) == ["SmolLM2", "RL policy"] and len(got["conversations"]) == 2
    for who, texts in got["samples"].items():  # each reply scored by the checker, recomputed here
        want = [instructions.true_utility(m, t) for m, t in zip(got["conversations"], texts)]
        np.testing.assert_allclose(got["utilities"][who], want)
