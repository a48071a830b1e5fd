"""The files chat benchmarks read and write, as plain dicts: MT-Bench questions and fschat model answers, AlpacaEval
instructions and model outputs, RewardBench rows, and prompt lists.

  MT-Bench question (fschat llm_judge data/mt_bench/question.jsonl): {"question_id", "category", "turns": [str, ...]}
  fschat model answer (one JSONL line per question, what gen_judgment.py reads):
      {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [str, ...]}], "tstamp"}
  AlpacaEval instruction (alpaca_eval_gpt4_baseline / alpaca_eval.json): {"instruction", "dataset", ...}
  AlpacaEval model outputs (a JSON list): {"instruction", "output", "generator", "dataset"}
  RewardBench row (allenai/reward-bench "filtered" split): {"prompt", "chosen", "rejected", "subset", "id"}

Readers name the file and the row of anything wrong (InputError) and accept .json (a list, or an object holding one
list), .jsonl and .parquet.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any, Iterable, Optional

from starling_jax.errors import InputError
from starling_jax.files import write_atomic

# MT-Bench's sampling temperature per question category (fschat's llm_judge/common.py temperature_config); other
# categories use 0.7. A temperature below 1e-4 means greedy decoding.
MT_BENCH_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
MT_BENCH_DEFAULT_TEMPERATURE = 0.7


def read_records(path: str) -> list[dict]:
    """Rows of a .json / .jsonl / .parquet file as dicts."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    lower = path.lower()
    if lower.endswith(".parquet"):
        import pyarrow
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as e:
            raise InputError(f"{path}: unreadable Parquet file ({e})") from None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if lower.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno})") from None
    elif lower.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise InputError(f"{path}: expected a JSON list of rows (or an object holding exactly one list)")
            data = lists[0]
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        rows = data
    else:
        raise InputError(f"{path}: unsupported file type (use .json, .jsonl or .parquet)")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise InputError(f"{path}: row {i}: expected a JSON object, got {type(r).__name__}")
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def _text(row: dict, key: str, where: str) -> str:
    v = row.get(key)
    if not isinstance(v, str):
        raise InputError(f"{where}: field {key!r} must be a string, got "
                         f"{'nothing' if v is None else type(v).__name__}")
    return v


def read_mt_bench_questions(path: str) -> list[dict]:
    """MT-Bench questions: question_id (int or str, unique), category (str, optional), turns (non-empty list of str)."""
    out, seen = [], set()
    for i, row in enumerate(read_records(path)):
        where = f"{path}: row {i}"
        qid = row.get("question_id")
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise InputError(f"{where}: field 'question_id' must be an integer or string")
        if qid in seen:
            raise InputError(f"{where}: duplicate question_id {qid!r}")
        seen.add(qid)
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise InputError(f"{where}: field 'turns' must be a non-empty list of strings (MT-Bench question format)")
        category = row.get("category", "")
        if not isinstance(category, str):
            raise InputError(f"{where}: field 'category' must be a string")
        out.append({**row, "question_id": qid, "category": category, "turns": list(turns)})
    return out


def mt_bench_temperature(category: str) -> float:
    return MT_BENCH_TEMPERATURE.get(category, MT_BENCH_DEFAULT_TEMPERATURE)


def read_alpaca_eval_instructions(path: str) -> list[dict]:
    """AlpacaEval rows: instruction (str), dataset (str, optional; default "custom")."""
    out = []
    for i, row in enumerate(read_records(path)):
        where = f"{path}: row {i}"
        instruction = _text(row, "instruction", where)
        dataset = row.get("dataset", "custom")
        if not isinstance(dataset, str):
            raise InputError(f"{where}: field 'dataset' must be a string")
        out.append({"instruction": instruction, "dataset": dataset})
    return out


def read_prompts(path: str) -> list[str]:
    """Single-turn prompts: a .txt file (one per non-empty line) or rows with "prompt", "instruction" (AlpacaEval) or
    "turns" (MT-Bench: the first turn)."""
    if path.lower().endswith(".txt"):
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such file")
        try:
            with open(path, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
        if not prompts:
            raise InputError(f"{path}: no prompts")
        return prompts
    out = []
    for i, row in enumerate(read_records(path)):
        where = f"{path}: row {i}"
        if "prompt" in row:
            out.append(_text(row, "prompt", where))
        elif "instruction" in row:
            out.append(_text(row, "instruction", where))
        elif isinstance(row.get("turns"), list) and row["turns"] and isinstance(row["turns"][0], str):
            out.append(row["turns"][0])
        else:
            raise InputError(f"{where}: no prompt (expected a 'prompt', 'instruction' or 'turns' field)")
    return out


def read_rewardbench(path: str) -> list[dict]:
    """RewardBench rows: prompt, chosen, rejected, subset (str each); id kept when present."""
    out = []
    for i, row in enumerate(read_records(path)):
        where = f"{path}: row {i}"
        r = {k: _text(row, k, where) for k in ("prompt", "chosen", "rejected", "subset")}
        r["id"] = row.get("id", i)
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Answer files (resumable: what is already in the file is skipped).


def fschat_answer(question_id, model_id: str, turns_per_choice: Iterable[list[str]]) -> dict:
    """One fschat model_answer record."""
    return {"question_id": question_id, "answer_id": uuid.uuid4().hex[:22], "model_id": model_id,
            "choices": [{"index": i, "turns": list(t)} for i, t in enumerate(turns_per_choice)],
            "tstamp": time.time()}


def read_fschat_answers(path: str) -> dict[Any, dict]:
    """{question_id: answer} of an existing answer file ({} if none). A last line cut short by a kill is dropped (and
    the file rewritten without it) so the question is answered again; damage elsewhere is an error."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    answers, good = {}, []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            qid = rec["question_id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if n >= len(lines) - 1:  # the last line: an interrupted write
                print(f"{path}:{n}: dropping an incomplete last answer (interrupted run); it will be regenerated",
                      file=sys.stderr)
                with open(path, "w", encoding="utf-8") as f:
                    f.write("".join(g + "\n" for g in good))
                break
            raise InputError(f"{path}:{n}: not an fschat answer record; move the file away or pick another --out")
        answers[qid] = rec
        good.append(line)
    return answers


def append_jsonl(path: str, records: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_alpaca_eval_outputs(path: str) -> list[dict]:
    """An existing AlpacaEval outputs file ([] if none)."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not a JSON list of AlpacaEval outputs ({e.msg} at line {e.lineno}); move it away "
                         f"or pick another --out") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) and "instruction" in r and "output" in r
                                             for r in data):
        raise InputError(f"{path}: not a JSON list of AlpacaEval outputs (instruction, output, generator, dataset)")
    return data


def write_json_atomic(path: str, data) -> None:
    """An answer file as the benchmark's tools write it (indent 2, UTF-8 text, a final newline), atomically."""
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def alpaca_eval_output(instruction: str, output: str, generator: str, dataset: Optional[str]) -> dict:
    return {"instruction": instruction, "output": output, "generator": generator, "dataset": dataset or "custom"}
