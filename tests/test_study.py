"""The study runner (starling_jax.commands.study): paired bootstrap statistics, ranking metrics against scipy, seeding, the
shared-stage check, the report; and (slow) one shortened cell of each study under experiments/studies/."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from cpu_env import cpu_env
from starling_jax.config import ConfigError
from starling_jax.stages.experiment import apply_overrides, load_experiment, stages_of
from starling_jax.commands.study import Arm, Study, load_study, report, stats, with_seed
from starling_jax.commands.study.runner import check_shared
from starling_jax.metrics.ranking import group_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments", "studies"))
                 if f.endswith(".py") and not f.startswith("_"))


def _values(rng, shift=0.0, noise=0.0, seeds=3, n=40):
    base = {s: rng.normal(size=n) for s in range(seeds)}
    other = {s: base[s] + shift + noise * rng.normal(size=n) for s in range(seeds)}
    return {"a": {s: {"x": base[s]} for s in base}, "b": {s: {"x": other[s]} for s in other}}


def test_bootstrap_point_estimate_is_the_mean_of_seed_means_and_pairing_cancels_shared_noise():
    rng = np.random.default_rng(0)
    values = _values(rng, shift=0.25)
    clusters = {s: np.arange(40) // 2 for s in range(3)}  # pairs of rows share a prompt
    out = stats.summarise(values, clusters, ["x"], baseline="a", num_samples=300)
    want = np.mean([np.mean(values["b"][s]["x"]) for s in range(3)])
    assert out["b"]["x"]["mean"] == pytest.approx(want)
    assert out["a"]["x"]["lo"] < out["a"]["x"]["mean"] < out["a"]["x"]["hi"]
    # b = a + 0.25 on every prompt: the paired difference is exactly 0.25 in every replicate
    assert out["b"]["x"]["diff"] == pytest.approx(0.25)
    assert out["b"]["x"]["diff_lo"] == pytest.approx(0.25) and out["b"]["x"]["diff_hi"] == pytest.approx(0.25)
    # with independent noise added the difference interval is wide, and contains the truth
    noisy = stats.summarise(_values(np.random.default_rng(1), shift=0.25, noise=1.0), clusters, ["x"], "a",
                            num_samples=300)["b"]["x"]
    assert noisy["diff_lo"] < 0.25 < noisy["diff_hi"] and noisy["diff_hi"] - noisy["diff_lo"] > 0.2


def test_bootstrap_resamples_whole_prompt_clusters_and_seeds():
    # one seed whose rows all share one prompt: resampling clusters can only redraw that cluster, so no spread
    values = {"a": {0: {"x": np.arange(10.0)}}}
    out = stats.summarise(values, {0: np.zeros(10)}, ["x"], None, num_samples=50)["a"]["x"]
    assert out["lo"] == out["hi"] == out["mean"] == 4.5
    # two seeds, one cluster each: replicates are the seed means' resamples -> {mean0, (mean0+mean1)/2, mean1}
    values = {"a": {0: {"x": np.zeros(4)}, 1: {"x": np.ones(4)}}}
    _, draws = stats.seed_means(values, {0: np.zeros(4), 1: np.zeros(4)}, ["x"], 400, np.random.default_rng(0))
    assert set(np.round(draws["a"]["x"], 6)) == {0.0, 0.5, 1.0}
    with pytest.raises(ValueError, match="same seeds"):
        stats.summarise({"a": {0: {"x": np.zeros(2)}}, "b": {1: {"x": np.zeros(2)}}}, {0: [0, 1], 1: [0, 1]},
                        ["x"], "a")


def test_derived_ratio_is_the_ratio_of_means():
    values = {"a": {0: {"gain": np.array([1.0, 3.0]), "kl": np.array([2.0, 2.0])}}}
    out = stats.summarise(values, {0: [0, 1]}, ["gain", "kl"], None, {"ratio": lambda m: m["gain"] / m["kl"]},
                          num_samples=100)
    assert out["a"]["ratio"]["mean"] == pytest.approx(1.0)
    assert 0.5 <= out["a"]["ratio"]["lo"] <= out["a"]["ratio"]["hi"] <= 1.5


@pytest.mark.parametrize("seed", range(5))
def test_ranking_metrics_against_direct_counts_and_scipy(seed):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=7)
    u[3] = u[5]  # a tie in the true utilities: that pair is not counted
    s = u + rng.normal(scale=0.8, size=7)
    pair_acc, top1, tau = group_metrics(s, u)
    pairs = [(i, j) for i in range(7) for j in range(i + 1, 7) if u[i] != u[j]]
    assert pair_acc == pytest.approx(np.mean([(u[i] - u[j]) * (s[i] - s[j]) > 0 for i, j in pairs]))
    assert top1 == float(np.argmax(s) == np.argmax(u))
    keep = [i for i in range(7) if i != 5]  # without the tie, tau over untied pairs is scipy's tau
    assert group_metrics(s[keep], u[keep])[2] == pytest.approx(scipy.stats.kendalltau(s[keep], u[keep])[0])


def test_with_seed_sets_data_order_init_and_sampling_seeds():
    study = load_study(os.path.join(ROOT, "experiments", "studies", "rl_algorithms.py"))
    exp = with_seed(study.arms[0].experiment, 7)
    for _, c in stages_of(exp):
        assert (c.data.synthetic_seed, c.data.shuffle_seed, c.train.seed) == (7, 7, 7)
    assert with_seed(study.arms[0].experiment, 0) == study.arms[0].experiment  # seed 0 is the main job itself


def test_run_seed_is_the_studys_seed_cell():
    """`starling-jax run EXPERIMENT --seed N` runs what a study's seed-N cell of that experiment runs; --set applies
    after it."""
    import argparse

    from starling_jax.commands import train

    parser = argparse.ArgumentParser()
    train.add_run_arguments(parser)
    path = os.path.join(ROOT, "experiments", "tiny_starling.py")
    exp, _ = train._prepare(parser.parse_args([path, "--seed", "11"]))
    assert exp == with_seed(load_experiment(path), 11) != load_experiment(path)
    exp, _ = train._prepare(parser.parse_args([path, "--seed", "11", "--set", "stages.rm.train.seed=3"]))
    assert dict(stages_of(exp))["rm"].train.seed == 3 and dict(stages_of(exp))["sft"].train.seed == 11


def test_shared_stages_must_be_identical_across_arms():
    study = load_study(os.path.join(ROOT, "experiments", "studies", "rl_algorithms.py"))
    check_shared(study, [0, 1, 2])
    bad = apply_overrides(study.arms[1].experiment, ["stages.rm.train.steps=5"])
    broken = Study(name="broken", arms=(study.arms[0], Arm("other", bad)), shared_stages=("sft", "rm"))
    with pytest.raises(ConfigError, match="shared stage.*rm.*'other'"):
        check_shared(broken, [0])
    with pytest.raises(ConfigError, match="no stage 'critic'"):
        check_shared(Study(name="x", arms=(Arm("a", study.arms[0].experiment, policy_stage="critic"),)), [0])


def _fake_record(arm, seed, gain, rng):
    prompts = [f"p{i // 2}" for i in range(20)]
    ref = rng.normal(size=20)
    pol = {"prompt": prompts, "true_reward": list(ref + gain), "kl": list(np.full(20, 1.0 + gain)),
           "rm_score": list(ref), "length": list(np.full(20, 10.0)), "term_relevance": list(ref)}
    rm = {"prompt": prompts, "pair_accuracy": list(np.full(20, 0.7 + gain / 10)), "top1_accuracy": list(np.ones(20)),
          "kendall_tau": list(np.full(20, 0.4))}
    return {"arm": arm, "seed": seed, "wall_s": 1.0, "summary": {},
            "groups": {"policy/heldout": pol, "reference/heldout": {"prompt": prompts, "true_reward": list(ref)},
                       "rm/heldout": rm}}


def test_report_tables_and_figure(tmp_path):
    rng = np.random.default_rng(0)
    study = Study(name="fake", arms=(Arm("a", None), Arm("b", None)), seeds=(0, 1, 2))
    records = [_fake_record(a, s, g, np.random.default_rng(s)) for s in range(3) for a, g in (("a", 0.0), ("b", 0.5))]
    results = report.aggregate(study, records, {0: 2.0}, this_run_s=3.0, failed=[], num_samples=200)
    s = results["summary"]
    assert s["policy/heldout"]["b"]["gain"]["mean"] == pytest.approx(0.5)
    assert s["policy/heldout"]["b"]["gain_per_kl"]["mean"] == pytest.approx(0.5 / 1.5)
    assert s["policy/heldout"]["b"]["true_reward"]["diff"] == pytest.approx(0.5)
    assert s["rm/heldout"]["b"]["pair_accuracy"]["mean"] == pytest.approx(0.75)
    report.write(study, results, str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    assert "| b | " in md and "Difference from a" in md and "relevance" in md
    assert os.path.getsize(tmp_path / "results.png") > 1000
    assert json.loads((tmp_path / "results.json").read_text())["wall_s"]["shared"] == 2.0
    assert results["unfinished"] == [] and "Partial" not in md
    # a study run in parts: the report says which of the grid's cells are not in yet
    longer = dataclasses.replace(study, seeds=(0, 1, 2, 3))
    partial = report.aggregate(longer, records, {0: 2.0}, this_run_s=3.0, failed=[], num_samples=200)
    assert partial["unfinished"] == ["a@3", "b@3"]
    assert "**Partial: 6 of the study's 8 cells; not yet run: a@3, b@3." in report.markdown(partial)
    del rng


def _tuning_record(arm, seed, true_reward):
    prompts = [f"p{i // 2}" for i in range(10)]
    pol = {"prompt": prompts, "true_reward": [true_reward + 0.01 * i for i in range(10)], "kl": [1.0] * 10}
    return {"arm": arm, "seed": seed, "wall_s": 1.0, "summary": {},
            "groups": {"policy/tuning": pol, "reference/tuning": {"prompt": prompts, "true_reward": [0.0] * 10}}}


def test_selection_picks_the_best_arm_per_family_on_the_tuning_split(tmp_path, capsys):
    from starling_jax.commands.study import Selection, read_selection
    from starling_jax.commands.study.runner import choose, write_selection
    settings = {"a1": {"x": 1}, "a2": {"x": 2}, "b1": {"x": 1}, "b2": {"x": 2}}
    study = Study(name="sel", arms=tuple(Arm(a, None) for a in settings), seeds=(100, 101), splits=("tuning",),
                  selection=Selection(group="policy/tuning", metric="true_reward", path="selected/x.json",
                                      settings=settings, families={"a": ("a1", "a2"), "b": ("b1", "b2")}))
    means = {"a1": 1.0, "a2": 0.5, "b1": 0.2, "b2": 0.9}
    records = [_tuning_record(a, s, m + 0.1 * s) for s in (100, 101) for a, m in means.items()]
    results = report.aggregate(study, records, {}, this_run_s=0.0, failed=[], num_samples=50)
    record = choose(study, results)
    assert {f: c["arm"] for f, c in record["choice"].items()} == {"a": "a1", "b": "b2"}
    assert record["choice"]["b"]["settings"] == {"x": 2} and len(record["grid"]) == 4
    a1 = next(g for g in record["grid"] if g["arm"] == "a1")
    assert a1["per_seed"] == pytest.approx([11.045, 11.145]) and a1["lo"] <= a1["mean"] <= a1["hi"]
    study_file = tmp_path / "sel.py"
    write_selection(study, str(study_file), results)
    assert read_selection(str(tmp_path / "selected" / "x.json"), "b") == {"x": 2}
    # not every arm at every seed (or a shortened run): nothing is written
    partial = report.aggregate(study, records[:-1], {}, this_run_s=0.0, failed=[], num_samples=50)
    assert choose(study, partial) is None
    minimize = dataclasses.replace(study, selection=dataclasses.replace(study.selection, maximize=False))
    assert choose(minimize, results)["choice"]["a"]["arm"] == "a2"
    with pytest.raises(ConfigError, match="no choice for 'c'"):
        read_selection(str(tmp_path / "selected" / "x.json"), "c")
    # a tie goes to the arm the study lists first, whichever that is
    tied = [_tuning_record(a, s, 0.5) for s in (100, 101) for a in ("a1", "a2")]
    for order in (("a1", "a2"), ("a2", "a1")):
        two = dataclasses.replace(study, arms=tuple(Arm(a, None) for a in order),
                                  selection=dataclasses.replace(study.selection, families=None))
        results = report.aggregate(two, tied, {}, this_run_s=0.0, failed=[], num_samples=50)
        assert choose(two, results)["choice"]["all"]["arm"] == order[0]


def test_the_main_job_uses_the_committed_selection():
    """experiments/tiny_starling.py's searched settings are the ones its selection files hold."""
    from starling_jax.commands.study import read_selection
    exp = load_study(os.path.join(ROOT, "experiments", "studies", "rl_algorithms.py")).arm("apa").experiment
    stages = dict(stages_of(exp))
    selected = os.path.join(ROOT, "experiments", "studies", "selected")
    chosen = {**read_selection(os.path.join(selected, "main_job_rm.json")),
              **read_selection(os.path.join(selected, "main_job_policy.json"))}
    for dotted, value in chosen.items():
        _, stage, section, field = dotted.split(".")
        assert getattr(getattr(stages[stage], section), field) == value, dotted
    rl = load_study(os.path.join(ROOT, "experiments", "studies", "rl_algorithms.py"))
    for name in ("ppo", "grpo", "rloo", "dpo"):
        rate = read_selection(os.path.join(selected, "rl_algorithms.json"), name)["stages.policy.optim.learning_rate"]
        assert dict(stages_of(rl.arm(name).experiment))["policy"].optim.learning_rate == rate


