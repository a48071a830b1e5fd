"""The synthetic Nectar: determinism, the utility's documented properties, Plackett-Luce rank sampling."""

import dataclasses
import itertools
import math
import re

import numpy as np
import pytest

from starling_jax.data import parse_rows, synthetic
from starling_jax.data.synthetic import plackett_luce_ranks, true_utility, utility_terms

ASK = [{"role": "user", "content": "Tell me about ocean."}]


def test_rows_are_deterministic_nectar_rows():
    a = synthetic.make_rows(30, seed=1)
    assert a == synthetic.make_rows(30, seed=1)
    assert a[:10] == synthetic.make_rows(10, seed=1)  # row i depends only on (seed, i)
    assert a != synthetic.make_rows(30, seed=2)
    parsed, report = parse_rows(a)  # valid Nectar: the same path as real data
    assert report.rows_kept == 30 and report.ties_broken == 0
    for raw, row in zip(a, parsed):
        assert raw["prompt"].startswith("\n\nHuman: ") and raw["prompt"].endswith("\n\nAssistant: ")
        assert sorted(row["ranks"]) == list(range(1, 8)) and len(set(row["responses"])) == 7
        assert raw["turns"] == (len(row["messages"]) + 1) // 2
        # The stored utilities are the hidden utility of each answer.
        assert row["utilities"] == [true_utility(row["messages"], r) for r in row["responses"]]
    assert any(len(r["messages"]) == 3 for r in parsed)  # some multi-turn prompts


def test_responses_are_short_for_the_tiny_model():
    from starling_jax.data import load_tokenizer
    tok = load_tokenizer("openchat-3.5")
    lengths = [len(tok.encode(a["answer"])) for r in synthetic.make_rows(100) for a in r["answers"]]
    assert max(lengths) <= 24


def test_utility_terms_follow_the_documented_formula():
    text = "The ocean has deep blue water and water zorp music."
    terms = utility_terms(ASK, text)
    # words: the ocean has deep blue water and water zorp music -> n=10, on-topic {ocean, deep, blue, water} = 4,
    # off-topic 1 (music), junk 1 (zorp), repeats 1 (water), generic 3 (the, has, and).
    assert terms == pytest.approx({
        "relevance": 3.0 * (1 - math.exp(-4 / 2)), "length": 1.0, "fluency": 0.5, "period": 0.5,
        "off_topic": -1.0, "repetition": -0.5, "junk": -0.5})
    assert true_utility(ASK, text) == pytest.approx(sum(terms.values()))


def test_utility_rewards_the_right_things_and_resists_gaming():
    good = "The ocean has deep blue water with fish."
    assert true_utility(ASK, good) > true_utility(ASK, "The music has a nice rhythm with notes.")  # off-topic
    assert true_utility(ASK, good) > true_utility(ASK, "Water water water water water water.")  # repetition
    assert true_utility(ASK, good) > true_utility(ASK, "Blorp zint ocean krell vosh.")  # junk words
    # Keyword stuffing and rambling saturate, then cost.
    stuffed = "Ocean water waves fish salt deep blue tide coral and it is the very good sure."
    rambling = stuffed[:-1] + " and many people really find this quite interesting and useful here."
    assert true_utility(ASK, rambling) < true_utility(ASK, stuffed)
    assert true_utility(ASK, "") == true_utility(ASK, "  ...  ") == synthetic.EMPTY_UTILITY
    # The topic is the last user turn's; earlier turns do not count.
    multi = [{"role": "user", "content": "Tell me about music."}, {"role": "assistant", "content": "Song notes."},
             {"role": "user", "content": "Now tell me about ocean."}]
    assert synthetic.topic_of(multi) == "ocean"
    assert true_utility(multi, good) == true_utility(ASK, good)
    assert true_utility([{"role": "user", "content": "hi"}], good) < true_utility(ASK, good)  # no topic named


def test_plackett_luce_ranks_match_the_model_probabilities():
    u = np.array([1.0, 0.0, -0.5])
    rng = np.random.default_rng(0)
    n = 20000
    counts = {}
    for _ in range(n):
        r = plackett_luce_ranks(u, 1.0, rng)
        counts[tuple(r)] = counts.get(tuple(r), 0) + 1
    for order in itertools.permutations(range(3)):  # order[0] is the best
        p = 1.0
        rest = list(order)
        for i in order:
            p *= math.exp(u[i]) / sum(math.exp(u[j]) for j in rest)
            rest.remove(i)
        ranks = tuple(order.index(i) + 1 for i in range(3))
        assert counts.get(ranks, 0) / n == pytest.approx(p, abs=0.012), order
    assert list(plackett_luce_ranks(u, 0.0, rng)) == [1, 2, 3]
    assert list(plackett_luce_ranks(np.array([0.0, 1.0, 1.0]), 0.0, rng)) == [3, 1, 2]


