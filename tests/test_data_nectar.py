"""Nectar parsing, validation errors, the skip report, the tie policy, local files and the tfds builder."""

import json

import numpy as np
import pytest

from starling_jax.data import DataReport, NectarError, parse_prompt, parse_rows, read_rows


def row(prompt="\n\nHuman: What is 2+2?\n\nAssistant: ", ranks=(1.0, 2.0, 3.0), **extra):
    return {"prompt": prompt,
            "answers": [{"answer": f"answer {k}", "model": f"m{k}", "rank": r} for k, r in enumerate(ranks)],
            "turns": 1, "num_responses": len(ranks), "source": ["test"], "good_natured": True, **extra}


def test_parse_multi_turn_prompt():
    p = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me\na joke.\n\nAssistant: "
    assert parse_prompt(p) == [{"role": "user", "content": "Hi there"},
                               {"role": "assistant", "content": "Hello! How can I help?"},
                               {"role": "user", "content": "Tell me\na joke."}]
    assert parse_prompt("Human: one\n\nAssistant:") == [{"role": "user", "content": "one"}]


@pytest.mark.parametrize("mutate, reason, field", [
    (lambda r: r.pop("prompt"), "missing_field", "field prompt"),
    (lambda r: r.update(prompt="What is 2+2?"), "bad_prompt", "field prompt: must start"),
    (lambda r: r.update(prompt="\n\nHuman: hi\n\nAssistant: ok"), "bad_prompt", "must end with"),
    (lambda r: r.update(prompt="\n\nHuman: hi\n\nHuman: again\n\nAssistant: "), "bad_prompt", "alternate"),
    (lambda r: r.update(prompt="\n\nHuman:  \n\nAssistant: "), "empty_text", "turn 0 (Human) is empty"),
    (lambda r: r.update(answers=r["answers"][:1]), "too_few_answers", "field answers: 1 answers"),
    (lambda r: r.update(answers="nope"), "bad_answers", "field answers: expected a list"),
    (lambda r: r["answers"][1].pop("answer"), "missing_field", "field answers[1].answer"),
    (lambda r: r["answers"][2].update(answer="   "), "empty_text", "field answers[2].answer: empty"),
    (lambda r: r["answers"][0].update(rank=float("nan")), "bad_rank", "field answers[0].rank"),
    (lambda r: r["answers"][1].update(rank="first"), "bad_rank", "field answers[1].rank"),
    (lambda r: r["answers"][1].update(rank=0), "bad_rank", "got 0"),
    (lambda r: r["answers"][1].update(answer="x" * 50), "too_long", "50 characters > max_chars 40"),
])
def test_every_validation_error_names_row_prefix_and_field(mutate, reason, field):
    rows = [row(), row(prompt="\n\nHuman: Second prompt here\n\nAssistant: ")]
    mutate(rows[1])
    with pytest.raises(NectarError) as e:
        parse_rows(rows, max_chars=40, source="shard-0.parquet")
    msg = str(e.value)
    assert "shard-0.parquet: row 1 (prompt " in msg and field in msg, msg
    if "prompt" in rows[1]:
        assert repr(rows[1]["prompt"][:40]) in msg
    kept, report = parse_rows(rows, on_bad_row="skip", max_chars=40)
    assert len(kept) == 1 and kept[0]["row"] == 0
    assert report.skipped == {reason: 1} and report.rows_read == 2 and report.rows_kept == 1
    assert report.skipped_examples[0].startswith("row 1 ")


def test_skip_report_counts_every_reason():
    rows = [row(), row(ranks=(1.0,)), row(ranks=(1.0,)), {"prompt": "x"}, "not a dict", row(ranks=(2.0, 1.0))]
    kept, report = parse_rows(rows, on_bad_row="skip")
    assert [r["row"] for r in kept] == [0, 5]
    assert report.skipped == {"too_few_answers": 2, "missing_field": 1, "not_a_record": 1}
    assert sum(report.skipped.values()) + report.rows_kept == report.rows_read == 6
    assert "skipped 4 (missing_field: 1, not_a_record: 1, too_few_answers: 2)" in report.summary()
    with pytest.raises(ValueError, match="on_bad_row must be"):
        parse_rows(rows, on_bad_row="ignore")


def test_tie_policy():
    tied = row(ranks=(2.0, 1.0, 2.0, 3.0))
    [parsed], report = parse_rows([tied])
    # K-wise: ties broken by answer order (answer 0 before answer 2), and counted.
    assert parsed["ranks"] == [2, 1, 3, 4] and parsed["raw_ranks"] == [2.0, 1.0, 2.0, 3.0]
    assert report.ties_broken == 1
    with pytest.raises(NectarError, match=r"tied ranks \[2.0\]"):
        parse_rows([tied], ties="reject")
    kept, report = parse_rows([tied, row()], ties="reject", on_bad_row="skip")
    assert len(kept) == 1 and report.skipped == {"tied_ranks": 1}
    # Pairwise: tied pairs are skipped and counted.
    from starling_jax.data import preference_pairs
    report = DataReport()
    pairs = preference_pairs(parsed, "all", report)
    assert (0, 2) not in pairs and (2, 0) not in pairs and len(pairs) == 5 and report.tied_pairs_skipped == 1
    assert preference_pairs(parsed, "best_vs_rest", DataReport()) == [(1, 0), (1, 2), (1, 3)]


