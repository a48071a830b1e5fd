"""Nectar rows: read local files, parse prompts into messages, validate, and apply the tie policy.

A raw Nectar row: prompt "\\n\\nHuman: ...\\n\\nAssistant: ..." (multi-turn possible, ends with "Assistant:"),
answers [{answer, model, rank}] (rank 1.0 = best), turns, num_responses, source, good_natured.

A parsed row (what pipelines consume; plain dict so grain can hold it):
    {"messages": [{"role", "content"}...] ending with a user turn,
     "responses": [str] in the file's order, "models": [str],
     "raw_ranks": [float] as stored, "ranks": [int] a strict order 1..K (ties broken, see below),
     "row": index in the source, "utilities": [float] (synthetic rows only)}

Validation names the row (index and prompt prefix) and the field of every problem. on_bad_row="error" raises
NectarError at the first bad row; "skip" drops it and counts the reason in a DataReport (nothing is dropped silently).

Tie policy: equal raw ranks are a tie. ties="break" (default) keeps the row and counts it: its "ranks" break the tie
by answer order in the row (the earlier answer ranks better), its "raw_ranks" keep it (an RM batch's ranks are their
dense levels: objectives.reward says how each loss reads a tie); pairwise data (DPO pairs) skips tied pairs and
counts them. ties="reject" treats a tie as a bad row.

Identical answers (Nectar pads some rows to 7 with repeats): answers with the same text (after stripping) are one
response, kept once at its best-ranked occurrence; the merged copies are counted in the DataReport
(duplicate_answers, rows_with_duplicates). A row left with fewer than two distinct answers is bad
("identical_answers").
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import numbers
import os
import re
import zlib
from typing import Iterable, Optional

from starling_jax.errors import InputError

_TURN_RE = re.compile(r"\n\n(Human|Assistant):[ ]?")


class NectarError(InputError):
    """A bad Nectar row; the message names the source, row, prompt prefix and field."""


@dataclasses.dataclass
class DataReport:
    """What happened to the rows: counts of kept, skipped (by reason), ties and truncation."""
    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict = dataclasses.field(default_factory=dict)  # reason -> count
    skipped_examples: list = dataclasses.field(default_factory=list)  # first messages, "row N (...): ..."
    ties_broken: int = 0  # rows whose K-wise order broke a tie by answer order
    tied_pairs_skipped: int = 0  # pairs left out of pairwise data because of a tie
    prompts_truncated: int = 0  # examples whose prompt lost tokens on the left
    responses_truncated: int = 0  # examples whose response lost tokens on the right (prompt alone did not suffice)
    answers_dropped: int = 0  # answers beyond max_responses left out of K-wise groups
    duplicate_answers: int = 0  # repeated answers (same text as a better-ranked one in the row) merged into it
    rows_with_duplicates: int = 0  # rows that had such repeats (Nectar pads some rows to 7 with copies)
    files_read: list = dataclasses.field(default_factory=list)  # data files read (a directory source)
    files_ignored: list = dataclasses.field(default_factory=list)  # files in a data directory that are not data
    train_rows: int = 0
    heldout_rows: int = 0

    def skip(self, reason: str, message: str, keep_examples: int = 20) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.skipped_examples) < keep_examples:
            self.skipped_examples.append(message)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        text = (f"rows read {self.rows_read}, kept {self.rows_kept}, skipped {skipped}"
                + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.skipped.items()))})" if skipped else "")
                + f"; ties broken {self.ties_broken}, tied pairs skipped {self.tied_pairs_skipped}"
                + f"; prompts truncated {self.prompts_truncated}, responses truncated {self.responses_truncated}")
        if self.answers_dropped:
            text += f"; answers beyond max_responses dropped {self.answers_dropped}"
        if self.duplicate_answers:
            text += (f"; identical answers merged {self.duplicate_answers} (in {self.rows_with_duplicates} rows; "
                     "each kept once, at its best rank)")
        if self.files_ignored:
            n = len(self.files_ignored)
            text += (f"; {n} file(s) in the data directory ignored (not {'/'.join(DATA_SUFFIXES)}): "
                     f"{', '.join(self.files_ignored[:5])}{' ...' if n > 5 else ''}")
        return text


def _where(index: int, row, source: str = "") -> str:
    prompt = row.get("prompt") if isinstance(row, dict) else None
    prefix = repr(prompt[:40]) if isinstance(prompt, str) else "<no prompt>"
    return f"{source + ': ' if source else ''}row {index} (prompt {prefix})"


class _Bad(NectarError):
    """A problem in one field of a row; parse_rows adds where it is (raised as is by parse_prompt)."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


