"""Evaluation: metric sums per batch on the device, divided once at the end.

The metric function follows the training loss protocol (a sum, a weight and
optional summed metrics), so a padded, masked last batch gives the exact mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnn.model.options import boolean
from fnn.training.accumulate import (
    LossFn,
    accumulator_dtype,
    check_aux_names,
    unpack_loss_output,
)
from fnn.training.loss_scale import all_finite
from fnn.training.train_state import TrainState

Metrics = dict[str, jax.Array]


def _padding_counted(batch: Any, weight: jax.Array) -> jax.Array:
    """1 when ``batch`` has padding rows and ``weight`` counts every row."""
    if not isinstance(batch, dict) or "mask" not in batch:
        return jnp.zeros((), jnp.int32)
    mask = jnp.asarray(batch["mask"])
    rows, real = mask.shape[0], jnp.sum(mask.reshape(mask.shape[0], -1)[:, 0])
    return ((real < rows) & (weight == rows)).astype(jnp.int32)


def make_eval_step(
    metric_fn: LossFn, *, has_state: bool = False, jit: bool = True
) -> Callable[..., Metrics]:
    """Builds ``eval_step(params_or_train_state, batch, state=None) -> sums``.

    ``metric_fn`` follows the loss protocol and is called with ``key=None``
    (inference: dropout off, running statistics), so the training loss
    function can be reused. The step returns *sums* ``{"loss": loss_sum,
    "weight": weight, **aux}``; :func:`evaluate` adds them over batches and
    divides once, so a padded, masked last batch gives the exact mean.

    Args:
      metric_fn: ``metric_fn(params, batch, key) -> (loss_sum, weight[, aux])``,
        or with ``has_state``, ``metric_fn(params, state, batch, key) -> (out,
        new_state)`` (the new state is discarded).
      has_state: whether ``metric_fn`` takes the model state.
      jit: compile the step.

    Returns:
      The eval step. Given a :class:`fnn.TrainState` it reads ``params`` and
      ``state`` from it; given params, the state comes from ``state=``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> def metric_fn(params, batch, key):
      ...     return jnp.sum(batch["x"] * params), 2.0, {"n": jnp.array(1.0)}
      >>> step = fnn.make_eval_step(metric_fn)
      >>> sums = step(jnp.array(3.0), {"x": jnp.ones(2)})
      >>> {k: float(v) for k, v in sums.items() if not k.startswith("_")}
      {'loss': 6.0, 'n': 1.0, 'weight': 2.0}
    """
    boolean("make_eval_step", "has_state", has_state)

    def sums_fn(params: Any, state: Any, batch: Any) -> Metrics:
        if has_state:
            out, _ = metric_fn(params, state, batch, None)
        else:
            out = metric_fn(params, batch, None)
        loss_sum, weight, aux = unpack_loss_output(out)
        check_aux_names(aux)
        sums = {"loss": loss_sum, "weight": weight, **aux}
        sums = {
            k: jnp.asarray(v, accumulator_dtype(jnp.asarray(v).dtype))
            for k, v in sums.items()
        }
        finite = all_finite(sums)
        sums["_nonfinite_batches"] = (~finite).astype(jnp.int32)
        sums["_padding_counted"] = _padding_counted(batch, weight)
        return sums

    compiled = jax.jit(sums_fn) if jit else sums_fn

    def eval_step(params_or_ts: Any, batch: Any, state: Any = None) -> Metrics:
        if isinstance(params_or_ts, TrainState):
            params, state = params_or_ts.params, params_or_ts.state
        else:
            params = params_or_ts
        return compiled(params, {} if state is None else state, batch)

    return eval_step


def evaluate(
    eval_step: Callable[..., Metrics],
    params_or_train_state: Any,
    batches: Iterable[Any],
    *,
    state: Any = None,
) -> dict[str, float]:
    """Means of the metrics over ``batches``: summed on device, divided once.

    Args:
      eval_step: from :func:`make_eval_step`.
      params_or_train_state: params, or a :class:`fnn.TrainState`.
      batches: an iterable of batches (e.g. :func:`fnn.data.batches` with
        ``remainder="pad"``, whose mask the metric function applies).
      state: the model state when ``params_or_train_state`` is params.

    Returns:
      ``{"loss": sum / weight, "weight": total weight, name: sum / weight}`` as
      Python floats (one host transfer at the end).

    Raises:
      ValueError: when ``batches`` is empty, or when batches carry padding
        (``batch["mask"]`` with ``False`` rows) and the metric function's
        weight counted those rows too (it ignores the mask, so the padding
        would count as examples).
      FloatingPointError: when a metric is NaN or infinite (NaN in the data or
        the params), naming the metrics and how many batches had them.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> def metric_fn(params, batch, key):
      ...     m = batch["mask"]
      ...     return jnp.sum(jnp.where(m, batch["x"], 0.0)), jnp.sum(m)
      >>> step = fnn.make_eval_step(metric_fn)
      >>> data = {"x": jnp.arange(5.0)}
      >>> fnn.evaluate(step, {}, fnn.data.batches(data, 2, shuffle=False,
      ...                                         remainder="pad"))
      {'loss': 2.0, 'weight': 5.0}
    """
    total, count = None, 0
    for batch in batches:
        sums = eval_step(params_or_train_state, batch, state)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        count += 1
    if total is None:
        raise ValueError("evaluate: got no batches.")
    total = jax.device_get(total)
    bad_batches = int(total.pop("_nonfinite_batches", 0))
    if total.pop("_padding_counted", 0) > 0:
        raise ValueError(
            "evaluate: the batches are padded (batch['mask'] marks the real rows) "
            "but the metric function's weight counts the padding rows too; apply "
            "the mask, e.g. return fnn.losses.sum_and_weight(per_example, "
            "batch['mask'])."
        )
    if bad_batches:
        bad = sorted(k for k, v in total.items() if not np.isfinite(v))
        raise FloatingPointError(
            f"evaluate: the metrics {bad!r} are NaN or infinite in {bad_batches} "
            f"of {count} batches; check the evaluation data and the params for NaN."
        )
    w = total["weight"]
    return {
        k: float(v) if k == "weight" else float(v / w if w > 0 else 0.0)
        for k, v in total.items()
    }
