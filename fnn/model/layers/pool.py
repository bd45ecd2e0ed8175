"""Pooling: windowed MaxPool/AvgPool, and global mean/max pooling with a mask.

Windowed pooling is channels last, like :func:`fnn.Conv`, on
``lax.reduce_window``. Global pooling reduces chosen axes, and takes an
optional ``mask=`` (an apply keyword, so it reaches every layer of a network)
marking the valid positions: padding never changes the result, and a row with
no valid position gives 0 (never NaN, nor NaN gradients).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fnn.model.core import Layer, fail, library_layer, signature
from fnn.model.layers.conv import check_spatial_input, check_spatial_rank
from fnn.model.options import as_int, boolean
from fnn.model.shapes import (
    axes_arg,
    check_shape,
    kernel_tuple,
    non_batch_axes,
    window_padding,
    window_tuple,
)

# --- masked reductions ----------------------------------------------------------


def _lowest(dtype: Any) -> Any:
    if jnp.issubdtype(dtype, jnp.floating):
        return -jnp.inf
    return jnp.iinfo(dtype).min


def mask_error(x_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> str | None:
    """Why ``mask_shape`` does not fit ``x_shape`` (None when it does)."""
    want = x_shape[:-1] if len(mask_shape) == len(x_shape) - 1 else x_shape
    ok = len(mask_shape) in (len(x_shape) - 1, len(x_shape)) and all(
        m in (1, d) for m, d in zip(mask_shape, want)
    )
    if ok:
        return None
    return (
        f"expected a mask broadcastable to {x_shape[:-1]!r} (the input's shape "
        f"without the feature axis) or to {x_shape!r}, got shape {mask_shape!r}."
    )


def broadcast_mask(x: jax.Array, mask: Any) -> jax.Array:
    """``mask`` as a boolean array of ``x``'s shape (see :func:`masked_mean`)."""
    mask = jnp.asarray(mask)
    detail = mask_error(x.shape, mask.shape)
    if detail is not None:
        raise ValueError(detail)
    if mask.ndim == x.ndim - 1:
        mask = mask[..., None]
    return jnp.broadcast_to(mask.astype(bool), x.shape)


def _floating(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.float32)


def masked_mean(
    x: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, axis: int | tuple[int, ...]
) -> jax.Array:
    """The mean of ``x`` over ``axis``, counting only where ``mask`` is true.

    Args:
      x: values, e.g. shape ``(batch, time, features)``.
      mask: true (or nonzero) at valid positions. Of ``x``'s rank minus one, it
        covers all axes but the last (features), e.g. ``(batch, time)``; of
        ``x``'s rank, it is broadcast as is.
      axis: the axis or axes to reduce.

    Returns:
      ``sum(x * mask) / max(count, 1)`` over ``axis``: exactly the mean over the
      valid positions, and 0 where there are none. Masked positions get zero
      gradient, even when they hold ``inf`` or NaN.

    Raises:
      ValueError: if ``mask`` does not fit ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fnn.model.layers.pool import masked_mean
      >>> x = jnp.array([[[1.0], [3.0], [100.0]], [[2.0], [9.0], [9.0]]])
      >>> mask = jnp.array([[True, True, False], [False, False, False]])
      >>> masked_mean(x, mask, axis=1)
      Array([[2.], [0.]], dtype=float32)
    """
    x = _floating(x)
    m = broadcast_mask(x, mask)
    total = jnp.sum(jnp.where(m, x, 0), axis=axis)
    count = jnp.sum(m, axis=axis, dtype=x.dtype)
    return total / jnp.maximum(count, 1)


def masked_max(
    x: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, axis: int | tuple[int, ...]
) -> jax.Array:
    """The element-wise maximum of ``x`` over ``axis``, only where ``mask`` is true.

    Args:
      x: values, e.g. shape ``(batch, time, features)``.
      mask: as in :func:`masked_mean`.
      axis: the axis or axes to reduce.

    Returns:
      The maximum over the valid positions, and 0 where there are none (with
      zero, finite gradients).

    Raises:
      ValueError: if ``mask`` does not fit ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fnn.model.layers.pool import masked_max
      >>> x = jnp.array([[[1.0], [3.0], [100.0]], [[2.0], [9.0], [9.0]]])
      >>> mask = jnp.array([[True, True, False], [False, False, False]])
      >>> masked_max(x, mask, axis=1)
      Array([[3.], [0.]], dtype=float32)
    """
    x = jnp.asarray(x)
    m = broadcast_mask(x, mask)
    best = jnp.max(jnp.where(m, x, _lowest(x.dtype)), axis=axis)
    return jnp.where(jnp.any(m, axis=axis), best, jnp.zeros((), x.dtype))


