"""The study report's statistics and records: the resampling against an explicit loop, bootstrap p-values and Holm's
adjustment against hand formulas, preregistered comparisons (validation, the report's primary section, per-seed
figures, the exploratory family), and the raw results folder (export, validation on read, the report regenerated
from it alone, byte for byte)."""

import dataclasses
import gzip
import json
import os

import numpy as np
import pytest

from starling_jax.config import ConfigError
from starling_jax.data import synthetic
from starling_jax.commands.study import REFERENCE, UTILITY_TERMS, Arm, Comparison, Study, raw, report, stats

FAKE_STUDY = '''
from starling_jax.commands.study import Arm, Comparison, Study


def get_study():
    return Study(name="fake", arms=(Arm("a", None), Arm("b", None), Arm("c", None)), seeds=(0, 1, 2), baseline="a",
                 primary=(Comparison("policy/heldout", "gain", "b", "a", "greater", "b is the method under test"),
                          Comparison("policy/unseen", "kl", "c", "a", "less", "c should stay closer")))
'''
GAINS = {"a": 0.0, "b": 0.5, "c": 0.2}


def fake_study() -> Study:
    return Study(name="fake", arms=(Arm("a", None), Arm("b", None), Arm("c", None)), seeds=(0, 1, 2), baseline="a",
                 primary=(Comparison("policy/heldout", "gain", "b", "a", "greater", "b is the method under test"),
                          Comparison("policy/unseen", "kl", "c", "a", "less", "c should stay closer")))


def fake_record(arm: str, seed: int, rows: int = 20) -> dict:
    """A cell.json record: the reference and the reward model are the same in every arm (shared stages); the
    policy gains GAINS[arm] true reward with noise of its own; one reward-model row has no untied pair (NaN)."""
    shared = np.random.default_rng(seed)
    own = np.random.default_rng(100 * seed + ord(arm))
    gain = GAINS[arm]
    groups = {}
    for split in ("heldout", "unseen"):
        prompts = [f"{split} prompt {i // 2}" for i in range(rows)]  # pairs of rows share a prompt
        ref = shared.normal(size=rows)
        pol = {"prompt": prompts, "true_reward": list(ref + gain + 0.3 * own.normal(size=rows)),
               "kl": list(np.abs(0.8 + gain + 0.2 * own.normal(size=rows))), "rm_score": list(own.normal(size=rows)),
               "length": list(np.round(10 + 3 * own.normal(size=rows))),
               "term_relevance": list(own.normal(size=rows)),
               "samples": [{"prompt": prompts[i], "reply": f"reply {i}"} for i in range(3)]}
        acc = shared.uniform(0.5, 1.0, size=rows)
        acc[3] = np.nan
        groups[f"policy/{split}"] = pol
        groups[f"reference/{split}"] = {"prompt": prompts, "true_reward": list(ref), "kl": list(np.zeros(rows)),
                                        "rm_score": list(ref), "length": list(np.full(rows, 9.0)),
                                        "term_relevance": list(ref),
                                        "samples": [{"prompt": prompts[0], "reply": "ref"}]}
        groups[f"rm/{split}"] = {"prompt": prompts, "pair_accuracy": list(acc),
                                 "top1_accuracy": list(shared.integers(0, 2, rows).astype(float)),
                                 "kendall_tau": list(2 * acc - 1)}
    return {"arm": arm, "seed": seed, "quick": False, "train_wall_s": 9.0 + seed, "wall_s": 10.0 + seed,
            "summary": {"policy": {"loss": 0.5, "eval": {"reward": 1.0}, "export": "/somewhere/export"}},
            "groups": groups}


def write_workdir(workdir, study: Study, arms=None, seeds=None) -> list:
    records = []
    for seed in seeds if seeds is not None else study.seeds:
        for arm in arms or [a.name for a in study.arms]:
            record = fake_record(arm, seed)
            directory = os.path.join(workdir, "cells", arm, f"seed{seed}")
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "cell.json"), "w") as f:
                json.dump(record, f)
            records.append(record)
        shared = os.path.join(workdir, "shared", f"seed{seed}")
        os.makedirs(shared, exist_ok=True)
        with open(os.path.join(shared, "done.json"), "w") as f:
            json.dump({"seed": seed, "wall_s": 100.0 + seed}, f)
    return records


