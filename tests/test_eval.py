"""`starling-jax eval policy | compare | rm`: answer files in the benchmarks' own schemas (read back with fschat's
loaders), head-to-head statistics against direct computations, RewardBench's section weighting, and the CLI on a
run of the main job's shape (tests/run_fixtures.py: random weights, so only plumbing and formats are checked here;
the learning itself is checked by tests/test_main_job.py)."""

import json
import os
import re
import sys
import types

import numpy as np
import pytest

from starling_jax.commands import cli
from starling_jax.commands.eval import answer, benchmarks as bm, judge
from starling_jax.metrics import stats

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it about snow."]},
    {"question_id": 101, "category": "reasoning", "turns": ["What is 2+2?", "And 3+3?"]},
    {"question_id": 131, "category": "stem", "turns": ["Name a planet."]},
    {"question_id": 200, "category": "unlisted", "turns": ["Say hi.", "Say bye."]},
]
ALPACA = [{"instruction": "Say hi.", "dataset": "helpful_base"}, {"instruction": "Count to three.", "dataset": "oasst"},
          {"instruction": "Name a color."}]


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def run(random_run):
    """The session's random-weight run (tests/conftest.py): these tests only read it."""
    return random_run


def _fschat_common():
    """fastchat.llm_judge.common (fschat is installed --no-deps: its API clients are not needed by the loaders)."""
    for name in ("openai", "anthropic"):
        sys.modules.setdefault(name, types.ModuleType(name))
    from fastchat.llm_judge import common
    return common


# ----------------------------------------------------------------------------------------------------------------------
# Statistics against direct computations


def test_length_controlled_win_rate_equals_a_direct_fit():
    from scipy.optimize import minimize
    rng = np.random.default_rng(0)
    n = 300
    len_a, len_b = rng.integers(20, 400, n), rng.integers(20, 400, n)
    # A is preferred more often when it is longer: a length-biased judge
    p_true = 1 / (1 + np.exp(-(0.3 + 1.5 * np.tanh((len_a - len_b) / 150))))
    pref = (rng.random(n) < p_true).astype(float)
    pref[:20] = 0.5  # some ties
    # AlpacaEval's formulation: every prompt twice, label 1 weighted by p and label 0 weighted by 1 - p
    delta = len_b - len_a
    x = np.tanh(delta / delta.std(ddof=1))
    X = np.concatenate([np.stack([np.ones(n), x], 1)] * 2)
    y = np.concatenate([np.ones(n), np.zeros(n)])
    w = np.concatenate([pref, 1 - pref])

    def objective(theta):
        z = X @ theta
        return stats.LC_C * np.sum(w * (np.logaddexp(0, -z) * y + np.logaddexp(0, z) * (1 - y))) + theta @ theta / 2

    theta = minimize(objective, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
    direct = 1 / (1 + np.exp(-theta[0]))
    ours = stats.length_controlled_win_rate(pref, len_a, len_b)
    assert ours == pytest.approx(direct, abs=1e-6)
    # the length bias is removed: the raw win rate is inflated by A's length advantage where A is longer
    assert np.allclose(stats.fit_length_glm(pref, len_a, len_b), theta, atol=1e-4)


def test_length_control_without_length_differences_is_the_win_rate():
    pref = np.array([1, 1, 1, 0, 0.5, 1, 0, 1.0])
    lc = stats.length_controlled_win_rate(pref, [50] * 8, [50] * 8)
    # logit of the mean up to the weak L2 penalty (n * C = 800 against 1)
    assert lc == pytest.approx(pref.mean(), abs=2e-3)
    assert 0.5 < stats.length_controlled_win_rate(np.ones(8), np.arange(8), np.arange(8)[::-1]) < 1  # finite


def test_head_to_head_counts_ties_and_interval():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.2, 1, 2000), rng.normal(0, 1, 2000)
    b[:100] = a[:100]  # exact ties
    r = stats.head_to_head(a, b, np.full(2000, 10), np.full(2000, 10))
    wins, ties = int(np.sum(a > b)), 100
    assert (r["wins"], r["ties"], r["losses"]) == (wins, ties, 2000 - wins - ties)
    assert r["win_rate"] == pytest.approx((wins + 0.5 * ties) / 2000)
    assert r["mean_score_gap"] == pytest.approx(np.mean(a - b))
    # the bootstrap interval of a mean matches the normal approximation at this size
    pref = stats.preferences(a, b)
    half = 1.96 * pref.std(ddof=1) / np.sqrt(2000)
    lo, hi = r["win_rate_ci95"]
    assert lo == pytest.approx(r["win_rate"] - half, abs=0.006) and hi == pytest.approx(r["win_rate"] + half, abs=0.006)
    assert stats.preferences([1.0, 1.0], [0.0, 0.0], identical=[True, False]).tolist() == [0.5, 1.0]
    assert "win rate" in stats.describe(r)


