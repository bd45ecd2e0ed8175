"""``fit``: the training loop over epochs, in small named parts.

* :class:`_Plan`, the schedule: how many steps, and which steps are report
  points (history entries, evaluations, checkpoints); calls never cross one.
* :func:`_calls`, the data: ``fnn.data.stream`` batches from the position the
  run has reached, stacked ``K`` at a time for a ``steps_per_call=K`` step.
* :class:`fnn.training.report.Reporter`: the progress bar, the history and
  its file.
* :class:`_Saver`: checkpoints and the exact resume.
* callbacks (:mod:`fnn.callbacks`): after steps, evaluations and checkpoints.

The data order is a function of ``(key, epoch)`` and the number of steps taken
fixes the position in the stream, so a checkpoint needs only the train state,
that count and the metrics not yet in an entry to resume *exactly*: the
resumed run continues with the same batches, keys and params, bit for bit, as
a run that never stopped. Between report points the loop never waits for the
device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any

import jax

from fnn.model.options import boolean, choice, positive_int
from fnn.training.accumulate import leading_size
from fnn.training.callbacks import Run
from fnn.training.data import batches as data_batches
from fnn.training.data import num_batches, stack
from fnn.training.data import stream as data_stream
from fnn.training.evaluate import evaluate
from fnn.training.history import HistoryFile, NonFiniteLossError
from fnn.training.loss_scale import all_finite
from fnn.training.report import Reporter, current_lr, eval_columns, learning_rate
from fnn.training.resume import Saver


class _Plan:
    """The schedule: total steps, steps per epoch and the report grid."""

    def __init__(self, n, batch_size, remainder, epochs, steps, grid, k):
        self.per_epoch = num_batches(n, batch_size, remainder)
        if self.per_epoch == 0:
            raise ValueError(
                f"fit: {n} examples give no batch of {batch_size} with "
                f"remainder={remainder!r}; use a smaller batch_size."
            )
        self.total = min(
            epochs * self.per_epoch if epochs is not None else math.inf,
            steps if steps is not None else math.inf,
        )
        self.grid = [g for g in grid if g]
        self.k = k

    def call_size(self, done: int) -> int:
        """Steps in the call that starts after ``done`` steps."""
        to_grid = min((g - done % g for g in self.grid), default=self.k)
        return min(self.k, self.total - done, to_grid)

    def due(self, every: int | None, done: int) -> bool:
        return bool(every) and done % every == 0


def _calls(plan: _Plan, stream: Iterator, done: int, put: Callable) -> Iterator:
    """``(k, batch)`` per call, sent to the device one call ahead."""
    ahead: list = []
    while done < plan.total:
        k = plan.call_size(done)
        group = list(islice(stream, k))
        batch = next(stack(group, k)) if k > 1 else group[0]
        ahead.append((k, put(batch)))
        if len(ahead) > 1:
            yield ahead.pop(0)
        done += k
    yield from ahead


def fit(
    train_step: Callable[[Any, Any], tuple[Any, dict]],
    train_state: Any,
    train_data: Any,
    *,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    key: jax.Array | None = None,
    shuffle: bool = True,
    remainder: str = "drop",
    eval_step: Callable[..., dict] | None = None,
    eval_data: Any = None,
    eval_every: int | None = None,
    eval_batch_size: int | None = None,
    log_every: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    max_to_keep: int | None = 3,
    resume: bool = True,
    history_path: str | os.PathLike | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    progress_every: int = 25,
) -> tuple[Any, list[dict[str, float]]]:
    """Trains ``train_state`` with ``train_step`` over ``train_data``.

    Each step takes the next batch of ``batch_size`` examples. The run is
    ``epochs`` passes over the data or ``steps`` steps, whichever ends first;
    both count from the start of the run, so calling ``fit`` again with the
    same arguments after an interruption resumes from the latest checkpoint
    and ends where an uninterrupted run ends.

    Metrics stay on the device between *report points*: every ``log_every``
    steps (a history entry), every ``eval_every`` steps, at a checkpoint,
    every ``progress_every`` steps (the bar's loss) and at the end. There the
    pending metrics are pulled in one transfer and every step's loss is
    checked: a NaN or infinite loss raises :class:`fnn.training.NonFiniteLossError`
    naming the step, and since every checkpoint is preceded by that check and
    a check of the params, no checkpoint holds a state reached through a
    non-finite loss.

    Args:
      train_step: from :func:`fnn.make_train_step` (or any ``step(state,
        batch) -> (state, metrics)`` doing one step). With
        ``steps_per_call=K``, ``fit`` stacks ``K`` batches per call and uses
        ``train_step.single`` for the calls it shortens to land exactly on a
        report point (choose the report intervals as multiples of ``K``).
      train_state: the state to start from, from ``train_step.init``;
        replaced by the latest checkpoint's when resuming. A donating step
        consumes it: use the returned state.
      train_data: a pytree (usually a dict) of arrays sharing the leading size
        ``n``, batched with :func:`fnn.data.stream`. With a mesh and many
        processes, each process passes its own rows.
      batch_size: examples per step (per process, with many processes).
      epochs: the number of passes over the data.
      steps: the number of steps (at least one of ``epochs``, ``steps``).
      key: the data-order key (``jax.random.key``): epoch ``e`` is shuffled by
        ``fold_in(key, e)``. Required when ``shuffle``.
      shuffle: whether to shuffle each epoch.
      remainder: the last ``n % batch_size`` examples of an epoch: ``"drop"``,
        ``"pad"`` (with ``batch["mask"]``) or ``"keep"``; see
        :func:`fnn.data.batches`.
      eval_step: from :func:`fnn.make_eval_step`; with ``eval_data``,
        evaluated every ``eval_every`` steps and at the end.
      eval_data: a pytree of arrays, batched in order with
        ``remainder="pad"``, so the means are exact when the metric function
        applies ``batch["mask"]`` (:func:`fnn.evaluate` refuses one that
        does not).
      eval_every: steps between evaluations; ``None`` evaluates at the end.
      eval_batch_size: examples per eval batch; ``batch_size`` by default.
      log_every: steps between history entries; ``None`` means once an epoch.
      checkpoint_dir: where to save checkpoints (:class:`fnn.Checkpointer`)
        and ``history.jsonl``, the history they resume with; ``None`` saves
        none.
      checkpoint_every: steps between checkpoints; ``None`` saves at the end
        only. A checkpoint is always saved at the end.
      max_to_keep: how many recent checkpoints to keep.
      resume: continue from the latest checkpoint in ``checkpoint_dir``. With
        ``resume=False`` a directory that holds checkpoints is an error.
      history_path: a ``.jsonl`` or ``.csv`` file that gains one line per
        entry (written by process 0 only).
      callbacks: objects with ``after_step``, ``after_eval`` and
        ``after_checkpoint`` methods, which may stop training (see
        :mod:`fnn.callbacks`: ``EarlyStopping``, ``BestCheckpoint``).
      progress: show a tqdm bar (on process 0) with the loss, the latest eval
        metrics and training examples per second.
      progress_every: steps between updates of the bar's loss.

    Returns:
      ``(train_state, history)``. ``history`` is a list of dicts, one per
      entry: ``step`` (the train state's step), ``epoch`` (epochs done,
      fractional), the train metrics averaged since the previous entry (loss
      and aux metrics per example, ``grad_norm`` and ``loss_scale`` per step,
      ``skipped`` summed), ``lr`` when the
      optimizer state holds a learning rate (``optax.inject_hyperparams``)
      and, where evaluated, ``eval_`` + each eval metric.

    Raises:
      ValueError: for bad arguments; for resuming from a checkpoint written
        with another ``batch_size``, data-order key or dataset; for existing
        checkpoints with ``resume=False``.
      NonFiniteLossError: when a loss or the params become NaN or infinite;
        for a loss, ``err.batch`` is the batch of the failing step, for
        :func:`fnn.find_nonfinite`.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, optax, fnn
      >>> def loss_fn(params, batch, key):
      ...     err = batch["x"] * params["w"] - batch["y"]
      ...     return jnp.sum(err**2), batch["x"].shape[0]
      >>> step = fnn.make_train_step(loss_fn, optax.sgd(0.1))
      >>> ts = step.init({"w": jnp.zeros(())}, key=jax.random.key(0))
      >>> x = np.linspace(-1, 1, 32, dtype=np.float32)
      >>> ts, history = fnn.fit(step, ts, {"x": x, "y": 3 * x}, batch_size=8,
      ...                       epochs=40, key=jax.random.key(1), progress=False)
      >>> round(float(ts.params["w"]), 3), len(history), history[-1]["step"]
      (3.0, 40, 160)
    """
    if epochs is None and steps is None:
        raise ValueError("fit: pass epochs=, steps= or both.")
    for name, v in (("batch_size", batch_size), ("progress_every", progress_every)):
        positive_int("fit", name, v)
    for name, v in (
        ("epochs", epochs),
        ("steps", steps),
        ("eval_every", eval_every),
        ("eval_batch_size", eval_batch_size),
        ("log_every", log_every),
        ("checkpoint_every", checkpoint_every),
    ):
        positive_int("fit", name, v, optional=True)
    choice("fit", "remainder", remainder, ("drop", "pad", "keep"))
    boolean("fit", "shuffle", shuffle)
    if shuffle and key is None:
        raise ValueError(
            "fit: shuffle=True needs key=, the data-order key, e.g. "
            "key=jax.random.key(0); or pass shuffle=False."
        )
    if (eval_step is None) != (eval_data is None):
        raise ValueError("fit: pass eval_step and eval_data together.")
    k = getattr(train_step, "steps_per_call", 1)
    if k > 1 and remainder == "keep":
        raise ValueError(
            f"fit: a step with steps_per_call={k} stacks batches of one shape; "
            f"use remainder='drop' or 'pad', not 'keep'."
        )
    n = leading_size(train_data, "train_data")
    _check_batch_sizes(train_step, n, batch_size, remainder)
    log_every = log_every or num_batches(n, batch_size, remainder)
    grid = [log_every, eval_every if eval_step is not None else None]
    grid.append(checkpoint_every if checkpoint_dir is not None else None)
    plan = _Plan(n, batch_size, remainder, epochs, steps, grid, k)
    saver = None
    if checkpoint_dir is not None:
        saver = Saver(checkpoint_dir, max_to_keep, batch_size, n, key, train_data)
    try:
        return _loop(
            train_step, train_state, train_data, plan, saver, callbacks,
            batch_size=batch_size, key=key, shuffle=shuffle, remainder=remainder,
            eval_step=eval_step, eval_data=eval_data, eval_every=eval_every,
            eval_batch_size=eval_batch_size or batch_size, log_every=log_every,
            checkpoint_every=checkpoint_every, resume=resume,
            history_path=history_path, progress=progress,
            progress_every=progress_every,
        )  # fmt: skip
    finally:
        if saver is not None:
            saver.close()


def _check_batch_sizes(train_step: Any, n: int, batch_size: int, remainder: str):
    """Refuses, before training, a batch size the step would refuse later."""
    multiple = getattr(train_step, "batch_multiple", 1)
    sizes = {batch_size} | ({n % batch_size} if remainder == "keep" else set())
    for size in sorted(sizes - {0}):
        if size % multiple:
            what = "batch_size" if size == batch_size else "the last batch"
            raise ValueError(
                f"fit: {what} of {size} examples does not split into the step's "
                f"microbatches (accum_steps x devices = {multiple}); use a batch "
                f"size that is a multiple of {multiple}"
                + (", or remainder='pad' or 'drop'." if size != batch_size else ".")
            )


def _eval_batches(eval_data: Any, size: int) -> Iterator:
    return data_batches(eval_data, size, shuffle=False, remainder="pad")


def _loop(train_step, ts, train_data, plan, saver, callbacks, **o) -> tuple:
    """The loop itself: calls, report points, evaluations, checkpoints."""
    run, done = Run(), 0
    eval_sample = None
    if o["eval_step"] is not None:
        eval_sample = next(_eval_batches(o["eval_data"], o["eval_batch_size"]))
    lr = learning_rate(ts.opt_state) if hasattr(ts, "opt_state") else None
    pending: list = []
    if saver is not None:
        ts, done, run.history, pending = saver.resume(
            ts, o["resume"], callbacks, plan.total
        )
    history_file = None
    if o["history_path"] is not None:
        history_file = HistoryFile(
            o["history_path"],
            keep=len(run.history),
            extra_columns=eval_columns(o["eval_step"], ts, eval_sample),
        )
    reporter = Reporter(plan.total, done, o["batch_size"], o["progress"], history_file)
    reporter.log.restore(pending)
    run.step = int(ts.step) if hasattr(ts, "step") else done
    base = run.step - done  # the state's step when done == 0
    single = getattr(train_step, "single", train_step)
    mesh = getattr(train_step, "mesh", None)
    put = getattr(train_step, "shard", None) if mesh is not None else None
    if put is None:
        put = (lambda b: b) if jax.default_backend() == "cpu" else jax.device_put
    stream = data_stream(
        train_data, o["batch_size"], key=o["key"], shuffle=o["shuffle"],
        remainder=o["remainder"], start=done,
    )  # fmt: skip
    last_ckpt = saver.last_step if saver is not None else None
    continued = len(run.history)  # entries an uninterrupted run also has
    with reporter.bar:
        for k, batch in _calls(plan, stream, done, put):
            ts, metrics = (train_step if k > 1 else single)(ts, batch)
            reporter.log.add(base + done + 1, metrics)
            done += k
            run.step, run.epoch = base + done, done / plan.per_epoch
            run.train_state, run.metrics = ts, metrics
            reporter.bar.update(k)
            for cb in callbacks:
                if hasattr(cb, "after_step"):
                    cb.after_step(run)
            final = done >= plan.total or run.stopped is not None
            eval_grid = o["eval_step"] is not None and plan.due(o["eval_every"], done)
            on_grid = plan.due(o["log_every"], done) or eval_grid
            eval_due = o["eval_step"] is not None and (eval_grid or final)
            save_due = saver is not None and (
                plan.due(o["checkpoint_every"], done) or final
            )
            crossed = done // o["progress_every"] != (done - k) // o["progress_every"]
            if not (on_grid or final or save_due or crossed):
                continue
            try:
                reporter.log.pull(last_ckpt)
            except NonFiniteLossError as err:
                _point_to_batch(err, train_data, err.step - base - 1, o)
                raise
            if on_grid or final:
                entry = reporter.entry(run, done, plan.per_epoch, current_lr(ts, lr))
                if eval_due:
                    results = evaluate(
                        o["eval_step"], ts,
                        _eval_batches(o["eval_data"], o["eval_batch_size"]),
                    )  # fmt: skip
                    results.pop("weight", None)
                    results = {f"eval_{name}": v for name, v in results.items()}
                    entry.update(results)
                    for cb in callbacks:
                        if hasattr(cb, "after_eval"):
                            cb.after_eval(run, results)
                    final = final or run.stopped is not None
                    save_due = save_due or (saver is not None and final)
                reporter.record(run, entry)
                if on_grid:  # an uninterrupted run has this entry too
                    reporter.log.reset()
                    continued = len(run.history)
            if save_due:
                _check_params(ts, run.step, last_ckpt)
                saver.save(
                    run.step, ts, done, run.history, continued, reporter.log,
                    callbacks,
                )  # fmt: skip
                last_ckpt = run.step
                for cb in callbacks:
                    if hasattr(cb, "after_checkpoint"):
                        cb.after_checkpoint(run, run.step)
            reporter.refresh(done)
            reporter.restart_clock(done)
            if final:
                break
    return ts, run.history


def _point_to_batch(err: NonFiniteLossError, train_data, position: int, o) -> None:
    """Gives ``err`` the failing step's host batch and says how to use it.

    The batch is made again from the data stream at that step's position (the
    order depends only on the key and the position), so ``fit`` keeps no
    batches while it runs.
    """
    err.batch = next(
        data_stream(
            train_data, o["batch_size"], key=o["key"], shuffle=o["shuffle"],
            remainder=o["remainder"], start=position,
        )
    )  # fmt: skip
    err.add_note(
        f"fit: err.batch is the batch of step {err.step}; "
        f"fnn.find_nonfinite(loss_fn, params, err.batch) names the first layer "
        f"whose output or gradient became NaN or Inf, given the params before "
        f"that step (run fit again with steps={position} to get them)."
    )


_all_finite = jax.jit(all_finite)


def _check_params(ts: Any, step: int, last_ckpt: int | None) -> None:
    """Refuses to save a state whose params or optimizer state are not finite."""
    if not bool(_all_finite(ts)):
        last = "none" if last_ckpt is None else f"step {last_ckpt}"
        raise NonFiniteLossError(
            f"fit: the params became NaN or infinite at step {step} (the loss was "
            f"finite); training stopped and the state was not saved. The last "
            f"checkpoint: {last}.",
            step,
            None,
            last_ckpt,
        )