def write_study_file(directory) -> str:
    path = os.path.join(directory, "fake.py")
    with open(path, "w") as f:
        f.write(FAKE_STUDY)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Statistics.

def test_weighted_resample_equals_the_explicit_concatenated_draw():
    """The vectorised replicate (rows weighted by how often their cluster was drawn) against an explicit loop that
    concatenates each drawn cluster's rows and takes np.nanmean, on the same random draws, with NaN rows and clusters
    of different sizes."""
    rng = np.random.default_rng(3)
    seeds = [0, 1, 2]
    clusters = {0: np.array([0, 0, 1, 2, 2, 2, 3]), 1: np.array([5, 6, 5, 7, 8, 8]), 2: np.array([1, 1, 1, 2])}
    values = {arm: {s: {"x": rng.normal(size=len(clusters[s]))} for s in seeds} for arm in ("a", "b")}
    values["b"][1]["x"][2] = np.nan
    B = 200
    point, draws = stats.seed_means(values, clusters, ["x"], B, np.random.default_rng(11))
    replay = np.random.default_rng(11)  # the resampling protocol of seed_means, replayed draw by draw
    seed_draw = replay.integers(0, len(seeds), (B, len(seeds))).reshape(-1)
    picks_of = {}
    for i, s in enumerate(seeds):
        slots = np.flatnonzero(seed_draw == i)
        order = list(dict.fromkeys(clusters[s].tolist()))  # clusters in order of first appearance
        picks = replay.integers(0, len(order), (len(slots), len(order)))
        for slot, row in zip(slots, picks):
            picks_of[slot] = [np.flatnonzero(clusters[s] == order[g]) for g in row]
    for arm in ("a", "b"):
        want = []
        for b in range(B):
            per_seed = [np.nanmean(values[arm][seeds[seed_draw[b * 3 + j]]]["x"][np.concatenate(picks_of[b * 3 + j])])
                        for j in range(3)]
            want.append(np.mean(per_seed))
        np.testing.assert_allclose(draws[arm]["x"], want, rtol=1e-12)
        assert point[arm]["x"] == pytest.approx(np.mean([np.nanmean(values[arm][s]["x"]) for s in seeds]))


def test_bootstrap_p_value_hand_cases():
    assert stats.bootstrap_p(np.arange(1.0, 100.0)) == pytest.approx(2 * 1 / 100)  # all 99 draws above 0
    assert stats.bootstrap_p(-np.arange(1.0, 100.0)) == pytest.approx(2 * 1 / 100)
    assert stats.bootstrap_p(np.zeros(50)) == 1.0
    d = np.array([-1.0] * 10 + [1.0] * 89)  # 10 of 99 at or below 0
    assert stats.bootstrap_p(d) == pytest.approx(2 * 11 / 100)


