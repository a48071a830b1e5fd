"""grain pipelines: batch shapes and masks against the tokenizer's own encoding, truncation, sharding, resume."""

import numpy as np
import pytest

from starling_jax.data import DataReport, load_tokenizer, make_dataset, parse_rows, synthetic

T, P = 96, 64


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("openchat-3.5")


@pytest.fixture(scope="module")
def rows():
    parsed, _ = parse_rows(synthetic.make_rows(24, seed=5))
    return parsed


def take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def full_encoding(tok, r, j, loss_all_turns=True):
    return tok.encode_chat(r["messages"] + [{"role": "assistant", "content": r["responses"][j]}],
                           add_generation_prompt=False, return_loss_mask=True)


def test_sft_padded_batches(tok, rows):
    ds = make_dataset("sft", rows, tok, 4, max_length=T, max_prompt_length=P, shuffle=False, num_epochs=1)
    batches = take(ds, 6)
    for b_index, b in enumerate(batches):
        assert b["tokens"].shape == (4, T) and b["tokens"].dtype == np.int32
        assert b["attention_mask"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
        for i in range(4):
            r = rows[4 * b_index + i]
            ids, mask = full_encoding(tok, r, int(np.argmin(r["ranks"])))  # SFT trains on the best answer
            n = len(ids)
            assert b["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
            assert b["tokens"][i, :n].tolist() == ids and (b["tokens"][i, n:] == tok.pad_id).all()
            assert b["loss_mask"][i, :n].tolist() == mask and not b["loss_mask"][i, n:].any()
    # Multi-turn rows train on the earlier assistant turn too.
    multi = [k for k, r in enumerate(rows) if len(r["messages"]) == 3]
    assert multi
    k = multi[0]
    mask = batches[k // 4]["loss_mask"][k % 4]
    assert np.count_nonzero(np.diff(np.concatenate([[0], mask])) == 1) == 2  # two runs of trained tokens


def test_sft_packed_batches(tok, rows):
    ds = make_dataset("sft", rows, tok, 2, max_length=T, max_prompt_length=P, pack=True, shuffle=False,
                      num_epochs=1)
    examples = {tuple(full_encoding(tok, r, int(np.argmin(r["ranks"])))[0]): full_encoding(
        tok, r, int(np.argmin(r["ranks"])))[1] for r in rows}
    seen = 0
    for b in take(ds, 3):
        assert b["tokens"].shape == b["attention_mask"].shape == b["loss_mask"].shape == (2, T)
        for i in range(2):
            seg = b["attention_mask"][i]
            ids = sorted(set(seg.tolist()) - {0})
            assert ids == list(range(1, len(ids) + 1))
            assert (b["tokens"][i][seg == 0] == tok.pad_id).all() and not b["loss_mask"][i][seg == 0].any()
            for s in ids:
                where = seg == s
                key = tuple(b["tokens"][i][where].tolist())
                assert key in examples and b["loss_mask"][i][where].tolist() == examples[key]
                seen += 1
    assert seen > 6  # short examples do share rows


def test_rm_groups(tok, rows):
    ragged = [dict(r) for r in rows[:4]]
    ragged[1] = {**ragged[1], "responses": ragged[1]["responses"][:3], "ranks": [3, 1, 2], "raw_ranks": [3.0, 1.0, 2.0]}
    ragged[2] = {**ragged[2], "responses": ragged[2]["responses"][:4], "ranks": [3, 1, 2, 4],
                 "raw_ranks": [2.0, 1.0, 2.0, 5.0]}  # a tie, as a task's checker gives
    report = DataReport()
    ds = make_dataset("rm", ragged, tok, 2, max_length=T, max_prompt_length=P, max_responses=5, shuffle=False,
                      num_epochs=1, report=report)
    b0, b1 = take(ds, 2)
    assert b0["tokens"].shape == b0["attention_mask"].shape == (2, 5, T)
    assert b0["ranks"].shape == b0["response_mask"].shape == (2, 5)
    # Row 1: 3 answers, ranks as given, padded slots masked and ranked after the real ones.
    assert b0["response_mask"][1].tolist() == [1, 1, 1, 0, 0] and b0["ranks"][1].tolist() == [3, 1, 2, 4, 5]
    assert not b0["attention_mask"][1, 3:].any()
    # Row 2: tied raw ranks stay tied (dense levels 1..3; objectives.reward says how each loss reads a tie).
    assert b1["ranks"][0].tolist() == [2, 1, 2, 3, 4] and b1["response_mask"][0].tolist() == [1, 1, 1, 1, 0]
    # Row 0: 7 answers, 5 kept (seeded subset), re-ranked 1..5 in the original order.
    kept_ranks = b0["ranks"][0]
    assert sorted(kept_ranks.tolist()) == [1, 2, 3, 4, 5] and b0["response_mask"][0].all()
    assert report.answers_dropped == 2 * 2  # rows 0 and 3: 7 answers, 5 kept
    for slot in range(5):
        n = int(b0["attention_mask"][0, slot].sum())
        text = tok.decode(b0["tokens"][0, slot, :n].tolist())
        j = [k for k, r in enumerate(rows[0]["responses"]) if text.endswith(r)]
        assert len(j) == 1
        assert full_encoding(tok, rows[0], j[0])[0] == b0["tokens"][0, slot, :n].tolist()
    order = np.argsort(kept_ranks)
    texts = [tok.decode(b0["tokens"][0, s, :int(b0["attention_mask"][0, s].sum())].tolist()) for s in order]
    orig = [rows[0]["ranks"][[k for k, r in enumerate(rows[0]["responses"]) if t.endswith(r)][0]] for t in texts]
    assert orig == sorted(orig)  # the kept ranks keep the original order


@pytest.mark.parametrize("pairs, per_row", [("best_vs_rest", 6), ("all", 21)])
def test_dpo_pairs(tok, rows, pairs, per_row):
    ds = make_dataset("dpo", rows[:4], tok, 3, max_length=T, max_prompt_length=P, pairs=pairs, shuffle=False,
                      num_epochs=1, drop_remainder=False)
    batches = list(ds)
    assert sum(len(b["chosen_tokens"]) for b in batches) == 4 * per_row
    b = batches[0]
    for k in ("chosen", "rejected"):
        assert b[f"{k}_tokens"].shape == b[f"{k}_attention_mask"].shape == b[f"{k}_loss_mask"].shape == (3, T)
    r = rows[0]
    best = int(np.argmin(r["ranks"]))
    assert b["chosen_tokens"][0, :b["chosen_attention_mask"][0].sum()].tolist() == full_encoding(tok, r, best)[0]
    rejected_text = tok.decode(b["rejected_tokens"][0, :b["rejected_attention_mask"][0].sum()].tolist())
    worse = [j for j, t in enumerate(r["responses"]) if rejected_text.endswith(t)][0]
    assert r["ranks"][worse] > r["ranks"][best]
    # Only the final response (and its <|end_of_turn|>) is in the loss.
    trained = b["chosen_tokens"][0][b["chosen_loss_mask"][0] > 0].tolist()
    assert tok.decode(trained, skip_special=False) == r["responses"][best] + "<|end_of_turn|>"


def test_rl_prompts_left_padded(tok, rows):
    ds = make_dataset("rl", rows, tok, 4, max_prompt_length=P, seed=3)
    b = take(ds, 1)[0]
    assert b["prompt_tokens"].shape == b["prompt_mask"].shape == (4, P) and b["prompt_id"].shape == (4,)
    for i in range(4):
        ids = tok.encode_chat(rows[b["prompt_id"][i]]["messages"])
        assert b["prompt_mask"][i].tolist() == [0] * (P - len(ids)) + [1] * len(ids)
        assert b["prompt_tokens"][i, P - len(ids):].tolist() == ids
        assert (b["prompt_tokens"][i, :P - len(ids)] == tok.pad_id).all()


def test_truncation_is_explicit_and_counted(tok):
    long_prompt = " ".join(f"word{k}" for k in range(80))
    raw = [{"prompt": f"\n\nHuman: {long_prompt} END\n\nAssistant: ",
            "answers": [{"answer": "Short reply.", "rank": 1}, {"answer": "x " * 200, "rank": 2}]}]
    parsed, _ = parse_rows(raw)
    report = DataReport()
    b = take(make_dataset("rm", parsed, tok, 1, max_length=T, max_prompt_length=P, shuffle=False, report=report),
             1)[0]
    assert report.prompts_truncated == 2 and report.responses_truncated == 1
    short = b["tokens"][0, 0][b["attention_mask"][0, 0] > 0].tolist()
    full = full_encoding(tok, parsed[0], 0)[0]
    reply = len(tok.encode_chat(parsed[0]["messages"] + [{"role": "assistant", "content": "Short reply."}],
                                add_generation_prompt=False)) - len(tok.encode_chat(parsed[0]["messages"]))
    assert len(short) == P + reply  # prompt cut to max_prompt_length, response whole
    assert short[0] == tok.bos_id and short[1:] == full[len(full) - (len(short) - 1):]  # BOS + the left-cut tail
    long = b["tokens"][0, 1]
    assert b["attention_mask"][0, 1].sum() == T and long[0] == tok.bos_id  # response cut, prompt kept >= T // 2
    rl_report = DataReport()
    rl = take(make_dataset("rl", parsed, tok, 1, max_prompt_length=P, report=rl_report), 1)[0]
    assert rl_report.prompts_truncated == 1 and rl["prompt_mask"].all() and rl["prompt_tokens"][0, 0] == tok.bos_id
    assert rl["prompt_tokens"][0, 1:].tolist() == tok.encode_chat(parsed[0]["messages"])[-(P - 1):]


def test_resume_is_exact_mid_epoch_and_across_epochs(tok, rows):
    for kind, kwargs in (("sft", {}), ("sft", {"pack": True}), ("rm", {}), ("rl", {})):
        ds = make_dataset(kind, rows, tok, 5, max_length=T, max_prompt_length=P, seed=11, **kwargs)
        it = iter(ds)
        for _ in range(3):  # 24 rows / 5 per batch: the next batches cross the epoch boundary
            next(it)
        state = it.get_state()
        want = [next(it) for _ in range(5)]
        it2 = iter(make_dataset(kind, rows, tok, 5, max_length=T, max_prompt_length=P, seed=11, **kwargs))
        it2.set_state(state)
        for a in want:
            b = next(it2)
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), kind


def test_seeds_epochs_and_shards(tok, rows):
    ids = lambda ds, n: np.concatenate([b["prompt_id"] for b in take(ds, n)]).tolist()
    a = ids(make_dataset("rl", rows, tok, 4, max_prompt_length=P, seed=1), 12)
    assert a == ids(make_dataset("rl", rows, tok, 4, max_prompt_length=P, seed=1), 12)
    assert a != ids(make_dataset("rl", rows, tok, 4, max_prompt_length=P, seed=2), 12)
    assert sorted(a[:24]) == sorted(a[24:]) == list(range(24)) and a[:24] != a[24:]  # each epoch reshuffled
    # process_rows: each process reads its positions of every global batch; the union is the one-process batch
    whole = [b["prompt_id"] for b in take(make_dataset("rl", rows, tok, 6, max_prompt_length=P, seed=1), 5)]
    for split in ([[0, 1, 2], [3, 4, 5]], [[0, 1], [2, 3], [4, 5]], [[0, 3], [1, 4], [2, 5]]):
        parts = [[b["prompt_id"] for b in take(make_dataset("rl", rows, tok, 6, max_prompt_length=P, seed=1,
                                                            process_rows=r), 5)] for r in split]
        for step, want in enumerate(whole):
            got = np.empty_like(want)
            for r, part in zip(split, parts):
                assert part[step].shape == (len(r),)
                got[r] = part[step]
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="process_rows must be increasing positions"):
        make_dataset("rl", rows, tok, 4, process_rows=[0, 4])
    with pytest.raises(ValueError, match="unknown pipeline kind 'ppo'"):
        make_dataset("ppo", rows, tok, 1)


# the keys whose zeros make a row weigh nothing in each kind's objective (data.formats.padding_example)
WEIGHT_MASKS = {"sft": ("loss_mask",), "rm": ("response_mask",), "dpo": ("chosen_loss_mask", "rejected_loss_mask")}


@pytest.mark.parametrize("kind, pack", [("sft", False), ("sft", True), ("rm", False), ("dpo", False)])
def test_pad_last_reads_every_example_in_whole_batches(tok, rows, kind, pack):
    """pad_last: one pass in batches of the full global shape; the real rows are those drop_remainder=False reads,
    then padding rows (copies of a real one) without weight; each process's rows are its share of the same batches."""
    kw = dict(max_length=T, max_prompt_length=P, max_responses=4, pack=pack, shuffle=False, num_epochs=1)
    few = rows[:7] if kind != "dpo" else rows[:3]  # 7 sft/rm examples, 3 * 3 = 9 dpo pairs (K = 4): not whole batches
    plain = list(make_dataset(kind, few, tok, 4, drop_remainder=False, **kw))
    padded = list(make_dataset(kind, few, tok, 4, pad_last=True, **kw))
    assert len(plain[-1][WEIGHT_MASKS[kind][0]]) < 4 and len(padded) == len(plain)
    for want, got in zip(plain, padded):
        n = len(want[WEIGHT_MASKS[kind][0]])
        for k in want:
            assert got[k].shape[0] == 4
            np.testing.assert_array_equal(got[k][:n], want[k])  # the real rows, unchanged
        for k in WEIGHT_MASKS[kind]:
            assert not got[k][n:].any()  # the padding rows weigh nothing ...
        if n < 4:  # ... and are real tokens (copies of a row), so a forward over them stays finite
            tokens = [k for k in got if k.endswith("tokens")]
            assert all((got[k][n:] != tok.pad_id).any(axis=-1).all() for k in tokens)
    for split in ([[0, 1], [2, 3]], [[0, 2], [1, 3]]):
        parts = [list(make_dataset(kind, few, tok, 4, pad_last=True, process_rows=r, **kw)) for r in split]
        for step, want in enumerate(padded):
            for r, part in zip(split, parts):
                for k in want:
                    np.testing.assert_array_equal(part[step][k], want[k][r])
    with pytest.raises(ValueError, match="needs num_epochs=1"):
        make_dataset(kind, few, tok, 4, pad_last=True, **{**kw, "num_epochs": None})


def test_dataset_for_uses_the_data_config(tok, rows):
    from starling_jax.config import DataConfig
    from starling_jax.data import dataset_for
    data = DataConfig(max_length=80, max_prompt_length=48, max_responses=4, pairs="all", shuffle_seed=3)
    rm = next(iter(dataset_for("rm", rows, tok, data, 2)))
    assert rm["tokens"].shape == (2, 4, 80) and rm["ranks"].shape == (2, 4)
    dpo = list(dataset_for("dpo", rows[:2], tok, data, 6, num_epochs=1, shuffle=False))
    assert sum(len(b["chosen_tokens"]) for b in dpo) == 2 * 21 and dpo[0]["chosen_tokens"].shape == (6, 80)
    rl = next(iter(dataset_for("rl", rows, tok, data, 3)))
    assert rl["prompt_tokens"].shape == (3, 48)
