"""Every study figure the documents quote is regenerated from the committed raw results (results/NAME/, written by
`starling-jax study FILE --workdir D --export-raw results/NAME`) and must equal the quoted number at its precision.

A quoted figure is plain text followed by an HTML comment naming where it comes from in the regenerated results.json
(starling_jax.commands.study.quotes): `0.68 <!-- q: rl_algorithms summary policy/heldout apa gain mean -->`. With no quotes and
no raw folders the checks pass; any mismatch, unknown key or missing folder fails them."""

import glob
import json
import os

from starling_jax.commands.study import quotes, raw

from tests.test_study_report import fake_study, write_study_file, write_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")
STUDIES = os.path.join(ROOT, "experiments", "studies")
DOCUMENTS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
REGENERATED: dict = {}  # the committed folders' reports, regenerated once for both checks below (read-only data)


def test_every_quoted_figure_equals_the_regenerated_one():
    count, problems = quotes.check_quotes(DOCUMENTS, RESULTS, STUDIES, root=ROOT, cache=REGENERATED)
    assert not problems, f"{len(problems)} of {count} quoted figures do not match:\n" + "\n".join(problems)


def test_committed_reports_are_the_ones_their_raw_data_gives():
    """A committed results/NAME/results.md is what `--report-only --raw results/NAME` writes today."""
    problems = quotes.check_reports(RESULTS, STUDIES, cache=REGENERATED)
    assert not problems, "\n".join(problems)


def _fake_results(tmp_path):
    """results/fake (raw) and a studies folder with fake.py, exported from a fake workdir; and its results.json."""
    studies = tmp_path / "studies"
    studies.mkdir()
    write_study_file(studies)
    write_workdir(str(tmp_path / "work"), fake_study())
    raw.export(fake_study(), str(studies / "fake.py"), str(tmp_path / "work"), str(tmp_path / "results" / "fake"), {})
    results = json.loads(json.dumps(raw.report(fake_study(), str(tmp_path / "results" / "fake"))))
    return str(tmp_path / "results"), str(studies), results


def test_quoted_figures_pass_when_equal_and_fail_when_not(tmp_path):
    results_root, studies, results = _fake_results(tmp_path)
    b = results["summary"]["policy/heldout"]["b"]["gain"]
    first = results["primary"][0]
    kl = results["summary"]["policy/unseen"]["c"]["kl"]["seeds"]["1"]

    def check(text):
        doc = tmp_path / "doc.md"
        doc.write_text(text)
        return quotes.check_quotes([str(doc)], results_root, studies)

    good = (f"# Fake\n\nb gains {b['mean']:.2f} <!-- q: fake summary policy/heldout b gain mean --> true reward, "
            f"+{first['diff']:.3f} [{first['lo']:.3f}, {first['hi']:.3f}] <!-- q: fake primary 0 diff,lo,hi --> over "
            f"a; seed 1 of c: {kl:.1f}<!--q: fake summary policy/unseen c kl seeds 1-->.\n\n"
            f"| arm | gain |\n|---|---|\n| b | {b['mean']:.3f} <!-- q: fake summary policy/heldout b gain mean --> |\n")
    assert check(good) == (6, [])
    assert check("No quotes here; 0.5 and 3 are just numbers.\n") == (0, [])
    wrong = f"{b['mean'] + 0.01:.2f} <!-- q: fake summary policy/heldout b gain mean -->\n"
    count, problems = check(wrong)
    assert count == 1 and len(problems) == 1 and "doc.md:1:" in problems[0] and "at the quoted precision" in problems[0]
    # one figure of three wrong in a multi-figure quote: only that one fails
    count, problems = check(f"{first['diff']:.3f} [{first['lo'] - 0.5:.3f}, {first['hi']:.3f}] "
                            f"<!-- q: fake primary 0 diff,lo,hi -->\n")
    assert count == 3 and len(problems) == 1 and "primary 0 lo" in problems[0]
    # a key that names no figure, a folder with no raw results, too few numbers, no key
    for text, message in [("1.0 <!-- q: fake summary policy/heldout b gain median -->", "has no figure at"),
                          ("1.0 <!-- q: fake primary 9 diff -->", "has no figure at"),
                          ("1.0 <!-- q: nothere summary x -->", "cannot be regenerated"),
                          ("1.0 <!-- q: fake primary 0 diff,lo,hi -->", "names 3 figure(s) but 1 number(s)"),
                          ("1.0 <!-- q: fake -->", "needs a results folder and at least one key")]:
        _, problems = check(text + "\n")
        assert len(problems) == 1 and message in problems[0], (text, problems)


def test_a_stale_or_missing_committed_report_fails(tmp_path):
    results_root, studies, _ = _fake_results(tmp_path)
    folder = os.path.join(results_root, "fake")
    assert quotes.check_reports(results_root, studies) == [f"{folder}/results.md is missing: run starling-jax study "
                                                        f"experiments/studies/fake.py --report-only --raw {folder}"]
    fresh = quotes.regenerated_markdown(folder, studies)
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(fresh)
    assert quotes.check_reports(results_root, studies) == []
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(fresh.replace("| b |", "| b* |", 1))
    assert "is stale" in quotes.check_reports(results_root, studies)[0]


def test_a_quote_matches_only_the_numbers_right_before_it_on_its_line(tmp_path):
    found = quotes.find_quotes("x 1.06x and v1.2 then -0.50 [0.1, \u22120.25] <!-- q: s a b,c --> 7\n"
                               "2.5 <!-- other --> 3 <!-- q: s d -->\n", "doc.md")
    assert [(q.line, q.keys, q.text) for q in found] == [(1, ("a", "b"), "0.1"), (1, ("a", "c"), "\u22120.25"),
                                                         (2, ("d",), "3")]
    example = ("An example:\n\n    0.5 <!-- q: s a -->\n\n```\n0.5 <!-- q: s b -->\n```\n"
               "and `0.5 <!-- q: s c -->` inline; 0.5 <!-- q: s d --> is a quote.\n")
    assert [(q.line, q.keys) for q in quotes.find_quotes(example, "doc.md")] == [(8, ("d",))]
    assert quotes._as_quoted(-0.0004, "0.000") == "0.000" and quotes._plain("\u22120.25") == "-0.25"
    assert quotes._as_quoted(0.6789, "+0.68") == "0.68" and quotes._plain("+0.68") == "0.68"
