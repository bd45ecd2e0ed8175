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

import jax
import jax.numpy as jnp
import numpy as np

NUM_LEVELS = 6  # step sizes base, base/4, ..., base/4**5
LEVEL_RATIO = 4.0
DEFAULT_BASE_STEP = 1e-2  # largest step, relative to each element's scale
SCALE_FLOOR = 1e-2  # elements near zero use this fraction of the leaf's rms
ROUNDING_FACTOR = 8.0
EPS64 = float(np.finfo(np.float64).eps)
CHUNK_FLOATS = 2**22  # floats per batched evaluation (32 MiB in float64)
# Checks run each compiled function a few times: compile fast rather than run fast.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


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
        for block in np.array_split(rng.permutation(active), max_directions):
            signs = rng.choice(np.array([-1.0, 1.0]), size=block.size)
            out.append(Direction("block", np.sort(block), signs))
    for _ in range(num_random if active.size > 1 else 0):
        out.append(Direction("random", active, rng.standard_normal(active.size)))
    return out


def direction_matrix(
    dirs: list[Direction], scale: np.ndarray, rows: int = 0
) -> np.ndarray:
    """Dense ``(rows, n)`` matrix of the scaled directions ``s * d``, zero-padded."""
    mat = np.zeros((rows or len(dirs), scale.size))
    for row, d in zip(mat, dirs):
        row[d.indices] = d.weights * scale[d.indices]
    return mat


def chunk_size(n_in: int, n_out: int) -> int:
    """How many directions to evaluate in one batched call."""
    return max(1, CHUNK_FLOATS // (2 * NUM_LEVELS * (n_in + n_out)))


def perturbed(x: np.ndarray, dirs: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Points ``x + t * d`` for every direction row and ``t`` in ``(ts, -ts)``.

    Returns shape ``(len(dirs) * 2 * len(ts), n)``.
    """
    offsets = np.concatenate([ts, -ts])
    pts = x[None, None, :] + offsets[None, :, None] * dirs[:, None, :]
    return pts.reshape(-1, x.size)


def central(values: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Central differences from ``perturbed`` outputs ``(nd * 2K, m)``.

    Returns shape ``(K, nd, m)``.
    """
    k = ts.size
    v = values.reshape(-1, 2 * k, values.shape[-1])
    diffs = (v[:, :k] - v[:, k:]) / (2.0 * ts[None, :, None])
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


class Compiled:
    """``jax.jit(fun)``, falling back to ``fallback`` (default ``fun``) if that fails.

    Functions that cannot be traced (Python control flow on values) still run,
    more slowly, without jit.
    """

    def __init__(self, fun, fallback=None):
        self.fun = fun
        self.jitted = jax.jit(fun, compiler_options=COMPILER_OPTIONS)
        self.fallback = fallback or fun
        self.ok = True

    def __call__(self, *args):
        if self.ok:
            try:
                return self.jitted(*args)
            except Exception:  # noqa: BLE001 - retried below, which re-raises
                self.ok = False
        return self.fallback(*args)


def perturbed_values(fun) -> Compiled:
    """``(x, dirs, ts) -> fun`` at every point of :func:`perturbed`, batched."""

    def batched(x, dirs, ts):
        offsets = jnp.concatenate([ts, -ts])
        pts = x[None, None, :] + offsets[None, :, None] * dirs[:, None, :]
        return jax.vmap(fun)(pts.reshape(-1, x.shape[0]))

    def one_by_one(x, dirs, ts):
        pts = perturbed(np.asarray(x), np.asarray(dirs), np.asarray(ts))
        return jnp.stack([fun(jax.device_put(p)) for p in pts])

    return Compiled(batched, one_by_one)


def batched_jvps(fun) -> Compiled:
    """``(x, dirs) -> `` the JVP of ``fun`` at ``x`` along every row of ``dirs``."""

    def one(x, t):
        return jax.jvp(fun, (x,), (t,))[1]

    def one_by_one(x, dirs):
        return jnp.stack([one(x, t) for t in dirs])

    return Compiled(jax.vmap(one, in_axes=(None, 0)), one_by_one)
