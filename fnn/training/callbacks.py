"""Callbacks: code that :func:`fnn.fit` calls after steps, evaluations and saves.

A callback is any object with some of these methods (all optional)::

    after_step(run)                  # after each compiled call (1 or K steps)
    after_eval(run, metrics)         # metrics: {"eval_loss": ..., ...}
    after_checkpoint(run, step)      # a checkpoint for ``step`` was saved
    state() -> JSON-able             # saved in fit's checkpoints ...
    restore(state)                   # ... and given back on resume

``run`` is a :class:`Run`: where training stands (``run.step``,
``run.epoch``, ``run.train_state``, ``run.history``) and ``run.stop(reason)``,
which ends training after the current call, with the final history entry and
checkpoint written as at a normal end. A callback that keeps state (a best
value, a patience count) returns it from ``state()``, so a resumed run
continues exactly where it stopped.

Examples:
  >>> import fnn
  >>> stop = fnn.callbacks.EarlyStopping("eval_loss", patience=2)
  >>> stop
  EarlyStopping('eval_loss', patience=2, mode='min', min_delta=0.0)
"""

from __future__ import annotations

import math
import os
from typing import Any

from fnn.model.options import choice, number, positive_int
from fnn.training.checkpoint import Checkpointer


class Run:
    """Where a :func:`fnn.fit` run stands, as its callbacks see it.

    Attributes:
      step: the train state's step after the last call.
      epoch: epochs done, fractional.
      train_state: the current train state. Do not keep it across calls: a
        donating step frees its buffers at the next call.
      history: the entries so far.
      metrics: the last call's metrics, still on the device (reading them
        waits for the step).
      stopped: the reason given to :meth:`stop`, or ``None``.
    """

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0.0
        self.train_state: Any = None
        self.history: list[dict[str, float]] = []
        self.metrics: dict[str, Any] = {}
        self.stopped: str | None = None

    def stop(self, reason: str) -> None:
        """Ends training after the current call, saying ``reason``."""
        self.stopped = reason


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _monitored(owner: str, metrics: dict[str, float], monitor: str) -> float | None:
    if monitor not in metrics:
        raise KeyError(
            f"{owner}: the evaluation gave {sorted(metrics)!r}, not {monitor!r}; "
            f"monitor one of those."
        )
    value = float(metrics[monitor])
    return value if math.isfinite(value) else None


class EarlyStopping:
    """Stops training when an evaluation metric stops improving.

    After each evaluation, the metric counts as improved when it is below the
    best so far by more than ``min_delta`` (above, with ``mode="max"``).
    After ``patience`` evaluations in a row without improvement, training
    stops; ``fit``'s history then ends at that evaluation.

    Args:
      monitor: the history key of an evaluation metric, e.g. ``"eval_loss"``.
      patience: evaluations without improvement before stopping.
      mode: ``"min"`` or ``"max"``.
      min_delta: the smallest change that counts as an improvement.

    Examples:
      >>> import fnn
      >>> stop = fnn.callbacks.EarlyStopping("eval_accuracy", mode="max")
      >>> run = fnn.callbacks.Run()
      >>> for acc in (0.5, 0.6, 0.6, 0.55, 0.6):
      ...     stop.after_eval(run, {"eval_accuracy": acc})
      >>> run.stopped
      'eval_accuracy did not improve on 0.6 for 3 evaluations'
    """

    def __init__(
        self,
        monitor: str = "eval_loss",
        *,
        patience: int = 3,
        mode: str = "min",
        min_delta: float = 0.0,
    ):
        self.monitor = monitor
        self.patience = positive_int("EarlyStopping", "patience", patience)
        self.mode = choice("EarlyStopping", "mode", mode, ("min", "max"))
        self.min_delta = number("EarlyStopping", "min_delta", min_delta, low=0.0)
        self.best: float | None = None
        self.waited = 0

    def __repr__(self) -> str:
        return (
            f"EarlyStopping({self.monitor!r}, patience={self.patience}, "
            f"mode={self.mode!r}, min_delta={self.min_delta})"
        )

    def after_eval(self, run: Run, metrics: dict[str, float]) -> None:
        value = _monitored("EarlyStopping", metrics, self.monitor)
        if value is not None and _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.waited = value, 0
            return
        self.waited += 1
        if self.waited >= self.patience:
            run.stop(
                f"{self.monitor} did not improve on {self.best} for "
                f"{self.waited} evaluations"
            )

    def state(self) -> dict:
        return {"best": self.best, "waited": self.waited}

    def restore(self, state: dict) -> None:
        self.best, self.waited = state["best"], state["waited"]


class BestCheckpoint:
    """Keeps the train state of the best evaluation in its own directory.

    After each evaluation that improves the monitored metric, the train state
    is saved (with :class:`fnn.Checkpointer`, keeping one checkpoint) under
    ``directory``; the checkpoint's metadata holds the metric. Restore it with
    ``fnn.Checkpointer(directory).restore(target)``.

    Args:
      directory: where the best checkpoint lives (not ``fit``'s
        ``checkpoint_dir``).
      monitor: the history key of an evaluation metric, e.g. ``"eval_loss"``.
      mode: ``"min"`` or ``"max"``.

    Attributes:
      best: the best value so far, or ``None``.
      best_step: its step, or ``None``.

    Examples:
      >>> import tempfile, fnn
      >>> best = fnn.callbacks.BestCheckpoint(tempfile.mkdtemp(), "eval_loss")
      >>> best.best is None
      True
    """

    def __init__(
        self, directory: str | os.PathLike, monitor: str = "eval_loss", *, mode="min"
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self.monitor = monitor
        self.mode = choice("BestCheckpoint", "mode", mode, ("min", "max"))
        self.best: float | None = None
        self.best_step: int | None = None

    def __repr__(self) -> str:
        return (
            f"BestCheckpoint({self.directory!r}, {self.monitor!r}, mode={self.mode!r})"
        )

    def after_eval(self, run: Run, metrics: dict[str, float]) -> None:
        value = _monitored("BestCheckpoint", metrics, self.monitor)
        if value is None or not _improved(value, self.best, self.mode, 0.0):
            return
        self.best, self.best_step = value, run.step
        with Checkpointer(self.directory, max_to_keep=1, async_save=False) as ckpt:
            if run.step in ckpt.all_steps():
                return
            ckpt.save(run.step, run.train_state, metadata={self.monitor: value})

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step}

    def restore(self, state: dict) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