# --- windowed pooling -----------------------------------------------------------


def _window_pool(
    kind: str,
    owner: str,
    window: tuple[int, ...],
    strides: Any,
    padding: Any,
    reduce: Callable[[jax.Array, tuple, tuple, Any], jax.Array],
    **shown: Any,
) -> Layer:
    ws = kernel_tuple(owner, window, "window")
    n = len(ws)
    st = (1,) * n if strides is None else window_tuple(owner, "strides", strides, n)
    pad = window_padding(owner, padding, n)
    if strides is not None:
        shown = {"strides": st[0] if as_int(strides) is not None else st} | shown
    if padding != "VALID":
        shown = {"padding": padding} | shown
    desc = signature(owner, ws, **shown)
    full_window, full_strides = (1, *ws, 1), (1, *st, 1)
    full_pad = pad if isinstance(pad, str) else ((0, 0), *pad, (0, 0))

    def out_shape(shape):
        concrete = (1, *shape[1:])
        pads = (
            lax.padtype_to_pads(concrete, full_window, full_strides, full_pad)
            if isinstance(full_pad, str)
            else full_pad
        )
        out = lax.reduce_window_shape_tuple(concrete, full_window, full_strides, pads)
        if any(d < 1 for d in out):
            fail(
                desc,
                f"input of shape {shape!r} is smaller than the window {ws!r}; "
                "use padding='SAME' or a smaller window.",
            )
        return (shape[0], *map(int, out[1:]))

    def init_fn(key, input_shape):
        shape = check_spatial_input(desc, input_shape, n, "pooling window")
        return out_shape(shape), {}

    def apply_fn(params, x, **kwargs):
        shape = tuple(jnp.shape(x))
        check_spatial_rank(desc, shape, n, "pooling window")
        out_shape(shape)  # fails for an input smaller than the window
        return reduce(jnp.asarray(x), full_window, full_strides, full_pad)

    return library_layer(kind, desc, init_fn, apply_fn)


def MaxPool(
    window: tuple[int, ...],
    strides: int | tuple[int, ...] | None = None,
    padding: str | tuple[tuple[int, int], ...] = "VALID",
) -> Layer:
    """The maximum over each window, channels last, on ``lax.reduce_window``.

    Args:
      window: the window, a tuple of 1, 2 or 3 ints, e.g. ``(2, 2)`` for inputs
        ``(batch, height, width, channels)``.
      strides: the step of the window; ``None`` means 1 on every axis, as in
        stax and Flax (so stax code keeps its shapes). Pass ``strides=window``
        for the non-overlapping pooling of PyTorch's and Keras' default.
      padding: ``"VALID"`` (default), ``"SAME"`` or ``(low, high)`` pairs; padded
        cells never win the maximum.

    Returns:
      The layer; params ``{}``.

    Raises:
      ValueError: for a bad option.
      ShapeError: at init or apply, for an input of the wrong rank, or smaller
        than the window (which would leave an empty output).

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> pool = fnn.MaxPool((2, 2), strides=2)
      >>> pool.init(jax.random.key(0), (-1, 8, 8, 3))
      ((-1, 4, 4, 3), {})
      >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
      >>> pool.apply({}, x)[0, :, :, 0]
      Array([[ 5.,  7.], [13., 15.]], dtype=float32)
    """

    def reduce(x, window, strides, padding):
        return lax.reduce_window(x, _lowest(x.dtype), lax.max, window, strides, padding)

    return _window_pool("max_pool", "MaxPool", window, strides, padding, reduce)