def _agreement(rows):
    ok = total = 0
    for r in rows:
        u = r["utilities"]
        ranks = [a["rank"] for a in r["answers"]]
        for i, j in itertools.combinations(range(len(u)), 2):
            if u[i] != u[j]:
                total += 1
                ok += (u[i] > u[j]) == (ranks[i] < ranks[j])
    return ok / total


def test_noise_knob():
    assert _agreement(synthetic.make_rows(40, noise=0.0)) == 1.0
    low, high = _agreement(synthetic.make_rows(100, noise=0.5)), _agreement(synthetic.make_rows(100, noise=3.0))
    assert 0.8 < low and 0.55 < high < low
    with pytest.raises(ValueError, match="noise must be >= 0"):
        synthetic.make_rows(1, noise=-1.0)


def test_true_ranks_sort_by_utility():
    [row], _ = parse_rows(synthetic.make_rows(1, seed=4, noise=5.0))
    ranks = synthetic.true_ranks(row)
    by_rank = [row["utilities"][ranks.index(k)] for k in range(1, 8)]
    assert by_rank == sorted(row["utilities"], reverse=True)
    with pytest.raises(ValueError, match="no 'utilities'"):
        synthetic.true_ranks({"row": 3, "responses": ["a", "b"]})


def _prompts(rows):
    return {repr(r["messages"]) for r in rows}


def test_splits_share_no_prompt_string_and_unseen_templates_are_never_trained_on():
    from starling_jax.config import DataConfig
    from starling_jax.data import pipelines, synthetic
    cfg = DataConfig(synthetic_prompts=600, synthetic_noise=0.5, heldout_fraction=0.1, tuning_fraction=0.1,
                     unseen_templates=1)
    s = pipelines.load_splits(cfg)
    assert len(s.train) + len(s.heldout) + len(s.tuning) + len(s.unseen) == 600
    train = _prompts(s.train)
    for part in (s.heldout, s.tuning, s.unseen):
        assert part and not _prompts(part) & train  # no prompt string of a held-out part is trained on
    assert not _prompts(s.heldout) & _prompts(s.tuning)
    # about 10% each: whole prompt groups are moved, so the sizes overshoot by less than one group
    assert 55 <= len(s.heldout) <= 90 and 55 <= len(s.tuning) <= 90
    # the unseen split is exactly the rows phrased with the last template, and no other split has that phrasing
    last = synthetic.PROMPTS[-1]
    phrased = lambda r: any(r["messages"][0]["content"] == last.format(t=t) for t in synthetic.TOPICS)  # noqa: E731
    assert all(phrased(r) for r in s.unseen) and not any(phrased(r) for r in s.train + s.heldout + s.tuning)
    # deterministic, and independent of the data order seed
    again = pipelines.load_splits(dataclasses.replace(cfg, shuffle_seed=5))
    assert [r["row"] for r in again.heldout] == [r["row"] for r in s.heldout]
    # the old row-wise split would have leaked: most held-out rows' prompts repeat among the other rows
    assert sum(repr(r["messages"]) in _prompts(s.train + s.tuning + s.unseen) for r in s.heldout) == 0


def test_split_options_are_validated():
    from starling_jax.config import ConfigError, DataConfig, Experiment
    from starling_jax.stages.validation import validate
    from starling_jax.data import pipelines
    with pytest.raises(ValueError, match="sum below 1"):
        pipelines.load_splits(DataConfig(synthetic_prompts=20, heldout_fraction=0.5, tuning_fraction=0.5))
    with pytest.raises(ConfigError, match="data.unseen_templates"):
        validate(Experiment(name="x", data=DataConfig(unseen_templates=8)))
    with pytest.raises(ConfigError, match="data.tuning_fraction"):
        validate(Experiment(name="x", data=DataConfig(heldout_fraction=0.6, tuning_fraction=0.5)))


def _old_selection_rows():
    """The rows the main job's settings were first chosen on (commit ffcaa51): the old row-wise held-out split of
    seed 0, a fixed permutation (seed 20231128) of make_rows(2000, 0, 0.5), its first 10%."""
    from starling_jax.data import synthetic
    rows = synthetic.make_rows(2000, seed=0, noise=0.5)
    perm = np.random.default_rng(20231128).permutation(len(rows))
    return [rows[i] for i in perm[:200]]


