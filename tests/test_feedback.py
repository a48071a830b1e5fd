"""AI-feedback ranking: judges (programmatic scores, an LLM judge behind a shuffled K-wise prompt), robust parsing,
self-agreement under two shuffles, and Nectar rows that the rm stage's readers and pipelines take unchanged."""

import random
import re

import numpy as np
import pytest

from starling_jax.generation import feedback
from starling_jax.data import load_tokenizer, nectar, pipelines


def test_rank_by_scores_higher_is_better_ties_share_a_rank():
    assert feedback.rank_by_scores([1, 3, 3, 0]) == [3, 1, 1, 4]
    assert feedback.rank_by_scores([0.5, 0.1, 0.9]) == [2, 3, 1]


@pytest.mark.parametrize("reply,k,want", [
    ("[[C]] > [[A]] > [[B]]", 3, [2, 0, 1]),
    ("After thought: [[B]]>[[A]]", 2, [1, 0]),
    ("C > A > B", 3, [2, 0, 1]),
    ("Ranking: B, C, A\nbecause B is concise", 3, [1, 2, 0]),
    ("[[A]] > [[A]] > [[B]]", 3, None),          # repeated label
    ("[[A]] > [[B]]", 3, None),                  # incomplete
    ("They are all good.", 3, None),             # no ranking
    ("[[A]] > [[B]] > [[D]]", 3, None),          # unknown label
])
def test_parse_ranking_accepts_only_complete_permutations(reply, k, want):
    assert feedback.parse_ranking(reply, k) == want


def _oracle_judge(prompt):
    """Reads the shuffled answers from the prompt and ranks them by the number each one states (higher is better)."""
    shown = re.findall(r"\[Response ([A-Z])\]\n(.*?)\n\[End of Response", prompt, re.S)
    best_first = sorted(shown, key=lambda x: -int(x[1].split()[-1]))
    return "Here is my ranking: " + " > ".join(f"[[{name}]]" for name, _ in best_first)


def test_llm_rank_undoes_the_shuffle_and_self_agreement():
    msgs = [{"role": "user", "content": "Give a big number."}]
    answers = [f"My number is {v}" for v in (5, 90, 17, 3, 41, 8, 60)]
    want = feedback.rank_by_scores([5, 90, 17, 3, 41, 8, 60])
    for seed in range(5):
        assert feedback.llm_rank(_oracle_judge, msgs, answers, random.Random(seed)) == want
    oracle = feedback.self_agreement(lambda i, rng: feedback.llm_rank(_oracle_judge, msgs, answers, rng), 20)
    assert oracle["identical_ranking"] == 1.0 and oracle["pair_agreement"] == 1.0 and oracle["unparseable"] == 0
    # A judge that always prefers the first shown answer (position bias) disagrees with itself across shuffles.
    biased = feedback.self_agreement(
        lambda i, rng: feedback.llm_rank(lambda p: " > ".join(f"[[{c}]]" for c in "ABCDEFG"), msgs, answers, rng), 20)
    assert biased["identical_ranking"] < 0.2 and biased["pair_agreement"] < 0.8
    broken = feedback.self_agreement(lambda i, rng: feedback.llm_rank(lambda p: "no idea", msgs, answers, rng), 4)
    assert broken["unparseable"] == 8 and broken["ranked_twice"] == 0


def test_feedback_rows_round_trip_into_the_rm_pipeline(tmp_path):
    rows, want = [], []
    for q in range(3):
        msgs = [{"role": "user", "content": f"What is {q} + {q}?"}]
        answers = [f"Answer: {v}" for v in (2 * q, 2 * q + 1, 7)]
        scores = [1.0 if a == f"Answer: {2 * q}" else 0.0 for a in answers]
        ranks = feedback.rank_by_scores(scores)
        rows.append(feedback.nectar_row(msgs, answers, ["policy@t0.7"] * 3, ranks))
        want.append((msgs, answers, ranks))
    path = tmp_path / "feedback.jsonl"
    feedback.write_rows(str(path), rows)
    parsed, report = nectar.read_rows(str(path))
    assert len(parsed) == 3
    for p, (msgs, answers, ranks) in zip(parsed, want):
        assert p["messages"] == msgs and p["responses"] == answers and p["raw_ranks"] == [float(r) for r in ranks]
        assert p["ranks"][0] == 1  # the correct answer is best; the tie between the wrong ones is broken by order
    batch = next(iter(pipelines.make_dataset("rm", parsed, load_tokenizer("openchat-3.5"), 3, max_length=64,
                                             max_prompt_length=32, max_responses=3, shuffle=False, num_epochs=1)))
    assert np.asarray(batch["ranks"]).shape == (3, 3) and (np.asarray(batch["ranks"])[:, 0] == 1).all()