def test_reuse_adopts_only_identical_shared_stages_and_cells(tmp_path):
    """--reuse: a cell of another study whose saved config equals ours (seed included) is adopted under our arm's
    name; one that differs in anything (here only its evaluation prompts) is not; shared stages are linked when the
    source's configs of our shared stages are the same (the source may have trained more shared stages)."""
    from starling_jax.commands.study.runner import _canonical, _cell_dir, _shared_dir, cell_experiment, reuse_finished
    rl = load_study(os.path.join(ROOT, "experiments", "studies", "rl_algorithms.py"))
    rm = load_study(os.path.join(ROOT, "experiments", "studies", "rm_kwise_vs_pairwise.py"))
    source, mine = str(tmp_path / "rl"), str(tmp_path / "rm")

    def save(directory, exp, **files):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(_canonical(exp), f)
        for name, obj in files.items():
            with open(os.path.join(directory, name), "w") as f:
                json.dump(obj, f)
    apa = cell_experiment(rl, rl.arm("apa"), 0)
    save(_cell_dir(source, "apa", 0), apa,
         **{"cell.json": {**_fake_record("apa", 0, 0.0, np.random.default_rng(0)), "wall_s": 7.0}})
    save(_cell_dir(source, "apa", 1), apply_overrides(cell_experiment(rl, rl.arm("apa"), 1),
                                                      ["stages.policy.rollout.eval_prompts=8"]),
         **{"cell.json": {"arm": "apa", "seed": 1, "wall_s": 7.0}})
    save(_cell_dir(source, "ppo", 0), cell_experiment(rl, rl.arm("ppo"), 0), **{"cell.json": {"arm": "ppo"}})
    shared = dataclasses.replace(apa, stages=tuple(st for st in apa.stages if st.name in ("sft", "rm")))
    save(_shared_dir(source, 0), shared, **{"done.json": {"seed": 0, "wall_s": 3.0}})
    notes = reuse_finished(rm, mine, [0, 1], ["plackett_luce", "bradley_terry"], [source])
    assert len(notes) == 2 and all("seed 0" in n for n in notes)
    with open(os.path.join(_cell_dir(mine, "plackett_luce", 0), "cell.json")) as f:
        record = json.load(f)
    assert record["arm"] == "plackett_luce" and record["reused_from"].endswith(os.path.join("apa", "seed0"))
    assert not os.path.exists(_cell_dir(mine, "plackett_luce", 1))  # differs in eval_prompts: trained, not reused
    assert not os.path.exists(_cell_dir(mine, "bradley_terry", 0))  # a different loss: no identical cell
    assert os.path.realpath(_shared_dir(mine, 0)) == os.path.realpath(_shared_dir(source, 0))
    assert not os.path.lexists(_shared_dir(mine, 1))
    results = report.aggregate(rm, [record], {}, this_run_s=0.0, failed=[], num_samples=10)
    assert results["wall_s"]["cells"] == 0.0 and results["wall_s"]["reused_cells"] == 7.0
    assert list(results["reused"]) == ["plackett_luce@0"]


