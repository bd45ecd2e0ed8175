"""Combinators: layers made of layers.

Each child's params sit under a string key, ``'<index>_<kind>'`` (``'0_dense'``)
or the name given with :func:`named`, so ``jax.tree_util.keystr`` paths read like
the network. Shapes are checked at init, and a child's error names its place.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fnn.model.core import (
    Layer,
    apply_child,
    describe,
    fail,
    init_child,
    is_library,
    layer_name,
    library_layer,
    make_layer,
)
from fnn.model.options import integer, positive_int
from fnn.model.shapes import check_shape, check_shapes, is_shape, shapes_agree


def named(name: str, layer: Layer) -> Layer:
    """Gives ``layer`` a fixed params key inside a combinator.

    Args:
      name: the key, e.g. ``"encoder"``.
      layer: any layer.

    Returns:
      The same layer, whose params a combinator stores under ``name`` instead of
      ``'<index>_<kind>'``.

    Raises:
      ValueError: if ``name`` is empty or not a string.

    Examples:
      >>> import jax, fnn
      >>> net = fnn.serial(fnn.named("hidden", fnn.Dense(4)), fnn.Relu())
      >>> sorted(net.init(jax.random.key(0), (-1, 3))[1])
      ['1_relu', 'hidden']
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"named: expected a non-empty string name, got {name!r}.")
    return rewrapped(layer, describe(layer), layer[1], key=name)


def rewrapped(
    layer: Layer, desc: str, apply_fn: Any, *, key: str | None = None
) -> Layer:
    """``layer``'s init with another description and apply (``remat``,
    ``precision``, ``named``).

    The params key that :func:`named` gave ``layer`` stays, unless ``key``
    gives another; a library layer stays one.
    """
    init = layer[0]

    def init_fn(rng, input_shape):
        return init(rng, input_shape)

    key = key or getattr(init, "fnn_key", None)
    if key:
        init_fn.fnn_key = key  # type: ignore[attr-defined]
    make = library_layer if is_library(layer) else make_layer
    return make(layer_name(layer), desc, init_fn, apply_fn)


def _child_keys(combinator: str, layers: tuple[Layer, ...]) -> list[str]:
    keys = [
        getattr(l[0], "fnn_key", None) or f"{i}_{layer_name(l)}"
        for i, l in enumerate(layers)
    ]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise ValueError(
            f"{combinator}: names must be unique, got {sorted(dup)!r} twice."
        )
    return keys


def as_layers(combinator: str, layers: tuple[Any, ...]) -> tuple[Layer, ...]:
    out = []
    for i, l in enumerate(layers):
        if not (isinstance(l, tuple) and len(l) == 2 and all(map(callable, l))):
            raise TypeError(
                f"{combinator}: argument {i} must be a layer (an (init, apply) pair), "
                f"got {type(l).__name__}; did you forget to call it, e.g. fnn.Relu()?"
            )
        out.append(Layer(*l) if not isinstance(l, Layer) else l)
    return tuple(out)


