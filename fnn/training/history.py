"""Training history: per-step metrics kept on the device, averaged into entries.

:func:`fnn.fit` records a history, a list of dicts of numbers (one per report
point). Between report points the per-step metrics stay on the device;
:class:`MetricLog` pulls them in one transfer, checks each step's loss and
averages them. :class:`HistoryFile` appends each entry as one line (JSON Lines
or CSV), so writing a history costs the same at the first entry as at the
millionth.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

History = list[dict[str, float]]
FORMATS = (".jsonl", ".csv")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss (or params); nothing was saved after.

    Attributes:
      step: the step (counted as in the history: 1 is the first update) whose
        loss, or whose resulting params, were not finite.
      loss: that loss, a float (NaN or +-inf), or ``None`` for params.
      last_checkpoint: the step of the last checkpoint, all of whose steps had
        finite losses, or ``None``.
      batch: the batch (host arrays) of the step whose loss was not finite,
        set by :func:`fnn.fit`, for :func:`fnn.find_nonfinite`; ``None`` for
        params.

    Examples:
      >>> import fnn
      >>> issubclass(fnn.training.NonFiniteLossError, FloatingPointError)
      True
    """

    def __init__(
        self, message: str, step: int, loss: float | None, last_checkpoint: int | None
    ):
        super().__init__(message)
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint
        self.batch: Any = None


NonFiniteLossError.__module__ = "fnn.training"


def history_format(owner: str, path: str | os.PathLike) -> str:
    """The extension of a history file, ``.jsonl`` or ``.csv``; else an error."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in FORMATS:
        raise ValueError(
            f"{owner}: history_path must end in .jsonl (JSON Lines) or .csv, one "
            f"line per entry, got {os.fspath(path)!r}."
        )
    return ext


class HistoryFile:
    """A history file that grows by one line per entry.

    JSON Lines (``.jsonl``) holds one JSON object per line. CSV (``.csv``) has
    a header, written with the first entry: that entry's keys, then
    ``extra_columns`` it lacks (the evaluation metrics, when the first entry
    has none); a later entry leaves an empty cell where it lacks a column.
    Opening a file keeps its first ``keep`` entries and drops the rest (a
    resumed run continues from the entries its checkpoint had).

    Examples:
      >>> import os, tempfile
      >>> from fnn.training.history import HistoryFile
      >>> path = os.path.join(tempfile.mkdtemp(), "h.csv")
      >>> f = HistoryFile(path, keep=0, extra_columns=["eval_loss"])
      >>> f.append({"step": 1, "loss": 0.5})
      >>> f.append({"step": 2, "loss": 0.25, "eval_loss": 0.3})
      >>> with open(path) as file:
      ...     print(file.read().strip())
      step,loss,eval_loss
      1,0.5,
      2,0.25,0.3
      >>> HistoryFile(path, keep=1).read()
      [{'step': 1, 'loss': 0.5}]
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        keep: int,
        extra_columns: Sequence[str] = (),
    ):
        self.path = os.fspath(path)
        self.ext = history_format("fit", self.path)
        self.extra = list(extra_columns)
        self.columns: list[str] | None = None
        entries: History = []
        if os.path.exists(self.path):
            entries = self.read()[:keep]
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            if self.ext == ".csv" and self.columns is not None:
                f.write(",".join(self.columns) + "\n")
            for entry in entries:
                f.write(self._line(entry))
        os.replace(tmp, self.path)

    def _line(self, entry: dict) -> str:
        if self.ext == ".jsonl":
            return json.dumps(entry) + "\n"
        header = ""
        if self.columns is None:
            self.columns = list(entry) + [c for c in self.extra if c not in entry]
            header = ",".join(self.columns) + "\n"
        unknown = set(entry) - set(self.columns)
        if unknown:
            raise ValueError(
                f"fit: the CSV history {self.path} has the columns {self.columns!r}, "
                f"not {sorted(unknown)!r}; use a .jsonl history for entries whose "
                f"keys change."
            )
        out = io.StringIO()
        csv.DictWriter(out, self.columns, lineterminator="\n").writerow(entry)
        return header + out.getvalue()

    def append(self, entry: dict) -> None:
        with open(self.path, "a", newline="") as f:
            f.write(self._line(entry))

    def read(self) -> History:
        """The entries in the file (numbers as floats or ints)."""
        with open(self.path, newline="") as f:
            if self.ext == ".jsonl":
                return [json.loads(line) for line in f if line.strip()]
            reader = csv.DictReader(f)
            rows = list(reader)
            self.columns = list(reader.fieldnames) if reader.fieldnames else None
        return [{k: _number(v) for k, v in row.items() if v != ""} for row in rows]


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