def parse_prompt(prompt: str) -> list[dict]:
    """"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant: " -> messages [user a, assistant b, user c]."""
    if not isinstance(prompt, str):
        raise _Bad("bad_prompt", "prompt", f"expected a string, got {type(prompt).__name__}")
    text = prompt if prompt.startswith("\n\n") else "\n\n" + prompt.lstrip()
    marks = list(_TURN_RE.finditer(text))
    if not marks or marks[0].start() != 0 or marks[0].group(1) != "Human":
        raise _Bad("bad_prompt", "prompt", "must start with '\\n\\nHuman: '")
    if marks[-1].group(1) != "Assistant" or text[marks[-1].end():].strip():
        raise _Bad("bad_prompt", "prompt", "must end with '\\n\\nAssistant:' (the turn the answers complete)")
    messages = []
    for k, m in enumerate(marks[:-1]):
        role = "user" if m.group(1) == "Human" else "assistant"
        want = "user" if k % 2 == 0 else "assistant"
        if role != want:
            raise _Bad("bad_prompt", "prompt", f"turn {k} is {m.group(1)} but turns must alternate Human/Assistant")
        content = text[m.end():marks[k + 1].start()].strip()
        if not content:
            raise _Bad("empty_text", "prompt", f"turn {k} ({m.group(1)}) is empty")
        messages.append({"role": role, "content": content})
    return messages


def _check_row(row, max_chars: int, ties: str, min_answers: int) -> tuple[dict, bool, int]:
    if not isinstance(row, dict):
        raise _Bad("not_a_record", "<row>", f"expected a mapping, got {type(row).__name__}")
    for field in ("prompt", "answers"):
        if field not in row or row[field] is None:
            raise _Bad("missing_field", field, "required field is missing")
    messages = parse_prompt(row["prompt"])
    for k, m in enumerate(messages):
        if len(m["content"]) > max_chars:
            raise _Bad("too_long", f"prompt turn {k}", f"{len(m['content'])} characters > max_chars {max_chars}")
    answers = row["answers"]
    if not isinstance(answers, (list, tuple)):
        raise _Bad("bad_answers", "answers", f"expected a list, got {type(answers).__name__}")
    if len(answers) < min_answers:
        raise _Bad("too_few_answers", "answers", f"{len(answers)} answers; need at least {min_answers} to rank")
    texts, models, raw = [], [], []
    for j, a in enumerate(answers):
        if not isinstance(a, dict):
            raise _Bad("bad_answers", f"answers[{j}]", f"expected a mapping, got {type(a).__name__}")
        text = a.get("answer")
        if not isinstance(text, str):
            raise _Bad("missing_field", f"answers[{j}].answer", "missing or not a string")
        if not text.strip():
            raise _Bad("empty_text", f"answers[{j}].answer", "empty answer")
        if len(text) > max_chars:
            raise _Bad("too_long", f"answers[{j}].answer", f"{len(text)} characters > max_chars {max_chars}")
        rank = a.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not math.isfinite(rank) or rank < 1:
            raise _Bad("bad_rank", f"answers[{j}].rank", f"expected a finite number >= 1, got {rank!r}")
        texts.append(text.strip())
        models.append(str(a.get("model") or ""))
        raw.append(float(rank))
    # Identical answers are one response: a copy ranked below its original would tell the ranking loss that a text
    # beats itself. Keep each text once, at its best-ranked occurrence (the earlier one on equal ranks).
    keep = sorted({t: j for j in sorted(range(len(raw)), key=lambda j: (raw[j], j), reverse=True)
                   for t in [texts[j]]}.values())
    merged = len(raw) - len(keep)
    if merged and len(keep) < min_answers:
        raise _Bad("identical_answers", "answers[*].answer", f"{len(raw)} answers but only {len(keep)} distinct "
                                                              f"text(s); need at least {min_answers} to rank")
    tied = len({raw[j] for j in keep}) < len(keep)
    if tied and ties == "reject":
        dup = sorted({r for r in raw if raw.count(r) > 1})
        raise _Bad("tied_ranks", "answers[*].rank", f"tied ranks {dup} (ties='reject')")
    utilities = row.get("utilities")
    if utilities is not None and isinstance(utilities, (list, tuple)) and len(utilities) == len(answers):
        utilities = [utilities[j] for j in keep]
    texts, models, raw = [texts[j] for j in keep], [models[j] for j in keep], [raw[j] for j in keep]
    # Strict order: sort by raw rank, ties by answer position (stable sort).
    order = sorted(range(len(raw)), key=lambda j: raw[j])
    ranks = [0] * len(raw)
    for pos, j in enumerate(order):
        ranks[j] = pos + 1
    parsed = {"messages": messages, "responses": texts, "models": models, "raw_ranks": raw, "ranks": ranks}
    _check_metadata(row)
    if utilities is not None:
        if not isinstance(utilities, (list, tuple)) or len(utilities) != len(raw):
            raise _Bad("bad_utilities", "utilities", f"expected a list of {len(answers)} numbers (one per answer), "
                                                     f"got {row.get('utilities')!r:.80}")
        for j, u in enumerate(utilities):
            if isinstance(u, bool) or not isinstance(u, numbers.Real) or not math.isfinite(u):
                raise _Bad("bad_utilities", f"utilities[{j}]", f"expected a finite number, got {u!r:.40}")
        parsed["utilities"] = [float(u) for u in utilities]
    return parsed, tied, merged


