"""``remat``: any layer recomputed in the backward pass, with ``jax.checkpoint``.

The backward pass of a network reads the activations of its forward pass.
Kept, they cost memory in proportion to depth; a layer wrapped in
:func:`remat` keeps only its input, and its activations are computed again
when the gradient needs them: more arithmetic, less memory. A policy from
``jax.checkpoint_policies`` chooses what is kept after all (e.g.
``dots_with_no_batch_dims_saveable`` keeps matmul outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from fnn.model.combinators import as_layers, rewrapped
from fnn.model.core import Layer, describe
from fnn.model.state import peek_state, run_apply, write_state


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict, dict]:
    """Array keyword arguments (traced through the checkpoint) and the rest
    (``train=True``, ``None``s), which stay Python values."""
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
    return arrays, {k: v for k, v in kwargs.items() if k not in arrays}


def checkpointed(
    fn: Callable[..., Any], policy: Callable[..., bool] | None
) -> Callable[..., Any]:
    """``fn(params, x, **kwargs)`` under ``jax.checkpoint``, running state kept.

    The running state the layer reads (``fnn.with_state``) goes in and out of
    the checkpointed function as a value, so a stateful layer (BatchNorm)
    inside stays correct.
    """

    def apply(params: Any, x: Any, **kwargs: Any) -> Any:
        arrays, static = _split_kwargs(kwargs)
        state = peek_state()

        def body(params, x, arrays, state):
            def run():
                return fn(params, x, **arrays, **static)

            return run() if state is None else run_apply(run, state)

        out = jax.checkpoint(body, policy=policy)(params, x, arrays, state)
        if state is None:
            return out
        y, new_state = out
        write_state("remat", new_state)
        return y

    return apply


def remat(layer: Layer, *, policy: Callable[..., bool] | None = None) -> Layer:
    """``layer``, its activations recomputed in the backward pass.

    Same params, same outputs, same gradients: only where the backward pass
    gets the layer's activations changes. Wrap the blocks of a deep network
    (or pass ``remat=`` to :func:`fnn.repeat`) so the backward pass keeps one
    input per block instead of every intermediate array.

    Args:
      layer: any layer, stateful ones included.
      policy: a ``jax.checkpoint_policies`` policy choosing what is saved
        anyway, e.g. ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``;
        ``None`` saves nothing but the inputs.

    Returns:
      A layer with ``layer``'s params (under the same key in a combinator) and
      output shape.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> block = fnn.serial(fnn.Dense(8), fnn.Tanh(), fnn.Dense(8))
      >>> net = fnn.serial(fnn.remat(block), fnn.Dense(1))
      >>> _, params = net.init(jax.random.key(0), (-1, 8))
      >>> list(params)
      ['0_serial', '1_dense']
      >>> x = jnp.ones((2, 8))
      >>> g = jax.grad(lambda p: net.apply(p, x).sum())(params)
      >>> plain = fnn.serial(block, fnn.Dense(1))
      >>> g0 = jax.grad(lambda p: plain.apply(p, x).sum())(params)
      >>> jax.tree.all(jax.tree.map(jnp.allclose, g, g0))
      True
    """
    (layer,) = as_layers("remat", (layer,))
    if policy is not None and not callable(policy):
        raise ValueError(
            f"remat: expected policy to be one of jax.checkpoint_policies or None, "
            f"got {policy!r}."
        )

    desc = f"remat({describe(layer)})"
    return rewrapped(layer, desc, checkpointed(layer[1], policy))
