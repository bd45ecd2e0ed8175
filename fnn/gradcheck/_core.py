"""Core of :func:`fnn.check_grads`: evaluate, compare, localize, derive."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fnn.gradcheck._compare import Shared, compare_leaf, entry
from fnn.gradcheck._fd import Direction, direction_matrix, rows_per_call
from fnn.gradcheck._fd import directions as leaf_directions
from fnn.gradcheck._fd import steps as step_levels
from fnn.gradcheck._program import Plan, is_custom_vjp_jvp, is_untraceable
from fnn.gradcheck._program import run as run_program
from fnn.gradcheck._program import trace as trace_program
from fnn.gradcheck._target import Target, output_layout
from fnn.gradcheck._target import call as call_target

NUM_RANDOM = 2  # dense Gaussian directions per leaf, on top of element/block ones
NUM_COTANGENTS = 2  # random output cotangents in reverse mode
LOW_PRECISION = ("float32", "float16", "bfloat16")
# Operations whose code XLA:CPU runs several times slower unoptimized (windows
# and convolutions are loops that only optimization vectorizes).
SLOW_UNOPTIMIZED = ("conv_general_dilated", "reduce_window", "select_and_", "cum")


@dataclasses.dataclass
class Fn:
    """A checked function: ``f`` or one of its derivatives.

    Attributes:
      target: what to evaluate.
      order: 1 for ``f``, 2 for its first derivatives, ...
      layout: ``(name, shape, offset)`` of each output leaf in the flat output.
      vecs: the fixed vectors of ``target.steps``.
      fwd_ok: whether forward mode works (``False`` through ``jax.custom_vjp``).
      eager: whether it runs without jit (``f`` cannot be traced).
      batch: points evaluated together in each step of a ``lax.map`` over
        them; ``0``: all at once. ``1`` (one by one) for a function with a
        convolution.
      optimize: compile with XLA's full optimization (convolutions, pooling).
    """

    target: Target
    order: int
    layout: tuple[tuple[str, tuple[int, ...], int], ...]
    vecs: tuple = ()
    fwd_ok: bool = True
    eager: bool = False
    batch: int = 0
    optimize: bool = False

    @property
    def label(self) -> str:
        return self.target.label

    @property
    def size(self) -> int:
        name, shape, off = self.layout[-1]
        return off + int(np.prod(shape))

    def output_name(self, col: int) -> str:
        for name, shape, off in reversed(self.layout):
            if col >= off:
                if not shape:
                    return name
                idx = np.unravel_index(col - off, shape)
                return f"{name}[{', '.join(str(int(i)) for i in idx)}]"
        raise IndexError(col)


def with_offsets(layout) -> tuple:
    """``(name, shape)`` pairs with each leaf's offset in the flat output added."""
    out, off = [], 0
    for name, shape in layout:
        out.append((name, tuple(shape), off))
        off += int(np.prod(shape))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Config:
    modes: tuple[str, ...]
    atol: float
    rtol: float
    base: float
    max_directions: int
    rng: np.random.Generator