def _hand_holm(p, alpha=0.05):
    """Holm (1979) written out: sort ascending, multiply the j-th smallest (1-based) by m - j + 1, cap at 1, carry
    the running maximum; the j-th smallest is tested at alpha / (m - j + 1), tied p-values at their first rank."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted, level = [0.0] * m, [0.0] * m
    running = 0.0
    for j, i in enumerate(order, start=1):
        first = min(k for k, o in enumerate(order, start=1) if p[o] == p[i])
        running = max(running, min(1.0, (m - first + 1) * p[i]))
        adjusted[i] = running
        level[i] = alpha / (m - first + 1)
    return adjusted, level


@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03, 0.005], [0.02, 0.02, 0.5], [0.3, 0.001, 0.001, 0.2, 0.04, 0.9],
                               [0.5]])
def test_holm_against_the_hand_formula(p):
    adjusted, level = stats.holm(p)
    want_adjusted, want_level = _hand_holm(p)
    np.testing.assert_allclose(adjusted, want_adjusted)
    np.testing.assert_allclose(level, want_level)


def test_holm_textbook_example():
    adjusted, level = stats.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])  # 0.005*4, 0.01*3, max(0.03*2, ..), max(.., 0.04)
    np.testing.assert_allclose(level, [0.05 / 3, 0.05, 0.05 / 2, 0.05 / 4])


def test_utility_terms_are_synthetics():
    assert set(UTILITY_TERMS) == set(synthetic.utility_terms([{"role": "user", "content": "hi"}], "a reply."))


# ----------------------------------------------------------------------------------------------------------------------
# Preregistered comparisons.

@pytest.mark.parametrize("change, match", [
    (dict(arm="z"), "arm 'z' is not an arm"),
    (dict(baseline="z"), "baseline 'z' is not an arm"),
    (dict(arm="a"), "same arm"),
    (dict(group="policy/train"), "group 'policy/train' is not one of"),
    (dict(group="rm/heldout"), "metric 'gain' is not measured in rm/heldout"),
    (dict(metric="loss"), "metric 'loss' is not measured"),
    (dict(direction="bigger"), "direction 'bigger'"),
    (dict(why="  "), "say why"),
])
def test_a_malformed_primary_comparison_is_refused(change, match):
    good = Comparison("policy/heldout", "gain", "b", "a", "greater", "the method under test")
    arms = (Arm("a", None), Arm("b", None))
    Study(name="s", arms=arms, primary=(good,))
    with pytest.raises(ConfigError, match=match):
        Study(name="s", arms=arms, primary=(dataclasses.replace(good, **change),))


def test_primary_comparisons_need_what_the_group_measures():
    good = Comparison("policy/heldout", "term_relevance", "b", "a", "two-sided", "why")
    Study(name="s", arms=(Arm("a", None), Arm("b", None)), primary=(good,))
    with pytest.raises(ConfigError, match="arm 'b' has no policy stage"):
        Study(name="s", arms=(Arm("a", None), Arm("b", None, policy_stage=None)), primary=(good,))
    rm = dataclasses.replace(good, group="rm/unseen", metric="kendall_tau")
    with pytest.raises(ConfigError, match="measures no reward model in rm/unseen"):
        Study(name="s", arms=(Arm("a", None), Arm("b", None)), reward_stage=None, primary=(rm,))
    with pytest.raises(ConfigError, match="measures no reward model in rm/unseen"):  # a task's rows: no RM groups
        Study(name="s", arms=(Arm("a", None), Arm("b", None)), reward_model_splits=(), primary=(rm,))
    # against the reference policy: only a policy's gain (already paired with the reference), of an arm
    own = Comparison("policy/heldout", "gain", "b", REFERENCE, "greater", "does training help at all")
    Study(name="s", arms=(Arm("b", None),), primary=(own,))
    for change in (dict(metric="true_reward"), dict(group="rm/heldout", metric="pair_accuracy")):
        with pytest.raises(ConfigError, match="compares a policy's gain over the reference policy"):
            Study(name="s", arms=(Arm("b", None),), primary=(dataclasses.replace(own, **change),))
    with pytest.raises(ConfigError, match="arm 'c' is not an arm"):
        Study(name="s", arms=(Arm("b", None),), primary=(dataclasses.replace(own, arm="c"),))
    with pytest.raises(ConfigError, match="stated twice"):
        Study(name="s", arms=(Arm("a", None), Arm("b", None)), primary=(good, good))
    with pytest.raises(ConfigError, match="tuple of"):
        Study(name="s", arms=(Arm("a", None), Arm("b", None)), primary=[good])


def test_study_files_primary_comparisons_are_valid():
    from starling_jax.commands.study import load_study
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "experiments", "studies")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py") and not name.startswith("_"):
            load_study(os.path.join(folder, name))  # Study validates its primary comparisons on construction


# ----------------------------------------------------------------------------------------------------------------------
# The report.

def _seed_mean(records, arm, seed, group, metric):
    r = next(r for r in records if r["arm"] == arm and r["seed"] == seed)
    if metric == "gain":
        x = (np.asarray(r["groups"][group]["true_reward"], float)
             - np.asarray(r["groups"][group.replace("policy", "reference")]["true_reward"], float))
    else:
        x = np.asarray(r["groups"][group][metric], float)
    return float(np.nanmean(x))


def test_report_gives_primary_comparisons_first_per_seed_figures_and_a_holm_family():
    study = fake_study()
    records = [fake_record(a, s) for s in study.seeds for a in ("a", "b", "c")]
    B = 3000
    results = report.aggregate(study, records, {}, this_run_s=0.0, failed=[], num_samples=B)
    s = results["summary"]
    # each seed's own figure, beside the interval
    for arm in ("a", "b", "c"):
        for seed in study.seeds:
            for group, metric in (("policy/heldout", "gain"), ("policy/unseen", "kl"), ("rm/heldout", "pair_accuracy")):
                assert s[group][arm][metric]["seeds"][str(seed)] == pytest.approx(
                    _seed_mean(records, arm, seed, group, metric))
        ratio = s["policy/heldout"][arm]["gain_per_kl"]["seeds"]["1"]
        assert ratio == pytest.approx(_seed_mean(records, arm, 1, "policy/heldout", "gain")
                                      / _seed_mean(records, arm, 1, "policy/heldout", "kl"))
    # the primary comparisons: unadjusted 95% paired interval, per-seed differences, the stated direction
    first, second = results["primary"]
    assert first["measured"] and first["supported"] and first["verdict"].startswith("yes")
    assert first["diff"] == pytest.approx(s["policy/heldout"]["b"]["gain"]["diff"])
    assert (first["lo"], first["hi"]) == (s["policy/heldout"]["b"]["gain"]["diff_lo"],
                                          s["policy/heldout"]["b"]["gain"]["diff_hi"])
    assert first["seeds"]["2"] == pytest.approx(_seed_mean(records, "b", 2, "policy/heldout", "gain")
                                                - _seed_mean(records, "a", 2, "policy/heldout", "gain"))
    assert not second["supported"] and "opposite" in second["verdict"]  # c's KL is higher, not lower
    # the exploratory family: the shared RM's differences are no test; true reward is the primary gain's twin
    for arm in ("b", "c"):
        for m in ("pair_accuracy", "top1_accuracy", "kendall_tau"):
            assert s["rm/heldout"][arm][m]["role"] == "identical"
    assert s["policy/heldout"]["b"]["gain"]["role"] == s["policy/heldout"]["b"]["true_reward"]["role"] == "primary"
    assert s["policy/unseen"]["c"]["kl"]["role"] == "primary"
    exploratory = [(g, a, m, e) for g in s for a in s[g] for m, e in s[g][a].items() if e.get("role") == "exploratory"]
    tests = {}  # one test per distinct difference (twins share theirs)
    for g, a, m, e in exploratory:
        tests.setdefault((g, a, round(e["diff"], 12)), []).append((m, e))
    assert results["family"]["tests"] == len(tests) and results["family"]["differences"] == len(exploratory)
    keys = list(tests)
    draws = {}
    for g in ("policy/heldout", "policy/unseen"):
        values, clusters = report._group_values(records, g)
        _, draws[g], _ = stats.bootstrap(values, clusters, sorted(values["a"][0]),
                                         {"gain_per_kl": lambda m: m["gain"] / m["kl"]}, num_samples=B)
    diff = {k: draws[k[0]][k[1]][tests[k][0][0]] - draws[k[0]]["a"][tests[k][0][0]] for k in keys}
    p = [stats.bootstrap_p(diff[k]) for k in keys]
    adjusted, level = _hand_holm(p)
    for k, p_k, adj, lev in zip(keys, p, adjusted, level):
        for _, e in tests[k]:
            assert e["p"] == pytest.approx(p_k) and e["p_holm"] == pytest.approx(adj)
            lo, hi = np.percentile(diff[k], [50 * lev, 100 - 50 * lev])
            assert (e["holm_lo"], e["holm_hi"]) == (pytest.approx(lo), pytest.approx(hi))
            assert e["holm_lo"] <= e["diff_lo"] and e["diff_hi"] <= e["holm_hi"]  # adjusted intervals are wider
    assert any(e["p_holm"] <= 0.05 for *_, e in exploratory)  # b's 0.5 gain in KL and gain / KL is found
    # the markdown: primary first, then exploratory, every interval with its seeds
    md = report.markdown(results)
    assert md.index("## Primary comparisons (preregistered)") < md.index("## Exploratory") < md.index("### policy")
    assert "| b - a | policy/heldout | gain vs reference | greater | " in md and "b is the method under test" in md
    row = next(line for line in md.splitlines() if line.startswith("| b | ") and "primary" in line)
    assert row.count("(") >= 6 and "identical in every replicate" in md and "p=" in md
    seeds = s["policy/heldout"]["b"]["kl"]["seeds"]
    assert "(" + ", ".join(f"{seeds[str(x)]:.3f}" for x in study.seeds) + ")" in md


def test_a_primary_against_the_reference_is_the_arms_own_gain():
    """A one-arm study's question (baseline REFERENCE): the arm's paired gain over the reference policy, with the
    gain's own interval and per-seed figures; no exploratory family (there is no other arm)."""
    study = Study(name="one", arms=(Arm("b", None),), seeds=(0, 1, 2),
                  primary=(Comparison("policy/heldout", "gain", "b", REFERENCE, "greater", "does it help"),))
    records = [fake_record("b", s) for s in study.seeds]
    results = report.aggregate(study, records, {}, this_run_s=0.0, failed=[], num_samples=2000)
    gain = results["summary"]["policy/heldout"]["b"]["gain"]
    (p,) = results["primary"]
    assert p["measured"] and p["diff"] == pytest.approx(gain["mean"])
    assert (p["lo"], p["hi"]) == (pytest.approx(gain["lo"]), pytest.approx(gain["hi"]))
    for seed in study.seeds:
        assert p["seeds"][str(seed)] == pytest.approx(_seed_mean(records, "b", seed, "policy/heldout", "gain"))
    assert p["supported"] and p["lo"] > 0  # GAINS["b"] = 0.5 over a shared reference
    assert results["family"]["tests"] == 0
    assert "| b - reference | policy/heldout | gain vs reference | greater | " in report.markdown(results)


