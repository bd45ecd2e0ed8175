"""``check_step``: a whole training step against independent references, in float64.

The step's gradient is read through an optimizer that keeps the gradient it is
given as its state, so any step built from ``(loss_fn, optimizer)`` can be
checked, not only fnn's; the references call the loss function directly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fnn.gradcheck._report import GradientCheckError
from fnn.gradcheck._step_report import (
    CHECKS,
    DEFAULT_RTOL,
    StepCheckEntry,
    StepCheckError,
    StepCheckReport,
)
from fnn.training.accumulate import leading_size, unpack_loss_output
from fnn.training.step import make_train_step
from fnn.training.train_state import TrainState

PERTURB_SCALE = 10.0  # masked rows get another row's values times this, plus 1


def check_step(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    optimizer: optax.GradientTransformation | None = None,
    accum_steps: int = 2,
    steps_per_call: int = 2,
    has_state: bool = False,
    state: Any = None,
    mesh: Any = None,
    mask_key: str = "mask",
    make_step: Callable | None = None,
    key: jax.Array | None = None,
    checks: Sequence[str] = CHECKS,
    rtol: float = DEFAULT_RTOL,
    max_directions: int = 4,
) -> StepCheckReport:
    """Checks a loss function and the training step built on it, in float64.

    Params and float batch leaves are upcast to float64. A mask
    (``batch[mask_key]``) also loses the last row of every even microbatch
    (rows ``j::accum_steps``), so microbatches weigh differently. Checks:
    ``accumulation``, the gradient the step gives its optimizer and its
    ``loss`` and ``weight`` metrics equal the full batch's (a loss returning
    means fails); ``mask``, the divided loss, weight and gradient are the
    same with the masked rows, with their values replaced (another row's,
    times 10, plus 1) and without them (a weight counting masked rows
    fails); ``steps_per_call``, one call over stacked batches gives the
    params and metrics of single steps; ``mesh``, a step on ``mesh`` gives
    those of a step without; ``gradient``, :func:`fnn.check_grads` of the
    loss sum in the params. The references call ``loss_fn`` on whole batches
    with one key: for ``accumulation`` and ``mask`` the loss must not draw
    random numbers (dropout) nor mix rows (BatchNorm in training mode).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> (loss_sum, weight[, aux])``,
        or with ``has_state`` ``loss_fn(params, state, batch, key) -> (out,
        new_state)``.
      params: the params.
      batch: a batch; with a mask, at least 2 rows per microbatch.
      optimizer: for ``steps_per_call`` and ``mesh``; default
        ``optax.sgd(0.1, momentum=0.9)``, whose state carries over steps.
      accum_steps: microbatches per step.
      steps_per_call: steps per call to compare with single steps (1 skips).
      has_state: whether ``loss_fn`` takes and returns model state.
      state: the model state, with ``has_state``.
      mesh: a ``jax.sharding.Mesh``; ``None`` skips ``mesh``.
      mask_key: the batch entry of the mask; a batch without one skips ``mask``.
      make_step: the step under test, ``make_step(loss_fn, optimizer, *,
        accum_steps, has_state, steps_per_call[, mesh]) -> step`` with
        ``step(train_state, batch) -> (train_state, metrics)`` and, if it has
        one, ``step.init`` like ``TrainStep.init`` (else it is given a
        ``fnn.TrainState``); default :func:`fnn.make_train_step`.
      key: the train state's ``jax.random.key``; default ``key(0)``.
      checks: the checks to run, from :data:`CHECKS`.
      rtol: the tolerance, relative to each leaf's largest magnitude.
      max_directions: directions per params leaf for ``gradient``.

    Returns:
      A :class:`StepCheckReport`, one entry per check run.

    Raises:
      StepCheckError: if a check fails, naming the check, the value's path,
        both values and the relative error.
      ValueError: for unknown checks or a batch too small to mask.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, fnn
      >>> def loss_fn(params, batch, key):
      ...     err = (batch["x"] @ params["w"] - batch["y"]) ** 2
      ...     return jnp.sum(err * batch["mask"]), jnp.sum(batch["mask"])
      >>> rng = np.random.default_rng(0)
      >>> batch = {"x": rng.normal(size=(8, 2)), "y": rng.normal(size=8),
      ...          "mask": np.ones(8, bool)}
      >>> fnn.check_step(loss_fn, {"w": jnp.ones(2)}, batch).passed
      True
      >>> def mean_loss(params, batch, key):  # a mean: wrong with accum_steps
      ...     loss_sum, weight = loss_fn(params, batch, key)
      ...     return loss_sum / weight, 1.0
      >>> try:
      ...     fnn.check_step(mean_loss, {"w": jnp.ones(2)}, batch,
      ...                    checks=["accumulation"])
      ... except fnn.GradientCheckError as err:
      ...     print(err.report.failures[0].check, err.report.failures[0].path)
      accumulation grad['w']
    """
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        raise ValueError(f"check_step: unknown checks {unknown!r}; use {CHECKS!r}.")
    run = _Run(
        loss_fn,
        optimizer or optax.sgd(0.1, momentum=0.9),
        accum_steps,
        has_state,
        make_step or make_train_step,
        jax.random.key(0) if key is None else key,
        rtol,
        dict(k=steps_per_call, mesh=mesh, mask_key=mask_key, dirs=max_directions),
    )
    entries, skipped = [], []
    with jax.enable_x64(True):
        run.batch, run.valid = _narrow_mask(_f64(batch), mask_key, accum_steps)
        run.params, run.state = _f64(params), _f64(state)
        reasons = {
            "mask": run.valid is None and f"the batch has no {mask_key!r} entry",
            "steps_per_call": steps_per_call == 1 and "steps_per_call=1",
            "mesh": mesh is None and "no mesh",
        }
        for name in (c for c in CHECKS if c in checks):
            if reasons.get(name):
                skipped.append(f"{name}: {reasons[name]}")
            else:
                entries.append(getattr(run, name)())
    report = StepCheckReport(tuple(entries), tuple(skipped))
    if not report.passed:
        raise StepCheckError(report)
    return report


def _f64(tree: Any) -> Any:
    def up(x):
        x = jnp.asarray(x)
        return x.astype(jnp.float64) if _floating(x) else x

    return jax.tree.map(up, tree)


def _narrow_mask(batch: Any, mask_key: str, k: int) -> tuple[Any, Any]:
    """The batch with the last row of every even microbatch masked, and the
    rows it keeps (``None`` without a mask)."""
    if not (isinstance(batch, dict) and mask_key in batch):
        return batch, None
    b = leading_size(batch)
    if b % k or b // k < 2:
        raise ValueError(
            f"check_step: a batch of {b} rows does not split into accum_steps={k} "
            f"microbatches of at least 2 rows; use a multiple of {2 * k} rows."
        )
    rows = np.arange(b)
    valid = ~((rows // k == b // k - 1) & (rows % k % 2 == 0))
    mask = batch[mask_key]
    keep = jnp.asarray(valid.reshape((b,) + (1,) * (mask.ndim - 1)))
    mask = mask & keep if mask.dtype == jnp.bool_ else mask * keep.astype(mask.dtype)
    return {**batch, mask_key: mask}, valid


def _map_data(fn: Callable, batch: Any, mask_key: str) -> Any:
    """``fn`` applied to every batch leaf but the mask."""

    def one(path, x):
        return x if path == (jax.tree_util.DictKey(mask_key),) else fn(x)

    return jax.tree_util.tree_map_with_path(one, batch)


def _floating(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _stack(trees: list) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _capture() -> optax.GradientTransformation:
    """An optimizer that leaves params alone and keeps the gradient as its state."""

    def update(grads, state, params=None):
        return jax.tree.map(jnp.zeros_like, grads), grads

    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p), update
    )


def _compare(check, detail, prefix, got, want, rtol) -> StepCheckEntry:
    """The worst leaf of ``got`` against ``want``, relative to the leaf's scale."""
    worst = None
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(got),
        jax.tree_util.tree_leaves_with_path(want),
    ):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            a, b = np.full(1, np.nan), np.zeros(1)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        err = np.where(same, 0.0, np.nan_to_num(np.abs(a - b), nan=np.inf))
        mags = np.abs(np.concatenate([a.ravel(), b.ravel()]))
        scale = np.max(mags[np.isfinite(mags)], initial=0.0)
        rel = err / scale if scale > 0 else np.where(err > 0, np.inf, 0.0)
        i = np.unravel_index(np.argmax(rel), rel.shape)
        e = StepCheckEntry(
            check,
            prefix + jax.tree_util.keystr(path),
            tuple(int(n) for n in i) if a.ndim else None,
            *(float(a[i]), float(b[i]), float(rel[i]), rtol, bool(rel[i] <= rtol)),
            detail,
        )
        if worst is None or e.rel_err > worst.rel_err:
            worst = e
    return worst