def _is_count(x) -> bool:
    """A whole number (an int, or a float like 3.0 that parquet/JSON may produce), not a bool."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return False
    return isinstance(x, numbers.Integral) or (math.isfinite(x) and float(x).is_integer())


def _check_metadata(row: dict) -> None:
    """Nectar's metadata fields, when present (None = absent): turns and num_responses whole numbers >= 1, source a
    string or a list of strings, good_natured a boolean (the tfds builder stores them with these types)."""
    for field in ("turns", "num_responses"):
        v = row.get(field)
        if v is not None and not (_is_count(v) and v >= 1):
            raise _Bad("bad_metadata", field, f"expected a whole number >= 1, got {v!r:.40}")
    source = row.get("source")
    if source is not None and not isinstance(source, str) and not (
            isinstance(source, (list, tuple)) and all(isinstance(x, str) for x in source)):
        raise _Bad("bad_metadata", "source", f"expected a string or a list of strings, got {source!r:.40}")
    good = row.get("good_natured")
    if good is not None and type(good).__name__ not in ("bool", "bool_"):  # numpy's bool_ too
        raise _Bad("bad_metadata", "good_natured", f"expected true or false, got {good!r:.40}")


def parse_rows(rows: Iterable, on_bad_row: str = "error", ties: str = "break", max_chars: int = 100_000,
               min_answers: int = 2, source: str = "", report: Optional[DataReport] = None
               ) -> tuple[list[dict], DataReport]:
    """Validate and parse raw Nectar rows -> (parsed rows, report). See the module docstring for the policies."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if ties not in ("break", "reject"):
        raise ValueError(f"ties must be 'break' or 'reject', got {ties!r}")
    report = report or DataReport()
    out = []
    for index, row in enumerate(rows):
        report.rows_read += 1
        try:
            parsed, tied, merged = _check_row(row, max_chars, ties, min_answers)
        except _Bad as bad:
            message = f"{_where(index, row, source)}: field {bad.field}: {bad.detail}"
            if on_bad_row == "error":
                raise NectarError(message + " (set data.on_bad_row='skip' to skip such rows)") from None
            report.skip(bad.reason, message)
            continue
        report.ties_broken += int(tied)
        report.duplicate_answers += merged
        report.rows_with_duplicates += int(merged > 0)
        parsed["row"] = index
        out.append(parsed)
    report.rows_kept = len(out)
    return out, report


DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")  # matched case-insensitively


def _suffix(path: str) -> Optional[str]:
    name = path.lower()
    return next((sfx for sfx in sorted(DATA_SUFFIXES, key=len, reverse=True) if name.endswith(sfx)), None)


