"""Training history: per-step metrics kept on the device, averaged into entries.

:func:`fit` records a history, a list of dicts of numbers (one per report
point), and can write it as JSON or CSV with :func:`write_history`. Between
report points the per-step metrics stay on the device; :class:`MetricLog`
pulls them in one transfer, checks each step's loss and averages them.
"""

from __future__ import annotations

import csv
import json
import os

import jax
import numpy as np

__all__ = ["MetricLog", "NonFiniteLossError", "write_history"]

History = list[dict[str, float]]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss (or params); nothing was saved after.

    Attributes:
      step: the step (counted as in the history: 1 is the first update) whose
        loss, or whose resulting params, were not finite.
      loss: that loss, a float (NaN or +-inf), or ``None`` for params.
      last_checkpoint: the step of the last checkpoint, all of whose steps had
        finite losses, or ``None``.

    Examples:
      >>> import fnn
      >>> issubclass(fnn.NonFiniteLossError, FloatingPointError)
      True
    """

    step: int
    loss: float | None
    last_checkpoint: int | None


def non_finite_error(
    message: str, step: int, loss: float | None, last: int | None
) -> NonFiniteLossError:
    """A :class:`NonFiniteLossError` with its attributes set."""
    err = NonFiniteLossError(message)
    err.step, err.loss, err.last_checkpoint = step, loss, last
    return err


def write_history(history: History, path: str | os.PathLike) -> None:
    """Writes a history to ``path``: JSON for ``.json``, CSV for ``.csv``.

    The file is written to ``path + ".tmp"`` and renamed, so it is always
    complete. A CSV has one column per key, in order of first appearance, and
    an empty cell where an entry lacks the key (e.g. eval metrics).

    Args:
      history: a list of dicts of numbers, as :func:`fit` returns.
      path: the file to write.

    Raises:
      ValueError: for an extension other than ``.json`` or ``.csv``.

    Examples:
      >>> import os, tempfile, fnn
      >>> path = os.path.join(tempfile.mkdtemp(), "h.csv")
      >>> fnn.write_history([{"step": 1, "loss": 0.5}, {"step": 2}], path)
      >>> with open(path) as f:
      ...     print(f.read().strip())
      step,loss
      1,0.5
      2,
    """
    path = os.fspath(path)
    ext = history_format(path)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        if ext == ".json":
            json.dump(history, f, indent=1)
        else:
            columns = list(dict.fromkeys(k for entry in history for k in entry))
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)
    os.replace(tmp, path)


def history_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".csv"):
        raise ValueError(f"fit: history_path must end in .json or .csv, got {path!r}.")
    return ext


class MetricLog:
    """Per-step metrics kept on the device until they are needed on the host.

    Examples:
      >>> import jax.numpy as jnp, fnn
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
                raise non_finite_error(
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
        metrics (weighted by ``weight``), per step for ``grad_norm``."""
        if not self.host:
            return {}
        cols = {
            k: np.concatenate([m[k] for _, m in self.host]) for k in self.host[0][1]
        }
        w = cols.pop("weight", None)
        out = {}
        for k, v in cols.items():
            if k == "grad_norm" or w is None or w.sum() <= 0:
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