def test_reuse_adopts_identical_cells_from_a_raw_results_folder(tmp_path, monkeypatch):
    """A study finished on two machines: the raw folder of the first (committed) carries each cell's config digest;
    `--reuse RAW` on the second adopts exactly the cells whose experiment is identical to ours (not one that differs
    only in its evaluation prompts), with their seed's shared-stage time, and the run then trains neither those
    cells nor their seed's shared stages. Exporting the second workdir writes the adopted cells back, digest kept."""
    from starling_jax.commands.study import raw
    from starling_jax.commands.study import runner
    rl = load_study(os.path.join(ROOT, "experiments", "studies", "rl_algorithms.py"))
    first, second, folder = str(tmp_path / "first"), str(tmp_path / "second"), str(tmp_path / "results" / "rl")

    def save(directory, exp, record):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(runner._canonical(exp), f)
        with open(os.path.join(directory, "cell.json"), "w") as f:
            json.dump(record, f)
    rng = np.random.default_rng(0)
    save(runner._cell_dir(first, "apa", 0), runner.cell_experiment(rl, rl.arm("apa"), 0),
         {**_fake_record("apa", 0, 0.1, rng), "wall_s": 7.0})  # a record written before cells kept their digest
    changed = apply_overrides(runner.cell_experiment(rl, rl.arm("apa"), 1), ["stages.policy.rollout.eval_prompts=8"])
    save(runner._cell_dir(first, "apa", 1), changed, _fake_record("apa", 1, 0.1, rng))
    for seed, wall in ((0, 3.0), (1, 4.0)):
        os.makedirs(runner._shared_dir(first, seed))
        with open(os.path.join(runner._shared_dir(first, seed), "done.json"), "w") as f:
            json.dump({"seed": seed, "wall_s": wall}, f)
    raw.export(rl, "rl_algorithms.py", first, folder, runner.shared_times(first),
               digest=lambda cell: runner.config_digest(runner._saved_config(cell)))
    records, _, _ = raw.read(folder, rl)
    want = runner.config_digest(runner._canonical(runner.cell_experiment(rl, rl.arm("apa"), 0)))
    assert {r["seed"]: r["config_sha256"] == want for r in records} == {0: True, 1: False}

    notes = runner.reuse_finished(rl, second, [0, 1], ["apa", "ppo"], [folder])
    assert len(notes) == 1 and "cell apa seed 0" in notes[0]
    with open(os.path.join(runner._cell_dir(second, "apa", 0), "cell.json")) as f:
        adopted = json.load(f)
    assert adopted["config_sha256"] == want and adopted["reused_from"] is None  # this study's own, an earlier part
    assert adopted["groups"]["policy/heldout"]["true_reward"] == pytest.approx(
        records[0]["groups"]["policy/heldout"]["true_reward"])
    assert runner.shared_times(second) == {0: 3.0}
    assert not os.path.exists(runner._cell_dir(second, "apa", 1))  # differs in eval_prompts: trained, not reused

    scheduled = []
    monkeypatch.setattr(runner, "_run_pool", lambda jobs, *a: scheduled.extend(label for label, *_ in jobs) or [])
    runner.run_study(rl, os.path.join(ROOT, "experiments", "studies", "rl_algorithms.py"), second, seeds=[0, 1],
                     arms=["apa"])
    assert scheduled == ["shared stages of seed 1", "cell apa seed 1"]  # seed 0: nothing left to train
    out = str(tmp_path / "again")
    raw.export(rl, "rl_algorithms.py", second, out, runner.shared_times(second),
               digest=lambda cell: runner.config_digest(runner._saved_config(cell)))
    (again,), _, _ = raw.read(out, rl)
    assert again["config_sha256"] == want and again.get("reused_from") is None
    results = raw.report(rl, out)  # the part adopted from results/rl counts as the study's own cell, time included
    assert results["wall_s"]["cells"] == 7.0 and not results.get("reused")

    # a cell that an earlier part itself reused from another study keeps that provenance, as the raw folder says it
    cell = os.path.join(runner._cell_dir(first, "apa", 0), "cell.json")
    with open(cell) as f:
        record = json.load(f)
    with open(cell, "w") as f:
        json.dump(dict(record, reused_from=str(tmp_path / "elsewhere" / "cells" / "apa" / "seed0")), f)
    provenance = str(tmp_path / "results" / "rl_provenance")
    raw.export(rl, "rl_algorithms.py", first, provenance, runner.shared_times(first),
               digest=lambda cell: runner.config_digest(runner._saved_config(cell)))
    runner.reuse_finished(rl, str(tmp_path / "third"), [0], ["apa"], [provenance])
    with open(os.path.join(runner._cell_dir(str(tmp_path / "third"), "apa", 0), "cell.json")) as f:
        assert json.load(f)["reused_from"] == "elsewhere/cells/apa/seed0"


