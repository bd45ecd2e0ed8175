"""Gradient accumulation: one ``lax.scan`` over strided microbatches.

:func:`accumulate_gradients` sums the gradient of a loss that returns
``(loss_sum, weight[, aux])`` over microbatches and divides nothing: the caller
divides once, after any cross-device sum, so masked and uneven microbatches
give exactly the gradient of the whole batch. :mod:`fnn.training.step` builds
the training step on it; on a mesh each device runs it inside ``jax.shard_map``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fnn.model.options import positive_int

LossFn = Callable[..., Any]


class GradSums(NamedTuple):
    """What :func:`accumulate_gradients` returns: sums, not yet divided.

    Attributes:
      grad_sum: the gradient of the summed loss, a params-shaped tree (float32
        for bf16/f16 params, else the params' dtype).
      weight: the total weight (float scalar).
      aux_sum: the summed metrics, a dict (``{}`` when the loss has none).
      loss_sum: the summed loss (float scalar).
      state: the model state after the last microbatch.
    """

    grad_sum: Any
    weight: jax.Array
    aux_sum: dict[str, jax.Array]
    loss_sum: jax.Array
    state: Any


def unpack_loss_output(out: Any) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise TypeError(
            "loss_fn must return (loss_sum, weight) or (loss_sum, weight, aux), "
            f"got {type(out).__name__}; e.g. return fnn.losses.sum_and_weight(...)."
        )
    loss_sum, weight, aux = out if len(out) == 3 else (*out, {})
    if not isinstance(aux, dict):
        raise TypeError(f"loss_fn's aux must be a dict, got {type(aux).__name__}.")
    if jnp.ndim(loss_sum) or jnp.ndim(weight):
        raise TypeError(
            "loss_fn must return a scalar loss sum and a scalar weight, got shapes "
            f"{jnp.shape(loss_sum)!r} and {jnp.shape(weight)!r}."
        )
    for name, value in aux.items():
        if jnp.ndim(value):
            raise TypeError(
                f"loss_fn's aux[{name!r}] must be a scalar sum (it is divided by "
                f"the weight and averaged over steps), got shape "
                f"{jnp.shape(value)!r}; sum it, e.g. jnp.sum(...)."
            )
    return jnp.asarray(loss_sum), jnp.asarray(weight), aux


def check_aux_names(aux: dict) -> None:
    """Raises ``ValueError`` when ``aux`` uses a name the metrics reserve."""
    reserved = {"loss", "weight", "grad_norm", "loss_scale", "skipped"} & set(aux)
    if reserved:
        raise ValueError(f"loss_fn's aux may not use the names {sorted(reserved)!r}.")


def accumulator_dtype(dtype: Any) -> Any:
    """The accumulator dtype: bf16/f16 sums go to float32, integer counts to the
    default float (float64 under ``jax.enable_x64``), float32/64 stay."""
    if not jnp.issubdtype(dtype, jnp.floating):
        return jax.dtypes.canonicalize_dtype(jnp.float64)
    return jnp.promote_types(dtype, jnp.float32)


def leading_size(batch: Any, what: str = "batch") -> int:
    """The shared leading size of all leaves of ``batch``.

    Raises:
      ValueError: if ``batch`` has no leaves, a leaf is a scalar, or the leaves'
        leading sizes differ (the message lists each leaf's path and size).
    """
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError(f"the {what} has no arrays.")
    sizes = {}
    for path, x in leaves:
        if jnp.ndim(x) == 0:
            raise ValueError(
                f"every {what} leaf needs a leading axis, got a scalar at "
                f"{jax.tree_util.keystr(path) or 'the root'}."
            )
        sizes[jax.tree_util.keystr(path)] = jnp.shape(x)[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"all {what} leaves must share the leading size, got {sizes!r}."
        )
    return next(iter(sizes.values()))


def accumulate_gradients(
    loss_fn: LossFn,
    params: Any,
    state: Any,
    batch: Any,
    key: jax.Array | None,
    *,
    accum_steps: int = 1,
    has_state: bool = False,
    loss_scale: jax.Array | None = None,
) -> GradSums:
    """Sums the gradient of ``loss_fn`` over microbatches with one ``lax.scan``.

    Microbatch ``j`` holds rows ``j, j + k, j + 2k, ...`` of every batch leaf
    (``k = accum_steps``): the leaf is viewed as ``(B // k, k, ...)`` and the
    scan takes index ``j`` of the second axis, which is the same as swapping
    the first two axes and scanning over the first, without a transposed copy.
    A batch sharded over devices along its leading axis therefore stays local.
    Microbatch ``j`` gets the key ``jax.random.fold_in(key, j)`` (also for
    ``k = 1``), and sees the model state written by microbatch ``j - 1``.

    Nothing is divided here: the caller divides ``grad_sum`` by ``weight``
    once, after any cross-device sum. Compile time and memory do not grow with
    ``accum_steps``.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> (loss_sum, weight[, aux])``, or
        with ``has_state``, ``loss_fn(params, state, batch, key) -> (out,
        new_state)``.
      params: the params to differentiate.
      state: the model state (ignored and returned unchanged without
        ``has_state``).
      batch: a pytree of arrays sharing the leading size ``B``.
      key: a ``jax.random.key`` or ``None`` (then every microbatch gets ``None``).
      accum_steps: the number of microbatches ``k``; ``B`` must be a multiple.
      has_state: whether ``loss_fn`` takes and returns the model state.
      loss_scale: a scalar the loss sum is multiplied by before it is
        differentiated (dynamic loss scaling, :mod:`fnn.training.loss_scale`):
        ``grad_sum`` is then the gradient of the scaled loss, while
        ``loss_sum`` stays unscaled. ``None`` scales nothing.

    Returns:
      :class:`GradSums` ``(grad_sum, weight, aux_sum, loss_sum, state)``.

    Raises:
      ValueError: when ``B`` is not a multiple of ``accum_steps`` (naming
        both), or the batch leaves' leading sizes differ.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fnn.training.accumulate import accumulate_gradients
      >>> def loss_fn(params, batch, key):
      ...     return jnp.sum((batch["x"] * params["w"]) ** 2), batch["x"].shape[0]
      >>> sums = accumulate_gradients(
      ...     loss_fn, {"w": jnp.array(2.0)}, {}, {"x": jnp.arange(4.0)}, None,
      ...     accum_steps=2)
      >>> sums.grad_sum["w"], sums.weight  # d/dw sum (x w)^2 = 2 w sum x^2
      (Array(56., dtype=float32), Array(4., dtype=float32))
    """
    k = positive_int("accumulate_gradients", "accum_steps", accum_steps)
    b = leading_size(batch)
    if b % k:
        raise ValueError(
            f"accumulate_gradients: a batch of {b} examples does not split into "
            f"accum_steps={k} microbatches ({b} % {k} = {b % k}); use a batch "
            f"size that is a multiple of {k}."
        )

    def grads_of(st, mb, j):
        mb_key = None if key is None else jax.random.fold_in(key, j)

        def f(p):
            if has_state:
                out, new_st = loss_fn(p, st, mb, mb_key)
            else:
                out, new_st = loss_fn(p, mb, mb_key), st
            loss_sum, weight, aux = unpack_loss_output(out)
            scaled = loss_sum if loss_scale is None else loss_sum * loss_scale
            return scaled, (weight, aux, new_st, loss_sum)

        (_, (weight, aux, new_st, loss_sum)), g = jax.value_and_grad(f, has_aux=True)(
            params
        )
        return (g, weight, aux, loss_sum), new_st

    def cast(sums):
        return jax.tree.map(lambda x: x.astype(accumulator_dtype(x.dtype)), sums)

    if k == 1:
        sums, new_state = grads_of(state, batch, 0)
        return GradSums(*cast(sums), new_state)

    # (B, ...) -> (B // k, k, ...) is a free reshape; row i * k + j is [i, j].
    strided = jax.tree.map(lambda x: x.reshape(b // k, k, *x.shape[1:]), batch)

    def microbatch(j):
        return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, j, 1, False), strided)

    shapes = jax.eval_shape(lambda: grads_of(state, microbatch(0), 0))[0]
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, accumulator_dtype(s.dtype)), shapes
    )

    def body(carry, j):
        acc, st = carry
        sums, st = grads_of(st, microbatch(j), j)
        acc = jax.tree.map(lambda a, s: a + s.astype(a.dtype), acc, sums)
        return (acc, st), None

    (sums, new_state), _ = lax.scan(body, (zeros, state), jnp.arange(k))
    return GradSums(*sums, new_state)


def safe_divide(total: jax.Array, weight: jax.Array) -> jax.Array:
    """``total / weight``, and 0 where ``weight`` is 0 (no NaN for empty batches)."""
    return total / jnp.where(weight > 0, weight, 1).astype(weight.dtype)
