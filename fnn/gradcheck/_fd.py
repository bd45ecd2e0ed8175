"""Finite differences for :func:`fnn.check_grads`: steps, directions, extrapolation.

Every input element ``i`` gets a scale ``s_i = max(|x_i|, 0.01 * rms(x))`` (1 when
the leaf is all zeros). A direction ``d`` is perturbed as ``x + t * (s * d)`` for
``t`` in ``base * 4**-k``, ``k = 0..5``. Central differences at neighbouring
steps are combined by Richardson extrapolation (the ``h**2`` error term cancels);
the smallest difference between neighbouring extrapolations picks the step and is
the error estimate, floored by the rounding error ``eps * |f| / t``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NUM_LEVELS = 6  # step sizes base, base/4, ..., base/4**5
LEVEL_RATIO = 4.0
DEFAULT_BASE_STEP = 1e-2  # largest step, relative to each element's scale
SCALE_FLOOR = 1e-2  # elements near zero use this fraction of the leaf's rms
ROUNDING_FACTOR = 8.0
EPS64 = float(np.finfo(np.float64).eps)
SHAPE_LEVELS = 3  # the smallest steps that tell a jump or a kink
SHAPE_RTOL = 0.1  # how closely their differences must agree
NOISE_FACTOR = 1e3  # multiples of the rounding error a jump or kink must exceed
CHUNK_FLOATS = 2**22  # floats per batched evaluation (32 MiB in float64)


def steps(base: float) -> np.ndarray:
    """The ``NUM_LEVELS`` step multipliers, largest first."""
    return base * LEVEL_RATIO ** -np.arange(NUM_LEVELS, dtype=np.float64)


def element_scale(x: np.ndarray) -> np.ndarray:
    """Per-element step scale of a float64 leaf."""
    rms = float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0
    if rms == 0.0 or not np.isfinite(rms):
        return np.ones_like(x)
    return np.maximum(np.abs(x), SCALE_FLOOR * rms)


@dataclasses.dataclass(frozen=True)
class Direction:
    """A sparse direction: ``weights`` at the flat ``indices`` of one leaf."""

    kind: str  # "element", "block" or "random"
    indices: np.ndarray
    weights: np.ndarray

    def describe(self) -> str:
        if self.kind == "block":
            return f"block of {self.indices.size} elements"
        if self.kind == "random":
            return "random direction"
        return "element"


def directions(
    active: np.ndarray, max_directions: int, num_random: int, rng: np.random.Generator
) -> list[Direction]:
    """Directions that together touch every active element of a leaf.

    Up to ``max_directions`` active elements: one direction per element. More:
    the elements are shuffled into ``max_directions`` blocks, each perturbed with
    random signs, so every element sits in exactly one block with weight
    ``1/sqrt(block size)`` of it. Both are followed by ``num_random`` dense
    Gaussian directions, which exercise every element at once with non-trivial
    tangents.
    """
    out = []
    if active.size <= max_directions:
        one = np.ones(1)
        out = [Direction("element", np.array([i]), one) for i in active]
    else:
        signs = rng.choice(np.array([-1.0, 1.0]), size=active.size)
        blocks = np.array_split(rng.permutation(active), max_directions)
        for block, sign in zip(blocks, np.array_split(signs, max_directions)):
            out.append(Direction("block", np.sort(block), sign))
    for _ in range(num_random if active.size > 1 else 0):
        out.append(Direction("random", active, rng.standard_normal(active.size)))
    return out


def direction_matrix(dirs: list[Direction], scale: np.ndarray, rows: int) -> np.ndarray:
    """Dense ``(rows, n)`` matrix of the scaled directions ``s * d``.

    Rows past ``len(dirs)`` are zero (padding to a fixed number of rows).
    """
    mat = np.zeros((rows, scale.size))
    for row, d in zip(mat, dirs):
        row[d.indices] = d.weights * scale[d.indices]
    return mat


def rows_per_call(n_in: int, n_out: int, n_dirs: int) -> int:
    """How many directions one evaluation takes.

    Their ``2 * NUM_LEVELS`` points each, inputs and outputs, come to about
    ``CHUNK_FLOATS`` floats at most.
    """
    return max(1, min(n_dirs, CHUNK_FLOATS // (2 * NUM_LEVELS * (n_in + n_out))))


def central(values: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Central differences from the outputs ``(r, 2K, m)`` at ``x + t * d``.

    Returns shape ``(K, r, m)``.
    """
    k = ts.size
    diffs = (values[:, :k] - values[:, k:]) / (2.0 * ts[None, :, None])
    return np.moveaxis(diffs, 1, 0)