class MetricLog:
    """Per-step metrics kept on the device until they are needed on the host.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fnn.training.history import MetricLog
      >>> log = MetricLog()
      >>> log.add(1, {"loss": jnp.array(1.0), "weight": jnp.array(3.0)})
      >>> log.add(2, {"loss": jnp.array(3.0), "weight": jnp.array(1.0)})
      >>> log.pull(last_checkpoint=None)
      >>> log.means()
      {'loss': 1.5}
    """

    def __init__(self) -> None:
        self.device: list[tuple[int, dict]] = []  # (first step, metrics)
        self.host: list[tuple[int, dict]] = []

    def add(self, first_step: int, metrics: dict) -> None:
        self.device.append((first_step, metrics))

    def pull(self, last_checkpoint: int | None) -> None:
        """One transfer for everything pending; raises on a non-finite loss."""
        if not self.device:
            return
        pulled = jax.device_get([m for _, m in self.device])
        for (first, _), m in zip(self.device, pulled):
            m = {k: np.atleast_1d(np.asarray(v, np.float64)) for k, v in m.items()}
            bad = np.flatnonzero(~np.isfinite(m.get("loss", np.zeros(1))))
            if bad.size:
                step, loss = first + int(bad[0]), float(m["loss"][bad[0]])
                saved = (
                    "No checkpoint was saved before it"
                    if last_checkpoint is None
                    else f"The last checkpoint (step {last_checkpoint}) holds the "
                    f"last state saved before it"
                )
                raise NonFiniteLossError(
                    f"fit: the loss became {loss} at step {step}; training stopped. "
                    f"{saved}; lower the learning rate, clip gradients "
                    f"(optax.clip_by_global_norm) or check the data.",
                    step,
                    loss,
                    last_checkpoint,
                )
            self.host.append((first, m))
        self.device = []

    def means(self) -> dict[str, float]:
        """Means since the last :meth:`reset`: per example for the loss and aux
        metrics (weighted by ``weight``), per step for ``grad_norm`` and
        ``loss_scale``; ``skipped`` (loss scaling) is the number of skipped
        updates, and ``grad_norm`` the mean over the steps not skipped (a
        skipped step's gradient is not finite)."""
        if not self.host:
            return {}
        cols = {
            k: np.concatenate([m[k] for _, m in self.host]) for k in self.host[0][1]
        }
        w = cols.pop("weight", None)
        applied = cols["skipped"] == 0 if "skipped" in cols else None
        out = {}
        for k, v in cols.items():
            if k == "skipped":
                out[k] = float(v.sum())
            elif k == "grad_norm" and applied is not None:
                out[k] = float(v[applied].mean()) if applied.any() else math.nan
            elif k in ("grad_norm", "loss_scale") or w is None or w.sum() <= 0:
                out[k] = float(v.mean())
            else:
                out[k] = float((v * w).sum() / w.sum())
        return out

    def reset(self) -> None:
        self.host = []

    def saved(self) -> list:
        """The pulled metrics not yet in an entry, JSON-able (exact floats)."""
        return [
            [first, {k: v.tolist() for k, v in m.items()}] for first, m in self.host
        ]

    def restore(self, saved: list) -> None:
        self.host = [
            (first, {k: np.asarray(v) for k, v in m.items()}) for first, m in saved
        ]
