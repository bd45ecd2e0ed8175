"""Dropout: zero a random fraction of units while training."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fnn.model.core import (
    Layer,
    check_key,
    fail,
    library_layer,
    signature,
)
from fnn.model.mode import is_training
from fnn.model.options import as_int, number


def Dropout(rate: float, *, broadcast_dims: tuple[int, ...] = ()) -> Layer:
    """Zeroes each unit with probability ``rate`` and scales the rest by ``1/(1-rate)``.

    ``rate`` is the probability of *dropping* a unit, as in Flax, Haiku,
    Equinox, Keras and PyTorch; stax's ``Dropout(rate)`` is the probability of
    *keeping* one, so stax's ``Dropout(0.9)`` is ``fnn.Dropout(0.1)``. Scaling
    the kept units keeps the expected value of every unit, so inference needs
    no rescaling.

    The layer drops only while training: when apply gets a ``key`` and no
    ``train=False``. Without a key (inference) it is the identity; ``train=True``
    without a key is an error, and so is no key and no ``train=`` inside the
    loss function of a training step (:func:`fnn.make_train_step`), where it
    means the loss forgot ``key=key``.

    Args:
      rate: the drop probability, in ``[0, 1)``. ``0`` is the identity.
      broadcast_dims: axes along which one random draw is shared, e.g. ``(1,)``
        for inputs ``(batch, time, features)`` drops the same features at
        every time step.

    Returns:
      The layer; params ``{}``; output shape = input shape.

    Raises:
      ValueError: for ``rate`` outside ``[0, 1)`` or bad ``broadcast_dims``.
      ShapeError: at apply, for ``train=True`` without a key, no key and no
        ``train=`` inside a training step's loss function, a ``key`` that
        is not a ``jax.random.key`` (or a raw ``jax.random.PRNGKey``), or
        ``broadcast_dims`` out of range for the input.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> drop = fnn.Dropout(0.5)
      >>> x = jnp.ones((2, 4))
      >>> drop.apply({}, x)  # no key: inference, the identity
      Array([[1., 1., 1., 1.], [1., 1., 1., 1.]], dtype=float32)
      >>> y = drop.apply({}, x, key=jax.random.key(0))
      >>> sorted(set(y.ravel().tolist()))  # dropped, or kept and doubled
      [0.0, 2.0]
    """
    rate = number(
        "Dropout",
        "rate (the probability of dropping a unit)",
        rate,
        low=0.0,
        high=1.0,
        high_open=True,
    )
    try:
        bdims = tuple(as_int(d) for d in broadcast_dims)
    except TypeError:
        bdims = (None,)
    if any(d is None for d in bdims):
        raise ValueError(
            f"Dropout: expected broadcast_dims to be a tuple of ints, "
            f"got {broadcast_dims!r}."
        )
    shown = {"broadcast_dims": bdims} if bdims else {}
    desc = signature("Dropout", rate, **shown)

    def init_fn(key, input_shape):
        return input_shape, {}

    def apply_fn(
        params: Any, x: Any, *, key: jax.Array | None = None, train=None, **kwargs
    ):
        if not is_training(key, train, desc) or rate == 0.0:
            return x
        if key is None:
            fail(desc, "train=True needs a key to draw the dropped units; pass key=.")
        check_key(desc, key)
        x = jnp.asarray(x)
        if not all(-x.ndim <= d < x.ndim for d in bdims):
            fail(
                desc,
                f"broadcast_dims {bdims!r} are out of range for an input of "
                f"shape {x.shape!r}.",
            )
        shape = tuple(
            1 if i in {d % x.ndim for d in bdims} else s for i, s in enumerate(x.shape)
        )
        keep = jax.random.bernoulli(key, 1.0 - rate, shape)
        keep = jnp.broadcast_to(keep, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))

    return library_layer("dropout", desc, init_fn, apply_fn)
