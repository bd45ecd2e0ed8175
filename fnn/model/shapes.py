"""Shape helpers shared by layers: checks at init and at trace time, windows.

All of them run in Python while tracing; a jitted step pays nothing for them.
Failures go through :func:`fnn.model.core.fail`, so they name the layer and its place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fnn.model.core import fail
from fnn.model.options import as_int, int_tuple

Shape = tuple[int, ...]


def is_shape(s: Any) -> bool:
    """Whether ``s`` is one shape (a tuple of ints) rather than a tuple of shapes."""
    return isinstance(s, tuple) and all(isinstance(d, int) for d in s)


def check_shape(desc: str, input_shape: Any, *, min_rank: int = 1) -> Shape:
    """Checks ``input_shape`` is one shape of rank ``>= min_rank``; returns it."""
    if isinstance(input_shape, list):
        input_shape = tuple(input_shape)
    if not is_shape(input_shape):
        fail(desc, f"expected one input shape (a tuple of ints), got {input_shape!r}.")
    if len(input_shape) < min_rank:
        fail(
            desc,
            f"expected input of rank at least {min_rank}, got shape {input_shape!r}.",
        )
    if any(d < -1 or d == 0 for d in input_shape):
        fail(
            desc,
            f"expected positive dimensions (or -1 for the batch), got {input_shape!r}.",
        )
    return input_shape


def check_shapes(
    desc: str, input_shape: Any, n: int | None = None
) -> tuple[Shape, ...]:
    """Checks ``input_shape`` is a tuple of ``n`` shapes (any number if None)."""
    if (
        not isinstance(input_shape, (tuple, list))
        or not all(
            is_shape(tuple(s)) if isinstance(s, (tuple, list)) else False
            for s in input_shape
        )
        or not input_shape
    ):
        fail(desc, f"expected a tuple of input shapes, got {input_shape!r}.")
    shapes = tuple(tuple(s) for s in input_shape)
    if n is not None and len(shapes) != n:
        fail(desc, f"expected {n} inputs, got {len(shapes)}: {shapes!r}.")
    return shapes


def check_real(desc: str, x: Any, *, integers: bool = False) -> None:
    """Fails for a complex input, and an integer or boolean one unless ``integers``.

    Layers that multiply their input by weights (Dense, Conv, attention, RNN)
    take real floating-point inputs only; normalisation layers also accept
    integers. The check reads the dtype while tracing, so it is free under
    ``jit``.

    Raises:
      ShapeError: naming ``desc`` and the dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fnn.model.shapes import check_real
      >>> check_real("Dense(features=2)", jnp.ones(3, jnp.complex64))
      Traceback (most recent call last):
      ...
      fnn.ShapeError: Dense(features=2): expected a real input, got dtype
      complex64; fnn's layers compute with real numbers, so pass the real and
      imaginary parts as features, e.g. jnp.concatenate([x.real, x.imag], -1).
    """
    dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
    if jnp.issubdtype(dtype, jnp.complexfloating):
        fail(
            desc,
            f"expected a real input, got dtype {dtype}; fnn's layers compute with "
            "real numbers, so pass the real and imaginary parts as features, "
            "e.g. jnp.concatenate([x.real, x.imag], -1).",
        )
    if not integers and not jnp.issubdtype(dtype, jnp.floating):
        fail(
            desc,
            f"expected a floating-point input, got dtype {dtype}; convert it with "
            "x.astype(jnp.float32) (token ids go through fnn.Embed).",
        )


def dims_agree(a: int, b: int) -> bool:
    """Whether two dimensions agree, ``-1`` (unknown batch) agreeing with any."""
    return a == b or a == -1 or b == -1


def shapes_agree(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether two shapes agree dimension by dimension, ``-1`` being a wildcard."""
    return len(a) == len(b) and all(dims_agree(x, y) for x, y in zip(a, b))


def expand_left(a: jax.Array, ndim: int) -> jax.Array:
    """``a`` reshaped to rank ``ndim`` by adding leading axes of size 1.

    Broadcasting a bias ``(features,)`` against ``(batch, features)`` this way is
    explicit, so fnn runs under ``jax_numpy_rank_promotion="raise"``.

    Examples:
      >>> import jax.numpy as jnp, fnn.model.shapes
      >>> fnn.model.shapes.expand_left(jnp.ones(3), 3).shape
      (1, 1, 3)
    """
    return a.reshape((1,) * (ndim - a.ndim) + a.shape)


