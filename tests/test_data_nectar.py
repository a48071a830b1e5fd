"""Nectar parsing, validation errors, the skip report, the tie policy, local files and the tfds builder."""

import json
import os

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
    (lambda r: r.update(utilities=[1.0, "high", 0.0]), "bad_utilities", "field utilities[1]: expected a finite"),
    (lambda r: r.update(utilities=[1.0, 2.0]), "bad_utilities", "field utilities: expected a list of 3 numbers"),
    (lambda r: r.update(utilities=[1.0, float("nan"), 0.0]), "bad_utilities", "field utilities[1]"),
    (lambda r: r.update(utilities="1,2,3"), "bad_utilities", "field utilities: expected a list"),
    (lambda r: r.update(turns="n/a"), "bad_metadata", "field turns: expected a whole number >= 1, got 'n/a'"),
    (lambda r: r.update(turns=1.5), "bad_metadata", "field turns"),
    (lambda r: r.update(num_responses="seven"), "bad_metadata", "field num_responses"),
    (lambda r: r.update(num_responses=True), "bad_metadata", "field num_responses"),
    (lambda r: r.update(source=3), "bad_metadata", "field source: expected a string or a list of strings"),
    (lambda r: r.update(good_natured="false"), "bad_metadata", "field good_natured: expected true or false"),
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


def _jsonl(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def test_skip_mode_skips_and_counts_undecodable_lines(tmp_path):
    """A truncated line and a non-UTF-8 line are bad rows like any other: skip mode drops and counts them (with the
    file and line), the rest of the file is kept; error mode names the file and line."""
    good = [row(prompt=f"\n\nHuman: q{i}\n\nAssistant: ") for i in range(4)]
    lines = _jsonl(good).splitlines(keepends=True)
    lines[1] = lines[1][:30] + b"\n"  # truncated mid-object
    lines[2] = lines[2].replace(b"q2", b"caf\xe9")  # latin-1 byte
    data = b"".join(lines) + _jsonl(good[:1])[:-1][:25]  # and a last line cut without its newline
    (tmp_path / "n.jsonl").write_bytes(data)
    kept, report = read_rows(str(tmp_path / "n.jsonl"), on_bad_row="skip")
    assert [r["messages"][0]["content"] for r in kept] == ["q0", "q3"]
    assert report.skipped == {"bad_json": 2, "not_utf8": 1}
    assert report.rows_read == 5 and report.rows_kept == 2
    assert any("n.jsonl: line 2: not valid JSON" in m for m in report.skipped_examples)
    assert any("n.jsonl: line 3: not UTF-8 text" in m for m in report.skipped_examples)
    assert "skipped 3 (bad_json: 2, not_utf8: 1)" in report.summary()
    with pytest.raises(NectarError, match=r"n\.jsonl: line 2: not valid JSON .*on_bad_row='skip'"):
        read_rows(str(tmp_path / "n.jsonl"))


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.jsonl.gz", "bom.json"])
def test_a_utf8_byte_order_mark_is_read_like_utf_8_sig(tmp_path, name):
    """A file saved with a UTF-8 BOM (Windows editors, some exporters) gives the same rows as without one, in both
    modes: the rows Python's "utf-8-sig" decoding gives; a BOM later in the file is still a bad line."""
    import gzip
    rows = [row(prompt=f"\n\nHuman: q{i} café\n\nAssistant: ") for i in range(3)]
    text = json.dumps(rows) if name.endswith(".json") else _jsonl(rows).decode()
    data = ("\ufeff" + text).encode("utf-8")
    assert data.startswith(b"\xef\xbb\xbf")
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    expected = [json.loads(line) for line in data.decode("utf-8-sig").splitlines()] if "jsonl" in name else \
        json.loads(data.decode("utf-8-sig"))
    for mode in ("error", "skip"):
        kept, report = read_rows(str(tmp_path / name), on_bad_row=mode)
        assert [r["messages"][0]["content"] for r in kept] == [f"q{i} café" for i in range(3)]
        assert report.rows_read == report.rows_kept == len(expected) == 3 and not report.skipped
    if name == "bom.jsonl":
        (tmp_path / name).write_bytes(data + "\ufeff".encode() + _jsonl(rows[:1]))
        with pytest.raises(NectarError, match=r"bom\.jsonl: line 4: not valid JSON"):
            read_rows(str(tmp_path / name))


@pytest.mark.parametrize("name, content, message", [
    ("zero.json", b"", r"zero\.json: empty file"),
    ("cut.json", b'[{"prompt": ', r"cut\.json: invalid JSON at line 1"),
    ("latin.json", b'[{"prompt": "caf\xe9"}]', r"latin\.json: not UTF-8 text"),
    ("obj.json", b'{"prompt": "x"}', r"obj\.json: a \.json Nectar file must hold a list of rows"),
    ("bad.parquet", b"PAR1 garbage PAR1", r"bad\.parquet: unreadable Parquet file"),
    ("bad.jsonl.gz", b"\x1f\x8b\x08\x00 not gzip", r"bad\.jsonl\.gz: damaged compressed file"),
    ("notgz.json.gz", b"plain text", r"notgz\.json\.gz: damaged compressed file"),
])
def test_an_undecodable_file_is_named_in_both_modes(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    for mode in ("error", "skip"):
        with pytest.raises(NectarError, match=message):
            read_rows(str(tmp_path / name), on_bad_row=mode)


def test_truncated_gzip_names_the_file_and_line(tmp_path):
    import gzip
    data = gzip.compress(_jsonl([row()] * 50))
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(NectarError, match=r"t\.jsonl\.gz: damaged compressed file after line \d+"):
        read_rows(str(tmp_path / "t.jsonl.gz"), on_bad_row="skip")


def test_directory_reads_gzip_and_case_variants_and_lists_ignored_files(tmp_path):
    import gzip
    (tmp_path / "a.jsonl").write_bytes(_jsonl([row()]))
    (tmp_path / "B.JSONL").write_bytes(_jsonl([row(), row()]))
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl([row()] * 3)))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.Json").write_text(json.dumps([row()] * 4))
    (tmp_path / "README.md").write_text("Nectar")
    (tmp_path / "e.jsonl.bz2").write_bytes(b"BZh9")
    kept, report = read_rows(str(tmp_path))
    assert len(kept) == 1 + 2 + 3 + 4 and report.rows_read == 10
    assert sorted(os.path.basename(f) for f in report.files_read) == ["B.JSONL", "a.jsonl", "c.jsonl.gz", "d.Json"]
    assert report.files_ignored == ["README.md", "e.jsonl.bz2"]
    assert "2 file(s) in the data directory ignored" in report.summary() and "e.jsonl.bz2" in report.summary()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NectarError, match=r"notes\.txt: not a Nectar data file"):
        read_rows(str(tmp_path / "notes.txt"))


