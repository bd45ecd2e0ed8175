"""Dense and Embed: the layers that hold a weight matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.nn import initializers

from fnn.model.core import Layer, fail, library_layer, signature
from fnn.model.options import boolean, positive_int
from fnn.model.precision import init_param, layer_dtypes, shown_dtype, to_compute
from fnn.model.shapes import check_real, check_shape, expand_left


def Dense(
    features: int,
    *,
    w_init: initializers.Initializer = initializers.lecun_normal(),
    b_init: initializers.Initializer = initializers.zeros,
    use_bias: bool = True,
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype | None = None,
) -> Layer:
    """A fully connected layer, ``y = x @ w + b``, on the last axis.

    Leading dimensions, whatever they are, pass through: an input of shape
    ``(batch, time, in_features)`` gives ``(batch, time, features)``.

    The weight is stored ``(in_features, features)`` and applied as ``x @ w``,
    the layout of stax, Flax and Haiku and of ``z = x W + b`` in the guide.
    PyTorch and Equinox store ``(features, in_features)``: their weights load
    with a transpose, ``params['w'] = weight.T``. The product is a plain
    ``jnp.matmul`` with no custom derivative rule, so ``jax.grad``,
    ``jax.jvp`` and higher orders all work through it. A ``(features,
    in_features)`` weight, ``lax.dot_general`` or a per-example product under
    ``jax.vmap`` compile to the same matmul kernels on XLA:CPU;
    ``benchmarks/README.md`` ("Dense: the weight's layout") has the
    measurements behind keeping this layout.

    Args:
      features: the size of the output's last axis.
      w_init: initializer for ``w``, shape ``(in_features, features)``. The
        default, LeCun normal (variance ``1 / in_features``), keeps the scale of
        activations through a stack of layers, as in Flax.
      b_init: initializer for ``b``, shape ``(features,)``; zeros by default.
      use_bias: whether to add ``b``; without it params are ``{'w': ...}``.
      param_dtype: the dtype the params are stored in.
      dtype: the computation dtype: the input and the params are cast to it
        and the output has it. ``None`` computes in the input's and the
        params' dtypes promoted together.

    Returns:
      The layer; params ``{'w': (in_features, features), 'b': (features,)}``.

    Raises:
      ValueError: for a non-positive ``features``, or a dtype that is not
        floating.
      ShapeError: at init or apply, for an input whose last dimension is unknown
        or differs from ``in_features``; at apply, for an input that is not
        real floating-point (integers, booleans, complex numbers).

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> layer = fnn.Dense(3)
      >>> shape, params = layer.init(jax.random.key(0), (-1, 5, 4))
      >>> shape, params["w"].shape, params["b"].shape
      ((-1, 5, 3), (4, 3), (3,))
      >>> layer.apply(params, jnp.ones((2, 5, 4))).shape
      (2, 5, 3)
    """
    features = positive_int("Dense", "features", features)
    boolean("Dense", "use_bias", use_bias)
    param_dtype, dtype = layer_dtypes("Dense", param_dtype, dtype)
    desc = signature("Dense", features=features, **shown_dtype(dtype))

    def init_fn(key, input_shape):
        shape = check_shape(desc, input_shape)
        if shape[-1] == -1:
            fail(desc, f"the last dimension of the input must be known, got {shape!r}.")
        k_w, k_b = jax.random.split(key)
        params = {"w": init_param(w_init, k_w, (shape[-1], features), param_dtype)}
        if use_bias:
            params["b"] = init_param(b_init, k_b, (features,), param_dtype)
        return shape[:-1] + (features,), params

    def apply_fn(params, x, **kwargs):
        check_real(desc, x)
        x, params = to_compute(dtype, x, params)
        w = params["w"]
        if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != w.shape[0]:
            fail(
                desc,
                f"expected input with last dimension {w.shape[0]}, "
                f"got shape {tuple(jnp.shape(x))!r}.",
            )
        y = jnp.matmul(x, w)
        return y + expand_left(params["b"], y.ndim) if use_bias else y

    return library_layer("dense", desc, init_fn, apply_fn)


def Embed(
    vocab_size: int,
    features: int,
    *,
    init: initializers.Initializer = initializers.normal(stddev=1.0),
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype | None = None,
) -> Layer:
    """Turns integer token ids into vectors: row ``i`` of a table for token ``i``.

    Args:
      vocab_size: the number of tokens; ids run from 0 to ``vocab_size - 1``.
      features: the length of each vector.
      init: initializer for the table, shape ``(vocab_size, features)``;
        standard normal by default (as Flax), so embeddings start at unit scale.
      param_dtype: the dtype the table is stored in.
      dtype: the dtype of the vectors returned (the table is cast to it);
        ``None`` returns them in ``param_dtype``.

    Returns:
      The layer; params ``{'table': (vocab_size, features)}``. Input ids of shape
      ``(...)`` give ``(..., features)``. An id outside ``[0, vocab_size)``
      (negative ids such as a padding ``-1`` included) gives a row of NaN, so a
      bad id is loud (the training loop stops on a NaN loss) instead of
      silently reading another token's vector; the table gets no gradient from
      it.

    Raises:
      ValueError: for non-positive sizes, or a dtype that is not floating.
      ShapeError: at apply, for ids that are not integers.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> layer = fnn.Embed(10, 4)
      >>> shape, params = layer.init(jax.random.key(0), (-1, 7))
      >>> shape
      (-1, 7, 4)
      >>> layer.apply(params, jnp.zeros((2, 7), jnp.int32)).shape
      (2, 7, 4)
    """
    vocab_size = positive_int("Embed", "vocab_size", vocab_size)
    features = positive_int("Embed", "features", features)
    param_dtype, dtype = layer_dtypes("Embed", param_dtype, dtype)
    desc = signature(
        "Embed", vocab_size=vocab_size, features=features, **shown_dtype(dtype)
    )

    def init_fn(key, input_shape):
        shape = check_shape(desc, input_shape, min_rank=0)
        return shape + (features,), {
            "table": init_param(init, key, (vocab_size, features), param_dtype)
        }

    def apply_fn(params, ids, **kwargs):
        ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            fail(desc, f"expected integer token ids, got dtype {ids.dtype}.")
        # jnp.take wraps negative ids (-1 reads the last row) before its
        # out-of-bounds fill, so every bad id is read as row 0 and masked here;
        # the mask also gives those rows zero gradient.
        bad = (ids < 0) | (ids >= vocab_size)
        _, params = to_compute(dtype, None, params)
        rows = jnp.take(params["table"], jnp.where(bad, 0, ids), axis=0)
        return jnp.where(bad[..., None], jnp.nan, rows)

    return library_layer("embed", desc, init_fn, apply_fn)
