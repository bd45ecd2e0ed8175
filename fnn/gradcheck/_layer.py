""":func:`check_layer`: a layer's gradients with respect to its params and input."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnn.gradcheck._check import DEFAULT_MAX_DIRECTIONS, run_check
from fnn.gradcheck._report import GradCheckReport
from fnn.gradcheck._target import Static
from fnn.model.compare import shape_tree
from fnn.model.core import check_output_shape, describe

LAYER_BATCH = 2  # what a leading -1 batch dimension becomes in check_layer


@dataclasses.dataclass(frozen=True)
class _Projected:
    """The scalar :func:`check_layer` checks: the output dotted with ``proj``.

    A value, not a closure, so that checking the same layer again compares
    equal and reuses the compiled check.
    """

    apply: Callable
    stateful: bool
    kwargs: Static  # a tuple of (name, value) pairs

    def output(self, params, x, state):
        kwargs = dict(self.kwargs.value)
        if self.stateful:
            return self.apply(params, state, x, **kwargs)[0]
        return self.apply(params, x, **kwargs)

    def __call__(self, params, x, proj, state):
        ys = jax.tree.leaves(self.output(params, x, state))
        return sum(jnp.sum(y * w) for y, w in zip(ys, proj))


# jax.eval_shape of loss.output, traced again for every new bound method; this
# traces once per layer and input shapes.
_output_shape = jax.jit(_Projected.output, static_argnums=0)


def check_layer(
    layer: tuple[Callable, Callable],
    input_shape: tuple,
    *,
    key: jax.Array | None = None,
    x: Any = None,
    input_dtype: Any = jnp.float32,
    apply_kwargs: dict[str, Any] | None = None,
    order: int = 1,
    modes: Sequence[str] = ("fwd", "rev"),
    eps: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    max_directions: int = DEFAULT_MAX_DIRECTIONS,
    seed: int = 0,
) -> GradCheckReport:
    """Checks a layer's ``apply`` with respect to its params and its input.

    The layer's output is reduced to a scalar by a fixed random projection (a
    Gaussian weight per output element), and :func:`check_grads` checks that
    scalar as a function of ``(params, x)`` in float64. Report paths read
    ``params['w']`` and ``x`` (``x[0]``, ``x[1]`` for several inputs). Integer
    inputs, such as token ids, are not checked; only the params are.

    A model with running state (``fnn.with_state(layer)``, whose ``init``
    returns ``(output_shape, params, state)`` and whose ``apply`` takes and
    returns the state) is checked with the state held fixed at its initial
    value; only ``y`` of ``apply``'s ``(y, new_state)`` is differentiated.

    Args:
      layer: an ``(init, apply)`` pair: ``init(key, input_shape) ->
        (output_shape, params)`` and ``apply(params, x, *, key=None) -> y``;
        or a model with state as above.
      input_shape: the input's shape, whose leading dimension may be ``-1``
        (replaced by 2), or a tuple of shapes for a layer with several inputs.
      key: a ``jax.random.key`` for ``init``; default ``jax.random.key(0)``.
      x: the input to check at (an array, or a tuple of arrays); default random
        normal values of ``input_shape`` (integers in ``[0, 2)`` for integer
        ``input_dtype``).
      input_dtype: dtype of the generated input, or a tuple with one per input.
      apply_kwargs: keyword arguments for ``apply``, such as ``{"train":
        True}`` for a ``BatchNorm`` that normalizes with the batch's statistics.
      order: as in :func:`check_grads`.
      modes: as in :func:`check_grads`.
      eps: as in :func:`check_grads`.
      atol: as in :func:`check_grads`.
      rtol: as in :func:`check_grads`.
      max_directions: as in :func:`check_grads`.
      seed: seed of the generated input, the projection and the directions.

    Returns:
      The :class:`GradCheckReport`.

    Raises:
      GradientCheckError: if a gradient is wrong.
      ValueError: as :func:`check_grads`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fnn
      >>> from fnn.gradcheck import check_layer
      >>> def init(key, shape):
      ...     return shape, {"scale": jnp.array(2.0)}
      >>> def apply(params, x, *, key=None):
      ...     return jnp.tanh(x * params["scale"])
      >>> check_layer((init, apply), (-1, 3)).passed
      True
      >>> model = fnn.with_state(fnn.BatchNorm())
      >>> check_layer(model, (-1, 3), apply_kwargs={"train": True}).passed
      True
    """
    init, apply = layer
    rng = np.random.default_rng(seed)
    multi = len(input_shape) > 0 and isinstance(input_shape[0], tuple | list)
    shapes = tuple(input_shape) if multi else (input_shape,)
    concrete = [tuple(LAYER_BATCH if d == -1 else d for d in s) for s in shapes]
    made = init(jax.random.key(0) if key is None else key, input_shape)
    params, state = made[1], made[2] if len(made) == 3 else None
    if x is None:
        dtypes = input_dtype if isinstance(input_dtype, tuple | list) else None
        xs = []
        for k, s in enumerate(concrete):
            dt = np.dtype(dtypes[k] if dtypes else input_dtype)
            if np.issubdtype(dt, np.integer):
                xs.append(rng.integers(0, 2, size=s).astype(dt))
            else:
                xs.append(rng.standard_normal(s).astype(dt))
        x = tuple(xs) if multi else xs[0]
    kwargs = tuple(sorted((apply_kwargs or {}).items()))
    loss = _Projected(apply, len(made) == 3, Static(kwargs))
    out = _output_shape.trace(loss, params, x, state).out_info
    desc = describe(getattr(init, "fnn_layer", layer))
    check_output_shape(desc, made[0], shape_tree(out), shape_tree(x))
    proj = tuple(rng.standard_normal(o.shape) for o in jax.tree.leaves(out))
    return run_check(
        loss,
        (params, x, proj, state),
        order,
        modes,
        eps,
        atol,
        rtol,
        (0, 1),
        None,
        max_directions,
        seed,
        names=("params", "x", "proj", "state"),
    )