def window_tuple(owner: str, name: str, value: Any, n: int) -> tuple[int, ...]:
    """Normalises a per-spatial-dimension option (strides, dilation) to ``n`` ints.

    An int means the same value for every spatial dimension; a sequence must
    have exactly ``n`` positive ints (numpy integers included).

    Raises:
      ValueError: naming ``owner`` and ``name`` otherwise.

    Examples:
      >>> from fnn.model.shapes import window_tuple
      >>> window_tuple("Conv", "strides", 2, 3)
      (2, 2, 2)
      >>> window_tuple("Conv", "strides", (1, 2), 2)
      (1, 2)
    """
    return int_tuple(owner, name, value, n)


def kernel_tuple(
    owner: str, kernel_size: Any, name: str = "kernel_size"
) -> tuple[int, ...]:
    """Checks a window (``kernel_size``, a pooling window): 1 to 3 positive ints.

    A bare int is refused: ``Conv(8, 3)`` could mean 1-D or 2-D, so fnn asks.

    Examples:
      >>> from fnn.model.shapes import kernel_tuple
      >>> kernel_tuple("Conv", (3, 3))
      (3, 3)
    """
    return int_tuple(owner, name, kernel_size, allow_int=False)


def window_padding(owner: str, padding: Any, n: int) -> str | tuple[tuple[int, int]]:
    """Normalises ``padding``: ``"SAME"``, ``"VALID"`` or ``n`` ``(low, high)`` pairs.

    Raises:
      ValueError: naming ``owner`` for anything else.

    Examples:
      >>> from fnn.model.shapes import window_padding
      >>> window_padding("Conv", "same", 2)
      'SAME'
      >>> window_padding("Conv", [(1, 1), (0, 2)], 2)
      ((1, 1), (0, 2))
    """
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID"):
            return padding.upper()
    else:
        try:
            pairs = tuple(tuple(p) for p in padding)
        except TypeError:
            pairs = ()
        ints = [tuple(as_int(v) for v in p) for p in pairs]
        if len(ints) == n and all(
            len(p) == 2 and all(v is not None and v >= 0 for v in p) for p in ints
        ):
            return tuple(ints)
    raise ValueError(
        f"{owner}: expected padding 'SAME', 'VALID' or {n} (low, high) pairs of "
        f"non-negative ints, got {padding!r}."
    )


def axes_arg(owner: str, axis: Any) -> tuple[int, ...]:
    """Checks a constructor's ``axis`` option: an int or a non-empty tuple of ints.

    Raises:
      ValueError: naming ``owner`` otherwise.

    Examples:
      >>> from fnn.model.shapes import axes_arg
      >>> axes_arg("LayerNorm", -1), axes_arg("GlobalMeanPool", (1, 2))
      ((-1,), (1, 2))
    """
    axes = (axis,) if as_int(axis) is not None else axis
    try:
        axes = tuple(as_int(a) for a in axes)
    except TypeError:
        axes = ()
    if not axes or any(a is None for a in axes):
        raise ValueError(
            f"{owner}: expected an int axis or a tuple of them, got {axis!r}."
        )
    return axes


def non_batch_axes(desc: str, axes: tuple[int, ...], shape: Shape) -> Shape:
    """``axes`` as sorted non-negative ints; fails unless distinct non-batch axes.

    Raises:
      ShapeError: naming ``desc``, for an axis out of range for ``shape``, a
        repeated axis, or the batch axis 0.

    Examples:
      >>> from fnn.model.shapes import non_batch_axes
      >>> non_batch_axes("GlobalMeanPool(axis=(-2, 1))", (-2, 1), (-1, 5, 6, 3))
      (1, 2)
    """
    rank = len(shape)
    if not all(-rank <= a < rank for a in axes):
        fail(desc, f"axis {axes!r} is out of range for an input of shape {shape!r}.")
    out = tuple(sorted({a % rank for a in axes}))
    if len(out) != len(axes) or 0 in out:
        fail(
            desc,
            f"axis {axes!r} must name distinct non-batch axes of an input of "
            f"shape {shape!r}.",
        )
    return out
