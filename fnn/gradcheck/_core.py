"""Core of :func:`fnn.check_grads`: flatten arguments, derive, compare, localize."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fnn.gradcheck import _fd as fd
from fnn.gradcheck._args import unflatten
from fnn.gradcheck._report import GradCheckEntry

SAFETY = 4.0  # multiples of the finite-difference error estimate allowed
NUM_RANDOM = 2  # dense Gaussian directions per leaf, on top of element/block ones
NUM_COTANGENTS = 2  # random output cotangents in reverse mode
LOW_PRECISION = ("float32", "float16", "bfloat16")


@dataclasses.dataclass
class Fn:
    """A function of the flat input vector with a flat float64 output."""

    label: str
    order: int
    flat: Callable  # x (n,) -> y (m,)
    layout: tuple[tuple[str, tuple[int, ...], int], ...]  # (name, shape, offset)
    fwd_ok: bool
    size: int

    def __post_init__(self):
        self.values = fd.perturbed_values(self.flat)
        self.tangents = fd.batched_jvps(self.flat)

    def output_name(self, col: int) -> str:
        for name, shape, off in reversed(self.layout):
            if col >= off:
                if not shape:
                    return name
                idx = np.unravel_index(col - off, shape)
                return f"{name}[{', '.join(str(int(i)) for i in idx)}]"
        raise IndexError(col)


@dataclasses.dataclass(frozen=True)
class Config:
    modes: tuple[str, ...]
    atol: float
    rtol: float
    base: float
    max_directions: int
    rng: np.random.Generator


def make_fn(label, order, tree_fn, x0, names, notes, modes) -> Fn:
    """Trace ``tree_fn`` in float64, check its output dtypes, flatten it."""
    x = jax.device_put(x0)
    try:
        out = jax.eval_shape(tree_fn, x)
    except Exception as e:
        e.add_note(f"Raised when fnn.check_grads traced {label} in float64.")
        raise
    flat = jax.tree_util.tree_flatten_with_path(out)[0]
    pos, layout, off = [], [], 0
    for j, (path, y) in enumerate(flat):
        name = names[j] if names is not None else "out" + jax.tree_util.keystr(path)
        if not jnp.issubdtype(y.dtype, jnp.inexact):
            continue
        if y.dtype != jnp.float64:
            raise ValueError(
                f"{label} returned {y.dtype} at {name} when called with float64 "
                f"inputs, so it cannot be checked in float64; remove casts to lower "
                f"precision (such as .astype(jnp.float32)) or cast to the input's "
                f"dtype instead."
            )
        pos.append(j)
        layout.append((name, tuple(y.shape), off))
        off += y.size
    if not pos:
        raise ValueError(f"{label} has no floating-point output to differentiate.")

    def flat_fn(v):
        ls = jax.tree.leaves(tree_fn(v))
        return jnp.concatenate([jnp.ravel(ls[j]) for j in pos])

    fwd_ok = "fwd" in modes
    if fwd_ok:
        try:
            # Tracing accepts a JVP of a custom_vjp; lowering rejects it.
            jax.jit(lambda v: jax.jvp(flat_fn, (v,), (v,))).lower(x)
        except TypeError as e:
            if "custom_vjp" not in str(e):
                raise
            fwd_ok = False
            notes.append(
                f"{label} uses jax.custom_vjp, which has no forward mode; "
                f"checked it in reverse mode only."
            )
    return Fn(label, order, flat_fn, tuple(layout), fwd_ok, off)


def low_precision_ops(fun, x0) -> set[str]:
    """Names of operations in ``fun``'s jaxpr that produce low-precision floats."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                dtype = str(getattr(v.aval, "dtype", ""))
                if dtype in LOW_PRECISION:
                    found.add(f"{eqn.primitive.name} to {dtype}")
            for p in eqn.params.values():
                for sub in p if isinstance(p, tuple | list) else (p,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub.jaxpr)

    with contextlib.suppress(Exception):  # a diagnostic only
        walk(jax.make_jaxpr(fun)(jax.device_put(x0)).jaxpr)
    return found


def derive(fn: Fn, leaves, scale, actives, cfg: Config) -> list:
    """The next-order functions: a gradient (VJP) and a directional derivative.

    Returns ``(label, tree_fn, output names)`` triples for :func:`make_fn`.
    """
    out = []
    if "rev" in cfg.modes:
        u = jax.device_put(cfg.rng.standard_normal(fn.size))

        def grad_fn(v):
            return unflatten(jax.vjp(fn.flat, v)[1](u)[0], leaves)

        names = [f"vjp:{leaf.path}" for leaf in leaves]
        out.append((f"vjp({fn.label})", grad_fn, names))
    if "fwd" in cfg.modes and fn.fwd_ok:
        t = np.zeros(scale.size)
        for act in actives:
            t[act] = cfg.rng.standard_normal(act.size) * scale[act]
        tangent = jax.device_put(t)

        def jvp_fn(v):
            return jax.jvp(fn.flat, (v,), (tangent,))[1]

        out.append((f"jvp({fn.label})", jvp_fn, [f"jvp:{fn.label}"]))
    return out