def test_study_command_rejects_bad_input(tmp_path):
    from starling_jax.commands.cli import main
    assert main(["study", str(tmp_path / "missing.py"), "--workdir", str(tmp_path)]) == 2
    path = os.path.join(ROOT, "experiments", "studies", "rm_kwise_vs_pairwise.py")
    assert main(["study", path, "--workdir", str(tmp_path), "--arms", "nope"]) == 2
    assert main(["study", path, "--workdir", str(tmp_path), "--seeds", "x"]) == 2
    assert main(["study", path, "--workdir", str(tmp_path), "--jobs", "0"]) == 2


# select_rl_algorithms runs the machinery select_main_job runs (a policy-measuring selection study) with other
# algorithms' stages, which rl_algorithms' cells run; its grid is checked without training below. The real-model
# studies' cell (smol_starling; select_smol is the same recipe measured on the tuning split) runs in
# tests/test_smol_starling.py; the ifeval studies' recipe (experiments/smol_ifeval.py) runs shortened in
# tests/test_colab.py (colab/real_model_rlaif.ipynb) and their cells use smol_starling's machinery (a "base"
# reference, a task's true utility); their grids are checked below.
QUICK_CELLS = [name for name in STUDIES if name not in ("select_rl_algorithms", "select_smol", "smol_starling",
                                                        "select_ifeval", "ifeval_lora_vs_full")]


