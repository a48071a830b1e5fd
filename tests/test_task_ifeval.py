"""task:ifeval (data/instructions.py): the checker on hand-written replies for every constraint type, prompts that
parse back to what was drawn, reference replies that meet every constraint, and a held-out split that shares neither
an instruction nor a combination of constraint types with training or tuning, at every seed a study uses."""

import dataclasses
import json

import pytest

from starling_jax.config import DataConfig
from starling_jax.data import instructions as ifv
from starling_jax.data import pipelines, tasks


def _user(text):
    return [{"role": "user", "content": text}]


# (type, parameter, replies that meet it, replies that do not): written by hand, edge cases included
CASES = [
    ("max_words", 5, ["One two three four five.", "Don't stop: it's fine, ok?", "¡Hola! Ça va bien, merci 🙂",
                      "a-b c", ""],
     ["One two three four five six.", "e-mail me at six o'clock", "Ça va très très bien merci"]),
    ("min_words", 4, ["one two three four", "naïve café résumé déjà", "Don't won't can't shan't"],
     ["one two three", "don't won't can't", "1 2 3", "... !!! ??? 🙂🙂🙂🙂"]),
    ("sentences", 2, ["I like tea. You like coffee.", "Really?! Yes!", "Wait… what", "First one. second one",
                      "Dr. Who"],
     ["Just one sentence.", "One. Two. Three.", "No break.Here", "", "1.5 is a number."]),
    ("include", ("garden", "friday"), ["The garden opens on Friday.", "GARDEN! friday?", "(garden) [friday]"],
     ["The gardens open on Friday.", "garden only", "gardening on fridays"]),
    ("forbid", ("really", "just"), ["I mean it.", "Surreally adjusted.", "reallyjust"],
     ["I really mean it.", "Just do it.", "JUST", "it's really-good"]),
    ("bullets", 3, ["- a\n- b\n- c", "Intro:\n* one\n* two\n* three", "  - a\n  - b\n  - c\n\nThat is all."],
     ["- a\n- b", "- a\n- b\n- c\n- d", "-a\n-b\n-c", "a - b - c", "• a\n• b\n• c"]),
    ("json", ("title", "mood"), ['{"title": "x", "mood": "calm"}', '  {"mood": 1, "title": null, "extra": []}  ',
                                 '```json\n{"title": "x", "mood": "y"}\n```', '{"title": "é", "mood": "\\u00e9"}'],
     ['{"title": "x"}', '{"title": "x", "mood": "y"} Hope this helps!', 'Here it is: {"title": "x", "mood": "y"}',
      '[{"title": "x", "mood": "y"}]', '{"title": "x", "mood": "y",}', '"title mood"',
      '{"title": "x", "mood": "y"}{"a": 1}']),
    ("lowercase", None, ["all lower case, with 3 digits!", "ça va très bien", "über straße", "<<title>>\n- ok"],
     ["All lower case", "ÇA", "straSSe", "1234 !!", ""]),
    ("end_phrase", "Is there anything else I can help with?",
     ["Sure. Is there anything else I can help with?", "is there anything else i can help with?  \n",
      "Done!Is there anything else I can help with?"],
     ["Is there anything else I can help with", "Is there anything else I can help with? Bye.",
      "Is there anything else I can help with?!"]),
    ("no_commas", None, ["No commas here; none at all.", "Semi; colon: dash - fine.", ""],
     ["One, two.", "中文，逗号", "a,b"]),
    ("title", None, ["<<My Note>>\nHello.", "Text then <<a title>> here.", "<<Ünïcode titel>>"],
     ["<My Note>", "<<>>", "<<123>>", "<<two\nlines>>", "« title »"]),
]


def test_every_constraint_type_has_hand_written_cases():
    assert sorted(c[0] for c in CASES) == sorted(ifv.TYPES)


@pytest.mark.parametrize("kind,param,good,bad", CASES, ids=[c[0] for c in CASES])
def test_checker_on_hand_written_replies(kind, param, good, bad):
    for reply in good:
        met, _ = ifv.check(kind, param, reply)
        assert met, (kind, reply)
    for reply in bad:
        met, partial = ifv.check(kind, param, reply)
        assert not met, (kind, reply)
        assert 0.0 <= partial < 1.0, (kind, reply, partial)


def test_definitions_of_words_and_sentences():
    assert ifv.words("Don't e-mail me, ok? 🙂 Ça!") == ["Don't", "e", "mail", "me", "ok", "Ça"]
    assert ifv.sentences("  One... Two?! three") == ["One...", "Two?!", "three"]
    assert ifv.sentences("") == [] and ifv.sentences("...  !!") == []


