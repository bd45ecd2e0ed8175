"""Every evaluation one check of a function needs, in one compiled program.

The program returns the function's value, its VJPs with a few cotangents, its
values at ``x ± t * d`` for every direction ``d`` and step ``t``, and its JVPs
along every direction, each batched with ``jax.vmap``. A batch that varies
every input at once turns a convolution into a grouped convolution, which
XLA:CPU runs slowly (its cost grows faster than the number of groups), so for
functions with convolutions the points are evaluated one after another
(``lax.map``). Programs compile at ``xla_backend_optimization_level=0``, except
for functions with convolutions or pooling windows, which run several times
slower unoptimized.

The program is ``jax.jit``-compiled with the :class:`~fnn.gradcheck._target.Target`
and the :class:`Plan` as static arguments, so checking the same function again
reuses it. A function that cannot be traced (Python control flow on values)
runs the same program without jit, with Python loops in place of ``jax.vmap``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fnn.gradcheck._target import call as call_target
from fnn.gradcheck._target import flat as flat_target


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the program computes and how.

    Attributes:
      fwd: compute JVPs along the directions (forward mode).
      rev: compute VJPs with the cotangents (reverse mode).
      shapes: the checked leaves' shapes, in the order of the flat input.
      batch: points evaluated together (``jax.vmap``) in each step of a
        ``lax.map`` over them; ``0``: all at once.
      optimize: compile with XLA's full optimization, slower to compile and
        faster to run; else with ``xla_backend_optimization_level=0``.
      eager: run without ``jax.jit`` and ``jax.vmap``, one point at a time.
    """

    fwd: bool
    rev: bool
    shapes: tuple[tuple[int, ...], ...]
    batch: int = 0
    optimize: bool = False
    eager: bool = False

    def unflatten(self, x):
        """The leaves of the flat input vector ``x``."""
        out, off = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            out.append(x[off : off + size].reshape(shape))
            off += size
        return tuple(out)


def _map(plan: Plan, fn, xs, batch: int = 0):
    """``fn`` over the leading axis of ``xs``: vmapped, in batches, or a loop."""
    if plan.eager:
        return jnp.stack([fn(x) for x in xs])
    if batch == 1:
        return jax.lax.map(fn, xs)
    if 0 < batch < xs.shape[0]:
        return jax.lax.map(fn, xs, batch_size=batch)
    return jax.vmap(fn)(xs)


def program(target, plan, x, rest, vecs, dirs, ts, cots):
    """``(y0, grads, values, tangents)`` of the target at the flat input ``x``.

    Args:
      target: the :class:`~fnn.gradcheck._target.Target`.
      plan: the :class:`Plan`.
      x: the checked input leaves, flattened into one float64 vector ``(n,)``.
      rest: the other array leaves of the arguments.
      vecs: the fixed vectors of the target's derivative steps.
      dirs: the scaled directions, shape ``(r, n)``.
      ts: the step multipliers, shape ``(K,)``.
      cots: output cotangents, shape ``(C, m)`` (unused without ``plan.rev``).

    Returns:
      ``y0`` (shape ``(m,)``); ``grads``, the VJPs with every cotangent (shape
      ``(C, n)``) or ``None``; ``values``, the outputs at ``x + t * d`` for
      ``t`` in ``(ts, -ts)`` (shape ``(r, 2K, m)``); ``tangents``, the JVPs
      along every direction (shape ``(r, m)``) or ``None``.
    """

    def fn(v):
        return flat_target(target, plan.unflatten(v), rest, vecs)

    if plan.rev:
        y0, pull = jax.vjp(fn, x)
        grads = _map(plan, lambda c: pull(c)[0], cots)
    else:
        y0, grads = fn(x), None
    offsets = jnp.concatenate([ts, -ts])

    def points(d):
        return _map(plan, fn, x[None] + offsets[:, None] * d[None])

    def tangent(d):
        return jax.jvp(fn, (x,), (d,))[1]

    if plan.eager:
        values = _map(plan, points, dirs)
    else:
        pts = x[None, None] + offsets[None, :, None] * dirs[:, None]
        values = _map(plan, fn, pts.reshape(-1, x.size), plan.batch)
        values = values.reshape(dirs.shape[0], offsets.size, -1)
    tangents = _map(plan, tangent, dirs) if plan.fwd else None
    return y0, grads, values, tangents


# A check runs its program once or a few times: compile fast rather than run
# fast, except where unoptimized code is very slow (convolutions and pooling
# windows on XLA:CPU).
_compiled = jax.jit(
    program,
    static_argnums=(0, 1),
    compiler_options={"xla_backend_optimization_level": 0},
)
_optimized = jax.jit(program, static_argnums=(0, 1))
_traced_call = jax.jit(call_target, static_argnums=0)


def run(target, plan, x, rest, vecs, dirs, ts, cots):
    """:func:`program`, compiled unless ``plan.eager``."""
    fun = program if plan.eager else _optimized if plan.optimize else _compiled
    return fun(target, plan, x, rest, vecs, dirs, ts, cots)


def trace(target, xs, rest):
    """``(out_info, jaxpr)`` of ``f`` at these leaves, from a cached trace."""
    traced = _traced_call.trace(target, xs, rest)
    return traced.out_info, traced.jaxpr


def is_untraceable(e: BaseException) -> bool:
    """Whether ``e`` says ``f`` needs concrete values (Python control flow)."""
    return isinstance(
        e,
        jax.errors.ConcretizationTypeError
        | jax.errors.TracerIntegerConversionError
        | jax.errors.TracerArrayConversionError,
    )


def is_custom_vjp_jvp(e: BaseException) -> bool:
    """Whether ``e`` is JAX refusing forward mode through a ``jax.custom_vjp``."""
    return (
        isinstance(e, TypeError)
        and not isinstance(e, jax.errors.JAXTypeError)
        and "custom_vjp" in str(e)
    )