def test_tfds_builder_honours_on_bad_row(tmp_path):
    """Rows whose metadata the builder cannot store (turns='n/a', num_responses='seven') are bad rows: skipped and
    counted with skip, named with error; the built dataset holds exactly the good rows."""
    from starling_jax.data import tfds_nectar
    rows = [row(prompt=f"\n\nHuman: q{i}\n\nAssistant: ") for i in range(5)]
    rows[1]["turns"] = "n/a"
    rows[3]["num_responses"] = "seven"
    (tmp_path / "m.jsonl").write_bytes(_jsonl(rows))
    with pytest.raises(NectarError, match=r"m\.jsonl: row 1 .*field turns"):
        tfds_nectar.build(str(tmp_path / "m.jsonl"), str(tmp_path / "tfds_error"), on_bad_row="error")
    (tmp_path / "n.jsonl").write_bytes(_jsonl(rows) + b"{truncated\n")
    path, report = tfds_nectar.build(str(tmp_path / "n.jsonl"), str(tmp_path / "tfds"), on_bad_row="skip")
    assert report.skipped == {"bad_metadata": 2, "bad_json": 1} and report.rows_kept == 3 and report.rows_read == 6
    stored = tfds_nectar.read_raw_rows(str(tmp_path / "tfds"))
    assert [parse_prompt(r["prompt"])[0]["content"] for r in stored] == ["q0", "q2", "q4"]