def test_partial_credit_and_the_judge():
    assert ifv.check("max_words", 10, " ".join(["w"] * 20)) == (False, 0.5)
    assert ifv.check("min_words", 10, "a b c d e") == (False, 0.5)
    assert ifv.check("sentences", 4, "A. B.") == (False, 0.5)
    assert ifv.check("include", ("a", "b"), "a") == (False, 0.5)
    assert ifv.check("json", ("a", "b"), '{"a": 1}') == (False, 0.25)
    assert ifv.check("lowercase", None, "aB") == (False, 0.5)
    messages = _user('Say hi. Answer in at most 3 words. Include the words "garden" and "friday".')
    assert ifv.constraints_of(messages) == [("max_words", 3), ("include", ("garden", "friday"))]
    assert ifv.true_utility(messages, "garden friday") == 1.0 == ifv.all_met(messages, "garden friday")
    assert ifv.true_utility(messages, "garden") == 0.5 and ifv.all_met(messages, "garden") == 0.0
    assert ifv.judge(messages, "garden") == pytest.approx((1 + 0.5 * 0.5) / 2)
    assert ifv.judge(messages, "garden a b c d e") == pytest.approx((0.5 * 3 / 6 + 0.5 * 0.5) / 2)
    # a met constraint outweighs any partial credit: the ranking follows the true utility where it differs
    assert ifv.judge(messages, "garden friday x y z w") < ifv.judge(messages, "garden friday")
    with pytest.raises(ValueError, match="not an instruction-following prompt"):
        ifv.true_utility(_user("What is 2 + 2?"), "4")
    task = tasks.get("task:ifeval")
    assert task.true_utility is ifv.true_utility and task.judge is ifv.judge


@pytest.mark.parametrize("seed", [0, 1, 100])
def test_rows_parse_back_and_references_meet_every_constraint(seed):
    raw = ifv.make_rows(seed, n=300) + ifv.make_report_rows("heldout", 100, seed)
    sizes = set()
    for r in raw:
        text = r["prompt"][len("\n\nHuman: "):-len("\n\nAssistant:")]
        messages = _user(text)
        constraints = ifv.constraints_of(messages)
        sizes.add(len(constraints))
        assert text == " ".join([ifv.signature(messages)[0]] + [ifv.render(k, p) for k, p in constraints])
        answers = [a["answer"] for a in r["answers"]]
        assert answers[0] == ifv.build_reply(dict(ifv.INSTRUCTIONS)[ifv.signature(messages)[0]], constraints,
                                             pad=0) or ifv.true_utility(messages, answers[0]) == 1.0
        assert r["utilities"][0] == 1.0 and r["answers"][0]["model"] == "reference"
        assert r["utilities"] == [ifv.true_utility(messages, a) for a in answers]
        assert r["utilities"] == sorted(r["utilities"], reverse=True) and min(r["utilities"]) < 1.0
        assert len(set(answers)) == len(answers) <= 5
        for t in [text] + answers:  # text is data: no chat-template marker or special token in any row
            assert not any(s in t for s in ("<|", "|>", "</s>", "<s>", "\n\nHuman:", "\n\nAssistant:"))
    assert sizes == {1, 2, 3}


def test_every_combination_admits_a_reference_and_the_reporting_draw_is_fixed():
    import random
    for combo in ifv.COMBINATIONS:
        row = ifv._row(random.Random(0), ifv.INSTRUCTIONS, [combo], "x")
        assert row["utilities"][0] == 1.0
    assert all(len(c) > 1 for c in ifv.REPORT_COMBINATIONS)
    assert {(k,) for k in ifv.TYPES} <= set(ifv.TRAIN_COMBINATIONS)  # every reported type is trained alone
    assert not set(ifv.REPORT_COMBINATIONS) & set(ifv.TRAIN_COMBINATIONS)
    assert not set(ifv.REPORT_INSTRUCTIONS) & set(ifv.TRAIN_INSTRUCTIONS)
    assert len(ifv.REPORT_INSTRUCTIONS) == 10 and len(ifv.REPORT_COMBINATIONS) == 38


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 100, 101])  # every reporting and selection seed
def test_heldout_shares_no_instruction_and_no_constraint_combination_with_training(seed):
    data = DataConfig(source="task:ifeval", heldout_fraction=0.0, tuning_fraction=0.1, report_rows=256,
                      synthetic_seed=seed)
    s = pipelines.load_splits(data)
    assert len(s.heldout) == 256 and not s.unseen and len(s.train) + len(s.tuning) == ifv.ROWS
    trained = [ifv.signature(r["messages"]) for r in s.train + s.tuning]
    held = [ifv.signature(r["messages"]) for r in s.heldout]
    assert not {i for i, _ in held} & {i for i, _ in trained}
    assert not {c for _, c in held} & {c for _, c in trained}
    assert {i for i, _ in held} <= {i for i, _ in ifv.REPORT_INSTRUCTIONS}
    assert not {r["messages"][0]["content"] for r in s.tuning} & {r["messages"][0]["content"] for r in s.train}
    assert s.true_utility is ifv.true_utility
    # a selection run: the same training and tuning rows, no reporting row
    quiet = pipelines.load_splits(dataclasses.replace(data, reporting=False))
    assert quiet.train == s.train and quiet.tuning == s.tuning and not quiet.heldout
    with pytest.raises(ValueError, match="shares its instruction"):
        ifv.check_reporting(s.train, [dict(s.heldout[0], messages=s.train[0]["messages"])])


def test_report_rows_need_a_source_that_generates_them():
    with pytest.raises(ValueError, match="task with its own reporting split"):
        pipelines.load_splits(DataConfig(source="task:arithmetic", heldout_fraction=0.0, report_rows=8))
    with pytest.raises(ValueError, match="one reporting split"):
        ifv.make_report_rows("unseen", 4, 0)


def test_rows_are_valid_nectar_and_deterministic():
    from starling_jax.data import nectar
    raw = ifv.make_rows(3, n=50)
    assert json.dumps(raw) == json.dumps(ifv.make_rows(3, n=50)) != json.dumps(ifv.make_rows(4, n=50))
    rows, report = nectar.parse_rows(raw, on_bad_row="error", source="task:ifeval")
    assert len(rows) == 50 and report.ties_broken == 0