def _worst(entries: list[StepCheckEntry]) -> StepCheckEntry:
    """The first failure (gradients or params come first), else the worst."""
    failed = [e for e in entries if not e.passed]
    return failed[0] if failed else max(entries, key=lambda e: e.rel_err)


@dataclasses.dataclass
class _Run:
    """The options the checks share, their steps and the full-batch reference."""

    loss_fn: Callable
    optimizer: Any
    k: int
    has_state: bool
    make_step: Callable
    key: jax.Array
    rtol: float
    opts: dict
    params: Any = None
    state: Any = None
    batch: Any = None
    valid: Any = None
    single: Any = None

    def __post_init__(self):
        self.sums = jax.jit(self._sums)  # one compile per batch shape

    def _loss_sum(self, params, batch):
        key = jax.random.fold_in(jax.random.fold_in(self.key, 0), 0)  # step 0, mb 0
        if self.has_state:
            out = self.loss_fn(params, self.state, batch, key)[0]
        else:
            out = self.loss_fn(params, batch, key)
        loss_sum, weight, _ = unpack_loss_output(out)
        return loss_sum, weight

    def _sums(self, params, batch):
        """The full batch's gradient and ``{"loss", "weight"}``, divided once."""
        (loss, w), g = jax.value_and_grad(self._loss_sum, has_aux=True)(params, batch)
        return jax.tree.map(lambda x: x / w, g), {"loss": loss / w, "weight": w}

    def step(self, optimizer, steps_per_call=1, **mesh) -> tuple[Callable, Any]:
        """The step under test with these options, and a fresh train state."""
        opts = dict(accum_steps=self.k, has_state=self.has_state)
        if optimizer is self.optimizer and steps_per_call == 1 and not mesh:
            if self.single is None:  # shared by steps_per_call and mesh
                self.single = self.make_step(self.loss_fn, optimizer, **opts)
            step = self.single
        else:
            step = self.make_step(
                self.loss_fn, optimizer, steps_per_call=steps_per_call, **opts, **mesh
            )
        params = jax.tree.map(jnp.array, self.params)
        if hasattr(step, "init"):
            return step, step.init(params, key=self.key, state=self.state)
        state = {} if self.state is None else self.state
        zero = jnp.zeros((), jnp.int32)
        return step, TrainState(zero, params, optimizer.init(params), state, self.key)

    def compare(self, check, detail, got, want) -> StepCheckEntry:
        """Gradients or params first, then the metrics both sides report."""
        (gp, gm), (wp, wm) = got, want
        prefix = "grad" if check in ("accumulation", "mask") else "params"
        entries = [_compare(check, detail, prefix, gp, wp, self.rtol)]
        common = [n for n in wm if n in gm]
        if common:
            gm, wm = ({n: m[n] for n in common} for m in (gm, wm))
            entries.append(_compare(check, detail, "metrics", gm, wm, self.rtol))
        return _worst(entries)

    def accumulation(self) -> StepCheckEntry:
        step, ts = self.step(_capture())
        ts, metrics = step(ts, self.batch)
        detail = f"accum_steps={self.k} vs the full-batch gradient"
        want = self.sums(self.params, self.batch)
        return self.compare("accumulation", detail, (ts.opt_state, metrics), want)

    def mask(self) -> StepCheckEntry:
        valid, src = self.valid, np.roll(np.arange(len(self.valid)), 1)

        def replace(x):  # masked rows take another row's values (floats scaled)
            y = x[src] * PERTURB_SCALE + 1 if _floating(x) else x[src]
            return jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)

        want = self.sums(self.params, jax.tree.map(lambda x: x[valid], self.batch))
        replaced = _map_data(replace, self.batch, self.opts["mask_key"])
        entries = []
        for what, b in (("with masked rows", self.batch), ("replaced", replaced)):
            got = self.sums(self.params, b)
            entries.append(self.compare("mask", f"{what} vs without", got, want))
        return _worst(entries)

    def steps_per_call(self) -> StepCheckEntry:
        k, mask_key = self.opts["k"], self.opts["mask_key"]
        batches = [  # each step its own batch: float leaves scaled
            _map_data(
                lambda x, f=1 + i / 4: x * f if _floating(x) else x,
                self.batch,
                mask_key,
            )
            for i in range(k)
        ]
        single, ts = self.step(self.optimizer)
        singles = []
        for b in batches:
            ts, metrics = single(ts, b)
            singles.append(metrics)
        many, ts_k = self.step(self.optimizer, steps_per_call=k)
        ts_k, m_k = many(ts_k, _stack(batches))
        want = (ts.params, _stack(singles))
        detail = f"steps_per_call={k} vs {k} single steps"
        return self.compare("steps_per_call", detail, (ts_k.params, m_k), want)

    def mesh(self) -> StepCheckEntry:
        mesh = self.opts["mesh"]
        sharded, ts = self.step(self.optimizer, mesh=mesh)
        ts, metrics = sharded(ts, self.batch)
        single, ts_1 = self.step(self.optimizer)
        ts_1, metrics_1 = single(ts_1, self.batch)
        detail = f"one step on the mesh {dict(mesh.shape)} vs one without"
        got, want = (ts.params, metrics), (ts_1.params, metrics_1)
        return self.compare("mesh", detail, got, want)

    def gradient(self) -> StepCheckEntry:
        from fnn.gradcheck import check_grads  # that package imports this module

        def loss_sum(params):
            return self._loss_sum(params, self.batch)[0]

        try:
            report = check_grads(
                loss_sum,
                (self.params,),
                modes=("rev",),
                max_directions=self.opts["dirs"],
            )
            e, passed = report.worst, True
        except GradientCheckError as err:
            e, passed = err.report.failures[0], False
        scale = max(abs(e.analytic), abs(e.numeric))
        return StepCheckEntry(
            "gradient",
            e.path.replace("args[0]", "params", 1),
            e.index,
            *(e.analytic, e.numeric, e.rel_err),
            e.tol / scale if scale > 0 else math.inf,
            passed,
            "autodiff vs finite differences of the loss sum",
        )