def test_every_study_file_resolves_its_grid():
    """Every study's arms resolve their shared stages identically at every seed it runs (no training)."""
    for name in STUDIES:
        study = load_study(os.path.join(ROOT, "experiments", "studies", f"{name}.py"))
        check_shared(study, study.seeds)
        check_shared(study, study.seeds[:1], quick=True)


# Whose first cell is another study's first cell, exactly (the main job's APA at seed 0): their full runs adopt those
# cells with --reuse (docs/REPRODUCTION.md), and so do their shortened ones here, which runs the reuse end to end
# instead of training the same cell three times.
REUSES = {"apa_sensitivity": "rl_algorithms", "rm_kwise_vs_pairwise": "rl_algorithms"}


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """name -> (workdir, the first `study --quick` run, the second): each study's shortened run, made once (a study
    that REUSES another's first cell makes that one first and adopts it)."""
    made = {}

    def run(name):
        if name not in made:
            workdir = tmp_path_factory.mktemp(f"quick_{name}")
            cmd = [sys.executable, "-m", "starling_jax.commands.cli", "study",
                   os.path.join(ROOT, "experiments", "studies", f"{name}.py"), "--workdir", str(workdir), "--quick"]
            if name in REUSES:
                cmd += ["--reuse", str(run(REUSES[name])[0])]
            env = cpu_env()
            first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
            again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            made[name] = (workdir, first, again)
        return made[name]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("name", QUICK_CELLS)
def test_one_shortened_cell_of_each_study(quick_study, name):
    """CI's cell per study: `starling-jax study FILE --quick` trains and measures one shortened cell (first arm,
    first seed), or adopts it from the study it REUSES, aggregates it, and a second invocation resumes (runs
    nothing)."""
    tmp_path, done, again = quick_study(name)
    logs = "".join(p.read_text()[-2000:] for p in (tmp_path / "logs").glob("*.log")) if (tmp_path / "logs").exists() else ""
    assert done.returncode == 0, done.stderr[-2000:] + logs
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] and len(results["cells"]) == 1
    study = load_study(os.path.join(ROOT, "experiments", "studies", f"{name}.py"))
    arm = results["arms"][0]
    policy = [f"policy/{s}" for s in study.splits] if study.arms[0].policy_stage else []
    assert set(results["summary"]) == {*(f"rm/{s}" for s in study.rm_splits), *policy}
    for group in (f"rm/{s}" for s in study.rm_splits):
        m = results["summary"][group][arm]
        assert 0 <= m["pair_accuracy"]["lo"] <= m["pair_accuracy"]["mean"] <= m["pair_accuracy"]["hi"] <= 1
    for group in policy:
        m = results["summary"][group][arm]
        assert np.isfinite([m[k]["mean"] for k in ("true_reward", "kl", "rm_score", "length", "gain")]).all()
    assert os.path.getsize(tmp_path / "results.png") > 1000
    if study.selection is not None:  # a shortened run never writes a choice
        assert "selection not written" in done.stderr
    if name in REUSES:  # adopted, not trained: the source's cell, under this study's arm, with the same figures
        source = quick_study(REUSES[name])[0]
        assert "[study] start" not in done.stderr and f"cell {arm} seed 0: reused" in done.stderr, done.stderr[-2000:]
        theirs = json.loads((source / "results.json").read_text())
        assert results["reused"] == {f"{arm}@0": f"{source.name}/cells/{theirs['arms'][0]}/seed0"}
        for k in ("summary", "means"):
            assert results["cells"][0][k] == theirs["cells"][0][k], k
    assert again.returncode == 0 and "[study] start" not in again.stderr  # finished cells are skipped


def test_a_selection_cell_never_loads_a_reporting_row():
    """select_main_job's cells run with data.reporting=false: load_splits returns no held-out or unseen row (none is
    even generated), the training and tuning rows are those of the reporting run, and the study measures tuning."""
    from starling_jax.commands.study.runner import cell_experiment
    from starling_jax.data import pipelines
    study = load_study(os.path.join(ROOT, "experiments", "studies", "select_main_job.py"))
    exp = cell_experiment(study, study.arms[0], 100, quick=True)
    stages = dict(stages_of(exp))
    assert all(not s.data.reporting for s in stages.values())
    quiet = pipelines.load_splits(stages["policy"].data)
    loud = pipelines.load_splits(dataclasses.replace(stages["policy"].data, reporting=True))
    assert not quiet.heldout and not quiet.unseen and loud.heldout and loud.unseen
    assert quiet.train == loud.train and quiet.tuning == loud.tuning and quiet.tuning
    assert study.splits == ("tuning",)
    rl = load_study(os.path.join(ROOT, "experiments", "studies", "rl_algorithms.py"))
    assert all(s.data.reporting for _, s in stages_of(cell_experiment(rl, rl.arms[0], 0)))


