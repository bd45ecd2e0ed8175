"""The property suite every layer and combinator goes through.

``check_layer_properties(layer, input_shape)`` checks, for one layer:

* init keeps a leading ``-1`` batch dimension as ``-1``;
* init's output shape equals what apply really returns, eagerly and under
  ``jax.eval_shape``;
* apply under ``jax.jit`` equals apply without it;
* float64 gradients with respect to params and (float) inputs pass
  ``fnn.check_grads`` (every element for small leaves, both modes).

Bad-input errors are tested per layer, since each has its own message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

import fnn
from fnn.model.shapes import is_shape

BATCH = 3
# Tolerances: jit may fuse and reorder float32 arithmetic.
JIT_RTOL_F32 = 1e-5
JIT_ATOL_F32 = 1e-5


def concrete(shape: Any, batch: int = BATCH) -> Any:
    """``shape`` with ``-1`` replaced by ``batch`` (also inside tuples of shapes)."""
    if is_shape(shape):
        return tuple(batch if d == -1 else d for d in shape)
    return tuple(concrete(s, batch) for s in shape)


def random_input(key: jax.Array, shape: Any, dtype=jnp.float32) -> Any:
    """A standard-normal input (a tuple of inputs for a tuple of shapes)."""
    if is_shape(shape):
        return jax.random.normal(key, shape, dtype)
    keys = jax.random.split(key, len(shape))
    return tuple(random_input(k, s, dtype) for k, s in zip(keys, shape))


def _shape_of(y: Any) -> Any:
    return jax.tree.map(lambda a: tuple(a.shape), y)


def _expected(out_shape: Any, batch: int) -> Any:
    return concrete(out_shape, batch)


def _to_tuple_shapes(tree: Any) -> Any:
    if isinstance(tree, (tuple, list)) and not is_shape(tuple(tree)):
        return tuple(_to_tuple_shapes(t) for t in tree)
    return tuple(tree)


def check_layer_properties(
    layer: fnn.Layer,
    input_shape: Any,
    *,
    make_input: Callable[[jax.Array, Any], Any] | None = None,
    apply_kwargs: dict | None = None,
    grad_wrt_input: bool = True,
    grad_wrt_params: bool = True,
    grad_order: int = 1,
    key: jax.Array | None = None,
) -> tuple[Any, Any]:
    """Runs the shared properties on ``layer``; returns ``(out_shape, params)``."""
    apply_kwargs = apply_kwargs or {}
    key = jax.random.key(0) if key is None else key
    k_init, k_x = jax.random.split(key)
    make_input = make_input or random_input

    out_shape, params = layer.init(k_init, input_shape)
    leading = input_shape[0] if is_shape(input_shape) else input_shape[0][0]
    if leading == -1:
        first = (
            jax.tree.leaves(out_shape)[0] if not is_shape(out_shape) else out_shape[0]
        )
        assert first == -1, f"batch -1 was lost: {input_shape} -> {out_shape}"

    x = make_input(k_x, concrete(input_shape))
    y = layer.apply(params, x, **apply_kwargs)
    assert _to_tuple_shapes(_shape_of(y)) == _to_tuple_shapes(
        _expected(out_shape, BATCH)
    ), f"init claims {out_shape}, apply returns {_shape_of(y)}"

    abstract = jax.eval_shape(lambda p, v: layer.apply(p, v, **apply_kwargs), params, x)
    assert _shape_of(abstract) == _shape_of(y)

    y_jit = jax.jit(lambda p, v: layer.apply(p, v, **apply_kwargs))(params, x)
    chex.assert_trees_all_close(y_jit, y, rtol=JIT_RTOL_F32, atol=JIT_ATOL_F32)

    with jax.enable_x64(True):
        p64 = jax.tree.map(_to64, params)
        x64 = jax.tree.map(_to64, x)
        proj = jax.tree.map(
            lambda a: jnp.asarray(np.random.default_rng(1).normal(size=a.shape)),
            jax.eval_shape(lambda p, v: layer.apply(p, v, **apply_kwargs), p64, x64),
        )

        def scalar(p, v):
            out = layer.apply(p, v, **apply_kwargs)
            return sum(
                jnp.vdot(a, b)
                for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(proj))
            )

        float_x = all(
            jnp.issubdtype(a.dtype, jnp.floating) for a in jax.tree.leaves(x64)
        )
        argnums = []
        if grad_wrt_params and jax.tree.leaves(p64):
            argnums.append(0)
        if grad_wrt_input and float_x:
            argnums.append(1)
        if argnums:
            fnn.check_grads(
                scalar, (p64, x64), argnums=tuple(argnums), order=grad_order
            )
    return out_shape, params


def _to64(a: Any) -> Any:
    a = jnp.asarray(a)
    return a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a


def state_as_params(layer: fnn.Layer) -> fnn.Layer:
    """A layer with running state, seen as a stateless one for the suite.

    ``init`` runs ``fnn.with_state(layer).init`` and returns params ``{'params':
    ..., 'state': ...}``; ``apply`` threads that state and returns only ``y``,
    after checking the new state keeps the state's structure and shapes. So
    :func:`check_layer_properties` covers stateful layers too (gradients with
    respect to the state included).
    """
    model = fnn.with_state(layer)

    def init_fn(key, input_shape):
        out_shape, params, state = model.init(key, input_shape)
        return out_shape, {"params": params, "state": state}

    def apply_fn(params, x, **kwargs):
        y, new_state = model.apply(params["params"], params["state"], x, **kwargs)
        chex.assert_trees_all_equal_shapes(new_state, params["state"])
        return y

    return fnn.Layer(init_fn, apply_fn)


def init_perturbed(layer: fnn.Layer, shape: Any, seed: int = 0) -> Any:
    """``layer``'s params with ``0.1 * N(0, 1)`` added to every leaf.

    Initial biases are often zero; perturbed, a numpy reference shows whether
    each one is added in the right place.
    """
    _, params = layer.init(jax.random.key(seed), shape)
    return jax.tree.map(
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(seed + 1), a.shape),
        params,
    )