def test_report_without_primary_says_so_and_an_unmeasured_primary_is_named():
    study = dataclasses.replace(fake_study(), primary=())
    records = [fake_record(a, 0) for a in ("a", "b")]
    md = report.markdown(report.aggregate(study, records, {}, 0.0, [], num_samples=200))
    assert "None stated in the study file: every comparison below is exploratory." in md
    results = report.aggregate(fake_study(), records, {}, 0.0, [], num_samples=200)  # arm c did not run
    assert results["primary"][1]["measured"] is False and "not measured" in report.markdown(results)


# ----------------------------------------------------------------------------------------------------------------------
# The raw results folder.

def test_export_then_report_only_from_raw_regenerates_the_report_byte_for_byte(tmp_path, capsys):
    from starling_jax.commands.cli import main
    study_file = write_study_file(tmp_path)
    workdir, out = str(tmp_path / "work"), str(tmp_path / "results" / "fake")
    records = write_workdir(workdir, fake_study(), seeds=(0, 1))
    assert main(["study", study_file, "--workdir", workdir, "--export-raw", out]) == 0
    assert "not finished, not exported: a@2, b@2, c@2" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["a", "b", "c", "study.json"]
    manifest = json.load(open(os.path.join(out, "study.json")))
    assert manifest["study_file"] == "fake.py" and manifest["shared_wall_s"] == {"0": 100.0, "1": 101.0}
    assert manifest["primary"][0]["why"] == "b is the method under test"
    # read back: the same per-prompt records (NaN as null and back), numeric stage summaries only
    back, shared, _ = raw.read(out, fake_study())
    assert shared == {0: 100.0, 1: 101.0}
    for want, got in zip(sorted(records, key=lambda r: (r["arm"], r["seed"])), back):
        assert (got["arm"], got["seed"], got["wall_s"]) == (want["arm"], want["seed"], want["wall_s"])
        assert got["summary"] == {"policy": {"loss": 0.5, "eval": {"reward": 1.0}}}
        for g, m in want["groups"].items():
            assert got["groups"][g]["prompt"] == m["prompt"]
            for k, v in m.items():
                if k == "samples":
                    assert got["groups"][g]["samples"] == v[:3]
                elif k != "prompt":
                    np.testing.assert_array_equal(got["groups"][g][k], np.asarray(v, float))
    # the report from the raw folder alone equals the workdir's, byte for byte, and again on a second run
    assert main(["study", study_file, "--workdir", workdir, "--report-only"]) == 0
    assert main(["study", study_file, "--report-only", "--raw", out]) == 0
    first = open(os.path.join(out, "results.md"), "rb").read()
    assert first == open(os.path.join(workdir, "results.md"), "rb").read()
    elsewhere = str(tmp_path / "again")
    assert main(["study", study_file, "--report-only", "--raw", out, "--workdir", elsewhere]) == 0
    assert open(os.path.join(elsewhere, "results.md"), "rb").read() == first
    assert os.path.getsize(os.path.join(elsewhere, "results.png")) > 1000
    assert json.load(open(os.path.join(elsewhere, "results.json")))["primary"][0]["measured"]
    # exporting again writes the same bytes (no time stamps), and a finished third seed is added
    before = open(os.path.join(out, "a", "seed0.jsonl.gz"), "rb").read()
    write_workdir(workdir, fake_study(), seeds=(2,))
    assert main(["study", study_file, "--workdir", workdir, "--export-raw", out]) == 0
    assert open(os.path.join(out, "a", "seed0.jsonl.gz"), "rb").read() == before
    assert json.load(open(os.path.join(out, "study.json")))["seeds"] == [0, 1, 2]


