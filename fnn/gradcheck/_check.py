"""One gradient check from start to end: validate, prepare, check every order."""

from __future__ import annotations

import jax
import numpy as np

from fnn.gradcheck._args import prepare
from fnn.gradcheck._core import Config, check_fn, derive, first
from fnn.gradcheck._fd import DEFAULT_BASE_STEP
from fnn.gradcheck._report import GradCheckReport, GradientCheckError

DEFAULT_RTOL = 1e-6  # relative tolerance of the float64 comparison
DEFAULT_ATOL = 0.0
DEFAULT_MAX_DIRECTIONS = 64  # per leaf; larger leaves are checked in blocks


def run_check(
    f, args, order, modes, eps, atol, rtol, argnums, mask, max_dirs, seed, names=None
) -> GradCheckReport:
    """:func:`fnn.check_grads` with every option given; ``names`` name the args."""
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
    cfg = Config(
        modes=modes,
        atol=DEFAULT_ATOL if atol is None else float(atol),
        rtol=DEFAULT_RTOL if rtol is None else float(rtol),
        base=DEFAULT_BASE_STEP if eps is None else float(eps),
        max_directions=int(max_dirs),
        rng=np.random.default_rng(seed),
    )
    notes: list[str] = []
    with jax.enable_x64(True):
        prep = prepare(f, args, argnums, mask, names, eps, notes)
        if not prep.leaves:
            raise ValueError(
                f"no non-empty floating-point inputs to check among args at argnums "
                f"{argnums!r}."
            )
        x = np.concatenate([leaf.x for leaf in prep.leaves])
        scale = np.concatenate([leaf.scale for leaf in prep.leaves])
        xs = tuple(jax.device_put(leaf.x.reshape(leaf.shape)) for leaf in prep.leaves)
        base = first(prep.target, xs, prep.rest, notes)
        entries, frontier = [], [base]
        for k in range(1, order + 1):
            if k > 1:
                frontier = [g for fn in frontier for g in derive(fn, prep.leaves, cfg)]
            for fn in frontier:
                entries.extend(
                    check_fn(fn, prep.leaves, x, scale, prep.rest, cfg, notes)
                )
    report = GradCheckReport(tuple(entries), tuple(dict.fromkeys(notes)))
    if not report.passed:
        raise GradientCheckError(report)
    return report