def test_the_ifeval_studies_select_on_tuning_and_compare_lora_with_full_layers():
    """select_ifeval's cells generate no held-out row of task:ifeval (data.reporting=false; the rm reads the feedback
    stage's rows, which hold none) and choose each arm's rate on the tuning split; ifeval_lora_vs_full runs its two
    arms at the selected rates, with adapters on the same top layers the full arm trains and nothing else different,
    and measures both against SmolLM2 itself (the "base" reference) on held-out prompts."""
    from starling_jax.commands.study import REFERENCE, read_selection
    from starling_jax.commands.study.runner import cell_experiment
    from starling_jax.data import pipelines
    select = load_study(os.path.join(ROOT, "experiments", "studies", "select_ifeval.py"))
    assert select.splits == ("tuning",) and select.reference_stage == "base" and select.reward_model_splits == ()
    assert select.selection.path == "selected/ifeval.json" and set(select.selection.families) == {"full", "lora"}
    stages = dict(stages_of(cell_experiment(select, select.arms[0], 100)))
    assert stages["rm"].data.source == "stage:feedback"
    assert all(not s.data.reporting for n, s in stages.items() if n != "rm")
    quiet = pipelines.load_splits(stages["policy"].data)
    assert not quiet.heldout and len(quiet.tuning) >= select.eval_prompts - 5
    for family, arms in select.selection.families.items():
        rates = {select.arm(a).experiment.stages[-1].optim.learning_rate for a in arms}
        assert len(rates) == 3 and all((select.arm(a).experiment.stages[-1].model.lora is not None) ==
                                       (family == "lora") for a in arms)
    study = load_study(os.path.join(ROOT, "experiments", "studies", "ifeval_lora_vs_full.py"))
    assert study.reference_stage == "base" and study.splits == ("heldout",) and study.baseline_arm == "full"
    assert [p.label() for p in study.primary] == ["lora - full, policy/heldout gain"]
    assert all(p.baseline != REFERENCE for p in study.primary)
    for arm in study.arms:
        policy = dict(stages_of(arm.experiment))["policy"]
        rate = read_selection(os.path.join(ROOT, "experiments", "studies", "selected", "ifeval.json"), arm.name)
        assert policy.optim.learning_rate == rate["stages.policy.optim.learning_rate"]
        assert policy.model.trainable_top_layers == 2 and (policy.model.lora is not None) == (arm.name == "lora")
        assert policy.rollout.eval_prompts == 0  # the study measures the cell; the stage samples nothing itself
    full, lora = (dict(stages_of(a.experiment))["policy"] for a in study.arms)
    assert dataclasses.replace(full, optim=lora.optim, model=lora.model) == lora  # nothing else differs
    assert dataclasses.replace(full.model, lora=lora.model.lora) == lora.model


def test_committed_selections_regenerate_from_their_raw_results():
    """Every selection file the experiments read either says it is provisional (no grid) or is exactly what its
    selection study's committed raw results (results/STUDY) choose today: the settings trace back to data."""
    import glob

    from starling_jax.commands.study import raw
    from starling_jax.commands.study.runner import choose
    files = sorted(glob.glob(os.path.join(ROOT, "experiments", "studies", "selected", "*.json")))
    assert files
    for path in files:
        with open(path) as f:
            record = json.load(f)
        if "status" in record:
            assert record["status"].startswith("provisional") and record["grid"] == [], path
            continue
        study = load_study(os.path.join(ROOT, "experiments", "studies", f"{record['study']}.py"))
        again = choose(study, raw.report(study, os.path.join(ROOT, "results", record["study"])))
        # the choice exactly; the means it rests on to the last bits (sums in another order on another CPU's SIMD)
        assert {f: (c["arm"], c["settings"]) for f, c in again["choice"].items()} == \
            {f: (c["arm"], c["settings"]) for f, c in record["choice"].items()}, path
        assert {f: c["mean"] for f, c in again["choice"].items()} == pytest.approx(
            {f: c["mean"] for f, c in record["choice"].items()}, rel=1e-12), path
        assert [(g["arm"], g["settings"]) for g in again["grid"]] == [(g["arm"], g["settings"]) for g in record["grid"]]
        for new, old in zip(again["grid"], record["grid"]):
            assert new["mean"] == pytest.approx(old["mean"], rel=1e-12) and new["per_seed"] == pytest.approx(
                old["per_seed"], rel=1e-12), path


