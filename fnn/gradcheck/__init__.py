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

from fnn.gradcheck._check import DEFAULT_MAX_DIRECTIONS, run_check
from fnn.gradcheck._layer import check_layer
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
    part of the tolerance. Where ``f`` jumps (its change over a step stays the
    same as the step shrinks) the check fails and says so, whatever the
    derivative; failures at a kink or with a non-finite derivative say so too.

    All evaluations of ``f`` for one derivative run in one compiled program,
    which a later check of the same function with arguments of the same shapes
    reuses. ``f`` that cannot be traced (Python control flow on values) is
    evaluated without ``jax.jit`` and ``jax.vmap``, point by point.

    Args:
      f: the function, called as ``f(*args)``; it returns a pytree of arrays
        (integer outputs are ignored). It may use ``jax.custom_vjp`` (then only
        reverse mode is checked, and the report says so) or ``jax.custom_jvp``.
      args: a tuple of positional arguments; each may be a pytree (e.g. a dict of
        arrays). Integer, boolean and empty leaves are not checked. Leaves that
        are neither arrays nor checked floats (Python ints, strings) are fixed
        in the compiled check, which a later check reuses only when they are
        equal (the same object, when unhashable).
      order: ``1`` checks first derivatives; ``2`` also checks the derivatives of
        a gradient (VJP) and of a directional derivative (JVP) of ``f``, i.e.
        Hessian-vector products, with the same modes. Through a
        ``jax.custom_vjp`` there is no JVP of ``f``, and the gradient is checked
        in reverse mode (reverse-over-reverse), and in forward mode where JAX
        can differentiate the backward pass forward.
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
        at ``args``, has nothing to check (only empty inputs, or a mask that
        leaves every element out), or the arguments are malformed.

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
      >>> try:
      ...     check_grads(jnp.floor, (jnp.array([0.5, 2.0]),))
      ... except GradientCheckError as e:
      ...     print(e.report.worst.problem, e.report.worst.where())
      jump args[0][1]
    """
    return run_check(
        f, args, order, modes, eps, atol, rtol, argnums, mask, max_directions, seed
    )