def test_load_function_and_bad_specs():
    assert feedback.load_function("starling_jax.generation.feedback:rank_by_scores") is feedback.rank_by_scores
    for bad in ("nocolon", "starling_jax.generation.feedback:missing", "no_such_module_x:f"):
        with pytest.raises(ValueError, match="judge"):
            feedback.load_function(bad)


def test_sample_k_and_build_rows_with_a_tiny_policy(tmp_path):
    import jax

    from starling_jax import models
    tok = load_tokenizer("openchat-3.5")
    config = models.get_preset("tiny")
    params = models.init_params(config, jax.random.key(0))
    convs = [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Count to three."}]]
    samples = feedback.sample_k(params, config, tok, "auto", convs, 3, jax.random.key(1), max_new_tokens=6,
                                temperature=1.0, batch_size=4, length_bucket=16)
    assert [len(s) for s in samples] == [3, 3] and all(isinstance(a, str) for s in samples for a in s)
    samples = [[a or "(empty)" for a in s] for s in samples]
    rows, stats = feedback.build_rows(convs, samples, lambda m, a: len(a), model="tiny@t1.0")
    assert stats["rows"] == 2 and stats["skipped_empty_answer"] == 0
    parsed, _ = nectar.parse_rows(rows)
    for p, s in zip(parsed, samples):
        best = p["responses"][p["ranks"].index(1)]
        assert len(best) == max(len(a) for a in s)
    _, stats = feedback.build_rows(convs, [["", "x", "y"], ["a", "a", "a"]], lambda m, a: len(a))
    assert stats == {"rows": 1, "skipped_empty_answer": 1, "rows_without_signal": 1, "mean_score": 1.0}


def test_sample_k_shares_each_prompts_prefill_and_samples_as_before():
    """K = 3 samples of 3 prompts in batches of 4 rows (a batch spans 2 or 3 prompts, the last one padded): each
    batch prefills its distinct prompts once; the replies equal those of prefilling every row (the loop below: the
    former sample_k), for the same key."""
    import jax

    from starling_jax import models
    from starling_jax.generation import sampling
    tok = load_tokenizer("openchat-3.5")
    config = models.get_preset("tiny")
    params = models.init_params(config, jax.random.key(0))
    convs = [[{"role": "user", "content": c}] for c in ("Say hi.", "Count to three, slowly.", "Name a colour.")]
    key, k, batch = jax.random.key(1), 3, 4
    got = feedback.sample_k(params, config, tok, "auto", convs, k, key, max_new_tokens=6, temperature=1.0,
                            batch_size=batch, length_bucket=16)
    t = tok.template("auto")
    flat = [tok.encode_chat(list(c), template=t) for c in convs for _ in range(k)]
    want = []
    for start in range(0, len(flat), batch):
        rows = flat[start:start + batch]
        rows = rows + [rows[-1]] * (batch - len(rows))
        tokens, mask = sampling.left_pad(rows, tok.pad_id, 16)
        out, out_mask, _ = sampling.generate(params, config, tokens, mask, jax.random.fold_in(key, start), 6,
                                             temperature=1.0, stop_ids=tok.stop_ids(t))
        decoded, _ = sampling.apply_stop_strings(tok, np.asarray(out), np.asarray(out_mask), t.stop_strings)
        want += [s.strip() for s in decoded]
    assert got == [want[i * k:(i + 1) * k] for i in range(len(convs))]