def find_files(path: str, report: Optional[DataReport] = None) -> list[str]:
    """Nectar files under path: itself if a file, else every file under it (recursive, sorted by path) whose name
    ends in .parquet, .jsonl, .json, .jsonl.gz or .json.gz, in any letter case. Other files are listed in
    report.files_ignored (and so in its summary), never dropped silently."""
    if os.path.isfile(path):
        if _suffix(path) is None:
            raise NectarError(f"{path}: not a Nectar data file (expected a name ending in {', '.join(DATA_SUFFIXES)})")
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Nectar source {path!r} does not exist")
    files, ignored = [], []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in names:
            full = os.path.join(root, name)
            (files if _suffix(name) else ignored).append(full)
    files.sort()
    ignored = sorted(os.path.relpath(f, path) for f in ignored)
    if not files:
        raise FileNotFoundError(f"no data files under {path!r} (expected names ending in {', '.join(DATA_SUFFIXES)}"
                                + (f"; found only {', '.join(ignored[:5])}{' ...' if len(ignored) > 5 else ''})"
                                   if ignored else "; the directory is empty)"))
    if report is not None:
        report.files_read += files
        report.files_ignored += ignored
    return files


def _unreadable(path: str, what: str, e: BaseException) -> NectarError:
    detail = getattr(e, "msg", None) or str(e) or type(e).__name__
    return NectarError(f"{path}: {what} ({detail}); re-download or re-export the file, or move it out of the data "
                       f"directory")


def _jsonl_rows(path: str, lines, on_bad_row: str, report: DataReport) -> list:
    rows = []
    line_no = 0
    try:
        for line_no, raw in enumerate(lines, 1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a byte-order mark starts no row
                if not text.strip():
                    continue
                rows.append(json.loads(text))
                continue
            except UnicodeDecodeError as e:
                reason, detail = "not_utf8", f"not UTF-8 text (byte {e.start}: {e.reason})"
            except json.JSONDecodeError as e:
                reason, detail = "bad_json", f"not valid JSON ({e.msg} at column {e.colno})"
            message = f"{path}: line {line_no}: {detail}"
            if on_bad_row == "error":
                raise NectarError(message + " (set data.on_bad_row='skip' to skip such lines)")
            report.rows_read += 1
            report.skip(reason, message)
    except (OSError, EOFError, zlib.error) as e:  # a damaged .gz: the rows before the damage are kept only if skipping
        raise _unreadable(path, f"damaged compressed file after line {line_no}", e) from None
    return rows


def read_file(path: str, on_bad_row: str = "error", report: Optional[DataReport] = None) -> list:
    """Raw rows of one parquet / JSONL / JSON (a list of rows) file, optionally gzipped (.jsonl.gz, .json.gz).

    A JSONL line that is not UTF-8 or not JSON is a bad row: NectarError naming the file and line (on_bad_row="error")
    or skipped and counted in `report` with its reason (not_utf8, bad_json). A file that cannot be decoded at all
    (a corrupt parquet or gzip, an empty or invalid .json) raises NectarError naming it, in either mode. A UTF-8
    byte-order mark at the start of a file is skipped (as Python's "utf-8-sig" reads it)."""
    report = report if report is not None else DataReport()
    kind = _suffix(path) or ".json"
    opener = gzip.open if kind.endswith(".gz") else open
    if kind == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as e:
            raise _unreadable(path, "unreadable Parquet file", e) from None
    if kind.startswith(".jsonl"):
        with opener(path, "rb") as f:
            return _jsonl_rows(path, f, on_bad_row, report)
    try:
        with opener(path, "rb") as f:
            data = f.read()
        if not data.strip():
            raise NectarError(f"{path}: empty file; a .json Nectar file holds a list of rows (or remove the file)")
        data = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise _unreadable(path, f"not UTF-8 text (byte {e.start})", e) from None
    except json.JSONDecodeError as e:
        raise _unreadable(path, f"invalid JSON at line {e.lineno} column {e.colno}", e) from None
    except (OSError, EOFError, zlib.error) as e:
        raise _unreadable(path, "damaged compressed file", e) from None
    if not isinstance(data, list):
        raise NectarError(f"{path}: a .json Nectar file must hold a list of rows, got {type(data).__name__}")
    return data


def read_rows(path: str, on_bad_row: str = "error", ties: str = "break", max_chars: int = 100_000,
              ) -> tuple[list[dict], DataReport]:
    """Read and parse every Nectar file under path; errors name the file and the row within it."""
    report = DataReport()
    out: list[dict] = []
    for f in find_files(path, report):
        rows, _ = parse_rows(read_file(f, on_bad_row, report), on_bad_row, ties, max_chars, source=f, report=report)
        for r in rows:
            r["file"] = f
        out += rows
    report.rows_kept = len(out)
    return out, report