def test_rewardbench_sections_weight_subsets_like_rewardbench():
    acc = {"math-prm": 1.0, "hep-go": 0.0, "alpacaeval-easy": 0.5, "mt-bench-med": 1.0, "xstest-should-refuse": 0.2}
    s = judge.section_scores(acc)
    assert set(s) == {"Reasoning", "Chat", "Safety"}
    assert s["Reasoning"] == pytest.approx(100 * 984 / (984 + 164))  # math counts as much as all of code
    assert s["Chat"] == pytest.approx(100 * (0.5 * 100 + 1.0 * 40) / 140)
    assert s["Safety"] == pytest.approx(20.0)
    assert sum(judge.SUBSET_WEIGHTS[x] for x in judge.SECTIONS["Reasoning"]) == 2 * 984


# ----------------------------------------------------------------------------------------------------------------------
# MT-Bench: turn by turn, per-category temperatures, fschat's schema, resumable


class FakeGenerator:
    """Stands in for answer.Generator: records (conversation, temperature) and replies with a function of both."""
    batch_size = 3

    def __init__(self):
        self.calls = []

    def __call__(self, conversations, temperature):
        self.calls.append(([list(c) for c in conversations], temperature))
        return [f"reply {len(c)} to {c[-1]['content']} at {temperature}" for c in conversations]