def test_the_reference_replies_are_measured_alone_and_equal_the_joint_measurement():
    """policy_measurements(..., who=("reference",)) samples and scores exactly what the joint measurement reports
    for the reference (the same key, prompts and replies), with a KL of exactly 0 (its own replies) and no forward
    pass of the policy: what lets a study measure the reference once per seed."""
    import types

    import jax

    from starling_jax import models
    from starling_jax.commands.study import evaluate as ev
    from starling_jax.config import DataConfig, ModelSection
    from starling_jax.data import load_tokenizer, pipelines
    config = models.get_preset("tiny").replace(num_layers=1)
    policy = (config, models.init_params(config, jax.random.key(1)))
    reference = (config, models.init_params(config, jax.random.key(2)))
    data = DataConfig(synthetic_prompts=60, max_length=32, max_prompt_length=16)
    rows = pipelines.load_splits(data).heldout[:4]
    kwargs = dict(tokenizer=load_tokenizer("openchat-3.5"), template=ModelSection().template, data=data,
                  rollout=types.SimpleNamespace(max_new_tokens=4), key=jax.random.key(3),
                  true_utility=lambda conversation, reply: float(len(reply) % 3))
    scorer = lambda conversations, texts: np.array([len(t) for t in texts], np.float32)  # noqa: E731
    both = ev.policy_measurements(policy, reference, scorer, rows, **kwargs)
    alone = ev.policy_measurements(policy, reference, scorer, rows, who=("reference",), **kwargs)
    assert set(alone) == {"prompt", "reference"} and alone["prompt"] == both["prompt"]
    assert alone["reference"]["samples"] == both["reference"]["samples"]
    for k, v in both["reference"].items():
        if k != "samples":
            np.testing.assert_array_equal(alone["reference"][k], v, err_msg=k)
    assert np.all(alone["reference"]["kl"] == 0.0)


def test_a_seeds_reference_measurement_is_kept_for_its_other_cells(tmp_path):
    """With a "base" reference and a shared reward stage the reference group of a seed does not depend on the arm:
    every cell of the seed names the same file in the seed's shared directory (the first cell measures, the others
    read it back exactly, NaN included), while another seed, split, prompt set or reward model section names another
    file; a study whose reward model is trained per cell measures the reference in every cell."""
    from starling_jax.commands.study import runner
    study = load_study(os.path.join(ROOT, "experiments", "studies", "select_ifeval.py"))
    rows = [{"messages": [{"role": "user", "content": "Describe a lake in two sentences."}]}]
    (tmp_path / "shared" / "seed100" / "rm").mkdir(parents=True)

    def cache(arm, seed=100, split="tuning", rows=rows, section=None):
        cell = tmp_path / "cells" / arm.name / f"seed{seed}"
        cell.mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(cell / "rm"):
            os.symlink(os.path.relpath(tmp_path / "shared" / f"seed{seed}" / "rm", cell), cell / "rm")
        exp = runner.cell_experiment(study, arm, seed)
        policy = dict(stages_of(exp))["policy"]
        return runner._reference_cache(study, exp, policy, section or exp.reward_model, str(cell), seed, split, rows)

    paths = {cache(arm) for arm in study.arms}
    assert len(paths) == 1
    (path,) = paths
    assert os.path.dirname(path) == str(tmp_path / "shared" / "seed100" / "reference")
    (tmp_path / "shared" / "seed101" / "rm").mkdir(parents=True)
    exp = study.arms[0].experiment
    others = {cache(study.arms[0], seed=101), cache(study.arms[1], split="heldout"),
              cache(study.arms[1], rows=rows * 2),
              cache(study.arms[2], section=dataclasses.replace(exp.reward_model, max_length=96))}
    assert len(others) == 4 and path not in others

    calls = []
    group = {"prompt": ["p0", "p1"], "true_reward": np.array([0.5, np.nan]), "kl": np.zeros(2),
             "samples": [{"prompt": "p0", "reply": "r0"}]}
    first = runner._cached(path, lambda: calls.append(1) or group)
    again = runner._cached(path, lambda: calls.append(1) or group)
    assert calls == [1] and first is group and os.path.isfile(path)
    assert again["prompt"] == group["prompt"] and again["samples"] == group["samples"]
    for k in ("true_reward", "kl"):
        assert again[k].dtype == np.float64
        np.testing.assert_array_equal(again[k], group[k])

    smol = load_study(os.path.join(ROOT, "experiments", "studies", "smol_starling.py"))  # no shared stages
    exp = runner.cell_experiment(smol, smol.arms[0], 0)
    policy = dict(stages_of(exp))["policy"]
    assert runner._reference_cache(smol, exp, policy, exp.reward_model, str(tmp_path), 0, "heldout", rows) is None


def test_a_seeds_shared_reward_model_is_measured_once_for_all_its_cells(tmp_path):
    """The RM measurement of a shared reward stage does not depend on the arm: every cell of a seed names one file
    (beside the seed's shared stages), another seed, split or row set another; an RM trained per cell has none."""
    from starling_jax.commands.study import runner
    study = load_study(os.path.join(ROOT, "experiments", "studies", "select_ifeval.py"))
    rows = [{"messages": [{"role": "user", "content": "Describe a lake."}], "responses": ["A lake.", "Lake"],
             "utilities": [1.0, 0.5]}]

    def cache(arm, seed=100, split="heldout", rows=rows):
        (tmp_path / "shared" / f"seed{seed}" / "rm").mkdir(parents=True, exist_ok=True)
        cell = tmp_path / "cells" / arm.name / f"seed{seed}"
        cell.mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(cell / "rm"):
            os.symlink(os.path.relpath(tmp_path / "shared" / f"seed{seed}" / "rm", cell), cell / "rm")
        rm_cfg = dict(stages_of(runner.cell_experiment(study, arm, seed)))["rm"]
        return runner._rm_cache(study, rm_cfg, str(cell), seed, split, rows)

    (path,) = {cache(arm) for arm in study.arms}
    assert os.path.dirname(path) == str(tmp_path / "shared" / "seed100" / "measured")
    changed = [dict(rows[0], utilities=[0.5, 1.0])]
    others = {cache(study.arms[0], seed=101), cache(study.arms[1], split="unseen"), cache(study.arms[2], rows=changed)}
    assert len(others) == 3 and path not in others
    smol = load_study(os.path.join(ROOT, "experiments", "studies", "smol_starling.py"))  # no shared stages
    rm_cfg = dict(stages_of(runner.cell_experiment(smol, smol.arms[0], 0)))["rm"]
    assert runner._rm_cache(smol, rm_cfg, str(tmp_path), 0, "heldout", rows) is None


