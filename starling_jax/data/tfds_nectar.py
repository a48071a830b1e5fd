"""A tensorflow-datasets builder `nectar` built from local Nectar files (parquet shards or JSONL), stored as
array_record so it reads back without TensorFlow: tfds.data_source -> grain.MapDataset.

    path, report = build(source="nectar/data", data_dir="~/tfds")       # validates rows (on_bad_row) first
    ds = grain_source("~/tfds")                                          # MapDataset of raw Nectar rows
    rows, report = nectar.parse_rows(ds)                                 # or data.load_rows(DataConfig(source=...))

The stored rows are the raw Nectar fields (plus the synthetic rows' "utilities" when present); rows that fail
validation (nectar.parse_rows: the fields, the metadata's types, utilities) or cannot be decoded (a JSONL line that is
not UTF-8 or not JSON) are skipped (on_bad_row="skip", counted in the report) or stop the build ("error"), so every
row written converts to the stored feature types.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np

from starling_jax.data import nectar

VERSION = "1.0.0"
FILE_FORMAT = "array_record"


@functools.lru_cache(maxsize=None)  # define (and so register with tfds) the class once
def _builder_class():
    import tensorflow_datasets as tfds

    class Nectar(tfds.core.GeneratorBasedBuilder):
        """Nectar (berkeley-nest/Nectar) from local files: prompt, 2..7 ranked answers, metadata."""
        VERSION = tfds.core.Version(VERSION)

        def __init__(self, *, rows=None, **kwargs):
            self._rows = rows  # validated raw rows to write (None when only reading)
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Nectar: chat prompts with K ranked answers (rank 1 = best).",
                features=tfds.features.FeaturesDict({
                    "prompt": tfds.features.Text(),
                    "answers": tfds.features.Sequence({
                        "answer": tfds.features.Text(), "model": tfds.features.Text(), "rank": np.float32}),
                    "turns": np.int32,
                    "num_responses": np.int32,
                    "source": tfds.features.Sequence(tfds.features.Text()),
                    "good_natured": np.bool_,
                    "utilities": tfds.features.Sequence(np.float32),  # synthetic rows only (else empty)
                }),
                homepage="https://huggingface.co/datasets/berkeley-nest/Nectar",
                disable_shuffling=True,  # keep the source order, so row indices match the files
            )

        def _split_generators(self, dl_manager):
            if self._rows is None:
                raise ValueError("the nectar builder needs rows to build; use starling_jax.data.tfds_nectar.build")
            return {"train": self._generate_examples(self._rows)}

        def _generate_examples(self, rows):
            for i, row in enumerate(rows):
                yield i, _to_record(row)

    return Nectar


def _to_record(row: dict) -> dict:
    answers = row["answers"]
    source = row.get("source")
    return {
        "prompt": row["prompt"],
        "answers": [{"answer": a["answer"], "model": str(a.get("model") or ""), "rank": float(a["rank"])}
                    for a in answers],
        "turns": int(row.get("turns") or 0),
        "num_responses": int(row.get("num_responses") or len(answers)),
        "source": [str(s) for s in (source if isinstance(source, (list, tuple)) else [source] if source else [])],
        "good_natured": bool(row.get("good_natured", True)),
        "utilities": [float(u) for u in (row.get("utilities") or [])],
    }


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def record_to_row(record: dict) -> dict:
    """A tfds record (bytes, dict of lists) back to a raw Nectar row."""
    a = record["answers"]
    row = {
        "prompt": _text(record["prompt"]),
        "answers": [{"answer": _text(t), "model": _text(m), "rank": float(r)}
                    for t, m, r in zip(a["answer"], a["model"], a["rank"])],
        "turns": int(record["turns"]),
        "num_responses": int(record["num_responses"]),
        "source": [_text(s) for s in record["source"]],
        "good_natured": bool(record["good_natured"]),
    }
    if len(record["utilities"]):
        row["utilities"] = [float(u) for u in record["utilities"]]
    return row


def build(source: str | list, data_dir: str, on_bad_row: str = "error", ties: str = "break"
          ) -> tuple[str, nectar.DataReport]:
    """Validate the rows of `source` (a Nectar file/directory, or a list of raw rows) and write the `nectar`
    dataset under data_dir. Returns (dataset directory, report)."""
    import tensorflow_datasets as tfds
    report = nectar.DataReport()
    if isinstance(source, (str, os.PathLike)):
        raw = []
        for f in nectar.find_files(str(source), report):
            rows = nectar.read_file(f, on_bad_row, report)
            parsed, _ = nectar.parse_rows(rows, on_bad_row, ties, source=f, report=report)
            raw += [rows[p["row"]] for p in parsed]
    else:
        parsed, _ = nectar.parse_rows(source, on_bad_row, ties, source="rows", report=report)
        raw = [source[p["row"]] for p in parsed]
    report.rows_kept = len(raw)
    builder = _builder_class()(rows=raw, data_dir=os.path.expanduser(data_dir), file_format=FILE_FORMAT)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
    return str(builder.data_dir), report


def dataset_dir(data_dir: str) -> Optional[str]:
    """The built dataset's directory (data_dir/nectar/VERSION, or data_dir itself if it is one), else None."""
    data_dir = os.path.expanduser(data_dir)
    for d in (os.path.join(data_dir, "nectar", VERSION), data_dir):
        if os.path.exists(os.path.join(d, "dataset_info.json")):
            return d
    return None


def is_tfds_dir(path: str) -> bool:
    return os.path.isdir(os.path.expanduser(path)) and dataset_dir(path) is not None


def data_source(data_dir: str, split: str = "train"):
    """tfds.data_source over the built dataset (random access, no TensorFlow)."""
    import tensorflow_datasets as tfds
    d = dataset_dir(data_dir)
    if d is None:
        raise FileNotFoundError(f"no built nectar dataset under {data_dir!r} (expected nectar/{VERSION}/"
                                f"dataset_info.json); build it with starling_jax.data.tfds_nectar.build")
    root = os.path.dirname(os.path.dirname(d))
    _builder_class()  # registers the `nectar` builder with tfds
    return tfds.data_source("nectar", data_dir=root, split=split, builder_kwargs={"file_format": FILE_FORMAT},
                            download=False)


def grain_source(data_dir: str, split: str = "train"):
    """A grain.MapDataset of raw Nectar rows read from the built dataset."""
    import grain
    return grain.MapDataset.source(data_source(data_dir, split)).map(record_to_row)


def read_raw_rows(data_dir: str, split: str = "train") -> list[dict]:
    """All raw rows of the built dataset, in stored order."""
    ds = grain_source(data_dir, split)
    return [ds[i] for i in range(len(ds))]


def main(argv=None) -> None:
    """python -m starling_jax.data.tfds_nectar SOURCE DATA_DIR [--on-bad-row skip] [--ties reject]"""
    import argparse
    p = argparse.ArgumentParser(description="Build the tfds `nectar` dataset (array_record) from local Nectar files.")
    p.add_argument("source", help="a Nectar .parquet/.jsonl/.json file or a directory of them")
    p.add_argument("data_dir", help="tfds data_dir to write nectar/" + VERSION + " under")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    p.add_argument("--ties", choices=("break", "reject"), default="break")
    args = p.parse_args(argv)
    path, report = build(args.source, args.data_dir, args.on_bad_row, args.ties)
    print(f"built {path}: {report.summary()}")
    for message in report.skipped_examples:
        print("  skipped", message)


if __name__ == "__main__":
    main()