@pytest.mark.slow  # importing fastchat's judge module imports torch and transformers
def test_mt_bench_answers_turn_by_turn_in_fschats_schema(tmp_path):
    qfile = _write_jsonl(tmp_path / "question.jsonl", QUESTIONS)
    out = str(tmp_path / "model_answer" / "m.jsonl")
    os.makedirs(os.path.dirname(out))
    gen = FakeGenerator()
    report = answer.answer_mt_bench(gen, bm.read_mt_bench_questions(qfile), out, "m")
    assert report == {"answered": 4, "skipped": 0, "total": 4}
    for convs, temperature in gen.calls:
        for c in convs:
            if len(c) == 3:  # a second turn sees the question, the model's first answer, the second question
                assert c[1]["role"] == "assistant" and c[1]["content"].startswith("reply 1 to ")
    common = _fschat_common()
    questions = common.load_questions(qfile, None, None)
    answers = common.load_model_answers(str(tmp_path / "model_answer"))
    common.check_data(questions, answers, {}, ["m"], {})  # fschat's own consistency check before judging
    by_id = answers["m"]
    temps = {81: 0.7, 101: 0.0, 131: 0.1, 200: 0.7}  # MT-Bench's per-category temperatures, 0.7 otherwise
    for q in QUESTIONS:
        a = by_id[q["question_id"]]
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert a["model_id"] == "m" and isinstance(a["tstamp"], float) and isinstance(a["answer_id"], str)
        (choice,) = a["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == len(q["turns"])
        for k, (turn, reply) in enumerate(zip(q["turns"], choice["turns"])):
            assert reply == f"reply {2 * k + 1} to {turn} at {temps[q['question_id']]}"


def test_mt_bench_resumes_and_drops_a_torn_last_line(tmp_path):
    qfile = _write_jsonl(tmp_path / "question.jsonl", QUESTIONS)
    out = str(tmp_path / "a.jsonl")
    answer.answer_mt_bench(FakeGenerator(), bm.read_mt_bench_questions(qfile), out, "m")
    lines = open(out).read().splitlines()
    with open(out, "w") as f:  # the run was killed while writing the last answer
        f.write("\n".join(lines[:2]) + "\n" + lines[2][:25])
    gen = FakeGenerator()
    report = answer.answer_mt_bench(gen, bm.read_mt_bench_questions(qfile), out, "m")
    assert report == {"answered": 2, "skipped": 2, "total": 4}
    ids = [json.loads(line)["question_id"] for line in open(out)]
    assert sorted(ids) == sorted(q["question_id"] for q in QUESTIONS) and len(ids) == 4
    assert answer.answer_mt_bench(FakeGenerator(), bm.read_mt_bench_questions(qfile), out, "m")["answered"] == 0


def test_alpaca_eval_outputs_schema_and_resume(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(ALPACA))
    out = str(tmp_path / "outputs.json")
    rows = bm.read_alpaca_eval_instructions(str(src))
    answer.answer_alpaca_eval(FakeGenerator(), rows[:2], out, "gen", 0.7)
    report = answer.answer_alpaca_eval(FakeGenerator(), rows, out, "gen", 0.7)
    assert report == {"answered": 1, "skipped": 2, "total": 3}
    data = json.load(open(out))
    assert [d["instruction"] for d in data] == [r["instruction"] for r in ALPACA]
    for d, r in zip(data, ALPACA):
        assert set(d) == {"instruction", "output", "generator", "dataset"}
        assert d["generator"] == "gen" and d["dataset"] == r.get("dataset", "custom")
        assert d["output"] == f"reply 1 to {r['instruction']} at 0.7"


def test_readers_name_the_file_and_row(tmp_path):
    bad = _write_jsonl(tmp_path / "q.jsonl", [QUESTIONS[0], {"question_id": 2, "turns": "not a list"}])
    with pytest.raises(Exception, match=r"q\.jsonl: row 1: field 'turns'"):
        bm.read_mt_bench_questions(bad)
    rb = tmp_path / "rb.json"
    rb.write_text(json.dumps([{"prompt": "p", "chosen": "c", "subset": "s"}]))
    with pytest.raises(Exception, match=r"rb\.json: row 0: field 'rejected' must be a string"):
        bm.read_rewardbench(str(rb))
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert bm.read_prompts(str(tmp_path / "p.txt")) == ["one", "two"]


# ----------------------------------------------------------------------------------------------------------------------
# The command line on a run


@pytest.mark.slow
def test_eval_policy_cli_writes_files_fschat_reads(run, tmp_path, capsys):
    qfile = _write_jsonl(tmp_path / "question.jsonl", QUESTIONS[:2])
    out = str(tmp_path / "model_answer" / "tiny.jsonl")
    argv = ["eval", "policy", os.path.join(run, "policy"), "--questions", qfile, "--format", "mt_bench", "--out", out,
            "--model-id", "tiny", "--max-new-tokens", "4", "--batch-size", "2"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["answered"] == 2
    common = _fschat_common()
    answers = common.load_model_answers(str(tmp_path / "model_answer"))
    common.check_data(common.load_questions(qfile, None, None), answers, {}, ["tiny"], {})
    assert all(len(a["choices"][0]["turns"]) == 2 for a in answers["tiny"].values())
    assert cli.main(argv) == 0  # resumed: nothing left to answer
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["answered"] == 0


@pytest.mark.slow
def test_eval_compare_and_rm_cli(run, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hi.\nName a color.\nCount to three.\n")
    out = str(tmp_path / "cmp.json")
    assert cli.main(["eval", "compare", os.path.join(run, "policy"), os.path.join(run, "sft"), "--prompts",
                     str(prompts), "--judge", os.path.join(run, "rm"), "--max-new-tokens", "4", "--batch-size", "4",
                     "--out", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = json.loads(lines[0])
    assert head["n"] == 3 and head["wins"] + head["ties"] + head["losses"] == 3
    assert re.match(r"\S+-policy vs \S+-sft: win rate \d+\.\d% \[95% CI", lines[1]), lines[1]
    saved = json.load(open(out))
    pref = stats.preferences([r["score_a"] for r in saved["rows"]], [r["score_b"] for r in saved["rows"]],
                             identical=[r["reply_a"] == r["reply_b"] for r in saved["rows"]])
    assert saved["win_rate"] == pytest.approx(pref.mean())

    rb = tmp_path / "rb.jsonl"
    _write_jsonl(rb, [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}", "subset": s}
                      for i, s in enumerate(["alpacaeval-easy", "hep-go", "math-prm", "mine"] * 2)])
    assert cli.main(["eval", "rm", os.path.join(run, "rm"), "--rewardbench", str(rb), "--max-groups", "8"]) == 0
    text = capsys.readouterr().out
    result = json.loads(text[:text.rindex("}") + 1])
    r = result["rewardbench"]
    assert r["rows"] == 8 and set(r["subsets"]) == {"alpacaeval-easy", "hep-go", "math-prm", "mine"}
    assert r["other_subsets"] == ["mine"] and set(r["sections"]) == {"Chat", "Reasoning"}
    acc = {s: v["accuracy"] for s, v in r["subsets"].items()}
    assert r["sections"] == pytest.approx(judge.section_scores(acc))
    assert result["nectar"]["groups"] == 8  # the K-wise metrics on the stage's held-out rows
    assert "RewardBench:" in text

    # RewardBench as parquet (its native format) and the K-wise metrics on a Nectar file, on the HF export of the RM
    import pyarrow as pa
    import pyarrow.parquet as pq
    from starling_jax.data import synthetic
    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}", "subset": "llmbar-natural", "id": i}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "rb.parquet"))
    _write_jsonl(tmp_path / "nectar.jsonl", synthetic.make_rows(5, seed=3))
    hf_rm = str(tmp_path / "hf_rm")
    assert cli.main(["convert", os.path.join(run, "rm"), hf_rm]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "rm", hf_rm, "--rewardbench", str(tmp_path / "rb.parquet"), "--nectar",
                     str(tmp_path / "nectar.jsonl"), "--out", str(tmp_path / "rm.json")]) == 0
    result = json.load(open(tmp_path / "rm.json"))
    assert result["template"] == "llama2" and result["rewardbench"]["rows"] == 3
    assert set(result["rewardbench"]["sections"]) == {"Chat Hard"}
    assert result["nectar"]["groups"] == 5 and result["nectar"]["pairs"] == 5 * 21


def test_eval_recognises_a_model_directory(run, tmp_path, capsys):
    hf_dir = str(tmp_path / "hf_rm")
    assert cli.main(["convert", "preset:tiny", hf_dir, "--head", "score"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", hf_dir]) == 2
    err = capsys.readouterr().err
    assert "Hugging Face reward model directory" in err and "eval rm" in err and "Traceback" not in err
    assert cli.main(["eval", "policy", os.path.join(run, "rm"), "--questions", "x.jsonl", "--format", "mt_bench",
                     "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "x.jsonl: no such file" in capsys.readouterr().err
    q = _write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:1])
    assert cli.main(["eval", "policy", os.path.join(run, "rm"), "--questions", q, "--format", "mt_bench",
                     "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "a reward model" in capsys.readouterr().err


def test_sharded_generation_equals_one_device(run):
    """Greedy answers with the parameters and batches sharded over 8 (simulated) devices equal the one-device ones."""
    import jax
    from starling_jax.parallel import sharding
    from starling_jax.config import MeshConfig
    from starling_jax.commands.eval.checkpoints import load_checkpoint
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py simulates them on CPU)")
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    convs = [[{"role": "user", "content": p}] for p in ("Say hi.", "Name a color.", "What is rain?")]
    one = answer.Generator(load_checkpoint(os.path.join(run, "sft"), want="lm"), max_new_tokens=4, batch_size=8)
    ck = load_checkpoint(os.path.join(run, "sft"), want="lm", mesh=mesh)
    assert len(ck.params["layers"]["wq"].sharding.device_set) == 8
    sharded = answer.Generator(ck, max_new_tokens=4, batch_size=8, mesh=mesh)
    assert sharded(convs, 0.0) == one(convs, 0.0)
