"""``fit``'s checkpoints and its exact resume.

A checkpoint of a ``fit`` run holds the train state (:class:`fnn.Checkpointer`)
and small metadata: the number of steps done, the metrics not yet averaged
into a history entry, the number of history entries, the callbacks' state, and
what the data stream depends on (the batch size, the data-order key, a
fingerprint of the training data). The history itself is appended to
``history.jsonl`` in the checkpoint directory, one line per entry, so neither
the checkpoints nor the history file grow with the length of the run.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any

import jax
import numpy as np

from fnn.training.checkpoint import Checkpointer
from fnn.training.history import History, HistoryFile, MetricLog

HISTORY_FILE = "history.jsonl"


def fingerprint(arrays: Any) -> str:
    """A hash of a dataset's structure, shapes, dtypes and bytes.

    Examples:
      >>> import numpy as np
      >>> from fnn.training.resume import fingerprint
      >>> fingerprint({"x": np.zeros(3)}) == fingerprint({"x": np.ones(3)})
      False
    """
    h = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_leaves_with_path(arrays):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}{a.dtype}".encode())
        h.update(a.data)
    return h.hexdigest()


def _key_data(key: Any) -> list[int] | None:
    if key is None:
        return None
    return np.asarray(jax.random.key_data(key)).ravel().tolist()


class Saver:
    """Saves and restores a ``fit`` run in ``directory``."""

    def __init__(self, directory, max_to_keep, batch_size, n, key, train_data):
        self.ckpt = Checkpointer(directory, max_to_keep=max_to_keep)
        self.stream = {
            "batch_size": batch_size,
            "examples": n,
            "data_key": _key_data(key),
            # Many processes hold different rows: only one process's data is
            # comparable across runs, so the fingerprint is left out there.
            "data": fingerprint(train_data) if jax.process_count() == 1 else None,
        }
        self.last_step: int | None = None
        self.history: HistoryFile | None = None
        self.main = jax.process_index() == 0

    def resume(
        self, ts: Any, resume: bool, callbacks: Any, total: float
    ) -> tuple[Any, int, History, list]:
        """``(train state, steps done, history, pending metrics)`` to start from.

        A run that had reached ``total`` steps keeps its whole history; one
        that stopped early drops the entry its stop added between report
        points, which an uninterrupted run does not have. A checkpoint that
        does not verify is skipped, with a warning, for the newest that does.
        """
        steps = self.ckpt.all_steps()
        if not steps:
            self._open_history(0)
            return ts, 0, [], []
        where = self.ckpt.directory
        if not resume:
            raise ValueError(
                f"fit: {where} already holds checkpoints (latest step {steps[-1]}); "
                f"pass resume=True to continue from it or use another "
                f"checkpoint_dir."
            )
        ts, meta, latest = self._restore_newest_good(ts, steps)
        for name, value in self.stream.items():
            if meta.get(name) != value:
                raise ValueError(
                    f"fit: the checkpoint in {where} was written for another data "
                    f"stream ({name}: it has {_show(name, meta.get(name))}, this "
                    f"run {_show(name, value)}; batch_size={meta.get('batch_size')}"
                    f" and {meta.get('examples')} examples there), so it cannot "
                    f"resume exactly; use another checkpoint_dir."
                )
        finished = meta["done"] >= total
        kept = meta["history_entries"] if finished else meta["continued_entries"]
        self._open_history(kept)
        history = self.history.read()[:kept] if self.history else []
        for cb, state in zip(callbacks, meta.get("callbacks", [])):
            if state is not None and hasattr(cb, "restore"):
                cb.restore(state)
        self.last_step = latest
        return ts, meta["done"], history, [] if finished else meta["pending_metrics"]

    def _restore_newest_good(self, ts: Any, steps: list[int]) -> tuple:
        """``(state, metadata, step)`` of the newest checkpoint that verifies;
        the damaged newer ones are moved to ``damaged/`` so their steps can be
        saved again."""
        damaged = []
        for step in reversed(steps):
            try:
                restored, meta = self.ckpt.restore(ts, step)
            except Checkpointer.CorruptError as e:
                damaged.append((step, e))
                continue
            break
        else:
            raise Checkpointer.CorruptError(
                f"fit: no checkpoint in {self.ckpt.directory} verifies (steps "
                f"{steps!r}); the newest failed with: {damaged[0][1]}"
            )
        if damaged:
            for bad, _ in damaged:
                self.ckpt.set_aside(bad)
            warnings.warn(
                f"fit: resuming from step {step}, the newest checkpoint in "
                f"{self.ckpt.directory} that verifies; steps "
                f"{[s for s, _ in damaged]!r} are damaged and were moved to "
                f"{self.ckpt.directory}/damaged (the newest: {damaged[0][1]})",
                RuntimeWarning,
                stacklevel=4,
            )
        return restored, meta, step

    def _open_history(self, keep: int) -> None:
        path = os.path.join(self.ckpt.directory, HISTORY_FILE)
        if self.main:
            self.history = HistoryFile(path, keep=keep)
        self.written = keep

    def save(
        self,
        step: int,
        ts: Any,
        done: int,
        history: History,
        continued: int,
        log: MetricLog,
        callbacks: Any,
    ) -> None:
        if self.history is not None:
            for entry in history[self.written :]:
                self.history.append(entry)
        self.written = len(history)
        meta = {
            **self.stream,
            "done": done,
            "history_entries": len(history),
            # Entries an uninterrupted run also has: a final entry at a stop
            # between report points is dropped when the run resumes.
            "continued_entries": continued,
            "pending_metrics": log.saved(),
            "callbacks": [
                cb.state() if hasattr(cb, "state") else None for cb in callbacks
            ],
        }
        self.ckpt.save(step, ts, metadata=meta)
        self.last_step = step

    def close(self) -> None:
        self.ckpt.close()


def _show(name: str, value: Any) -> str:
    if name == "data_key" and value is not None:
        return f"key data {value!r}"
    if name == "data" and value is not None:
        return f"fingerprint {value[:12]}"
    return repr(value)
