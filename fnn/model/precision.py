"""Mixed precision: the one cast every layer shares, and the ``precision`` policy.

A layer with params takes two dtypes, as Flax's do: ``param_dtype``, how its
params are stored (float32 by default), and ``dtype``, what it computes in
(``None`` by default: the input's and the params' dtypes promoted together).
With ``dtype`` set, its apply casts the floating input and the floating params
to it with :func:`to_compute`; integer ids, boolean masks and keys pass as
they are. :func:`precision` applies the same cast to a whole network from
outside, so a float32 network runs in bfloat16 without touching its layers.

Three things stay in float32 (at least) whatever the compute dtype, because
bfloat16's 8 bits of mantissa are too few for them: the statistics of
LayerNorm, RMSNorm and BatchNorm (and BatchNorm's running statistics), every
softmax (the layers and the one inside attention), and the losses of
``fnn.losses``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fnn.model.combinators import as_layers, rewrapped
from fnn.model.core import Layer, describe
from fnn.model.options import floating_dtype


def layer_dtypes(owner: str, param_dtype: Any, dtype: Any) -> tuple[Any, Any]:
    """A layer's ``param_dtype`` and ``dtype`` options, checked.

    Raises:
      ValueError: naming ``owner`` when either is not a floating dtype
        (``dtype`` may be ``None``).
    """
    return (
        floating_dtype(owner, "param_dtype", param_dtype),
        floating_dtype(owner, "dtype", dtype, optional=True),
    )


def shown_dtype(dtype: Any) -> dict[str, str]:
    """``{"dtype": name}`` for a layer's description when ``dtype`` is set."""
    return {} if dtype is None else {"dtype": dtype.name}


def init_param(initializer: Any, key: jax.Array, shape: Any, param_dtype: Any):
    """``initializer(key, shape)`` drawn in float32 (at least), stored in
    ``param_dtype``.

    Every layer draws its params through this: the values are rounded once to
    a narrow ``param_dtype``, and initializers that have no bfloat16 or
    float16 kernel on some backend (``orthogonal``'s QR on CPU) still work.
    """
    wide = jnp.promote_types(param_dtype, jnp.float32)
    return jnp.asarray(initializer(key, shape, wide), param_dtype)


def _is_floating(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, float)
    return jnp.issubdtype(dtype, jnp.floating)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Every floating leaf of ``tree`` cast to ``dtype`` (``tree`` for ``None``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from fnn.model.precision import cast_floating
      >>> out = cast_floating({"w": jnp.ones(2), "ids": jnp.arange(2)}, jnp.bfloat16)
      >>> out["w"].dtype, out["ids"].dtype
      (dtype(bfloat16), dtype('int32'))
    """
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if _is_floating(x) else x, tree)


def to_compute(dtype: Any, x: Any, params: Any) -> tuple[Any, Any]:
    """``(x, params)`` as a layer computing in ``dtype`` uses them.

    The floating leaves of both are cast to ``dtype``; with ``dtype=None``
    both are returned unchanged (the layer's arithmetic promotes them).
    """
    return cast_floating(x, dtype), cast_floating(params, dtype)


def at_least_float32(x: Any) -> jax.Array:
    """``x`` in float32, or in its own dtype when that is wider (float64).

    Examples:
      >>> import jax.numpy as jnp
      >>> from fnn.model.precision import at_least_float32
      >>> at_least_float32(jnp.ones(2, jnp.bfloat16)).dtype
      dtype('float32')
    """
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def result_dtype(dtype: Any, x: Any, params: Any) -> Any:
    """The dtype a layer returns: ``dtype``, or input and params promoted together.

    Non-floating inputs (integer pixels into a norm) count as float32.
    """
    if dtype is not None:
        return dtype
    out = jnp.result_type(x, *jax.tree.leaves(params))
    return out if jnp.issubdtype(out, jnp.inexact) else jnp.dtype(jnp.float32)


def precision(layer: Layer, *, compute: Any, output: Any = None) -> Layer:
    """``layer`` computing in ``compute``, its params stored as they are.

    A policy for a whole network, without editing its layers: apply casts the
    floating input and every floating params leaf to ``compute``, runs
    ``layer``, and casts the floating output to ``output``. The params keep
    their stored dtype (float32), so ``jax.grad`` of a loss through the
    network gives float32 gradients (the cast's transpose casts them back),
    and the optimizer state stays float32. Running state (BatchNorm under
    :func:`fnn.with_state`) is not cast: it stays float32.

    What stays in float32 inside: norm statistics, softmax, and the losses of
    ``fnn.losses`` (which upcast their inputs), so a bfloat16 network's loss
    is float32.

    Args:
      layer: any layer or network.
      compute: the computation dtype, e.g. ``jnp.bfloat16`` or ``jnp.float16``.
      output: the dtype the floating output is cast to, e.g. ``jnp.float32``;
        ``None`` leaves it in whatever dtype the network returns.

    Returns:
      A layer with ``layer``'s params (under the same key in a combinator)
      and output shape.

    Raises:
      ValueError: if ``compute`` or ``output`` is not a floating dtype.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> net = fnn.serial(fnn.Dense(8), fnn.Relu(), fnn.Dense(2))
      >>> mixed = fnn.precision(net, compute=jnp.bfloat16, output=jnp.float32)
      >>> _, params = mixed.init(jax.random.key(0), (-1, 4))
      >>> params["0_dense"]["w"].dtype  # stored as float32
      dtype('float32')
      >>> x = jnp.ones((3, 4))
      >>> mixed.apply(params, x).dtype, net.apply(params, x).dtype
      (dtype('float32'), dtype('float32'))
      >>> fnn.precision(net, compute=jnp.bfloat16).apply(params, x).dtype
      dtype(bfloat16)
      >>> grads = jax.grad(lambda p: mixed.apply(p, x).sum())(params)
      >>> grads["0_dense"]["w"].dtype
      dtype('float32')
    """
    compute = floating_dtype("precision", "compute", compute)
    output = floating_dtype("precision", "output", output, optional=True)
    (layer,) = as_layers("precision", (layer,))
    apply = layer[1]

    def apply_fn(params, x, **kwargs):
        y = apply(cast_floating(params, compute), cast_floating(x, compute), **kwargs)
        return cast_floating(y, output)

    shown = f", output={output.name}" if output is not None else ""
    desc = f"precision({describe(layer)}, compute={compute.name}{shown})"
    return rewrapped(layer, desc, apply_fn)