def test_read_parquet_and_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [row(), row(prompt="\n\nHuman: Other\n\nAssistant: ", ranks=(2.0, 1.0))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n")
    parsed, report = read_rows(str(tmp_path))
    assert len(parsed) == 3 and report.rows_read == 3
    # Files in sorted path order: more.jsonl, then the parquet shard.
    assert parsed[2]["ranks"] == [2, 1] and parsed[2]["messages"] == [{"role": "user", "content": "Other"}]
    assert (parsed[1]["row"], parsed[2]["row"]) == (0, 1)
    assert parsed[0]["file"].endswith("more.jsonl") and parsed[2]["file"].endswith(".parquet")
    (tmp_path / "bad.jsonl").write_text(json.dumps(row()) + "\n{oops\n")
    with pytest.raises(NectarError, match="bad.jsonl: line 2: not valid JSON"):
        read_rows(str(tmp_path))
    (tmp_path / "bad.jsonl").write_text(json.dumps(row(ranks=(1.0,))) + "\n")
    with pytest.raises(NectarError, match=r"bad.jsonl: row 0 .*field answers"):
        read_rows(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_rows(str(tmp_path / "nowhere"))


def test_tfds_builder_round_trip_into_grain(tmp_path):
    import grain
    from starling_jax.config import DataConfig
    from starling_jax.data import load_rows, make_dataset, load_tokenizer
    from starling_jax.data import synthetic, tfds_nectar
    raw = synthetic.make_rows(12, seed=3)
    raw[4]["answers"] = raw[4]["answers"][:1]  # a bad row: skipped and counted at build time
    path, report = tfds_nectar.build(raw, str(tmp_path / "tfds"), on_bad_row="skip")
    assert report.skipped == {"too_few_answers": 1} and report.rows_kept == 11
    source = tfds_nectar.data_source(str(tmp_path / "tfds"))
    assert type(source).__name__ == "ArrayRecordDataSource" and len(source) == 11
    ds = tfds_nectar.grain_source(str(tmp_path / "tfds"))
    assert isinstance(ds, grain.MapDataset)
    want = [r for i, r in enumerate(raw) if i != 4]
    got = [ds[i] for i in range(len(ds))]
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "utilities"} == {k: v for k, v in w.items() if k != "utilities"}
        np.testing.assert_allclose(g["utilities"], w["utilities"], rtol=1e-6)  # stored as float32
    train, heldout, report = load_rows(DataConfig(source=str(tmp_path / "tfds"), heldout_fraction=0.25))
    assert len(train) + len(heldout) == 11 and len(heldout) == 3
    batch = next(iter(make_dataset("rm", train, load_tokenizer("openchat-3.5"), 2, max_length=40)))
    assert batch["tokens"].shape == (2, 7, 40)
    with pytest.raises(NectarError, match="row 4"):
        tfds_nectar.build(raw, str(tmp_path / "tfds2"), on_bad_row="error")


def test_load_rows_synthetic_split_is_deterministic():
    from starling_jax.config import DataConfig
    from starling_jax.data import load_rows
    cfg = DataConfig(synthetic_prompts=50, heldout_fraction=0.2)
    train, heldout, report = load_rows(cfg)
    assert (len(train), len(heldout), report.train_rows, report.heldout_rows) == (40, 10, 40, 10)
    train2, heldout2, _ = load_rows(DataConfig(synthetic_prompts=50, heldout_fraction=0.2, shuffle_seed=7))
    assert [r["row"] for r in heldout] == [r["row"] for r in heldout2]  # same held-out rows for every stage
    assert not {r["row"] for r in train} & {r["row"] for r in heldout}


def test_parse_prompt_raises_a_value_error():
    with pytest.raises(ValueError, match="must start with"):
        parse_prompt("no turns here")
    with pytest.raises(NectarError, match="must end with"):
        parse_prompt("\n\nHuman: hi\n\nAssistant: done")


def test_load_rows_from_jsonl_path_with_skips(tmp_path):
    from starling_jax.config import DataConfig
    from starling_jax.data import load_rows, synthetic
    raw = synthetic.make_rows(10)
    raw[2]["answers"][0]["rank"] = None
    (tmp_path / "nectar.jsonl").write_text("\n".join(json.dumps(r) for r in raw) + "\n")
    with pytest.raises(NectarError, match=r"nectar.jsonl: row 2 .*answers\[0\].rank"):
        load_rows(DataConfig(source=str(tmp_path)))
    train, heldout, report = load_rows(DataConfig(source=str(tmp_path), on_bad_row="skip", heldout_fraction=0.2))
    assert (len(train), len(heldout)) == (7, 2) and report.skipped == {"bad_rank": 1}


def test_tfds_build_command(tmp_path, capsys):
    from starling_jax.data import synthetic, tfds_nectar
    raw = synthetic.make_rows(6)
    raw[5]["answers"] = []
    (tmp_path / "nectar.jsonl").write_text("\n".join(json.dumps(r) for r in raw) + "\n")
    tfds_nectar.main([str(tmp_path / "nectar.jsonl"), str(tmp_path / "tfds"), "--on-bad-row", "skip"])
    out = capsys.readouterr().out
    assert "kept 5, skipped 1 (too_few_answers: 1)" in out and "row 5 (prompt" in out
    assert len(tfds_nectar.data_source(str(tmp_path / "tfds"))) == 5