def extrapolate(diffs: np.ndarray, ts: np.ndarray, fabs: np.ndarray):
    """Richardson-extrapolated derivative and its error estimate.

    Args:
      diffs: central differences, shape ``(K, ...)``, one per step in ``ts``.
      ts: the steps, largest first.
      fabs: the magnitude of the function values differenced, broadcastable to
        ``diffs.shape[1:]``; sets the rounding-error floor.

    Returns:
      ``(numeric, err)``, each of shape ``diffs.shape[1:]``.
    """
    r = LEVEL_RATIO**2
    rich = (r * diffs[1:] - diffs[:-1]) / (r - 1.0)
    with np.errstate(invalid="ignore", over="ignore"):
        gaps = np.abs(rich[1:] - rich[:-1])
    gaps = np.where(np.isfinite(gaps), gaps, np.inf)
    best = np.argmin(gaps, axis=0)
    numeric = np.take_along_axis(rich[1:], best[None], 0)[0]
    err = np.take_along_axis(gaps, best[None], 0)[0]
    rounding = ROUNDING_FACTOR * EPS64 * fabs / ts[2:][best]
    return numeric, np.maximum(err, rounding)


def shape_of(values: np.ndarray, y0: np.ndarray, ts: np.ndarray, proj=None):
    """Which comparisons sit at a jump of ``f``, and which at a kink.

    Along a direction, ``f(x + t) - f(x - t)`` tends to 0 like ``t`` where ``f``
    is differentiable; it stays the same for the smallest steps where ``f``
    jumps (so the central difference grows like ``1/t``). ``(f(x + t) + f(x - t)
    - 2 f(x)) / t``, the difference of the one-sided derivatives, tends to 0 too;
    it stays the same where ``f`` has a kink. Both must be steady over the
    ``SHAPE_LEVELS`` smallest steps and far above rounding error.

    Args:
      values: the outputs at ``x + t * d`` for ``t`` in ``(ts, -ts)``, shape
        ``(r, 2K, m)``.
      y0: the outputs at ``x``, shape ``(m,)``.
      ts: the steps, largest first.
      proj: ``None`` to compare output by output, or a matrix ``(m, C)`` that
        projects the outputs first (reverse mode's cotangents).

    Returns:
      ``(jump, size, kink)``, each of shape ``(r, m)`` or ``(r, C)``: whether
      ``f`` jumps, by how much at the smallest step, and whether it has a kink.
    """
    k, tail = ts.size, slice(ts.size - SHAPE_LEVELS, ts.size)
    up, down = values[:, :k][:, tail], values[:, k:][:, tail]
    change = up - down
    bend = (up + down - 2.0 * y0) / ts[tail][None, :, None]
    scale = np.abs(y0)
    if proj is not None:
        change, bend, scale = change @ proj, bend @ proj, scale @ np.abs(proj)
    noise = NOISE_FACTOR * ROUNDING_FACTOR * EPS64 * scale
    with np.errstate(invalid="ignore"):
        jump = _steady(change) & (np.abs(change[:, -1]) > noise)
        kink = _steady(bend) & (np.abs(bend[:, -1]) > noise / ts[-1])
    return jump, change[:, -1], kink


def _steady(a: np.ndarray) -> np.ndarray:
    """Whether ``a[:, level]`` agrees over its levels (the smallest steps)."""
    last = a[:, -1:]
    return np.all(np.abs(a - last) <= SHAPE_RTOL * np.abs(last), axis=1)