def _mutations(rng):
    """Random damage to a raw row or its JSON line (the Nectar fuzz cases)."""
    def drop_field(r):
        r.pop(rng.choice(sorted(r)), None)

    def retype_field(r):
        r[rng.choice(sorted(r))] = rng.choice([None, 3, "x", [], {}, 1.5, True, [1, "a"], float("inf")])

    def damage_answer(r):
        if isinstance(r.get("answers"), list) and r["answers"]:
            a = r["answers"][rng.randrange(len(r["answers"]))]
            if isinstance(a, dict):
                a[rng.choice(["answer", "rank", "model"])] = rng.choice([None, "", -1, "1", 0.0, [], float("nan")])

    def damage_utilities(r):
        r["utilities"] = rng.choice([None, "1,2", [1.0], ["a", 2.0, 3.0], [1.0, 2.0, float("nan")]])

    def damage_prompt(r):
        p = r.get("prompt") if isinstance(r.get("prompt"), str) else ""
        cut = rng.randrange(len(p) + 1)
        r["prompt"] = rng.choice([p[:cut], p[cut:], p.replace("Human", "Humn"), p + "\n\nHuman: more"])
    return [drop_field, retype_field, damage_answer, damage_utilities, damage_prompt]


def test_nectar_fuzz(tmp_path):
    """Randomly damaged rows and lines: skip mode never raises and accounts for every line (kept + skipped =
    read); error mode raises only NectarError, naming the file; every kept row is a valid parsed row."""
    import random
    py = random.Random(0)
    mutations = _mutations(py)
    for trial in range(40):
        rows = [row(prompt=f"\n\nHuman: q{i}\n\nAssistant: ", ranks=(1.0, 2.0, 3.0), utilities=[3.0, 2.0, 1.0])
                for i in range(6)]
        for r in rows:
            for m in mutations:
                if py.random() < 0.15:
                    m(r)
        lines = []
        for r in rows:
            try:
                line = json.dumps(r).encode()
            except ValueError:
                line = b"{}"
            u = py.random()
            if u < 0.1:
                line = line[: py.randrange(len(line) + 1)]
            elif u < 0.15:
                line = line[:5] + bytes([0xff, 0xfe]) + line[5:]
            elif u < 0.2:
                line = bytes(b ^ 0x20 if py.random() < 0.01 else b for b in line)
            lines.append(line)
        path = tmp_path / f"f{trial}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        kept, report = read_rows(str(path), on_bad_row="skip")
        nonblank = sum(1 for line in lines if line.strip())
        assert report.rows_read == nonblank and report.rows_kept == len(kept)
        assert report.rows_kept + sum(report.skipped.values()) == report.rows_read
        for k in kept:
            assert k["messages"] and len(k["responses"]) == len(k["ranks"]) >= 2
            assert sorted(k["ranks"]) == list(range(1, len(k["ranks"]) + 1))
            assert all(isinstance(u, float) and np.isfinite(u) for u in k.get("utilities", []))
        try:
            read_rows(str(path))
        except NectarError as e:
            assert f"f{trial}.jsonl" in str(e)


def test_skipped_rows_and_ignored_files_are_said_when_the_data_loads(tmp_path):
    """A run with skipped rows or ignored files says so when it loads its data (a warning), not only in the summary."""
    import logging
    from starling_jax.config import DataConfig
    from starling_jax.data import pipelines
    rows = [row(prompt=f"\n\nHuman: q{i}\n\nAssistant: ") for i in range(8)]
    rows[2]["utilities"] = ["x", 1.0, 2.0]
    (tmp_path / "a.jsonl").write_bytes(_jsonl(rows) + b"{cut\n")
    (tmp_path / "notes.txt").write_text("x")
    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    logger = logging.getLogger("starling_jax.data.pipelines")
    handler = Keep(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        splits = pipelines.load_splits(DataConfig(source=str(tmp_path), on_bad_row="skip", heldout_fraction=0.25))
    finally:
        logger.removeHandler(handler)
    assert len(splits.train) + len(splits.heldout) == 7
    assert len(messages) == 1 and "skipped 2 (bad_json: 1, bad_utilities: 1)" in messages[0]
    assert "notes.txt" in messages[0] and "a.jsonl: line 9: not valid JSON" in messages[0]