def test_raw_records_are_compact():
    """A cell of the main job's size (256 prompts x 2 splits) stays near 100 KB, so a 5-arm x 5-seed study is a few
    MB."""
    record = fake_record("a", 0, rows=256)
    for split in ("heldout", "unseen"):
        for k in ("term_" + t for t in UTILITY_TERMS):
            record["groups"][f"policy/{split}"][k] = list(np.random.default_rng(0).normal(size=256))
    size = len(raw._gzip(raw.cell_lines(record)))
    assert size < 160_000, size


def _gz_lines(path):
    with gzip.open(path, "rt") as f:
        return f.read().splitlines()


def _put_lines(path, lines):
    with open(path, "wb") as f:
        f.write(raw._gzip(lines))


def _edit_line(index, fn):
    def edit(out):
        path = os.path.join(out, "b", "seed1.jsonl.gz")
        lines = _gz_lines(path)
        lines[index] = fn(lines[index])
        _put_lines(path, lines)
    return edit


def _edit_json_line(index, fn):
    return _edit_line(index, lambda line: json.dumps(fn(json.loads(line))))


def _edit_manifest(fn):
    def edit(out):
        path = os.path.join(out, "study.json")
        m = json.load(open(path))
        fn(m)
        json.dump(m, open(path, "w"))
    return edit


