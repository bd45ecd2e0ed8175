"""Layers that only move data around: Identity, Flatten, Reshape."""

from __future__ import annotations

import math

from fnn.model.core import Layer, fail, library_layer, signature
from fnn.model.options import int_tuple
from fnn.model.shapes import check_shape


def Identity() -> Layer:
    """Returns its input unchanged; params ``{}``.

    Examples:
      >>> import jax, fnn
      >>> fnn.model.Identity().init(jax.random.key(0), (-1, 3))
      ((-1, 3), {})
    """

    def init_fn(key, input_shape):
        return input_shape, {}

    def apply_fn(params, x, **kwargs):
        return x

    return library_layer("identity", "Identity()", init_fn, apply_fn)


def Flatten() -> Layer:
    """Flattens all but the leading (batch) dimension: ``(B, ...) -> (B, prod)``.

    Raises:
      ShapeError: if a non-batch dimension is unknown (``-1``).

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> fnn.Flatten().init(jax.random.key(0), (-1, 4, 4, 2))
      ((-1, 32), {})
      >>> fnn.Flatten().apply({}, jnp.ones((3, 4, 4, 2))).shape
      (3, 32)
    """
    desc = "Flatten()"

    def init_fn(key, input_shape):
        shape = check_shape(desc, input_shape)
        if -1 in shape[1:]:
            fail(desc, f"only the batch dimension may be unknown, got {shape!r}.")
        return (shape[0], math.prod(shape[1:])), {}

    def apply_fn(params, x, **kwargs):
        return x.reshape((x.shape[0], -1))

    return library_layer("flatten", desc, init_fn, apply_fn)


def Reshape(shape: tuple[int, ...]) -> Layer:
    """Reshapes each example (all but the batch dimension) to ``shape``.

    Args:
      shape: the new per-example shape, e.g. ``(8, 8, 1)``. It must hold as many
        elements as the input's per-example shape.

    Raises:
      ShapeError: at init or apply, if the element counts differ.

    Examples:
      >>> import jax, fnn
      >>> fnn.Reshape((8, 8, 1)).init(jax.random.key(0), (-1, 64))
      ((-1, 8, 8, 1), {})
    """
    shape = int_tuple("Reshape", "shape", shape, allow_int=False, ranks=range(1, 33))
    desc = signature("Reshape", shape)
    n = math.prod(shape)

    def init_fn(key, input_shape):
        in_shape = check_shape(desc, input_shape)
        if -1 in in_shape[1:] or math.prod(in_shape[1:]) != n:
            fail(
                desc,
                f"expected an input with {n} elements per example, "
                f"got shape {in_shape!r}.",
            )
        return (in_shape[0],) + shape, {}

    def apply_fn(params, x, **kwargs):
        if math.prod(x.shape[1:]) != n:
            fail(
                desc,
                f"expected an input with {n} elements per example, "
                f"got shape {tuple(x.shape)!r}.",
            )
        return x.reshape((x.shape[0],) + shape)

    return library_layer("reshape", desc, init_fn, apply_fn)