class _Worst:
    """Running worst comparison of one mode over the directions of one leaf.

    Comparisons along single elements and along wider directions are kept
    apart, so the report can name an element whenever one is at fault.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.checked = self.failed = 0
        self.best = {}  # "element" / "other" -> (ratio, dir, col, a, n, err, tol)
        self.dir_ratio = {}  # direction position -> worst ratio along it
        self.nonfinite = False

    def add(self, rows, is_elem, analytic, numeric, err):
        cfg = self.cfg
        tol = cfg.atol + cfg.rtol * np.maximum(np.abs(analytic), np.abs(numeric))
        tol = tol + SAFETY * err
        with np.errstate(divide="ignore", invalid="ignore"):
            abs_err = np.abs(analytic - numeric)
            ratio = np.where(abs_err == 0, 0.0, abs_err / tol)
        finite = np.isfinite(analytic) & np.isfinite(numeric)
        self.nonfinite |= not finite.all()
        ratio = np.where(finite, ratio, np.inf)
        self.checked += ratio.size
        self.failed += int(np.sum(ratio > 1))
        self.dir_ratio.update(zip(rows.tolist(), ratio.max(axis=1).tolist()))
        for group, sel in (("element", is_elem), ("other", ~is_elem)):
            if not sel.any():
                continue
            masked = np.where(sel[:, None], ratio, -1.0)
            r, c = np.unravel_index(np.argmax(masked), ratio.shape)
            best = self.best.get(group)
            if best is None or ratio[r, c] > best[0]:
                vals = (analytic[r, c], numeric[r, c], err[r, c], tol[r, c])
                self.best[group] = (ratio[r, c], rows[r], c, *map(float, vals))

    def pick(self):
        elem, other = self.best.get("element"), self.best.get("other")
        if elem is not None and (other is None or elem[0] > 1 or other[0] <= 1):
            return elem
        return other


def compare(fn: Fn, x0, scale, dirs, owner, modes, cots, grads, cfg):
    """Compare autodiff with finite differences along ``dirs``.

    ``owner[k]`` is the leaf of direction ``k``. Returns ``{(leaf, mode): _Worst}``.
    """
    ts = fd.steps(cfg.base)
    worst = {}
    fabs = np.abs(fn.y0)
    n_rows = min(len(dirs), fd.chunk_size(x0.size, fn.size))
    xj = jax.device_put(x0)
    for start in range(0, len(dirs), n_rows):
        sub = dirs[start : start + n_rows]
        mat = fd.direction_matrix(sub, scale, rows=n_rows)
        values = np.asarray(fn.values(xj, jax.device_put(mat), jax.device_put(ts)))
        diffs = fd.central(values, ts)[:, : len(sub)]
        mat = mat[: len(sub)]
        results = {}
        if "fwd" in modes:
            tangent_out = np.asarray(fn.tangents(xj, jax.device_put(mat)))[: len(sub)]
            numeric, err = fd.extrapolate(diffs, ts, fabs[None])
            results["fwd"] = (tangent_out, numeric, err)
        if "rev" in modes:
            # The rounding floor counts the outputs a direction changes, so a
            # tiny derivative next to large outputs it does not touch keeps a
            # tight tolerance. A direction that changes no output at all only
            # shows the derivative is below the outputs' resolution: then every
            # output counts (a bias before a normalization, a key bias under
            # softmax: exactly 0, which autodiff rounds to a few ulps).
            moved = np.any(diffs != 0, axis=0)
            moved = moved | ~np.any(moved, axis=1, keepdims=True)
            changed = moved * fabs[None]
            numeric, err = fd.extrapolate(diffs @ cots, ts, changed @ np.abs(cots))
            results["rev"] = (mat @ grads, numeric, err)
        rows = np.arange(start, start + len(sub))
        own = owner[rows]
        is_elem = np.array([d.kind == "element" for d in sub])
        for leaf in np.unique(own):
            sel = own == leaf
            for mode, (a, n, e) in results.items():
                w = worst.setdefault((int(leaf), mode), _Worst(cfg))
                w.add(rows[sel], is_elem[sel], a[sel], n[sel], e[sel])
    return worst


def _entry(fn, leaf, mode, best, dirs, note="") -> GradCheckEntry:
    _, d, col, analytic, numeric, err, tol = best
    direction = dirs[d]
    index = None
    if direction.kind == "element":
        flat_index = direction.indices[0] - leaf.offset
        index = tuple(int(k) for k in np.unravel_index(flat_index, leaf.shape))
    abs_err = abs(analytic - numeric)
    rel_err = (
        abs_err / abs(numeric) if numeric != 0 else (0.0 if abs_err == 0 else np.inf)
    )
    return GradCheckEntry(
        of=fn.label,
        order=fn.order,
        mode=mode,
        path=leaf.path,
        index=index,
        direction=direction.describe() + note,
        output=fn.output_name(col) if mode == "fwd" else None,
        analytic=analytic,
        numeric=numeric,
        abs_err=float(abs_err),
        rel_err=float(rel_err),
        tol=tol,
        fd_err=err,
        checked=0,
        failed=0,
    )


def evaluate(fn: Fn, x0, cots):
    """``fn`` at ``x0`` and, given cotangents, its VJPs ``(n, num_cotangents)``."""

    def value_and_vjps(x, c):
        y, pull = jax.vjp(fn.flat, x)
        return y, jax.vmap(lambda ci: pull(ci)[0], in_axes=1, out_axes=1)(c)

    try:
        if cots is None:
            y0, grads = fd.Compiled(fn.flat)(jax.device_put(x0)), None
        else:
            y0, grads = fd.Compiled(value_and_vjps)(
                jax.device_put(x0), jax.device_put(cots)
            )
    except Exception as e:
        e.add_note(f"Raised when fnn.check_grads evaluated {fn.label} in float64.")
        raise
    if grads is not None and grads.dtype != jnp.float64:
        raise ValueError(
            f"the VJP of {fn.label} returned {grads.dtype} cotangents for float64 "
            f"inputs, so it cannot be checked in float64; return cotangents in the "
            f"input's dtype."
        )
    y0 = np.asarray(y0)
    if not np.all(np.isfinite(y0)):
        col = int(np.flatnonzero(~np.isfinite(y0))[0])
        raise ValueError(
            f"{fn.label} is {y0[col]!r} at {fn.output_name(col)}, so its derivatives "
            f"cannot be checked at these inputs."
        )
    return y0, None if grads is None else np.asarray(grads)


def check_fn(fn: Fn, leaves, x0, scale, actives, cfg: Config, notes):
    """Every comparison for one function; one entry per (mode, leaf)."""
    modes = tuple(m for m in cfg.modes if m == "rev" or fn.fwd_ok)
    cots = None
    if "rev" in modes:
        cots = cfg.rng.standard_normal((fn.size, NUM_COTANGENTS))
    fn.y0, grads = evaluate(fn, x0, cots)
    dirs, owner = [], []
    for k, act in enumerate(actives):
        new = fd.directions(act, cfg.max_directions, NUM_RANDOM, cfg.rng)
        dirs.extend(new)
        owner.extend([k] * len(new))
    owner = np.array(owner, dtype=int)
    worst = compare(fn, x0, scale, dirs, owner, modes, cots, grads, cfg)
    entries = []
    for (k, mode), w in sorted(worst.items(), key=lambda kv: (modes.index(kv[0][1]),)):
        leaf = leaves[k]
        if w.nonfinite:
            notes.append(
                f"non-finite derivative for {leaf.path} ({mode}, {fn.label}): it "
                f"may be undefined near the input; leave such elements out with mask=."
            )
        entry = _entry(fn, leaf, mode, w.pick(), dirs)
        if w.failed and entry.index is None:
            blocks = [d for d in w.dir_ratio if dirs[d].kind == "block"]
            worst_block = max(blocks, key=w.dir_ratio.get, default=None)
            if worst_block is not None and w.dir_ratio[worst_block] > 1:
                block = dirs[worst_block]
                elems = [
                    fd.Direction("element", np.array([j]), np.ones(1))
                    for j in block.indices
                ]
                loc = compare(
                    fn,
                    x0,
                    scale,
                    elems,
                    np.full(len(elems), k),
                    (mode,),
                    cots,
                    grads,
                    cfg,
                )[(k, mode)]
                best = loc.best.get("element")
                if best is not None and best[0] > 1:
                    note = f" within a failing block of {block.indices.size}"
                    entry = _entry(fn, leaf, mode, best, elems, note)
        entries.append(dataclasses.replace(entry, checked=w.checked, failed=w.failed))
    return entries