def test_cells_measuring_the_same_thing_at_once_measure_it_once(tmp_path):
    """Two cells of a seed reach a shared measurement together (--jobs 2): one measures while the other waits for
    its file; a lock left by a killed process blocks no one (the kernel drops it with its holder)."""
    import threading
    import time
    from starling_jax.commands.study import runner
    path = str(tmp_path / "shared" / "seed0" / "measured" / "rm-heldout-x.json")
    calls, started = [], threading.Event()

    def slow():
        calls.append(1)
        started.set()
        time.sleep(1.0)  # the other cell arrives meanwhile
        return {"prompt": ["p"], "pair_accuracy": [0.25]}

    got = []
    first = threading.Thread(target=lambda: got.append(runner._cached(path, slow)))
    first.start()
    assert started.wait(30)
    second = runner._cached(path, slow)  # arrives while the first holds the lock: waits, then reads its file
    first.join()
    assert calls == [1] and second["prompt"] == ["p"] and second["pair_accuracy"].tolist() == [0.25]

    other = str(tmp_path / "other.json")  # a holder killed mid-measurement: the next cell measures
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               other + ".lock"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    assert runner._cached(other, lambda: {"prompt": ["q"], "kl": [0.0]})["prompt"] == ["q"]


def test_cells_run_with_a_persistent_compilation_cache_in_the_workdir(tmp_path, monkeypatch):
    """Each cell's process gets JAX's persistent compilation cache (D/xla_cache) unless the user names one."""
    from starling_jax.commands.study import runner
    seen = []
    monkeypatch.setattr(runner.subprocess, "Popen", lambda cmd, env, **kw: seen.append(env))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    runner._child("s.py", str(tmp_path / "d"), ["--cell", "a@0"], False, str(tmp_path / "logs" / "a.log"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    runner._child("s.py", str(tmp_path / "d"), ["--cell", "a@0"], False, str(tmp_path / "logs" / "a.log"))
    assert [env["JAX_COMPILATION_CACHE_DIR"] for env in seen] == [str(tmp_path / "d" / "xla_cache"),
                                                                   str(tmp_path / "mine")]


def test_the_pool_runs_a_seeds_cells_once_its_shared_stages_are_trained(monkeypatch, capsys):
    """The grid's jobs as one pool (runner._pipeline): the cells of seeds whose shared stages are trained, then the
    next two seeds' shared stages and each seed's cells with the shared stages two seeds on beside them; a cell never
    starts before its seed's shared stages finished, no more than `parallel` jobs run at once, and a seed whose
    shared stages failed runs none of its cells."""
    from starling_jax.commands.study import runner
    seeds, arms = [0, 1, 2, 3, 4], ["a", "b"]
    shared = {s: (f"shared stages of seed {s}", ["--shared", str(s)], f"shared{s}.log") for s in seeds if s != 1}
    cells = [(s, (f"cell {a} seed {s}", ["--cell", f"{a}@{s}"], f"{a}{s}.log")) for s in seeds for a in arms]
    jobs = runner._pipeline(shared, cells, 2)
    assert [label.replace("shared stages of seed ", "S").replace("cell ", "").replace(" seed ", "") for label, *_ in
            jobs] == ["a1", "b1", "S0", "S2", "a0", "b0", "S3", "a2", "b2", "S4", "a3", "b3", "a4", "b4"]
    assert {label: after for label, _, _, after in jobs if label.startswith("cell")}["cell a seed 1"] is None

    running, log, polls = [], [], {}

    class Child:  # finishes on its third poll (shared stages) or second (a cell); seed 3's shared stages fail
        def __init__(self, label):
            self.label, self.returncode = label, None

        def poll(self):
            polls[self.label] = polls.get(self.label, 0) + 1
            if polls[self.label] == (3 if self.label.startswith("shared") else 2):
                self.returncode = 1 if self.label == "shared stages of seed 3" else 0
                running.remove(self.label)
                log.append(("done", self.label))
            return self.returncode

    def child(study_path, workdir, what, quick, log_path):
        label = {tuple(args): label for label, args, _, _ in jobs}[tuple(what)]
        running.append(label)
        assert len(running) <= 2, running
        log.append(("start", label))
        return Child(label)

    monkeypatch.setattr(runner, "_child", child)
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    failed = runner._run_pool(jobs, "study.py", "w", False, 2)
    assert failed == ["shared stages of seed 3"]
    started = [label for event, label in log if event == "start"]
    assert not any("seed 3" in label for label in started if label.startswith("cell"))
    assert len(started) == len(jobs) - 2  # all but seed 3's two cells
    for s in (0, 2, 4):
        finished = log.index(("done", f"shared stages of seed {s}"))
        assert all(log.index(("start", f"cell {a} seed {s}")) > finished for a in arms)
    assert started[:7] == ["cell a seed 1", "cell b seed 1", "shared stages of seed 0", "shared stages of seed 2",
                           "cell a seed 0", "cell b seed 0", "shared stages of seed 3"]
