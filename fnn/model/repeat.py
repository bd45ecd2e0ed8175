"""``repeat``: n copies of one layer, params stacked, applied with ``lax.scan``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fnn.model.combinators import as_layers
from fnn.model.core import (
    Layer,
    apply_child,
    describe,
    fail,
    init_child,
    layer_name,
    make_layer,
)
from fnn.model.options import positive_int
from fnn.model.remat import checkpointed
from fnn.model.shapes import shapes_agree
from fnn.model.state import declare_state, peek_state, run_apply, run_init, write_state


def repeat(layer: Layer, n: int, *, remat: bool | Callable[..., bool] = False) -> Layer:
    """``n`` copies of ``layer`` one after another, compiled once.

    The copies have their own params, stacked on a new leading axis of size
    ``n``, and are applied with one ``lax.scan``, so tracing and compile time
    do not grow with ``n`` (see docs/transformer.md, "Measured"). Copy ``i``
    is initialised with ``jax.random.fold_in(key, i)`` and, when apply is
    given a ``key``, applied with ``jax.random.fold_in(key, i)``: the keys
    ``serial`` gives its children, so ``repeat(layer, n)`` computes what
    ``serial(layer, ..., layer)`` does with the same (unstacked) params.
    Keyword arguments (``mask=``, ``train=``) reach every copy.

    Running state (BatchNorm inside the repeated layer) is stacked like the
    params and carried through the scan; use the network through
    :func:`fnn.with_state` as usual. Its state is ``{name: stacked_state}``.

    Args:
      layer: a layer that maps its input shape to itself (a residual block, a
        transformer block).
      n: the number of copies, at least 1.
      remat: recompute each copy's activations in the backward pass
        (:func:`fnn.remat` of the scanned block): ``True``, or a
        ``jax.checkpoint_policies`` policy saying what to keep. The backward
        pass then keeps one input per copy instead of every intermediate.

    Returns:
      The layer; params ``{name: stacked}``, where ``name`` is the child's
      kind (``'serial'``) or the name given with :func:`fnn.named`, and every
      leaf of ``stacked`` has a leading axis of size ``n``.

    Raises:
      ValueError: for ``n < 1``.
      TypeError: if ``layer`` is not a layer.
      ShapeError: at init, if ``layer`` changes the shape of its input.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> block = fnn.residual(fnn.serial(fnn.Dense(4), fnn.Relu()))
      >>> deep = fnn.repeat(block, 6)
      >>> shape, params = deep.init(jax.random.key(0), (-1, 4))
      >>> shape, params["residual"]["serial"]["0_dense"]["w"].shape
      ((-1, 4), (6, 4, 4))
      >>> deep.apply(params, jnp.ones((2, 4))).shape
      (2, 4)
    """
    n = positive_int("repeat", "n (the number of copies)", n)
    (layer,) = as_layers("repeat", (layer,))
    if remat is not False and remat is not True and not callable(remat):
        raise ValueError(
            f"repeat: expected remat to be a bool or a jax.checkpoint_policies "
            f"policy, got {remat!r}."
        )
    body_layer = layer
    if remat is not False:
        policy = None if remat is True else remat
        body_layer = Layer(layer.init, checkpointed(layer.apply, policy))
    k = getattr(layer[0], "fnn_key", None) or layer_name(layer)
    desc = f"repeat({describe(layer)}, n={n}" + (", remat=True)" if remat else ")")
    place = f"repeat[0:{n}]"

    def init_fn(rng, input_shape):
        shapes = []

        def one(i):
            r = None if rng is None else jax.random.fold_in(rng, i)
            (out, params), state = run_init(
                lambda: init_child(layer, k, place, r, input_shape)
            )
            shapes.append(out)
            return params, state

        params, state = jax.vmap(one)(jnp.arange(n))
        out = shapes[0]
        if not shapes_agree(out, input_shape):
            fail(
                desc,
                f"the repeated layer maps shape {input_shape!r} to {out!r}; "
                "repeat needs a layer that keeps the shape of its input.",
            )
        if state:
            declare_state(desc, state)
        return input_shape, {k: params}

    def apply_fn(params, x, *, key=None, **kwargs):
        state = peek_state()  # None: a stateless layer, or no fnn.with_state

        def body(x, inputs):
            p, s, i = inputs
            sub = None if key is None else jax.random.fold_in(key, i)

            def run():
                return apply_child(body_layer, k, place, p, x, key=sub, **kwargs)

            if s is None:
                return run(), None
            return run_apply(run, s)

        x, new_state = jax.lax.scan(body, x, (params[k], state, jnp.arange(n)))
        if state is not None:
            write_state(desc, new_state)
        return x

    return make_layer("repeat", desc, init_fn, apply_fn)
