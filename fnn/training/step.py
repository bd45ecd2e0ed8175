"""The training step: a train state, gradient accumulation by ``lax.scan``, eval.

A loss function returns a *sum* and a *weight* (the number of valid examples or
tokens), optionally with a dict of summed metrics::

    loss_fn(params, batch, key) -> (loss_sum, weight)
    loss_fn(params, batch, key) -> (loss_sum, weight, aux)        # aux: sums
    loss_fn(params, state, batch, key) -> (out, new_state)        # has_state

The step adds gradient sums and weights over microbatches in one ``lax.scan``
and divides once at the end, so masked and uneven microbatches give exactly the
gradient of the whole batch (a mean of per-microbatch means does not).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fnn.training.accumulate import (
    GradSums,
    LossFn,
    accumulate_gradients,
    leading_size,
    safe_divide,
)
from fnn.training.compiling import jit_step
from fnn.training.train_state import (
    PACK_MAX_SIZE,
    TrainState,
    TrainStateFields,
    scan_train_state,
)

__all__ = [
    "GradSums",
    "Metrics",
    "TrainState",
    "TrainStateFields",
    "accumulate_gradients",
    "apply_gradients",
    "leading_size",
    "make_train_step",
    "metrics_from_sums",
    "safe_divide",
    "scan_steps",
    "step_key",
]

Metrics = dict[str, jax.Array]


def check_step_counts(owner: str, accum_steps: Any, steps_per_call: Any) -> None:
    """Raises ``ValueError`` naming ``owner`` unless both are positive ints."""
    for name, v in (("accum_steps", accum_steps), ("steps_per_call", steps_per_call)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}.")


def check_aux_names(aux: dict) -> None:
    """Raises ``ValueError`` when ``aux`` uses a name the metrics reserve."""
    reserved = {"loss", "weight", "grad_norm"} & set(aux)
    if reserved:
        raise ValueError(f"loss_fn's aux may not use the names {sorted(reserved)!r}.")


def global_norm(tree: Any) -> jax.Array:
    """The 2-norm of all of ``tree``'s leaves, as ``optax.tree.norm``.

    Leaves with at most :data:`fnn.train_state.PACK_MAX_SIZE` elements are
    concatenated (per dtype) and reduced as one array: one reduction kernel
    instead of one per leaf, which on the 64-32-32-10 MLP halved what the
    ``grad_norm`` metric adds to a step (``benchmarks/overhead.py``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from fnn.training.step import global_norm
      >>> float(global_norm({"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}))
      5.0
    """
    small: dict[Any, list[jax.Array]] = {}
    squares = []
    for x in jax.tree.leaves(tree):
        if x.size <= PACK_MAX_SIZE:
            small.setdefault(x.dtype, []).append(jnp.ravel(x))
        else:
            squares.append(jnp.sum(jnp.square(x)))
    for parts in small.values():
        squares.append(jnp.sum(jnp.square(jnp.concatenate(parts))))
    return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def metrics_from_sums(sums: GradSums, *, grad_norm: bool = True) -> Metrics:
    """The step's metrics from the (cross-device) sums.

    Returns ``{"loss", "weight", **aux, "grad_norm"}``: sums divided by the
    weight (0 for a zero weight), the weight itself, and, unless ``grad_norm``
    is False, the norm of the gradient ``grad_sum / weight``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> from fnn.training.step import metrics_from_sums
      >>> sums = fnn.GradSums({"w": jnp.array(6.0)}, jnp.array(3.0), {},
      ...                     jnp.array(9.0), {})
      >>> sorted(metrics_from_sums(sums)), float(metrics_from_sums(sums)["grad_norm"])
      (['grad_norm', 'loss', 'weight'], 2.0)
      >>> sorted(metrics_from_sums(sums, grad_norm=False))
      ['loss', 'weight']
    """
    w = sums.weight
    aux = {k: safe_divide(v, w) for k, v in sums.aux_sum.items()}
    check_aux_names(aux)
    metrics = {"loss": safe_divide(sums.loss_sum, w), "weight": w, **aux}
    if grad_norm:
        metrics["grad_norm"] = safe_divide(global_norm(sums.grad_sum), w)
    return metrics


def step_key(ts: TrainState) -> jax.Array:
    """The key of step ``ts.step``: ``jax.random.fold_in(ts.key, ts.step)``.

    The train state's key stays fixed and each step derives its own, so a
    model that draws no random numbers pays nothing for keys (XLA drops the
    unused ``fold_in``), and a resumed run draws what the uninterrupted one did.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fnn
      >>> ts = fnn.TrainState.create({}, optax.sgd(0.1), key=jax.random.key(0))
      >>> fnn.step_key(ts).shape
      ()
    """
    return jax.random.fold_in(ts.key, ts.step)


def apply_gradients(
    optimizer: optax.GradientTransformation,
    ts: TrainState,
    sums: GradSums,
    *,
    grad_norm: bool = True,
) -> tuple[TrainState, Metrics]:
    """Divides the gradient sums by the weight once and takes an optimizer step.

    A step whose total weight is 0 (an all-padding batch) has a zero gradient,
    never NaN: the optimizer takes its step with that zero gradient, as it
    would for any zero gradient (plain SGD leaves params as they were; Adam's
    moments decay). A branch that skipped the update would cost every step:
    on a small model, ``lax.cond`` made the step 2.6 times slower. The divided
    gradient is cast to the params' dtype, so the optimizer state keeps its
    dtypes.

    Args:
      optimizer: any optax ``GradientTransformation``.
      ts: the train state before the step.
      sums: from :func:`fnn.accumulate_gradients` (summed over devices, if any).
      grad_norm: include the ``grad_norm`` metric (see :func:`make_train_step`).

    Returns:
      ``(new train state, metrics)``, the metrics as in :func:`make_train_step`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fnn
      >>> opt = optax.sgd(1.0)
      >>> ts = fnn.TrainState.create({"w": jnp.array(1.0)}, opt,
      ...                            key=jax.random.key(0))
      >>> sums = fnn.GradSums({"w": jnp.array(6.0)}, jnp.array(3.0), {},
      ...                     jnp.array(9.0), {})
      >>> ts, metrics = fnn.apply_gradients(opt, ts, sums)
      >>> float(ts.params["w"]), float(metrics["loss"])  # 1 - 6 / 3, 9 / 3
      (-1.0, 3.0)
    """
    grads = jax.tree.map(
        lambda g, p: safe_divide(g, sums.weight).astype(p.dtype),
        sums.grad_sum,
        ts.params,
    )
    updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
    params = optax.apply_updates(ts.params, updates)
    new_ts = ts.replace(
        step=ts.step + 1, params=params, opt_state=opt_state, state=sums.state
    )
    return new_ts, metrics_from_sums(sums, grad_norm=grad_norm)


def scan_steps(
    one_step: Callable[[TrainState, Any], tuple[TrainState, Metrics]],
    steps_per_call: int,
    owner: str,
) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
    """``one_step`` itself, or ``steps_per_call`` of it in one ``lax.scan``.

    The scanned step takes batches stacked on a leading axis of size
    ``steps_per_call`` (:func:`fnn.data.stack`) and returns metrics with that
    leading axis.
    """
    if steps_per_call == 1:
        return one_step

    def many_steps(ts: TrainState, batches: Any) -> tuple[TrainState, Metrics]:
        k = leading_size(batches, "stacked batch")
        if k != steps_per_call:
            raise ValueError(
                f"{owner}: steps_per_call={steps_per_call} needs batch leaves "
                f"with a leading axis of {steps_per_call} (stacked batches, see "
                f"fnn.data.stack), got {k}."
            )

        return scan_train_state(one_step, ts, batches)

    return many_steps


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    accum_steps: int = 1,
    has_state: bool = False,
    steps_per_call: int = 1,
    donate: bool = True,
    jit: bool = True,
    mesh: Any = None,
    grad_norm: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
    """Builds ``step(train_state, batch) -> (train_state, metrics)``.

    The step draws its key with :func:`step_key`, sums the gradient of ``loss_fn`` over
    ``accum_steps`` strided microbatches with :func:`accumulate_gradients`
    (one ``lax.scan``), divides by the total weight once and applies
    ``optimizer``. Model state is carried through the scan: BatchNorm
    statistics are updated once per microbatch.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> (loss_sum, weight)`` or
        ``(loss_sum, weight, aux)`` with ``aux`` a dict of summed metrics; with
        ``has_state``, ``loss_fn(params, state, batch, key) -> (out,
        new_state)``.
      optimizer: any optax ``GradientTransformation``.
      accum_steps: microbatches per step; the batch size must be a multiple.
      has_state: whether the model has running state (see above).
      steps_per_call: ``K`` optimizer steps per call, by a ``lax.scan`` over a
        batch whose leaves have a leading axis ``K`` (see
        :func:`fnn.data.stack`); metrics then have a leading axis ``K``.
      donate: donate the train state's buffers (``donate_argnums=0``): the
        train state passed in must not be used again.
      jit: compile the step; ``False`` returns the plain function.
      mesh: a ``jax.sharding.Mesh`` from :func:`fnn.data_mesh` for data
        parallel training; the step is then
        :func:`fnn.make_parallel_train_step`'s (same arguments).
      grad_norm: compute the ``grad_norm`` metric. It is one more reduction
        over the gradients and one more output per step: on a tiny MLP
        (64-32-32-10, batch 32, Adam) ``grad_norm=False`` made the step about
        10% faster (benchmarks/overhead.py); on larger steps it is lost in
        the noise.

    Returns:
      The step. ``metrics`` is ``{"loss": loss_sum / weight, "weight": weight,
      **{name: aux_sum / weight}, "grad_norm": global norm of the gradient}``
      (no ``grad_norm`` with ``grad_norm=False``).

    Raises:
      ValueError: at construction for bad ``accum_steps`` or ``steps_per_call``;
        at trace time when the batch does not split into ``accum_steps``
        microbatches (naming both sizes), its leaves' leading sizes differ, or
        with ``steps_per_call`` the leading axis is not ``K``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fnn
      >>> def loss_fn(params, batch, key):
      ...     err = batch["x"] @ params["w"] - batch["y"]
      ...     return jnp.sum(err**2), batch["y"].shape[0]
      >>> opt = optax.sgd(0.1)
      >>> ts = fnn.TrainState.create(
      ...     {"w": jnp.zeros(2)}, opt, key=jax.random.key(0))
      >>> step = fnn.make_train_step(loss_fn, opt, accum_steps=2)
      >>> batch = {"x": jnp.eye(2).repeat(2, 0), "y": jnp.ones(4)}
      >>> ts, metrics = step(ts, batch)
      >>> float(metrics["loss"]), int(ts.step)
      (1.0, 1)
    """
    check_step_counts("make_train_step", accum_steps, steps_per_call)
    if mesh is not None:
        from fnn.training.parallel import make_parallel_train_step  # imports this file

        return make_parallel_train_step(
            loss_fn,
            optimizer,
            mesh,
            accum_steps=accum_steps,
            has_state=has_state,
            steps_per_call=steps_per_call,
            donate=donate,
            jit=jit,
            grad_norm=grad_norm,
        )

    def one_step(ts: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        sums = accumulate_gradients(
            loss_fn,
            ts.params,
            ts.state,
            batch,
            step_key(ts),
            accum_steps=accum_steps,
            has_state=has_state,
        )
        return apply_gradients(optimizer, ts, sums, grad_norm=grad_norm)

    step = scan_steps(one_step, steps_per_call, "make_train_step")
    if jit:
        step = jit_step(step, donate=donate)
    return step