def operations(jaxpr) -> set[tuple[str, str]]:
    """``(primitive name, output dtype)`` of every operation in a jaxpr, nested too."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                found.add((eqn.primitive.name, str(getattr(v.aval, "dtype", ""))))
            for p in eqn.params.values():
                for sub in p if isinstance(p, tuple | list) else (p,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub.jaxpr)

    walk(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr)
    return found


def first(target: Target, xs, rest, notes) -> Fn:
    """``f`` as the first checked function: its outputs, named and checked.

    ``f`` is traced once (a trace JAX caches for the next check of the same
    function); a function that cannot be traced is called once instead, and
    evaluated without jit from then on.
    """
    eager = False
    try:
        out_info, jaxpr = trace_program(target, xs, rest)
    except Exception as e:
        if not is_untraceable(e):
            e.add_note("Raised when fnn.check_grads traced f in float64.")
            raise
        eager, jaxpr = True, None
        notes.append(
            f"f could not be traced ({type(e).__name__}: Python control flow on "
            f"values?); evaluated it without jit and vmap, point by point, which is "
            f"slower."
        )
        try:
            out = call_target(target, xs, rest)
        except Exception as e2:
            e2.add_note("Raised when fnn.check_grads called f in float64.")
            raise
        out_info = jax.tree.map(
            lambda y: jax.ShapeDtypeStruct(jnp.shape(y), jnp.result_type(y)), out
        )
    layout, outputs = output_layout(target, out_info)
    ops = set()
    with contextlib.suppress(Exception):  # a diagnostic and a hint only
        ops = operations(jaxpr) if jaxpr is not None else ops
    low = {f"{name} to {dtype}" for name, dtype in ops if dtype in LOW_PRECISION}
    if low:
        notes.append(
            f"f computes in lower precision inside ({', '.join(sorted(low))}); "
            f"the check can be no more accurate than that."
        )
    target = dataclasses.replace(target, outputs=outputs)
    # Batched over every input at once, a convolution becomes a grouped
    # convolution, which XLA:CPU runs slowly: evaluate point by point.
    names = {name for name, _ in ops}
    conv = "conv_general_dilated" in names
    optimize = conv or any(n.startswith(SLOW_UNOPTIMIZED) for n in names)
    layout = with_offsets(layout)
    return Fn(target, 1, layout, eager=eager, batch=int(conv), optimize=optimize)


def derive(fn: Fn, leaves, cfg: Config) -> list[Fn]:
    """The next-order functions: a gradient (VJP) and a directional derivative."""
    out = []
    if "rev" in cfg.modes:
        u = jax.device_put(cfg.rng.standard_normal(fn.size))
        layout = with_offsets((f"vjp:{leaf.path}", leaf.shape) for leaf in leaves)
        target = dataclasses.replace(fn.target, steps=(*fn.target.steps, "vjp"))
        vecs = (*fn.vecs, u)
        out.append(_next(fn, target, layout, vecs))
    if "fwd" in cfg.modes and fn.fwd_ok:
        tangents = []
        for leaf in leaves:
            t = np.zeros(leaf.size)
            t[leaf.active - leaf.offset] = cfg.rng.standard_normal(leaf.active.size)
            tangents.append(jax.device_put((t * leaf.scale).reshape(leaf.shape)))
        layout = tuple((f"jvp:{name}", shape, off) for name, shape, off in fn.layout)
        target = dataclasses.replace(fn.target, steps=(*fn.target.steps, "jvp"))
        vecs = (*fn.vecs, tuple(tangents))
        out.append(_next(fn, target, layout, vecs))
    return out


def _next(fn: Fn, target: Target, layout, vecs) -> Fn:
    """A derivative of ``fn``, evaluated the same way; forward mode to be tried."""
    return dataclasses.replace(
        fn, target=target, order=fn.order + 1, layout=layout, vecs=vecs, fwd_ok=True
    )


def _evaluate(fn: Fn, plan, x, rest, mat, ts, cots, notes):
    """Run the program; on the way, fall back where ``f`` asks for it.

    Returns the program's outputs as numpy arrays, and the plan that ran.
    """
    try:
        out = run_program(fn.target, plan, x, rest, fn.vecs, mat, ts, cots)
    except Exception as e:
        if plan.fwd and is_custom_vjp_jvp(e):
            notes.append(
                f"{fn.label} uses jax.custom_vjp, which has no forward mode; "
                f"checked it in reverse mode only."
            )
            plan = dataclasses.replace(plan, fwd=False)
        elif not plan.eager and is_untraceable(e):
            notes.append(
                f"{fn.label} could not be traced ({type(e).__name__}: Python "
                f"control flow on values?); evaluated it without jit and vmap, "
                f"point by point, which is slower."
            )
            plan = dataclasses.replace(plan, eager=True)
        elif plan.eager and is_untraceable(e):
            e.add_note(
                f"Raised when fnn.check_grads evaluated {fn.label} in float64 "
                f"without jit or vmap: JAX's autodiff still traces f, so f must not "
                f"turn its inputs into numpy arrays or Python numbers (np.asarray, "
                f"float(x)); use jax.numpy, and jnp.where or lax.cond for choices."
            )
            raise
        else:
            e.add_note(f"Raised when fnn.check_grads evaluated {fn.label} in float64.")
            raise
        return _evaluate(fn, plan, x, rest, mat, ts, cots, notes)
    return tuple(None if a is None else np.asarray(a) for a in out), plan


class _Runner:
    """Evaluates one function along lists of directions.

    Every call of the program has the same shapes (``rows`` directions, the
    last call padded with zeros), so the first compilation serves the rest.
    Keeps the plan that ran (forward mode dropped, jit dropped).
    """

    def __init__(self, fn, plan, rows, x, scale, rest, ts, cots, notes):
        self.fn, self.plan, self.rows, self.scale = fn, plan, rows, scale
        self.x, self.rest, self.notes = jax.device_put(x), rest, notes
        self.ts, self.cots = jax.device_put(ts), jax.device_put(cots)

    def __call__(self, dirs):
        """``(y0, grads, values, tangents)`` along ``dirs``."""
        parts = []
        for start in range(0, max(len(dirs), 1), self.rows):
            chunk = dirs[start : start + self.rows]
            mat = jax.device_put(direction_matrix(chunk, self.scale, self.rows))
            out, self.plan = _evaluate(
                self.fn,
                self.plan,
                self.x,
                self.rest,
                mat,
                self.ts,
                self.cots,
                self.notes,
            )
            parts.append(out)
        y0, grads = parts[0][0], parts[0][1]
        values = np.concatenate([p[2] for p in parts])[: len(dirs)]
        tangents = None
        if self.plan.fwd:
            tangents = np.concatenate([p[3] for p in parts])[: len(dirs)]
        return y0, grads, values, tangents


def check_fn(fn: Fn, leaves, x, scale, rest, cfg: Config, notes) -> list:
    """Every comparison for one function; one entry per (mode, leaf)."""
    cots = cfg.rng.standard_normal((NUM_COTANGENTS, fn.size))
    dirs, owner = [], []
    for k, leaf in enumerate(leaves):
        new = leaf_directions(leaf.active, cfg.max_directions, NUM_RANDOM, cfg.rng)
        dirs.extend(new)
        owner.extend([k] * len(new))
    if not dirs:
        raise ValueError(
            "no input elements to check: the mask leaves every element out."
        )
    owner = np.array(owner, dtype=int)
    rows = rows_per_call(x.size, fn.size, len(dirs))
    shapes = tuple(leaf.shape for leaf in leaves)
    want_fwd = "fwd" in cfg.modes and fn.fwd_ok
    rev = "rev" in cfg.modes
    plan = Plan(want_fwd, rev, shapes, fn.batch, fn.optimize, fn.eager)
    ts = step_levels(cfg.base)
    run = _Runner(fn, plan, rows, x, scale, rest, ts, cots, notes)
    y0, grads, values, tangents = run(dirs)
    fn.fwd_ok, fn.eager = fn.fwd_ok and run.plan.fwd, run.plan.eager
    if not np.all(np.isfinite(y0)):
        col = int(np.flatnonzero(~np.isfinite(y0))[0])
        raise ValueError(
            f"{fn.label} is {float(y0[col])!r} at {fn.output_name(col)}, so its "
            f"derivatives cannot be checked at these inputs."
        )
    ctx = Shared(y0, cots, ts, scale, cfg.atol, cfg.rtol)
    entries = []
    for k, leaf in enumerate(leaves):
        sel = np.flatnonzero(owner == k)
        if not sel.size:
            continue
        own = [dirs[i] for i in sel]
        found = compare_leaf(
            own, values[sel], None if tangents is None else tangents[sel], grads, ctx
        )
        for mode, w in found.items():
            if w.nonfinite:
                notes.append(
                    f"non-finite derivative for {leaf.path} ({mode}, {fn.label}): it "
                    f"may be undefined near the input; leave such elements out with "
                    f"mask=."
                )
            best = entry(fn, leaf, mode, w.pick(), own)
            if w.failed and best.index is None:
                best = _localize(fn, leaf, mode, w, own, run, ctx) or best
            entries.append(
                dataclasses.replace(best, checked=w.checked, failed=w.failed)
            )
    order = {m: i for i, m in enumerate(cfg.modes)}
    return sorted(entries, key=lambda e: order[e.mode])


def _localize(fn, leaf, mode, w, dirs, run, ctx):
    """The worst element of the worst failing block, or ``None``."""
    blocks = [r for r in w.row_ratio if dirs[r].kind == "block"]
    worst_block = max(blocks, key=w.row_ratio.get, default=None)
    if worst_block is None or not w.row_ratio[worst_block] > 1:
        return None
    block = dirs[worst_block]
    elems = [Direction("element", np.array([j]), np.ones(1)) for j in block.indices]
    _, grads, values, tangents = run(elems)
    found = compare_leaf(
        elems,
        values,
        tangents if mode == "fwd" else None,
        grads if mode == "rev" else None,
        ctx,
    )[mode]
    best = found.best.get("element")
    if best is None or not best.ratio > 1:
        return None
    note = f" within a failing block of {block.indices.size}"
    return entry(fn, leaf, mode, best, elems, note)
