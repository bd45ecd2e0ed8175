"""Gradient checking: autodiff against finite differences, in float64.

:func:`check_grads` follows ``jax.test_util.check_grads``' calling convention: it
returns a :class:`GradCheckReport` when the gradients agree and raises
:class:`GradientCheckError` (an ``AssertionError``) carrying the same report when
they do not. :func:`check_layer` checks a layer's ``apply`` with respect to its
parameters and its input. The method is described in ``docs/gradcheck.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnn.gradcheck import _args as argsmod
from fnn.gradcheck import _core as core
from fnn.gradcheck import _fd as fd
from fnn.gradcheck._report import GradCheckEntry, GradCheckReport, GradientCheckError
from fnn.gradcheck.nonfinite import NonFiniteReport, find_nonfinite
from fnn.gradcheck.step import StepCheckError, StepCheckReport, check_step

__all__ = [
    "GradCheckEntry",
    "GradCheckReport",
    "GradientCheckError",
    "NonFiniteReport",
    "StepCheckError",
    "StepCheckReport",
    "check_grads",
    "check_layer",
    "check_step",
    "find_nonfinite",
]

DEFAULT_RTOL = 1e-6  # relative tolerance of the float64 comparison
DEFAULT_ATOL = 0.0
DEFAULT_MAX_DIRECTIONS = 64  # per leaf; larger leaves are checked in blocks
LAYER_BATCH = 2  # what a leading -1 batch dimension becomes in check_layer


def check_grads(
    f: Callable[..., Any],
    args: Sequence[Any],
    *,
    order: int = 1,
    modes: Sequence[str] = ("fwd", "rev"),
    eps: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    argnums: int | Sequence[int] | None = None,
    mask: Any = None,
    max_directions: int = DEFAULT_MAX_DIRECTIONS,
    seed: int = 0,
) -> GradCheckReport:
    """Checks ``f``'s derivatives against finite differences, in float64.

    Every float input leaf is upcast to float64 (inside ``jax.enable_x64``), so
    float32 callers get the same strict check. For each input leaf of up to
    ``max_directions`` elements, every element is perturbed on its own; larger
    leaves are shuffled into ``max_directions`` blocks perturbed with random signs,
    so a bug in a single element still shows (a failing block is then searched
    element by element). Two dense Gaussian directions per leaf are added in both
    cases. Forward mode compares JVPs with finite differences element by element
    of the output; reverse mode compares VJPs with two random Gaussian cotangents.
    The finite differences use six step sizes per element, scaled to the
    element's magnitude, and Richardson extrapolation, whose error estimate is
    part of the tolerance.

    Args:
      f: the function, called as ``f(*args)``; it returns a pytree of arrays
        (integer outputs are ignored). It may use ``jax.custom_vjp`` (then only
        reverse mode is checked, and the report says so) or ``jax.custom_jvp``.
      args: a tuple of positional arguments; each may be a pytree (e.g. a dict of
        arrays). Integer and boolean leaves are not checked.
      order: ``1`` checks first derivatives; ``2`` also checks the derivatives of
        a gradient (VJP) and of a directional derivative (JVP) of ``f``, i.e.
        Hessian-vector products, with the same modes.
      modes: any of ``"fwd"`` and ``"rev"``.
      eps: the largest finite-difference step, absolute, for every element (the
        check also uses ``eps/4`` ... ``eps/4**5``). Default: ``0.01`` times each
        element's magnitude (at least 1% of its leaf's root mean square).
      atol: absolute tolerance, default ``0``.
      rtol: relative tolerance, default ``1e-6``. A comparison fails when
        ``|analytic - numeric| > atol + rtol * max(|analytic|, |numeric|)
        + 4 * fd_err``, where ``fd_err`` is the finite differences' own estimated
        error.
      argnums: the positions of ``args`` to check; default all.
      mask: where ``f`` is not differentiable or not defined, elements to leave
        out. Either a tuple with one entry per argument, or a callable
        ``mask(*args)`` returning one: each entry is ``None`` (check all) or a
        pytree like that argument (or a prefix-free part of it, such as a dict
        with some of its keys) of booleans broadcastable to each leaf; ``False``
        elements are neither perturbed nor compared.
      max_directions: directions per leaf before switching to blocks.
      seed: seed of the random directions and cotangents.

    Returns:
      A :class:`GradCheckReport` with, for each derivative, mode and input path,
      the worst element with its analytic and numeric values, errors and
      tolerance.

    Raises:
      GradientCheckError: if any comparison exceeds its tolerance; ``.report``
        holds the report.
      ValueError: if ``f`` cannot be checked in float64 (it returns a lower
        precision output or cotangent when given float64 inputs), is not finite
        at ``args``, or the arguments are malformed.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fnn.gradcheck import check_grads, GradientCheckError
      >>> report = check_grads(lambda x: jnp.sum(jnp.sin(x)), (jnp.ones(3),))
      >>> report.passed
      True
      >>> @jax.custom_vjp
      ... def square(x):
      ...     return x * x
      >>> square.defvjp(lambda x: (x * x, x), lambda x, g: (g * x,))  # should be 2x
      >>> try:
      ...     check_grads(square, (jnp.arange(1.0, 4.0),))
      ... except GradientCheckError as e:
      ...     print(e.report.worst.path, e.report.worst.mode)
      args[0] rev
    """
    return _check(
        f, args, order, modes, eps, atol, rtol, argnums, mask, max_directions, seed
    )


def _check(
    f, args, order, modes, eps, atol, rtol, argnums, mask, max_dirs, seed, names=None
) -> GradCheckReport:
    if not isinstance(args, tuple | list):
        raise TypeError(
            f"args must be a tuple of positional arguments, got {type(args).__name__}."
        )
    args = tuple(args)
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    if not modes or any(m not in ("fwd", "rev") for m in modes):
        raise ValueError(f"modes must be some of 'fwd' and 'rev', got {modes!r}.")
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}.")
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}.")
    if max_dirs < 1:
        raise ValueError(f"max_directions must be at least 1, got {max_dirs!r}.")
    if argnums is None:
        argnums = tuple(range(len(args)))
    argnums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    if any(not -len(args) <= a < len(args) for a in argnums):
        raise ValueError(f"argnums {argnums!r} out of range for {len(args)} args.")
    argnums = tuple(a % len(args) for a in argnums)
    names = names or tuple(f"args[{k}]" for k in range(len(args)))
    cfg = core.Config(
        modes=modes,
        atol=DEFAULT_ATOL if atol is None else float(atol),
        rtol=DEFAULT_RTOL if rtol is None else float(rtol),
        base=fd.DEFAULT_BASE_STEP if eps is None else float(eps),
        max_directions=int(max_dirs),
        rng=np.random.default_rng(seed),
    )
    notes: list[str] = []
    with jax.enable_x64(True):
        leaves, x0, scale, actives, tree_fn = argsmod.prepare(
            f, args, argnums, mask, names, eps, notes
        )
        if not leaves:
            raise ValueError(
                f"no floating-point inputs to check among args at argnums {argnums!r}."
            )
        base = core.make_fn("f", 1, tree_fn, x0, None, notes, modes)
        low = core.low_precision_ops(base.flat, x0)
        if low:
            notes.append(
                f"f computes in lower precision inside ({', '.join(sorted(low))}); "
                f"the check can be no more accurate than that."
            )
        fns, frontier = [base], [base]
        for k in range(2, order + 1):
            frontier = [
                core.make_fn(label, k, g, x0, out_names, notes, modes)
                for fn in frontier
                for label, g, out_names in core.derive(fn, leaves, scale, actives, cfg)
            ]
            fns.extend(frontier)
        entries = []
        for fn in fns:
            entries.extend(core.check_fn(fn, leaves, x0, scale, actives, cfg, notes))
    report = GradCheckReport(tuple(entries), tuple(dict.fromkeys(notes)))
    if not report.passed:
        raise GradientCheckError(report)
    return report


def check_layer(
    layer: tuple[Callable, Callable],
    input_shape: tuple,
    *,
    key: jax.Array | None = None,
    x: Any = None,
    input_dtype: Any = jnp.float32,
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

    Args:
      layer: an ``(init, apply)`` pair: ``init(key, input_shape) ->
        (output_shape, params)`` and ``apply(params, x, *, key=None) -> y``.
      input_shape: the input's shape, whose leading dimension may be ``-1``
        (replaced by 2), or a tuple of shapes for a layer with several inputs.
      key: a ``jax.random.key`` for ``init``; default ``jax.random.key(0)``.
      x: the input to check at (an array, or a tuple of arrays); default random
        normal values of ``input_shape`` (integers in ``[0, 2)`` for integer
        ``input_dtype``).
      input_dtype: dtype of the generated input, or a tuple with one per input.
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
      >>> from fnn.gradcheck import check_layer
      >>> def init(key, shape):
      ...     return shape, {"scale": jnp.array(2.0)}
      >>> def apply(params, x, *, key=None):
      ...     return jnp.tanh(x * params["scale"])
      >>> check_layer((init, apply), (-1, 3)).passed
      True
    """
    init, apply = layer
    rng = np.random.default_rng(seed)
    multi = len(input_shape) > 0 and isinstance(input_shape[0], tuple | list)
    shapes = tuple(input_shape) if multi else (input_shape,)
    concrete = [tuple(LAYER_BATCH if d == -1 else d for d in s) for s in shapes]
    _, params = init(jax.random.key(0) if key is None else key, input_shape)
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
    out = jax.eval_shape(apply, params, x)
    proj = [rng.standard_normal(o.shape) for o in jax.tree.leaves(out)]

    def loss(p, inputs):
        ys = jax.tree.leaves(apply(p, inputs))
        return sum(jnp.sum(y * w) for y, w in zip(ys, proj))

    return _check(
        loss,
        (params, x),
        order,
        modes,
        eps,
        atol,
        rtol,
        None,
        None,
        max_directions,
        seed,
        names=("params", "x"),
    )