def _set(key, value):
    def fn(d):
        d[key] = value
        return d
    return fn


def _drop(key):
    def fn(d):
        del d[key]
        return d
    return fn


@pytest.mark.parametrize("damage, match", [
    (_edit_line(5, lambda line: line[:-4]), r"b/seed1.jsonl.gz line 6: not valid JSON"),
    (_edit_json_line(5, _set("kl", "big")), r"line 6: field 'kl': 'big' is not a number"),
    (_edit_line(5, lambda line: line.replace('"kl":', '"kl":NaN,"x":')), r"line 6: not valid JSON \(NaN"),
    (_edit_json_line(5, _drop("kl")), r"line 6: fields kl: every row of"),
    (_edit_json_line(5, _set("row", 7)), r"line 6: field 'row': 7, expected 4"),
    (_edit_json_line(5, _set("group", "policy/train")), r"line 6: field 'group': 'policy/train'"),
    (_edit_json_line(0, _drop("wall_s")), r"line 1: field\(s\) wall_s missing"),
    (_edit_json_line(0, _set("seed", 2)), r"line 1: header says arm 'b' seed 2"),
    (_edit_json_line(0, _set("extra", 1)), r"line 1: unknown field\(s\) extra"),
    (lambda out: open(os.path.join(out, "b", "seed1.jsonl.gz"), "wb").write(b"not gzip"), r"not a readable gzip"),
    (lambda out: os.remove(os.path.join(out, "b", "seed1.jsonl.gz")), r"b/seed1.jsonl.gz does not exist"),
    (lambda out: open(os.path.join(out, "b", "seed9.jsonl.gz"), "wb").write(b""), r"seed9.jsonl.gz: a cell file"),
    (_edit_manifest(lambda m: m["primary"][0].update(direction="two-sided")), r"preregistered comparisons differ"),
    (_edit_manifest(lambda m: m.update(study="other")), r"holds study 'other'"),
    (_edit_manifest(lambda m: m.update(version=2)), r"version 2"),
    (lambda out: _put_lines(os.path.join(out, "b", "seed1.jsonl.gz"),
                            [line for line in _gz_lines(os.path.join(out, "b", "seed1.jsonl.gz"))
                             if '"group":"reference/unseen"' not in line]), r"needs reference/unseen"),
])
def test_a_damaged_raw_folder_is_one_clear_error(tmp_path, capsys, damage, match):
    import re
    from starling_jax.commands.cli import main
    study_file = write_study_file(tmp_path)
    workdir, out = str(tmp_path / "work"), str(tmp_path / "raw")
    write_workdir(workdir, fake_study(), seeds=(0, 1))
    assert main(["study", study_file, "--workdir", workdir, "--export-raw", out]) == 0
    capsys.readouterr()
    damage(out)
    assert main(["study", study_file, "--report-only", "--raw", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert re.search(match, err), err
    assert not os.path.exists(os.path.join(out, "results.md"))


def test_export_refuses_what_would_lose_or_mix_cells(tmp_path, capsys):
    from starling_jax.commands.cli import main
    study_file = write_study_file(tmp_path)
    workdir, out = str(tmp_path / "work"), str(tmp_path / "raw")
    write_workdir(workdir, fake_study(), seeds=(0, 1))
    assert main(["study", study_file, "--workdir", workdir, "--export-raw", out]) == 0
    other = str(tmp_path / "other")
    write_workdir(other, fake_study(), seeds=(0,))
    capsys.readouterr()
    assert main(["study", study_file, "--workdir", other, "--export-raw", out]) == 2
    assert "seed1.jsonl.gz: a cell the workdir" in capsys.readouterr().err
    write_workdir(other, fake_study(), arms=["a"], seeds=(1,))
    os.rename(os.path.join(other, "cells", "b"), os.path.join(other, "cells", "zz"))
    assert main(["study", study_file, "--workdir", other, "--export-raw", str(tmp_path / "new")]) == 2
    assert "arm 'zz' is not an arm of study 'fake'" in capsys.readouterr().err
    assert main(["study", study_file, "--report-only", "--raw", str(tmp_path / "nowhere")]) == 2
    assert "not a raw results folder" in capsys.readouterr().err
    assert main(["study", study_file, "--raw", out]) == 2
    assert "use it with --report-only" in capsys.readouterr().err
    assert main(["study", study_file, "--report-only"]) == 2
    assert "--workdir is required" in capsys.readouterr().err


def test_a_figure_on_a_rounding_boundary_prints_the_same_on_every_machine():
    """Means of 0/1 rewards land exactly on a printed rounding boundary (0.4375); summed in another order (another
    CPU's SIMD) they come out 1 ulp either side of it. The report and the quote check print both as the same text."""
    from starling_jax.commands.study import quotes
    from starling_jax.commands.study.report import _n
    below, above = np.nextafter(0.4375, 0.0), np.nextafter(0.4375, 1.0)
    assert f"{below:.3f}" != f"{above:.3f}"  # what printing them directly does
    assert _n(below) == _n(above) == _n(0.4375)
    assert quotes._as_quoted(below, "0.438") == quotes._as_quoted(above, "0.438") == "0.438"
    assert _n(0.4374) == "0.437" and _n(-0.0004) == "-0.000"
