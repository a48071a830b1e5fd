"""grain pipelines over the batch format of a kind (data/formats.py: SFT, RM, DPO, RL prompts, or a kind's own), and
load_rows for the training loop.

Rows (parsed Nectar rows, see data.nectar) are tokenized once when a dataset is built, so truncation is counted
exactly in a DataReport; grain then shards, shuffles, repeats and batches the encoded examples. Every dataset is a
grain IterDataset: `it = iter(ds)` gives batches, `it.get_state()` / `it.set_state(s)`
checkpoint and resume it exactly, mid-epoch included. Batches are dicts of numpy arrays:

  SFT: tokens [B,T] int32, attention_mask [B,T] int32 (1 real / 0 pad; packed rows: segment ids 1,2,..),
       loss_mask [B,T] float32 (1 on assistant tokens incl. their closing token, every turn)
  RM:  tokens [B,K,T], attention_mask [B,K,T] (right padded), ranks [B,K] (1 = best, ties kept; padded slots
       continue after the worst), response_mask [B,K] (0 = padded slot)
  DPO: chosen_tokens, chosen_attention_mask, chosen_loss_mask, rejected_tokens, rejected_attention_mask,
       rejected_loss_mask, all [B,T] (loss masks float32, on the final response only)
  RL:  prompt_tokens [B,P] (left padded), prompt_mask [B,P], prompt_id [B] (index into the rows given)

Truncation: a prompt is cut from the left (its BOS kept) to at most max_prompt_length tokens and to what the
response leaves of max_length; a response is cut from the right only when it alone would leave the prompt fewer
than min(prompt length, max_prompt_length, max_length // 2) tokens. Both are counted in the report.
Several processes: the order of examples (shuffled from the seed, epoch after epoch) and the global batches cut
from it depend only on the data, the seed and the global batch_size, never on the number of processes. A process
passes `process_rows`, the positions within each global batch that its devices hold (sharding.process_rows), and its
dataset yields just those rows: it collates (pads, stacks) only its share, and the union over processes is the batch
one process would read alone.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional, Sequence

import grain
import numpy as np

from starling_jax.data import nectar, synthetic, tasks, tfds_nectar
from starling_jax.data.formats import Lengths, get_format, padding_example
from starling_jax.data.tokenizer import Tokenizer

_log = logging.getLogger(__name__)

_HELDOUT_SPLIT_SEED = 20231128  # fixed, so every stage and seed sees the same held-out rows


def _packed_to_batch(b):
    return {"tokens": b["tokens"].astype(np.int32), "attention_mask": b["tokens_segment_ids"].astype(np.int32),
            "loss_mask": b["loss_mask"].astype(np.float32)}


# -- padding rows (evaluation reads every example in batches of the training shape) ---------------------------------

def _pad_examples(ds: grain.MapDataset, kind: str, batch_size: int) -> grain.MapDataset:
    """ds completed to a multiple of batch_size with padding examples (copies of its first, weightless)."""
    n = len(ds)
    total = -(-n // batch_size) * batch_size
    if total == n:
        return ds
    pad = padding_example(kind, ds[0])
    return grain.MapDataset.range(total).map(lambda j: ds[j] if j < n else pad)


def _pad_packed_batch(b: dict, batch_size: int) -> dict:
    """A packed sft batch completed to batch_size rows with copies of its first row without loss tokens."""
    n = len(b["tokens"])
    if n == batch_size:
        return b
    extra = {k: np.repeat(v[:1], batch_size - n, axis=0) for k, v in b.items()}
    extra["loss_mask"] = np.zeros_like(extra["loss_mask"])
    return {k: np.concatenate([v, extra[k]]) for k, v in b.items()}


# -- datasets -----------------------------------------------------------------------------------------------------

def _global_order(examples: list, shuffle: bool, seed: int, num_epochs: Optional[int]) -> grain.MapDataset:
    """Every example in the order all processes agree on: shuffled from `seed` (each epoch reshuffled), repeated."""
    ds = grain.MapDataset.source(examples)
    if shuffle:
        ds = ds.shuffle(seed)
    return ds.repeat(num_epochs) if num_epochs != 1 else ds


def _check_rows(rows: Sequence[int], batch_size: int) -> list[int]:
    rows = [int(r) for r in rows]
    if not rows or sorted(set(rows)) != rows or rows[0] < 0 or rows[-1] >= batch_size:
        raise ValueError(f"process_rows must be increasing positions in [0, batch_size={batch_size}), got {rows}")
    return rows


def _process_share(ds: grain.MapDataset, batch_size: int, rows: Sequence[int], drop_remainder: bool
                   ) -> grain.MapDataset:
    """The elements of `ds` at positions `rows` of each consecutive global batch of `batch_size`: element j is
    ds[(j // k) * batch_size + rows[j % k]] with k = len(rows). Batching the result by k gives this process's share
    of each global batch; nothing outside it is read."""
    rows = _check_rows(rows, batch_size)
    k = len(rows)
    if k == batch_size:
        return ds
    full = len(ds) // batch_size
    if not drop_remainder and len(ds) % batch_size:
        raise ValueError("process_rows with a partial last batch: use drop_remainder=True")
    return grain.MapDataset.range(full * k).map(lambda j: ds[(j // k) * batch_size + rows[j % k]])


# The examples are in memory: reading them on threads only adds GIL contention (grain's own advice).
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def make_dataset(kind: str, rows: Sequence[dict], tokenizer: Tokenizer, batch_size: int, *, template=None,
                 max_length: int = 256, max_prompt_length: int = 128, max_responses: int = 7,
                 pairs: str = "best_vs_rest", pack: bool = False, seed: int = 0, shuffle: bool = True,
                 num_epochs: Optional[int] = None, process_rows: Optional[Sequence[int]] = None,
                 drop_remainder: bool = True, pad_last: bool = False, report: Optional[nectar.DataReport] = None):
    """A grain dataset of `kind` batches over parsed rows: the batch format registered under the kind's name (sft,
    rm, dpo, rl, or a kind's own: register_format).

    batch_size is the GLOBAL batch; process_rows (default: all of them) the positions within each global batch this
    process reads (see the module docstring), so each yielded batch has len(process_rows) rows.

    num_epochs None repeats forever (each epoch reshuffled from seed); 1 gives one pass (evaluation). Truncation,
    tie and dropped-answer counts are added to `report` when one is given (e.g. the one from load_rows).
    pad_last=True (one pass, kinds sft, rm, dpo) reads every example in whole global batches: the last partial batch
    is completed with padding rows (padding_example) that weigh nothing in the kind's objective and metrics, so an
    evaluation keeps the training batch shape (and shardings) and averages over exactly the real examples.
    """
    fmt = get_format(kind)
    if max_prompt_length < 1 or max_length < 2:
        raise ValueError(f"need max_length >= 2 and max_prompt_length >= 1, got {max_length}, {max_prompt_length}")
    if max_responses < fmt.min_responses:
        raise ValueError(f"max_responses (K) must be >= {fmt.min_responses} for {kind} batches, got {max_responses}")
    report = report if report is not None else nectar.DataReport()
    T, pad = max_length, tokenizer.pad_id
    lengths = Lengths(max_length, max_prompt_length, max_responses, pairs, seed)
    examples = fmt.examples(rows, tokenizer, template, lengths, report)
    if not examples:
        raise ValueError(f"no {kind} examples in {len(rows)} rows")
    ds = _global_order(examples, shuffle, seed, num_epochs)
    if pad_last:
        if num_epochs != 1:
            raise ValueError(f"pad_last completes the last batch of one pass: it needs num_epochs=1, got {num_epochs}")
        padding_example(kind, examples[0])  # the kind has padding rows
        drop_remainder = False
        if not (fmt.packable and pack):  # packing decides the rows itself: its last batch is padded below
            ds = _pad_examples(ds, kind, batch_size)
    if fmt.packable and pack:
        # Packing decides which examples share a row from the whole global stream, so every process packs all of
        # it and keeps its rows of each packed global batch.
        ds = grain.experimental.FirstFitPackIterDataset(
            ds.to_iter_dataset(_READ), length_struct={"tokens": T, "loss_mask": T}, num_packing_bins=batch_size,
            padding_struct={"tokens": pad, "loss_mask": 0.0},
            seed=seed, shuffle_bins=shuffle)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder).map(_packed_to_batch)
        if pad_last:
            ds = ds.map(lambda b: _pad_packed_batch(b, batch_size))
        if process_rows is not None and len(process_rows) != batch_size:
            keep = np.asarray(_check_rows(process_rows, batch_size))
            ds = ds.map(lambda b: {k: v[keep] for k, v in b.items()})
        return ds
    if process_rows is not None:
        ds = _process_share(ds, batch_size, process_rows, drop_remainder)
        batch_size = len(process_rows)
    collate = fmt.collate(pad, lengths)
    return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate).to_iter_dataset(_READ)


# -- rows for the loop ---------------------------------------------------------------------------------------------

def _prompt_key(row: dict) -> str:
    """What makes two rows "the same prompt": the Nectar prompt string, else the conversation's messages."""
    return row["prompt"] if "prompt" in row else repr([(m["role"], m["content"]) for m in row["messages"]])


def _by_prompt(rows: list[dict], fractions: Sequence[float]) -> list[list[dict]]:
    """Split rows into len(fractions) + 1 parts (the last is the rest) so that no prompt string is in two parts.

    Rows are grouped by their prompt (the Nectar "prompt" string, else the rendered messages); the groups are taken in
    one fixed random order (the same for every stage and seed) and given to part i until it holds about
    fractions[i] * len(rows) rows."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(_prompt_key(r), []).append(i)
    order = [list(groups.values())[j] for j in np.random.default_rng(_HELDOUT_SPLIT_SEED).permutation(len(groups))]
    part_of = np.full(len(rows), len(fractions), np.int64)
    g = 0
    for part, fraction in enumerate(fractions):
        target, taken = int(round(len(rows) * fraction)), 0
        while taken < target and g < len(order):
            part_of[order[g]] = part
            taken += len(order[g])
            g += 1
    return [[r for i, r in enumerate(rows) if part_of[i] == part] for part in range(len(fractions) + 1)]


def split_heldout(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, held-out) split by prompt: about `fraction` of the rows are held out, and no held-out
    prompt string occurs among the training rows."""
    if not 0 <= fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    heldout, train = _by_prompt(rows, [fraction])
    return train, heldout


@dataclasses.dataclass
class Splits:
    """The rows of a DataConfig, split so that each part means what its name says:

    train    the rows every stage trains on (SFT targets, RM rankings, RL prompts)
    heldout  the reporting set: prompt strings that no training row has (data.heldout_fraction of the rows)
    tuning   a separate set of unseen prompt strings for choosing hyperparameters and for the loop's periodic eval
             (data.tuning_fraction; empty by default), so that the reporting set is never tuned on
    unseen   synthetic data only: every row whose first user turn uses one of the last data.unseen_templates prompt
             templates (synthetic.PROMPTS) - a phrasing that no stage ever trains on, reported separately
    true_utility  the data source's own evaluation hook: (conversation, reply) -> the true utility of a reply, where
             the source knows it (synthetic data: synthetic.true_utility, the hidden reward its preferences are
             drawn from); None for real data
    """
    train: list
    heldout: list
    tuning: list
    unseen: list
    report: nectar.DataReport
    true_utility: Optional[Callable[[list, str], float]] = None

    def named(self) -> dict[str, list]:
        return {"heldout": self.heldout, "tuning": self.tuning, "unseen": self.unseen}


def load_splits(data) -> Splits:
    """The train / held-out / tuning / unseen rows of a DataConfig: source "synthetic", a verifiable task
    ("task:NAME", data/tasks.py), a Nectar file or directory of parquet/JSONL files, or a tensorflow-datasets data_dir
    holding the `nectar` builder's output."""
    true_utility = synthetic.true_utility if data.source == "synthetic" else None
    if data.source == "synthetic":
        raw = synthetic.make_rows(data.synthetic_prompts, data.synthetic_seed, data.synthetic_noise)
        rows, report = nectar.parse_rows(raw, on_bad_row=data.on_bad_row, source="synthetic")
    elif data.source.startswith("task:"):
        task = tasks.get(data.source)
        rows, report = nectar.parse_rows(task.make_rows(data.synthetic_seed), on_bad_row="error", min_answers=1,
                                         source=data.source)
        true_utility = task.true_utility
    else:
        if tfds_nectar.is_tfds_dir(data.source):
            raw = tfds_nectar.read_raw_rows(data.source)
            rows, report = nectar.parse_rows(raw, on_bad_row=data.on_bad_row, source=data.source)
        else:
            rows, report = nectar.read_rows(data.source, on_bad_row=data.on_bad_row)
    if not rows:
        raise nectar.NectarError(f"data source {data.source!r}: no usable rows ({report.summary()}); point "
                                 f"data.source at Nectar files with valid rows")
    if report.skipped or report.files_ignored:  # said now, not only in the stage summary at the end
        _log.warning("data %s: %s%s", data.source, report.summary(),
                     "".join(f"\n  skipped {m}" for m in report.skipped_examples[:5]))
    unseen_templates = getattr(data, "unseen_templates", 0)
    tuning_fraction = getattr(data, "tuning_fraction", 0.0)
    report_rows = getattr(data, "report_rows", 0)
    reporting = getattr(data, "reporting", True)
    if not reporting and not tuning_fraction:
        raise ValueError("data.reporting=false (a selection run) needs a tuning split: set data.tuning_fraction > 0")
    if report_rows:
        return _with_report_rows(data, rows, report, tuning_fraction, report_rows if reporting else 0, true_utility)
    if unseen_templates and data.source != "synthetic":
        raise ValueError("data.unseen_templates needs data.source='synthetic' (it names synthetic prompt templates)")
    if not 0 <= data.heldout_fraction < 1 or not 0 <= tuning_fraction < 1 \
            or data.heldout_fraction + tuning_fraction >= 1:
        raise ValueError(f"need heldout_fraction, tuning_fraction >= 0 with a sum below 1, got "
                         f"{data.heldout_fraction} and {tuning_fraction}")
    unseen = [r for r in rows if synthetic.uses_unseen_template(r["messages"], unseen_templates)] \
        if unseen_templates else []
    if unseen:
        rows = [r for r in rows if not synthetic.uses_unseen_template(r["messages"], unseen_templates)]
    # fractions of all usable rows (unseen ones included), so adding an unseen split does not grow the others
    total = len(rows) + len(unseen)
    heldout, tuning, train = _by_prompt(rows, [data.heldout_fraction * total / len(rows),
                                               tuning_fraction * total / len(rows)])
    if not train:
        raise ValueError(f"data source {data.source!r}: no training rows left after the held-out, tuning and "
                         f"unseen splits ({len(heldout)}, {len(tuning)}, {len(unseen)} rows)")
    if not reporting:  # a selection run: the same training rows, and no reporting row leaves this function
        heldout, unseen = [], []
    report.train_rows, report.heldout_rows = len(train), len(heldout)
    return Splits(train=train, heldout=heldout, tuning=tuning, unseen=unseen, report=report,
                  true_utility=true_utility)


def _with_report_rows(data, rows, report, tuning_fraction: float, n: int, true_utility) -> Splits:
    """Splits with generated reporting splits (data.report_rows): every make_rows row is a training or
    (tuning_fraction, by prompt group) a tuning row; held-out and unseen rows come from synthetic.make_report_rows,
    or a task's own held-out rows from its make_report_rows (checked against training and tuning by the task's
    check_reporting)."""
    task = tasks.get(data.source) if data.source.startswith("task:") else None
    if data.source != "synthetic" and (task is None or task.make_report_rows is None):
        raise ValueError("data.report_rows needs data.source='synthetic' or a task with its own reporting split "
                         "(task:ifeval): it generates the reporting rows")
    if data.heldout_fraction or getattr(data, "unseen_templates", 0):
        raise ValueError("data.report_rows generates the held-out and unseen splits itself: set "
                         "data.heldout_fraction=0 and data.unseen_templates=0")
    if not 0 <= tuning_fraction < 1:
        raise ValueError(f"need 0 <= tuning_fraction < 1, got {tuning_fraction}")
    reporting = {"heldout": [], "unseen": []}
    for split in (task.report_splits if task else ("heldout", "unseen")):  # n = 0: a selection run generates none
        raw = task.make_report_rows(split, n, data.synthetic_seed) if task else \
            synthetic.make_report_rows(split, n, data.synthetic_seed, data.synthetic_noise)
        reporting[split], _ = nectar.parse_rows(raw, on_bad_row="error", source=f"{data.source} {split}")
        if task and task.check_reporting is not None:
            task.check_reporting(rows, reporting[split])
    tuning, train = _by_prompt(rows, [tuning_fraction])
    trained = {_prompt_key(r) for r in rows}
    for split, part in reporting.items():  # true by construction (synthetic.make_report_rows); checked, not assumed
        shared = sorted({_prompt_key(r) for r in part} & trained)
        if shared:
            raise ValueError(f"{data.source} {split} split shares {len(shared)} prompt string(s) with training or tuning "
                             f"rows, e.g. {shared[0]!r}")
    report.train_rows, report.heldout_rows = len(train), len(reporting["heldout"])
    return Splits(train=train, heldout=reporting["heldout"], tuning=tuning, unseen=reporting["unseen"], report=report,
                  true_utility=true_utility)


def load_rows(data) -> tuple[list[dict], list[dict], nectar.DataReport]:
    """(train_rows, heldout_rows, report) of load_splits(data)."""
    s = load_splits(data)
    return s.train, s.heldout, s.report


def dataset_for(kind: str, rows, tokenizer, data, batch_size: int, *, template=None, seed: Optional[int] = None,
                shuffle: bool = True, num_epochs: Optional[int] = None, process_rows: Optional[Sequence[int]] = None,
                pad_last: bool = False, report: Optional[nectar.DataReport] = None):
    """make_dataset with the lengths, K, pairs and packing of a DataConfig."""
    return make_dataset(kind, rows, tokenizer, batch_size, template=template, max_length=data.max_length,
                        max_prompt_length=data.max_prompt_length, max_responses=data.max_responses,
                        pairs=data.pairs, pack=data.pack, seed=data.shuffle_seed if seed is None else seed,
                        shuffle=shuffle, num_epochs=num_epochs, process_rows=process_rows, pad_last=pad_last,
                        report=report)
