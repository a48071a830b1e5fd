"""The check that every study figure a document quotes, and every committed results.md, equals the one regenerated
from the study's raw results folder (starling_jax.commands.study.raw; tests/test_published_figures.py runs it).

Quoting a regenerated figure in a document: write the number as plain text and put right after it an HTML comment
(invisible when rendered) naming where it comes from in the regenerated results.json:

    APA gains 0.68 <!-- q: rl_algorithms summary policy/heldout apa gain mean --> true reward ...
    +0.03 [-0.14, 0.20] <!-- q: rl_algorithms primary 0 diff,lo,hi -->

The first word is the folder under results/, the rest are keys into results.json (a list takes an index); the last
may list several keys separated by commas, matched in order to that many numbers right before the comment on its
line. check_quotes() compares each at the quoted precision (tests/test_published_figures.py).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Optional

from starling_jax.commands.study import Study, load_study
from starling_jax.commands.study.raw import STUDY_JSON, RawError, _expect, _is_number, read_manifest, report
from starling_jax.commands.study.report import markdown, steady


QUOTE_RE = re.compile(r"<!--\s*q:(.*?)-->", re.S)
COMMENT_RE = re.compile(r"<!--.*?-->", re.S)
NUMBER_RE = re.compile(r"(?<![\w.])[+\-\u2212]?\d+(?:\.\d+)?(?!\.?\w)")


@dataclasses.dataclass(frozen=True)
class Quote:
    path: str
    line: int
    folder: str  # under results/
    keys: tuple[str, ...]  # into results.json, the last one of this figure included
    text: str  # the number as quoted

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.text} <!-- q: {self.folder} {' '.join(self.keys)} -->"


CODE_RE = re.compile(r"^```.*?^```|^(?:    |\t).*?$|`[^`\n]*`", re.M | re.S)


def _blank_code(text: str) -> str:
    """text with code (fenced blocks, indented lines, `spans`: examples, not quotes) blanked, lines kept."""
    return CODE_RE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def find_quotes(text: str, path: str) -> list[Quote]:
    """Every quoted figure of a document (see the module docstring), code excepted; RawError for a malformed
    quote."""
    text = _blank_code(text)
    quotes = []
    previous_end = 0
    for m in QUOTE_RE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        words = m.group(1).split()
        where = f"{path}:{line}"
        _expect(len(words) >= 2, where, f"quote <!--q:{m.group(1)}--> needs a results folder and at least one key")
        *keys, last = words[1:]
        fields = last.split(",")
        _expect(all(fields), where, f"quote <!--q:{m.group(1)}-->: an empty key in {last!r}")
        start = max(previous_end, text.rfind("\n", 0, m.start()) + 1)
        numbers = NUMBER_RE.findall(COMMENT_RE.sub(" ", text[start:m.start()]))
        _expect(len(numbers) >= len(fields), where,
                f"quote <!--q:{m.group(1)}--> names {len(fields)} figure(s) but {len(numbers)} number(s) precede "
                f"it on its line")
        for number, field in zip(numbers[len(numbers) - len(fields):], fields):
            quotes.append(Quote(path, line, words[0], tuple(keys) + (field,), number))
        previous_end = m.end()
    return quotes


def _lookup(results, keys):
    node = results
    for k in keys:
        if isinstance(node, dict) and k in node:
            node = node[k]
        elif isinstance(node, list) and re.fullmatch(r"\d+", k) and int(k) < len(node):
            node = node[int(k)]
        else:
            return None
    return node


def _plain(text: str) -> str:
    """A number as written, without a plus sign, with an ASCII minus, and -0.00 as 0.00."""
    text = text.replace("\u2212", "-").lstrip("+")
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _as_quoted(value: float, quoted: str) -> str:
    """value written at the precision of the quoted number."""
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    return _plain(f"{steady(value):.{decimals}f}")


def _study_of(folder: str, studies_dir: str) -> Study:
    return load_study(os.path.join(studies_dir, read_manifest(folder)["study_file"]))


def regenerated(folder: str, studies_dir: str, cache: Optional[dict] = None) -> dict:
    """The results that `--report-only --raw folder` computes (the study file from studies_dir). cache: None, or a
    dict kept by the caller across calls, {folder: results}, so that checks reading the same folders regenerate each
    once (a study's report draws 10,000 bootstrap replicates per comparison)."""
    cache = {} if cache is None else cache
    key = os.path.abspath(folder)
    if key not in cache:
        cache[key] = report(_study_of(folder, studies_dir), folder)
    return cache[key]


def regenerated_markdown(folder: str, studies_dir: str, cache: Optional[dict] = None) -> str:
    """The results.md that `--report-only --raw folder` writes (the study file from studies_dir)."""
    return markdown(regenerated(folder, studies_dir, cache))


def check_reports(results_root: str, studies_dir: str, cache: Optional[dict] = None) -> list[str]:
    """One line per raw folder under results_root whose committed results.md is missing or differs from the one its
    raw data gives today. cache: see regenerated."""
    problems = []
    for manifest in sorted(glob.glob(os.path.join(results_root, "*", STUDY_JSON))):
        folder = os.path.dirname(manifest)
        hint = (f"run starling-jax study experiments/studies/{read_manifest(folder)['study_file']} --report-only "
                f"--raw {folder}")
        path = os.path.join(folder, "results.md")
        if not os.path.exists(path):
            problems.append(f"{path} is missing: {hint}")
            continue
        with open(path, encoding="utf-8") as f:
            if f.read() != regenerated_markdown(folder, studies_dir, cache):
                problems.append(f"{path} is stale (its raw data gives another report): {hint}")
    return problems


def check_quotes(documents: list[str], results_root: str, studies_dir: str, root: Optional[str] = None,
                 cache: Optional[dict] = None) -> tuple[int, list[str]]:
    """(number of quoted figures, one line per problem) for the given documents: each quote's figure regenerated
    from results_root/FOLDER (its study file from studies_dir) must equal the quoted number at its precision.
    cache: see regenerated."""
    found: dict = {}
    problems = []
    count = 0
    for doc in documents:
        with open(doc, encoding="utf-8") as f:
            text = f.read()
        name = os.path.relpath(doc, root) if root else doc
        try:
            quotes = find_quotes(text, name)
        except RawError as e:
            problems.append(str(e))
            continue
        for q in quotes:
            count += 1
            if q.folder not in found:
                folder = os.path.join(results_root, q.folder)
                try:
                    found[q.folder] = json.loads(json.dumps(regenerated(folder, studies_dir, cache)))
                except (OSError, ValueError) as e:
                    found[q.folder] = f"results of {q.folder!r} cannot be regenerated: {e}"
            results = found[q.folder]
            if isinstance(results, str):
                problems.append(f"{q.where()}: {results}")
                continue
            value = _lookup(results, q.keys)
            if not _is_number(value):
                problems.append(f"{q.where()}: results.json has no figure at {' / '.join(q.keys)} (found "
                                f"{type(value).__name__})")
                continue
            quoted = _plain(q.text)
            if _as_quoted(float(value), quoted) != quoted:
                problems.append(f"{q.where()}: regenerated {float(value)!r}, which is "
                                f"{_as_quoted(float(value), quoted)} at the quoted precision")
    return count, problems