def _split(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    if key is None:
        return [None] * n
    return [jax.random.fold_in(key, i) for i in range(n)]


def serial(*layers: Layer) -> Layer:
    """Composes layers one after another.

    Args:
      *layers: the layers, applied first to last.

    Returns:
      A layer whose params are ``{'0_dense': ..., '1_relu': {}, ...}``. With a
      ``key``, child ``i`` gets ``jax.random.fold_in(key, i)``; keyword arguments
      reach every child.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> net = fnn.serial(fnn.Dense(8), fnn.Relu(), fnn.Dense(2))
      >>> out_shape, params = net.init(jax.random.key(0), (-1, 3))
      >>> out_shape, list(params)
      ((-1, 2), ['0_dense', '1_relu', '2_dense'])
      >>> net.apply(params, jnp.ones((5, 3))).shape
      (5, 2)
    """
    layers = as_layers("serial", layers)
    keys = _child_keys("serial", layers)
    places = [f"serial[{i}]" for i in range(len(layers))]

    def init_fn(rng, input_shape):
        params = {}
        for i, (layer, k, rng_i) in enumerate(
            zip(layers, keys, _split(rng, len(layers)))
        ):
            input_shape, params[k] = init_child(layer, k, places[i], rng_i, input_shape)
        return input_shape, params

    def apply_fn(params, x, *, key=None, **kwargs):
        for i, (layer, k) in enumerate(zip(layers, keys)):
            sub = None if key is None else jax.random.fold_in(key, i)
            x = apply_child(layer, k, places[i], params[k], x, key=sub, **kwargs)
        return x

    return library_layer("serial", f"serial({len(layers)} layers)", init_fn, apply_fn)


def parallel(*layers: Layer) -> Layer:
    """Applies ``layers[i]`` to input ``i`` of a tuple of inputs.

    Args:
      *layers: one layer per input.

    Returns:
      A layer from a tuple of ``len(layers)`` inputs to a tuple of outputs.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> net = fnn.parallel(fnn.Dense(2), fnn.Dense(3))
      >>> net.init(jax.random.key(0), ((-1, 4), (-1, 5)))[0]
      ((-1, 2), (-1, 3))
    """
    layers = as_layers("parallel", layers)
    keys = _child_keys("parallel", layers)
    desc = f"parallel({len(layers)} layers)"

    def init_fn(rng, input_shape):
        shapes = check_shapes(desc, input_shape, len(layers))
        out, params = [], {}
        for i, (layer, k, r) in enumerate(zip(layers, keys, _split(rng, len(layers)))):
            s, params[k] = init_child(layer, k, f"parallel[{i}]", r, shapes[i])
            out.append(s)
        return tuple(out), params

    def apply_fn(params, xs, *, key=None, **kwargs):
        if not isinstance(xs, (tuple, list)) or len(xs) != len(layers):
            got = len(xs) if isinstance(xs, (tuple, list)) else type(xs).__name__
            fail(desc, f"expected a tuple of {len(layers)} inputs, got {got}.")
        return tuple(
            apply_child(layer, k, f"parallel[{i}]", params[k], x, key=r, **kwargs)
            for i, (layer, k, x, r) in enumerate(
                zip(layers, keys, xs, _split(key, len(layers)))
            )
        )

    return library_layer("parallel", desc, init_fn, apply_fn)


def fan_out(n: int) -> Layer:
    """Copies one input into a tuple of ``n`` inputs.

    Examples:
      >>> import jax, fnn
      >>> fnn.fan_out(2).init(jax.random.key(0), (-1, 3))
      (((-1, 3), (-1, 3)), {})
    """
    n = positive_int("fan_out", "n (the number of copies)", n)
    desc = f"fan_out({n})"

    def init_fn(rng, input_shape):
        return (check_shape(desc, input_shape, min_rank=0),) * n, {}

    def apply_fn(params, x, **kwargs):
        return (x,) * n

    return library_layer("fan_out", desc, init_fn, apply_fn)


def _merge(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x if x != -1 else y for x, y in zip(a, b))


def _input_shapes(desc: str, xs: Any) -> tuple[tuple[int, ...], ...]:
    """The shapes of apply's tuple of inputs; fails unless a non-empty tuple."""
    if not isinstance(xs, (tuple, list)) or not xs:
        got = "an empty tuple" if isinstance(xs, (tuple, list)) else type(xs).__name__
        fail(desc, f"expected a tuple of inputs (from fan_out or parallel), got {got}.")
    return tuple(tuple(jnp.shape(x)) for x in xs)


def _sum_shape(desc: str, shapes: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """The shape of the sum; fails unless all shapes agree (no broadcasting)."""
    out = shapes[0]
    for i, s in enumerate(shapes[1:], 1):
        if not shapes_agree(out, s):
            fail(desc, f"branch 0 has shape {shapes[0]!r} but branch {i} has {s!r}.")
        out = _merge(out, s)
    return out


def fan_in_sum() -> Layer:
    """Sums a tuple of inputs of one shape.

    Shapes are checked at init and again at apply (while tracing, so a jitted
    step pays nothing): the inputs are never broadcast against each other.

    Raises:
      ShapeError: if the inputs' shapes differ; the message names both branches.

    Examples:
      >>> import jax, fnn
      >>> fnn.fan_in_sum().init(jax.random.key(0), ((-1, 3), (-1, 3)))
      ((-1, 3), {})
    """
    desc = "fan_in_sum()"

    def init_fn(rng, input_shape):
        return _sum_shape(desc, check_shapes(desc, input_shape)), {}

    def apply_fn(params, xs, **kwargs):
        _sum_shape(desc, _input_shapes(desc, xs))
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out

    return library_layer("fan_in_sum", desc, init_fn, apply_fn)


def _concat_shape(
    desc: str, shapes: tuple[tuple[int, ...], ...], axis: int
) -> tuple[int, ...]:
    """The shape of the concatenation; fails unless all but ``axis`` agree."""
    rank = len(shapes[0])
    if not -rank <= axis < rank:
        fail(desc, f"axis {axis} is out of range for inputs of rank {rank}.")
    ax = axis % rank
    out = list(shapes[0])
    for i, s in enumerate(shapes[1:], 1):
        others = [d for j, d in enumerate(s) if j != ax]
        ref = [d for j, d in enumerate(shapes[0]) if j != ax]
        if len(s) != rank or not shapes_agree(ref, others):
            fail(
                desc,
                f"branch 0 has shape {shapes[0]!r} but branch {i} has {s!r}; "
                f"all dimensions but axis {axis} must agree.",
            )
        out = [a if a != -1 else b for a, b in zip(out, s)]
    if any(s[ax] == -1 for s in shapes):
        out[ax] = -1
    else:
        out[ax] = sum(s[ax] for s in shapes)
    return tuple(out)


def fan_in_concat(axis: int = -1) -> Layer:
    """Concatenates a tuple of inputs along ``axis`` (default: the last, features).

    Raises:
      ValueError: if ``axis`` is not an int.
      ShapeError: at init or apply, if ranks differ or a dimension other than
        ``axis`` differs.

    Examples:
      >>> import jax, fnn
      >>> fnn.fan_in_concat().init(jax.random.key(0), ((-1, 3), (-1, 4)))
      ((-1, 7), {})
    """
    axis = integer("fan_in_concat", "axis", axis)
    desc = f"fan_in_concat(axis={axis})"

    def init_fn(rng, input_shape):
        return _concat_shape(desc, check_shapes(desc, input_shape), axis), {}

    def apply_fn(params, xs, **kwargs):
        _concat_shape(desc, _input_shapes(desc, xs), axis)
        return jnp.concatenate(xs, axis=axis)

    return library_layer("fan_in_concat", desc, init_fn, apply_fn)


def residual(layer: Layer) -> Layer:
    """``x + layer(x)``; the layer must keep the shape of its input.

    The input is one array (a tuple of inputs would be concatenated by ``+``,
    not added); the shapes are checked at init and again at apply, so the sum
    never broadcasts.

    Raises:
      ShapeError: at init or apply, if ``layer`` changes the shape, or the
        input is a tuple of inputs.

    Examples:
      >>> import jax, fnn
      >>> block = fnn.residual(fnn.serial(fnn.Dense(4), fnn.Relu()))
      >>> shape, params = block.init(jax.random.key(0), (-1, 4))
      >>> shape, list(params)
      ((-1, 4), ['serial'])
    """
    (layer,) = as_layers("residual", (layer,))
    k = getattr(layer[0], "fnn_key", None) or layer_name(layer)
    desc = f"residual({describe(layer)})"

    def keeps_shape(shape: Any, out: Any) -> None:
        if not (is_shape(out) and shapes_agree(out, shape)):
            fail(
                desc,
                f"the inner layer maps shape {shape!r} to {out!r}; "
                "a residual block must keep the shape.",
            )

    def init_fn(rng, input_shape):
        shape = check_shape(desc, input_shape, min_rank=0)
        out, params = init_child(layer, k, "residual", rng, shape)
        keeps_shape(shape, out)
        return shape, {k: params}

    def apply_fn(params, x, **kwargs):
        if isinstance(x, (tuple, list)):
            fail(desc, f"expected one input array, got a tuple of {len(x)}.")
        y = apply_child(layer, k, "residual", params[k], x, **kwargs)
        keeps_shape(tuple(jnp.shape(x)), jax.tree.map(jnp.shape, y))
        return x + y

    return library_layer("residual", desc, init_fn, apply_fn)