def _user_turns(prompt: str) -> list[str]:
    return [t.split("\n\nAssistant:")[0] for t in prompt.split("\n\nHuman: ")[1:]]


@pytest.mark.slow  # 14,000 rows generated
def test_reporting_splits_share_no_prompt_with_any_training_or_selection_row():
    from starling_jax.data import synthetic
    seeds = (0, 1, 2, 3, 4, 100, 101)  # every reporting and selection seed
    trained = {r["prompt"] for s in seeds for r in synthetic.make_rows(2000, seed=s, noise=0.5)}
    old = {r["prompt"] for r in _old_selection_rows()}
    assert len(old) > 100 and old <= trained  # the emulation is the real thing: those rows are training rows
    report_words = {w for t, ws in synthetic.REPORT_TOPICS.items() for w in (t,) + ws}
    trained_words = {w for p in trained for turn in _user_turns(p) for w in re.findall(r"[a-z']+", turn.lower())}
    assert not report_words & trained_words  # no training (or old selection) question names a reporting topic
    untrained = [re.escape(t).replace(r"\{t\}", "[a-z]+") for t in synthetic.UNSEEN_PROMPTS + synthetic.UNSEEN_FOLLOW_UPS]
    untrained_re = re.compile("|".join(f"(?:{u})" for u in untrained))
    assert not any(untrained_re.fullmatch(turn) for p in trained for turn in _user_turns(p))
    for seed in seeds:
        heldout = synthetic.make_report_rows("heldout", 256, seed=seed, noise=0.5)
        unseen = synthetic.make_report_rows("unseen", 256, seed=seed, noise=0.5)
        for part in (heldout, unseen):
            prompts = {r["prompt"] for r in part}
            assert len(prompts) > 60 and not prompts & trained and not prompts & old
        for r in heldout:  # every question is about a topic no stage trains on, asked in a trained template
            turns = _user_turns(r["prompt"])
            assert all(synthetic.topic_of([{"role": "user", "content": t}]) in synthetic.REPORT_TOPICS for t in turns)
        for r in unseen:  # every user turn uses an untrained template, about a trained topic
            turns = _user_turns(r["prompt"])
            assert all(untrained_re.fullmatch(t) for t in turns), turns
            assert synthetic.topic_of([{"role": "user", "content": turns[-1]}]) in synthetic.TOPICS
        assert any(len(_user_turns(r["prompt"])) == 2 for r in unseen)  # multi-turn rows too
        assert not {r["prompt"] for r in heldout} & {r["prompt"] for r in unseen}


def test_report_rows_splits_of_the_main_job():
    from starling_jax.config import DataConfig
    from starling_jax.data import pipelines, synthetic
    cfg = DataConfig(synthetic_prompts=600, synthetic_noise=0.5, heldout_fraction=0.0, tuning_fraction=0.1,
                     report_rows=64)
    s = pipelines.load_splits(cfg)
    assert len(s.train) + len(s.tuning) == 600 and len(s.heldout) == len(s.unseen) == 64
    assert not _prompts(s.tuning) & _prompts(s.train)
    trained = _prompts(s.train) | _prompts(s.tuning)
    assert not _prompts(s.heldout) & trained and not _prompts(s.unseen) & trained
    # the reporting rows are those of make_report_rows (row i depends on (seed, split, i) only)
    want = synthetic.make_report_rows("heldout", 64, seed=0, noise=0.5)
    assert [synthetic.nectar_prompt(r["messages"]) for r in s.heldout] == [r["prompt"] for r in want]
    with pytest.raises(ValueError, match="reporting split must be one of"):
        synthetic.make_report_rows("train", 4)


def test_make_rows_is_unchanged_by_the_reporting_splits():
    """The training rows do not draw on the reporting lexicon: no training row's question or answer names a
    reporting topic or one of its words (so adding the reporting topics changed no training row or its utility)."""
    from starling_jax.data import synthetic
    report_words = {w for t, ws in synthetic.REPORT_TOPICS.items() for w in (t,) + ws}
    for r in synthetic.make_rows(300, seed=3, noise=0.5):
        text = " ".join([r["prompt"]] + [a["answer"] for a in r["answers"]]).lower()
        assert not set(re.findall(r"[a-z']+", text)) & report_words
