"""Positional embeddings added to ``(batch, time, features)`` inputs."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.nn import initializers

from fnn.model.core import Layer, fail, library_layer, signature
from fnn.model.options import number, positive_int
from fnn.model.shapes import check_shape, expand_left


def _check_sequence(
    desc: str, shape: Any, max_len: int | None, features: int | None
) -> tuple[int, ...]:
    """Checks a (batch, time, features) shape against max_len and features."""
    shape = tuple(shape)
    if len(shape) != 3 or shape[-1] == -1:
        fail(
            desc,
            f"expected input of shape (batch, time, features) with known features, "
            f"got {shape!r}.",
        )
    if features is not None and shape[-1] != features:
        fail(desc, f"expected input with {features} features, got shape {shape!r}.")
    if max_len is not None and shape[1] > max_len:
        fail(
            desc,
            f"the input has {shape[1]} time steps but max_len is {max_len}; "
            "build the layer with a larger max_len.",
        )
    return shape


def sinusoidal_table(length: int, features: int, base: float = 10000.0) -> np.ndarray:
    """The table of Vaswani et al. (2017), shape ``(length, features)``.

    Row ``t``, columns ``2i`` and ``2i + 1`` hold ``sin(t / base**(2i /
    features))`` and ``cos(t / base**(2i / features))``. It is computed with
    numpy in float64 when the layer is traced, so it is a constant of the
    compiled program.

    Examples:
      >>> from fnn.model.layers.positional import sinusoidal_table
      >>> sinusoidal_table(3, 4)[1].round(4)
      array([0.8415, 0.5403, 0.01  , 1.    ])
    """
    pos = np.arange(length, dtype=np.float64)[:, None]
    rates = base ** (-np.arange(0, features, 2, dtype=np.float64) / features)
    table = np.zeros((length, features))
    table[:, 0::2] = np.sin(pos * rates[None, :])
    table[:, 1::2] = np.cos(pos * rates[None, : features // 2])
    return table


def SinusoidalPositionalEmbedding(
    *, max_len: int | None = None, base: float = 10000.0
) -> Layer:
    """Adds the fixed sine/cosine position table of the Transformer.

    ``y[b, t] = x[b, t] + table[t]`` with :func:`sinusoidal_table`. There are
    no params; any sequence length works, and ``max_len`` only guards against
    sequences longer than the model was meant for.

    Args:
      max_len: the longest sequence accepted, or None for any.
      base: the wavelength scale; 10000 as in the paper.

    Returns:
      The layer; params ``{}``; shape ``(batch, time, features)`` is kept.

    Raises:
      ValueError: for a non-positive ``max_len`` or ``base``.
      ShapeError: at init or apply, for an input not of rank 3, unknown
        features, or more than ``max_len`` time steps.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> pe = fnn.SinusoidalPositionalEmbedding(max_len=16)
      >>> pe.init(jax.random.key(0), (-1, 5, 4))
      ((-1, 5, 4), {})
      >>> pe.apply({}, jnp.zeros((1, 5, 4)))[0, 1].round(4)
      Array([0.8415, 0.5403, 0.01  , 1.    ], dtype=float32)
    """
    owner = "SinusoidalPositionalEmbedding"
    max_len = positive_int(owner, "max_len", max_len, optional=True)
    base = number(owner, "base", base, low=0.0, low_open=True)
    options = {"max_len": max_len} if max_len is not None else {}
    if base != 10000.0:
        options["base"] = base
    desc = signature("SinusoidalPositionalEmbedding", **options)

    def init_fn(key, input_shape):
        shape = check_shape(desc, input_shape)
        return _check_sequence(desc, shape, max_len, None), {}

    def apply_fn(params, x, **kwargs):
        _, time, features = _check_sequence(desc, jnp.shape(x), max_len, None)
        table = jnp.asarray(sinusoidal_table(time, features, base), x.dtype)
        return x + expand_left(table, 3)

    return library_layer("sinusoidal_position", desc, init_fn, apply_fn)


def LearnedPositionalEmbedding(
    max_len: int,
    features: int,
    *,
    init: initializers.Initializer = initializers.normal(stddev=0.02),
    dtype: jnp.dtype = jnp.float32,
) -> Layer:
    """Adds a learned vector per position: ``y[b, t] = x[b, t] + table[t]``.

    Args:
      max_len: the number of positions, the longest sequence accepted.
      features: the input's (and the table's) last dimension.
      init: initializer of the table, shape ``(max_len, features)``; normal
        with standard deviation 0.02, as GPT-2 and BERT, so positions start
        small next to unit-scale token embeddings.
      dtype: the table's dtype.

    Returns:
      The layer; params ``{'table': (max_len, features)}``; a sequence of
      ``time <= max_len`` steps uses rows ``0 .. time - 1``.

    Raises:
      ValueError: for non-positive sizes.
      ShapeError: at init or apply, for an input not of shape ``(batch, time,
        features)`` or with more than ``max_len`` time steps.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> pe = fnn.LearnedPositionalEmbedding(16, 4)
      >>> shape, params = pe.init(jax.random.key(0), (-1, 5, 4))
      >>> shape, params["table"].shape
      ((-1, 5, 4), (16, 4))
      >>> pe.apply(params, jnp.zeros((2, 5, 4))).shape
      (2, 5, 4)
    """
    max_len = positive_int("LearnedPositionalEmbedding", "max_len", max_len)
    features = positive_int("LearnedPositionalEmbedding", "features", features)
    desc = signature("LearnedPositionalEmbedding", max_len=max_len, features=features)

    def init_fn(key, input_shape):
        shape = check_shape(desc, input_shape)
        shape = _check_sequence(desc, shape, max_len, features)
        return shape, {"table": init(key, (max_len, features), dtype)}

    def apply_fn(params, x, **kwargs):
        _, time, _ = _check_sequence(desc, jnp.shape(x), max_len, features)
        return x + expand_left(params["table"][:time], 3)

    return library_layer("learned_position", desc, init_fn, apply_fn)