def AvgPool(
    window: tuple[int, ...],
    strides: int | tuple[int, ...] | None = None,
    padding: str | tuple[tuple[int, int], ...] = "VALID",
    *,
    count_include_pad: bool = True,
) -> Layer:
    """The mean over each window, channels last, on ``lax.reduce_window``.

    Args:
      window: the window, a tuple of 1, 2 or 3 ints.
      strides: the step of the window; ``None`` means 1, as in stax and Flax.
      padding: ``"VALID"`` (default), ``"SAME"`` or ``(low, high)`` pairs.
      count_include_pad: with padding, whether padded cells (zeros) count in
        the mean's denominator. True by default, as Flax's ``avg_pool`` and
        PyTorch's ``AvgPool``: every window divides by its full size. False
        divides by the number of real cells, as stax's ``AvgPool``.

    Returns:
      The layer; params ``{}``.

    Raises:
      ValueError: for a bad option.
      ShapeError: at init or apply, for an input of the wrong rank, or smaller
        than the window (which would leave an empty output).

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
      >>> fnn.AvgPool((2, 2), strides=2).apply({}, x)[0, :, :, 0]
      Array([[ 2.5,  4.5], [10.5, 12.5]], dtype=float32)
    """

    def reduce(x, window, strides, padding):
        x = _floating(x)
        total = lax.reduce_window(x, 0.0, lax.add, window, strides, padding)
        if count_include_pad:
            return total / math.prod(window)
        ones = jnp.ones(x.shape[1:-1], x.dtype)[None, ..., None]
        count = lax.reduce_window(ones, 0.0, lax.add, window, strides, padding)
        return total / count

    boolean("AvgPool", "count_include_pad", count_include_pad)
    shown = {} if count_include_pad else {"count_include_pad": False}
    return _window_pool(
        "avg_pool", "AvgPool", window, strides, padding, reduce, **shown
    )


# --- global pooling -------------------------------------------------------------


def _global_pool(kind: str, owner: str, axis: Any, masked: Callable, plain: Callable):
    axes = axes_arg(owner, axis)
    desc = signature(owner, axis=axis)

    def init_fn(key, input_shape):
        shape = check_shape(desc, input_shape, min_rank=2)
        ax = non_batch_axes(desc, axes, shape)
        return tuple(d for i, d in enumerate(shape) if i not in ax), {}

    def apply_fn(params, x, *, mask=None, **kwargs):
        x = jnp.asarray(x)
        ax = non_batch_axes(desc, axes, x.shape)
        if any(x.shape[a] == 0 for a in ax):
            fail(
                desc,
                f"the pooled axes {ax!r} of the input, shape {x.shape!r}, hold no "
                "element; give at least one position (padding marked with mask=).",
            )
        if mask is None:
            return plain(x, axis=ax)
        detail = mask_error(x.shape, tuple(jnp.shape(mask)))
        if detail is not None:
            fail(desc, detail)
        return masked(x, mask, ax)

    return library_layer(kind, desc, init_fn, apply_fn)


def GlobalMeanPool(axis: int | tuple[int, ...] = 1) -> Layer:
    """The mean over ``axis`` (removed from the shape), with an optional mask.

    Args:
      axis: the axis or axes to average; default 1, the time axis of ``(batch,
        time, features)``. Use ``(1, 2)`` for the spatial axes of an image.
        The batch axis 0 cannot be pooled.

    Returns:
      The layer; params ``{}``. Its apply takes ``mask=``: true at valid
      positions, shape ``(batch, time)`` for ``(batch, time, features)`` (see
      :func:`masked_mean`). Padding does not change the result; a row with no
      valid position gives 0.

    Raises:
      ValueError: for a bad ``axis``.
      ShapeError: if ``axis`` does not fit the input, a pooled axis is empty
        (size 0), or the mask does not fit.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> pool = fnn.GlobalMeanPool()
      >>> pool.init(jax.random.key(0), (-1, 5, 8))
      ((-1, 8), {})
      >>> x = jnp.array([[[1.0], [3.0], [100.0]]])
      >>> pool.apply({}, x, mask=jnp.array([[True, True, False]]))
      Array([[2.]], dtype=float32)
    """

    def plain(x, axis):
        return jnp.mean(_floating(x), axis=axis)

    return _global_pool("global_mean_pool", "GlobalMeanPool", axis, masked_mean, plain)


def GlobalMaxPool(axis: int | tuple[int, ...] = 1) -> Layer:
    """The element-wise maximum over ``axis`` (removed), with an optional mask.

    Args:
      axis: the axis or axes to reduce; default 1 (time). The batch axis 0
        cannot be pooled.

    Returns:
      The layer; params ``{}``. Its apply takes ``mask=`` as
      :func:`GlobalMeanPool`; a row with no valid position gives 0.

    Raises:
      ValueError: for a bad ``axis``.
      ShapeError: if ``axis`` does not fit the input, a pooled axis is empty
        (size 0), or the mask does not fit.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> x = jnp.array([[[1.0], [3.0], [100.0]]])
      >>> fnn.GlobalMaxPool().apply({}, x, mask=jnp.array([[True, True, False]]))
      Array([[3.]], dtype=float32)
    """
    return _global_pool("global_max_pool", "GlobalMaxPool", axis, masked_max, jnp.max)
