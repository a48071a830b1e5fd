"""Where training metrics go: WORKDIR/<stage>/metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow)
and a tqdm progress bar. The loop hands over host floats only (it fetches device metrics once per logged step)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Optional

from starling_jax.files import write_atomic, write_json

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger(__name__)


def _records(path: str) -> list[tuple[str, Optional[dict]]]:
    """(line, record) for each non-blank line; record None for a line that is not a JSON object (e.g. the last line
    half-written when a run was killed), with a warning naming the file and line."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                log.warning("%s: line %d is not a metrics record (cut by a kill?): %.60r; left out", path, n, line)
                record = None
            out.append((line if line.endswith("\n") else line + "\n", record))
    return out


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (or of WORKDIR/<stage>/ given its directory). A damaged line (a kill
    mid-write) is left out with a warning."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    return [r for _, r in _records(path) if r is not None]


def _jsonable(x):
    """Floats as JSON allows them: NaN/inf become strings so every line stays valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop records after `last_step` (written by a run that was killed after its last checkpoint) and any line a kill
    left half-written, so a resumed run's file reads as if it had never stopped."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        raw = f.read()
    records = _records(path)
    kept = [line for line, r in records if r is not None and r.get("step", 0) <= last_step]
    if "".join(kept).encode() != raw:  # records dropped, a damaged line, or a last line without its newline
        write_atomic(path, "".join(kept))


WINDOW_FILE = "metrics_window.json"


def save_window(workdir: str, step: int, window: dict, keep_steps) -> None:
    """Record the logging window a checkpoint at `step` cuts (the per-step host metrics since the last logged step,
    its first step, tokens and elapsed seconds), so a run resumed from that checkpoint logs the same window mean as
    one that never stopped. Written before the checkpoint (an entry without its checkpoint is never read); entries
    of steps not in keep_steps are dropped. JSON floats round-trip exactly, so the completed mean is bit-identical."""
    path = os.path.join(workdir, WINDOW_FILE)
    entries = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                entries = json.load(f)
        except (OSError, ValueError):
            entries = {}
    keep = {str(s) for s in keep_steps} | {str(step)}
    entries = {k: v for k, v in entries.items() if k in keep}
    entries[str(step)] = window
    write_json(path, entries)


def load_window(workdir: str, step: int) -> Optional[dict]:
    """The window save_window recorded for the checkpoint at `step`, or None (none recorded, or unreadable)."""
    path = os.path.join(workdir, WINDOW_FILE)
    try:
        with open(path) as f:
            return json.load(f).get(str(step))
    except (OSError, ValueError, AttributeError):
        return None


def delete_windows(workdir: str) -> None:
    path = os.path.join(workdir, WINDOW_FILE)
    if os.path.exists(path):
        os.remove(path)


class MetricsLogger:
    """Writes one JSON object per logged step to metrics.jsonl, the same scalars to TensorBoard, and a progress bar.

    start_step: the step the run (re)starts from; records after it are removed from an existing metrics.jsonl.
    """

    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 progress: bool = True, desc: str = ""):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        truncate_metrics(self.path, start_step)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # lazily: only when asked for
            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
        self._bar = None
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, file=sys.stderr, dynamic_ncols=True,
                             mininterval=1.0)
        self._last_step = start_step

    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        """metrics: name -> float (or JSON-able); `prefix` (e.g. "eval/") is prepended to every name."""
        record = {"step": int(step), **{prefix + k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(prefix + k, v, global_step=step)
        if self._bar is not None:
            if step > self._last_step:
                self._bar.update(step - self._last_step)
                self._last_step = step
            shown = {k: v for k, v in record.items() if k in ("loss", "tokens_per_s", "step_time", "mfu",
                                                               prefix + "loss", "eval/pair_accuracy")}
            self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in shown.items()
                                   if k != "step"}, refresh=False)

    def write(self, message: str) -> None:
        """A line for the user that does not break the progress bar."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            log.info(message)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float, num_devices: int) -> Optional[float]:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak (None when not configured)."""
    if flops_per_token <= 0 or peak_flops <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak_flops * num_devices)


def plot_metrics(records: list[dict], path: str, panels, xlabel: str = "step", title: str = "") -> Optional[str]:
    """A PNG of metrics.jsonl records: one panel per (title, metric names) of `panels`, each metric against "step".
    None (and no file) when no record has a "loss". matplotlib is imported here, only when a plot is made."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if "loss" in r]
    if not records:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    steps = [r["step"] for r in records]
    for ax, (name, keys) in zip(axes[0], panels):
        for k in keys:
            if k in records[0]:
                ax.plot(steps, [r.get(k, float("nan")) for r in records], label=k, marker=".")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("wrote %s", path)
    return path
