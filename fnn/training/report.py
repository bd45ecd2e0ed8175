"""``fit``'s reporting part: the progress bar, the history and its file.

The learning rate of an ``optax.inject_hyperparams`` state goes into the
history; the evaluation metrics' names make a CSV history's header.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from fnn.training.callbacks import Run
from fnn.training.history import MetricLog


def learning_rate(opt_state: Any) -> Any:
    """The learning rate an ``optax.inject_hyperparams`` state holds, or None."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "learning_rate")
    values = [v for _, v in found if hasattr(v, "dtype") and np.ndim(v) == 0]
    return values[0] if len(values) == 1 else None


class Reporter:
    """The progress bar, the metric log, the history and its file."""

    def __init__(self, total, done, batch_size, progress, history_file):
        main = jax.process_index() == 0  # one bar and one file per job
        self.bar = tqdm(
            total=total,
            initial=done,
            unit="step",
            disable=not progress or not main,
            dynamic_ncols=True,
        )
        self.file = history_file if main else None
        self.log = MetricLog()
        self.batch_size = batch_size
        self.shown: dict[str, str] = {}
        self.clock = (time.perf_counter(), done)

    def entry(self, run: Run, done: int, per_epoch: int, lr: Any) -> dict:
        """The next history entry: the step, the epoch and the mean metrics."""
        entry = {"step": run.step, "epoch": round(done / per_epoch, 6)}
        entry.update(self.log.means())
        if lr is not None:
            entry["lr"] = float(lr)
        return entry

    def record(self, run: Run, entry: dict) -> None:
        run.history.append(entry)
        if self.file is not None:
            self.file.append(entry)
        self.shown.update({k: f"{v:.4f}" for k, v in entry.items() if "eval_" in k})
        if "loss" in entry:
            self.shown["loss"] = f"{entry['loss']:.4f}"

    def refresh(self, done: int) -> None:
        """The bar's loss and speed (training time since the last refresh)."""
        if self.log.host and "loss" not in self.shown:
            self.shown["loss"] = f"{self.log.means().get('loss', math.nan):.4f}"
        seconds = time.perf_counter() - self.clock[0]
        if seconds > 0 and done > self.clock[1]:
            rate = (done - self.clock[1]) * self.batch_size / seconds
            self.shown["ex/s"] = f"{rate:,.0f}"
        order = sorted(self.shown, key=lambda k: (k != "loss", k == "ex/s", k))
        self.bar.set_postfix({k: self.shown[k] for k in order}, refresh=False)

    def restart_clock(self, done: int) -> None:
        self.clock = (time.perf_counter(), done)


def eval_columns(eval_step: Any, train_state: Any, eval_batch: Any) -> list[str]:
    """The history keys of the evaluation metrics (for a CSV header)."""
    if eval_step is None:
        return []
    sums = jax.eval_shape(eval_step, train_state, eval_batch)
    return [f"eval_{k}" for k in sums if not k.startswith("_") and k != "weight"]


def current_lr(ts: Any, template: Any) -> Any:
    """The learning rate of ``ts`` if ``template`` (the first state) had one."""
    return None if template is None else learning_rate(ts.opt_state)
