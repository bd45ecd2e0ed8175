"""``fit``: the training loop over epochs, with evaluation, history and checkpoints.

The loop owns nothing that a training step does not: it draws batches with
:func:`fnn.data.batches`, calls the step, and at chosen steps pulls the metrics
to the host, evaluates, records history and saves checkpoints. Between those
points it never waits for the device, so a jitted step runs back to back.

The data order is a function of ``(key, epoch)``, and the number of steps taken
fixes the position in the stream (epoch ``done // steps_per_epoch``, batch
``done % steps_per_epoch``). A checkpoint therefore needs only the train state
and that count to resume *exactly*: the resumed run skips the batches already
consumed and continues with the same batches, the same PRNG keys and the same
params, bit for bit, as a run that never stopped.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from itertools import islice
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fnn.training import data
from fnn.training.checkpoint import Checkpointer
from fnn.training.compiling import jit_step
from fnn.training.evaluate import evaluate
from fnn.training.history import (
    History,
    MetricLog,
    history_format,
    non_finite_error,
    write_history,
)
from fnn.training.step import leading_size
from fnn.training.train_state import scan_train_state

__all__ = ["fit"]


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


@functools.lru_cache(maxsize=8)
def _scanned(train_step: Callable) -> Callable:
    """``train_step`` run over a leading axis of stacked batches, compiled once
    per step function (a resumed ``fit`` in the same process reuses it)."""
    return jit_step(lambda ts, bs: scan_train_state(train_step, ts, bs), donate=True)


def _positive(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"fit: {name} must be a positive int, got {value!r}.")


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
    steps_per_call: int = 1,
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
    progress: bool = True,
    progress_every: int = 25,
) -> tuple[Any, History]:
    """Trains ``train_state`` with ``train_step`` over ``train_data``.

    Each step takes the next batch of ``batch_size`` examples. The run is
    ``epochs`` passes over the data or ``steps`` steps, whichever ends first;
    both count from the start of the run, so calling ``fit`` again with the
    same arguments after an interruption resumes from the latest checkpoint
    and ends where an uninterrupted run ends.

    Metrics stay on the device between *report points*; at a report point
    (every ``log_every`` steps, every ``eval_every`` steps, at a checkpoint,
    every ``progress_every`` steps for the progress bar, and at the end) the
    pending metrics are pulled in one transfer and every step's loss is
    checked. A NaN or infinite loss raises :class:`NonFiniteLossError` naming
    the step and the loss; since every checkpoint is preceded by that check
    (and a check of the params), no checkpoint holds a state reached through a
    non-finite loss.

    Args:
      train_step: ``step(train_state, batch) -> (train_state, metrics)`` doing
        ONE optimizer step, e.g. :func:`fnn.make_train_step` with the default
        ``steps_per_call=1``; ``metrics`` has ``"loss"`` and, for exact means,
        ``"weight"``.
      train_state: the state to start from (e.g. ``fnn.TrainState.create``);
        replaced by the latest checkpoint's when resuming. A donating step
        consumes it: use the returned state.
      train_data: a pytree (usually a dict) of arrays sharing the leading size
        ``n``, batched with :func:`fnn.data.batches`.
      batch_size: examples per step.
      epochs: the number of passes over the data.
      steps: the number of steps (at least one of ``epochs``, ``steps``).
      key: the data-order key (``jax.random.key``): epoch ``e`` is shuffled by
        ``fold_in(key, e)``. Required when ``shuffle``.
      shuffle: whether to shuffle each epoch.
      remainder: the last ``n % batch_size`` examples of an epoch: ``"drop"``,
        ``"pad"`` (with ``batch["mask"]``) or ``"keep"``; see
        :func:`fnn.data.batches`.
      steps_per_call: ``K`` steps per compiled call: ``fit`` stacks ``K``
        batches and runs ``train_step`` ``K`` times inside one ``lax.scan``.
        Batches flow across epoch ends, so every batch of every epoch is used
        in the same order as with ``K = 1``; calls are shortened (single
        steps) only to land exactly on a report point, so choose ``log_every``,
        ``eval_every`` and ``checkpoint_every`` as multiples of ``K``.
      eval_step: from :func:`fnn.make_eval_step`; with ``eval_data``, evaluated
        every ``eval_every`` steps and at the end.
      eval_data: a pytree of arrays, batched in order (``remainder="keep"``,
        so the means are exact without a mask).
      eval_every: steps between evaluations; ``None`` evaluates at the end only.
      eval_batch_size: examples per eval batch; ``batch_size`` by default.
      log_every: steps between history entries; ``None`` means once an epoch.
      checkpoint_dir: where to save checkpoints (:class:`fnn.Checkpointer`);
        ``None`` saves none.
      checkpoint_every: steps between checkpoints; ``None`` saves at the end
        only. A checkpoint is always saved at the end.
      max_to_keep: how many recent checkpoints to keep.
      resume: continue from the latest checkpoint in ``checkpoint_dir`` if there
        is one. With ``resume=False`` a directory that holds checkpoints is an
        error (nothing is overwritten).
      history_path: a ``.json`` or ``.csv`` file rewritten at each entry (by
        process 0 only, in a multi-process job).
      progress: show a tqdm bar (on process 0) with the loss, the latest eval
        metrics and training examples per second.
      progress_every: steps between updates of the bar's loss (each costs one
        transfer of the pending metrics).

    Returns:
      ``(train_state, history)``. ``history`` is a list of dicts, one per
      report point: ``step`` (the train state's step), ``epoch`` (epochs done,
      fractional), the train metrics averaged since the previous entry (the
      loss and aux metrics per example, ``grad_norm`` per step) and, where
      evaluated, ``eval_`` + each eval metric.

    Raises:
      ValueError: for bad arguments, a checkpoint written with another
        ``batch_size`` or dataset size, or existing checkpoints with
        ``resume=False``.
      NonFiniteLossError: when a loss or the params become NaN or infinite.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, optax, fnn
      >>> def loss_fn(params, batch, key):
      ...     err = batch["x"] * params["w"] - batch["y"]
      ...     return jnp.sum(err**2), batch["x"].shape[0]
      >>> opt = optax.sgd(0.1)
      >>> ts = fnn.TrainState.create({"w": jnp.zeros(())}, opt, key=jax.random.key(0))
      >>> x = np.linspace(-1, 1, 32, dtype=np.float32)
      >>> ts, history = fnn.fit(
      ...     fnn.make_train_step(loss_fn, opt), ts, {"x": x, "y": 3 * x},
      ...     batch_size=8, epochs=40, key=jax.random.key(1), progress=False)
      >>> round(float(ts.params["w"]), 3), len(history), history[-1]["step"]
      (3.0, 40, 160)
    """
    if epochs is None and steps is None:
        raise ValueError("fit: pass epochs=, steps= or both.")
    for name, v in (
        ("batch_size", batch_size),
        ("steps_per_call", steps_per_call),
        ("progress_every", progress_every),
    ):
        _positive(name, v, allow_none=False)
    for name, v in (
        ("epochs", epochs),
        ("steps", steps),
        ("eval_every", eval_every),
        ("eval_batch_size", eval_batch_size),
        ("log_every", log_every),
        ("checkpoint_every", checkpoint_every),
    ):
        _positive(name, v)
    if shuffle and key is None:
        raise ValueError(
            "fit: shuffle=True needs key=, the data-order key, e.g. "
            "key=jax.random.key(0); or pass shuffle=False."
        )
    if (eval_step is None) != (eval_data is None):
        raise ValueError("fit: pass eval_step and eval_data together.")
    if steps_per_call > 1 and remainder == "keep":
        raise ValueError(
            "fit: steps_per_call > 1 stacks batches of one shape; use "
            "remainder='drop' or 'pad', not 'keep'."
        )
    if history_path is not None:
        history_format(os.fspath(history_path))
    n = leading_size(train_data, "train_data")
    per_epoch = data.num_batches(n, batch_size, remainder)
    if per_epoch == 0:
        raise ValueError(
            f"fit: {n} examples give no batch of {batch_size} with "
            f"remainder={remainder!r}; use a smaller batch_size."
        )
    total = min(
        epochs * per_epoch if epochs is not None else math.inf,
        steps if steps is not None else math.inf,
    )
    log_every = log_every or per_epoch
    # The report grid: calls never cross it, so entries and checkpoints land on
    # exact steps. The bar refreshes at the first call ending past a multiple
    # of progress_every instead, so it never shortens a call.
    grid = [log_every]
    grid += [eval_every] if eval_every and eval_step is not None else []
    grid += [checkpoint_every] if checkpoint_every and checkpoint_dir else []

    ckpt = (
        None
        if checkpoint_dir is None
        else Checkpointer(checkpoint_dir, max_to_keep=max_to_keep)
    )
    try:
        done, history, last_ckpt = 0, [], None
        metrics = MetricLog()
        if ckpt is not None and ckpt.latest_step() is not None:
            if not resume:
                raise ValueError(
                    f"fit: {ckpt.directory} already holds checkpoints (latest step "
                    f"{ckpt.latest_step()}); pass resume=True to continue from it or "
                    f"use another checkpoint_dir."
                )
            train_state, meta = ckpt.restore(train_state)
            if (meta.get("batch_size"), meta.get("examples")) != (batch_size, n):
                raise ValueError(
                    f"fit: the checkpoint in {ckpt.directory} was written for "
                    f"batch_size={meta.get('batch_size')} and "
                    f"{meta.get('examples')} examples, this run has "
                    f"batch_size={batch_size} and {n}; it cannot resume exactly. "
                    f"Use another checkpoint_dir."
                )
            done, history, last_ckpt = meta["done"], meta["history"], ckpt.latest_step()
            if done < total:
                # Continue as if never stopped: drop the entry the stop added
                # and restore the metrics not yet averaged into an entry.
                history = history[: meta["continued_history"]]
                metrics.restore(meta["pending_metrics"])
        base = int(train_state.step) - done  # the state's step at done = 0

        def chunk(at: int) -> int:
            """Steps in the call that starts after ``at`` steps."""
            to_grid = min(g - at % g for g in grid)
            return min(steps_per_call, total - at, to_grid)

        def stream():
            epoch, skip = divmod(done, per_epoch)
            while True:
                it = data.batches(
                    train_data,
                    batch_size,
                    key=key,
                    epoch=epoch,
                    shuffle=shuffle,
                    remainder=remainder,
                )
                yield from islice(it, skip, None)
                epoch, skip = epoch + 1, 0

        put = (lambda b: b) if jax.default_backend() == "cpu" else jax.device_put

        def calls():
            """Yields ``(k, batch)`` per call, the batch already sent to the
            device one call ahead, so the copy overlaps the running step. On
            CPU there is nothing to overlap and the step's own transfer is
            cheaper than an explicit ``device_put``."""
            batches, at, ahead = stream(), done, []
            while at < total:
                k = chunk(at)
                group = list(islice(batches, k))
                if k == steps_per_call > 1:
                    group = [(k, jax.tree.map(lambda *xs: np.stack(xs), *group))]
                else:
                    group = [(1, b) for b in group]
                for k_b, b in group:
                    ahead.append((k_b, put(b)))
                    if len(ahead) > 1:
                        yield ahead.pop(0)
                at += k
            yield from ahead

        many = _scanned(train_step) if steps_per_call > 1 else None
        continued = len(history)  # entries an uninterrupted run also has
        main_process = jax.process_index() == 0  # one bar and file per job
        bar = tqdm(
            total=total,
            initial=done,
            unit="step",
            disable=not progress or not main_process,
            dynamic_ncols=True,
        )
        clock = [time.perf_counter(), done]  # training time only: reset after
        shown: dict[str, str] = {}  # reports and saves, so they do not count

        def report(final: bool) -> None:
            nonlocal continued
            metrics.pull(last_ckpt)
            seconds = time.perf_counter() - clock[0]
            eval_grid = bool(eval_every) and done % eval_every == 0
            on_grid = done % log_every == 0 or (eval_step is not None and eval_grid)
            eval_due = eval_step is not None and (final or eval_grid)
            if final or on_grid:
                entry = {"step": base + done, "epoch": round(done / per_epoch, 6)}
                entry.update(metrics.means())
                if eval_due:
                    eval_batches = data.batches(
                        eval_data,
                        eval_batch_size or batch_size,
                        shuffle=False,
                        remainder="keep",
                    )
                    results = evaluate(eval_step, train_state, eval_batches)
                    results.pop("weight", None)
                    entry.update({f"eval_{k}": v for k, v in results.items()})
                history.append(entry)
                if on_grid:
                    metrics.reset()
                    continued = len(history)
                if history_path is not None and main_process:
                    write_history(history, history_path)
                shown.update(
                    {k: f"{v:.4f}" for k, v in entry.items() if k.startswith("eval_")}
                )
                if "loss" in entry:
                    shown["loss"] = f"{entry['loss']:.4f}"
            elif metrics.host:
                shown["loss"] = f"{metrics.means().get('loss', math.nan):.4f}"
            if seconds > 0 and done > clock[1]:
                shown["ex/s"] = f"{(done - clock[1]) * batch_size / seconds:,.0f}"
            order = sorted(shown, key=lambda k: (k != "loss", k == "ex/s", k))
            bar.set_postfix({k: shown[k] for k in order}, refresh=False)

        def save() -> None:
            nonlocal last_ckpt
            metrics.pull(last_ckpt)
            if not bool(_all_finite(train_state)):
                last = "none" if last_ckpt is None else f"step {last_ckpt}"
                raise non_finite_error(
                    f"fit: the params became NaN or infinite at step {base + done} "
                    f"(the loss was finite); training stopped and the state was not "
                    f"saved. The last checkpoint: {last}.",
                    base + done,
                    None,
                    last_ckpt,
                )
            meta = {
                "done": done,
                "epoch": done // per_epoch,
                "batch": done % per_epoch,
                "batch_size": batch_size,
                "examples": n,
                "history": history,
                "continued_history": continued,
                "pending_metrics": metrics.saved(),
            }
            ckpt.save(base + done, train_state, metadata=meta)
            last_ckpt = base + done

        with bar:
            for k, batch in calls():
                if k > 1:
                    train_state, m = many(train_state, batch)
                else:
                    train_state, m = train_step(train_state, batch)
                metrics.add(base + done + 1, m)
                done += k
                bar.update(k)
                final = done >= total
                reported = (
                    final
                    or any(done % g == 0 for g in grid)
                    or done // progress_every != (done - k) // progress_every
                )
                if reported:
                    report(final)
                if ckpt is not None and (
                    final
                    or (checkpoint_every is not None and done % checkpoint_every == 0)
                ):
                    save()
                if reported:
                    clock[:] = [time.perf_counter(), done]
        return train_state, history
    finally:
        if ckpt is not None:
            ckpt.close()
