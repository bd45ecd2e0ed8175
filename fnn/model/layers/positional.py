"""Positional embeddings added to ``(batch, time, features)`` inputs."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.nn import initializers

from fnn.model.core import Layer, fail, library_layer, signature
from fnn.model.options import boolean, number, positive_int
from fnn.model.precision import init_param, layer_dtypes, shown_dtype, to_compute
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


def PositionalEmbedding(
    max_len: int | None = None,
    *,
    learned: bool = False,
    init: initializers.Initializer = initializers.normal(stddev=0.02),
    base: float = 10000.0,
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype | None = None,
) -> Layer:
    """Adds a vector per position: ``y[b, t] = x[b, t] + table[t]``.

    With ``learned=False`` (the default) the table is the fixed sine/cosine
    table of the Transformer (:func:`sinusoidal_table`): no params, any
    sequence length, and ``max_len`` only guards against sequences longer
    than the model was meant for. With ``learned=True`` the table is a param
    of shape ``(max_len, features)`` (``features`` is the input's last
    dimension), and a sequence of ``time <= max_len`` steps uses its rows
    ``0 .. time - 1``.

    Args:
      max_len: the longest sequence accepted; required when ``learned``,
        else ``None`` accepts any length.
      learned: a learned table instead of the fixed one.
      init: initializer of a learned table; normal with standard deviation
        0.02, as GPT-2 and BERT, so positions start small next to unit-scale
        token embeddings.
      base: the wavelength scale of the fixed table; 10000 as in the paper.
      param_dtype: the dtype a learned table is stored in.
      dtype: the computation dtype: the input and the table are cast to it.
        ``None`` promotes the input's and a learned table's dtypes (a fixed
        table takes the input's dtype).

    Returns:
      The layer; params ``{}``, or ``{'table': (max_len, features)}`` when
      learned; the input's shape ``(batch, time, features)`` is kept.

    Raises:
      ValueError: for a non-positive ``max_len`` or ``base``,
        ``learned=True`` without ``max_len``, or a dtype that is not floating.
      ShapeError: at init or apply, for an input not of rank 3, unknown
        features, or more than ``max_len`` time steps.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> fixed = fnn.PositionalEmbedding(max_len=16)
      >>> fixed.init(jax.random.key(0), (-1, 5, 4))
      ((-1, 5, 4), {})
      >>> fixed.apply({}, jnp.zeros((1, 5, 4)))[0, 1].round(4)
      Array([0.8415, 0.5403, 0.01  , 1.    ], dtype=float32)
      >>> learned = fnn.PositionalEmbedding(16, learned=True)
      >>> shape, params = learned.init(jax.random.key(0), (-1, 5, 4))
      >>> shape, params["table"].shape
      ((-1, 5, 4), (16, 4))
    """
    owner = "PositionalEmbedding"
    max_len = positive_int(owner, "max_len", max_len, optional=True)
    learned = boolean(owner, "learned", learned)
    base = number(owner, "base", base, low=0.0, low_open=True)
    param_dtype, dtype = layer_dtypes(owner, param_dtype, dtype)
    if learned and max_len is None:
        raise ValueError(
            "PositionalEmbedding: learned=True needs max_len, the number of rows "
            "of the learned table, e.g. PositionalEmbedding(512, learned=True)."
        )
    options = {"max_len": max_len} if max_len is not None else {}
    options |= {"learned": True} if learned else {}
    options |= {"base": base} if base != 10000.0 and not learned else {}
    options |= shown_dtype(dtype)
    desc = signature(owner, **options)

    def init_fn(key, input_shape):
        shape = _check_sequence(desc, check_shape(desc, input_shape), max_len, None)
        if not learned:
            return shape, {}
        return shape, {
            "table": init_param(init, key, (max_len, shape[-1]), param_dtype)
        }

    def apply_fn(params, x, **kwargs):
        want = params["table"].shape[-1] if learned else None
        _, time, features = _check_sequence(desc, jnp.shape(x), max_len, want)
        x, params = to_compute(dtype, x, params)
        if learned:
            return x + expand_left(params["table"][:time], 3)
        table = jnp.asarray(sinusoidal_table(time, features, base), x.dtype)
        return x + expand_left(table, 3)

    return library_layer("position", desc, init_fn, apply_fn)
