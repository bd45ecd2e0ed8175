"""Comparisons of autodiff with finite differences, and the worst of them."""

from __future__ import annotations

import dataclasses

import numpy as np

from fnn.gradcheck._fd import central, direction_matrix, extrapolate, shape_of
from fnn.gradcheck._report import GradCheckEntry

SAFETY = 4.0  # multiples of the finite-difference error estimate allowed


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One comparison: direction ``row``, output (or cotangent) column ``col``."""

    ratio: float
    row: int
    col: int
    analytic: float
    numeric: float
    fd_err: float
    tol: float
    problem: str | None
    jump: float | None


class Worst:
    """Running worst comparison of one mode over the directions of one leaf.

    Comparisons along single elements and along wider directions are kept
    apart, so the report can name an element whenever one is at fault.
    """

    def __init__(self, atol: float, rtol: float):
        self.atol, self.rtol = atol, rtol
        self.checked = self.failed = 0
        self.best: dict[str, Comparison] = {}  # "element" / "other"
        self.row_ratio: dict[int, float] = {}  # worst ratio along each direction
        self.nonfinite = False

    def add(self, rows, is_elem, analytic, numeric, err, jump, size, kink):
        """Adds comparisons, arrays of shape ``(len(rows), columns)``."""
        tol = self.atol + self.rtol * np.maximum(np.abs(analytic), np.abs(numeric))
        tol = tol + SAFETY * err
        with np.errstate(divide="ignore", invalid="ignore"):
            abs_err = np.abs(analytic - numeric)
            ratio = np.where(abs_err == 0, 0.0, abs_err / tol)
        finite = np.isfinite(analytic) & np.isfinite(numeric)
        self.nonfinite |= not finite.all()
        ratio = np.where(finite & ~jump, ratio, np.inf)
        self.checked += ratio.size
        self.failed += int(np.sum(ratio > 1))
        self.row_ratio.update(zip(rows.tolist(), ratio.max(axis=1).tolist()))
        for group, sel in (("element", is_elem), ("other", ~is_elem)):
            if not sel.any():
                continue
            masked = np.where(sel[:, None], ratio, -1.0)
            r, c = np.unravel_index(np.argmax(masked), ratio.shape)
            best = self.best.get(group)
            if best is not None and not ratio[r, c] > best.ratio:
                continue
            if ratio[r, c] <= 1:
                problem = None
            elif jump[r, c]:
                problem = "jump"
            elif not finite[r, c]:
                problem = "not finite"
            else:
                problem = "kink" if kink[r, c] else "mismatch"
            self.best[group] = Comparison(
                ratio=float(ratio[r, c]),
                row=int(rows[r]),
                col=int(c),
                analytic=float(analytic[r, c]),
                numeric=float(numeric[r, c]),
                fd_err=float(err[r, c]),
                tol=float(tol[r, c]),
                problem=problem,
                jump=float(size[r, c]) if problem == "jump" else None,
            )

    def pick(self) -> Comparison:
        elem, other = self.best.get("element"), self.best.get("other")
        if elem is not None and (other is None or elem.ratio > 1 or other.ratio <= 1):
            return elem
        return other


@dataclasses.dataclass(frozen=True)
class Shared:
    """What the comparisons of one function share.

    Attributes:
      y0: the function's outputs at the input, shape ``(m,)``.
      cots: reverse mode's output cotangents, shape ``(C, m)``.
      ts: the steps, largest first.
      scale: every input element's step scale, shape ``(n,)``.
      atol: absolute tolerance.
      rtol: relative tolerance.
    """

    y0: np.ndarray
    cots: np.ndarray
    ts: np.ndarray
    scale: np.ndarray
    atol: float
    rtol: float


def compare_leaf(dirs, values, tangents, grads, ctx: Shared) -> dict[str, Worst]:
    """Autodiff against finite differences along ``dirs``, for each mode.

    Args:
      dirs: the directions (a list of :class:`~fnn.gradcheck._fd.Direction`).
      values: the outputs at the perturbed points, shape ``(len(dirs), 2K, m)``.
      tangents: the JVPs along the directions, or ``None`` (no forward mode).
      grads: the VJPs with each cotangent, shape ``(C, n)``, or ``None``.
      ctx: what the comparisons of one function share.

    Returns:
      ``{mode: Worst}``.
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return _compare(dirs, values, tangents, grads, ctx)


def _compare(dirs, values, tangents, grads, ctx: Shared) -> dict[str, Worst]:
    n = len(dirs)
    rows = np.arange(n)
    is_elem = np.array([d.kind == "element" for d in dirs], dtype=bool)
    diffs = central(values, ctx.ts)
    fabs = np.abs(ctx.y0)
    found = {}
    if tangents is not None:
        numeric, err = extrapolate(diffs, ctx.ts, fabs[None])
        w = found["fwd"] = Worst(ctx.atol, ctx.rtol)
        shape = shape_of(values, ctx.y0, ctx.ts)
        w.add(rows, is_elem, tangents, numeric, err, *shape)
    if grads is not None:
        # The rounding floor counts the outputs a direction changes, so a tiny
        # derivative next to large outputs it does not touch keeps a tight
        # tolerance. A direction that changes no output at all only shows the
        # derivative is below the outputs' resolution: then every output counts
        # (a bias before a normalization, a key bias under softmax: exactly 0,
        # which autodiff rounds to a few ulps).
        cots = ctx.cots.T
        moved = np.any(diffs != 0, axis=0)
        moved = moved | ~np.any(moved, axis=1, keepdims=True)
        changed = moved * fabs[None]
        numeric, err = extrapolate(diffs @ cots, ctx.ts, changed @ np.abs(cots))
        analytic = direction_matrix(dirs, ctx.scale, n) @ grads.T
        w = found["rev"] = Worst(ctx.atol, ctx.rtol)
        shape = shape_of(values, ctx.y0, ctx.ts, cots)
        w.add(rows, is_elem, analytic, numeric, err, *shape)
    return found


def entry(fn, leaf, mode, best: Comparison, dirs, note="") -> GradCheckEntry:
    """The report entry of the comparison ``best`` (a row of ``dirs``)."""
    direction = dirs[best.row]
    index = None
    if direction.kind == "element":
        flat_index = direction.indices[0] - leaf.offset
        index = tuple(int(k) for k in np.unravel_index(flat_index, leaf.shape))
    abs_err = abs(best.analytic - best.numeric)
    if best.numeric != 0:
        rel_err = abs_err / abs(best.numeric)
    else:
        rel_err = 0.0 if abs_err == 0 else np.inf
    return GradCheckEntry(
        of=fn.label,
        order=fn.order,
        mode=mode,
        path=leaf.path,
        index=index,
        direction=direction.describe() + note,
        output=fn.output_name(best.col) if mode == "fwd" else None,
        analytic=best.analytic,
        numeric=best.numeric,
        abs_err=float(abs_err),
        rel_err=float(rel_err),
        tol=best.tol,
        fd_err=best.fd_err,
        checked=0,
        failed=0,
        problem=best.problem,
        jump=best.jump,
    )
