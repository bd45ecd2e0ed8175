"""How fnn compiles a training step: ``jax.jit`` plus, on CPU, one XLA option.

A step that donates its train state writes the new params into the buffers
of the old ones. On XLA:CPU, copy insertion by default copies every donated
buffer that the backward pass reads and the update then overwrites: on the
MLPs of ``benchmarks/steps.py`` the weights of all but the first layer, and
the whole packed buffer of a :class:`fnn.TrainState`. Its *region analysis*
(``xla_cpu_copy_insertion_use_region_analysis``) proves that those reads come
first and drops the copies, so the donating step moves as few bytes as a
non-donating one and keeps its smaller peak memory (``benchmarks/README.md``).

``jax.jit`` accepts compiler options only for a top-level call, so
:func:`jit_step` compiles with them when the step is called outside any trace
and without them inside another ``jit``, ``vmap`` or ``scan``, where the outer
compilation decides. Other backends get no options.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["compile_options", "jit_step"]

try:  # the cheapest test for "not inside a trace" (0.3 us)
    from jax._src.core import trace_state_clean as _outside_trace
except ImportError:  # pragma: no cover - a jax without it: never use the options

    def _outside_trace() -> bool:
        return False


def compile_options(donate: bool) -> dict[str, Any]:
    """The ``jax.jit`` keyword arguments for a top-level step.

    Examples:
      >>> import jax
      >>> from fnn.training.compiling import compile_options
      >>> compile_options(False)
      {}
      >>> sorted(compile_options(True)) == (
      ...     ["compiler_options"] if jax.default_backend() == "cpu" else [])
      True
    """
    if not donate or jax.default_backend() != "cpu":
        return {}
    return {"compiler_options": {"xla_cpu_copy_insertion_use_region_analysis": True}}


def jit_step(step: Callable, *, donate: bool, **jit_kwargs: Any) -> Callable:
    """``jax.jit(step, donate_argnums=0 if donate, **jit_kwargs)``, tuned on CPU.

    Outside any trace the call goes to a ``jax.jit`` with
    :func:`compile_options`; inside one (the step called from another ``jit``,
    under ``vmap``, in a ``lax.scan``) to a plain ``jax.jit``. ``lower`` and
    ``eval_shape`` are those of the top-level one.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fnn.training.compiling import jit_step
      >>> f = jit_step(lambda x: x + 1, donate=True)
      >>> f(jnp.ones(2)), jax.vmap(f)(jnp.ones((3, 2))).shape
      (Array([2., 2.], dtype=float32), (3, 2))
    """
    donate_argnums = (0,) if donate else ()
    plain = jax.jit(step, donate_argnums=donate_argnums, **jit_kwargs)
    options = compile_options(donate)
    if not options:
        return plain
    tuned = jax.jit(step, donate_argnums=donate_argnums, **jit_kwargs, **options)

    @functools.wraps(step)
    def call(*args: Any, **kwargs: Any) -> Any:
        return (tuned if _outside_trace() else plain)(*args, **kwargs)

    call.lower = tuned.lower
    call.eval_shape = tuned.eval_shape
    return call
