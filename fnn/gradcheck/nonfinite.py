"""``find_nonfinite``: the first layer whose output or gradient became NaN or Inf.

It replays a forward pass eagerly (under ``jax.disable_jit``), layer by layer:
every child that fnn's combinators run goes through
:func:`fnn.model.core.watching`, which records the child's input, params and
output. The first layer, in the order the layers finish, whose output is not
finite is where the forward pass broke; its input and params say whether the
NaN came in from outside or was made there. When the forward pass is finite, a
backward pass adds a zero *probe* to every layer's input, params and output;
the gradient with respect to a probe is the cotangent at that point, so the
layer whose output cotangent is finite but whose input cotangent or params
gradient is not is where the backward pass broke.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnn.model.core import (
    Layer,
    apply_child,
    current_keys,
    current_place,
    describe,
    watching,
)
from fnn.model.state import StatefulModel
from fnn.training.accumulate import unpack_loss_output


@dataclasses.dataclass(frozen=True)
class ValueCount:
    """How many elements of one value are NaN or infinite.

    Attributes:
      name: what the value is, e.g. ``"input"``, ``"params['w']"``,
        ``"output"`` or ``"output cotangent"``.
      shape: its shape.
      nan: the number of NaN elements.
      inf: the number of infinite elements.
    """

    name: str
    shape: tuple[int, ...]
    nan: int
    inf: int

    @property
    def finite(self) -> bool:
        return self.nan == 0 and self.inf == 0


@dataclasses.dataclass(frozen=True)
class NonFiniteReport:
    """What :func:`find_nonfinite` found.

    Attributes:
      cause: ``"input"`` (the layer's input was already not finite: the batch,
        or code outside the layers), ``"params"`` (the layer's params were not
        finite), ``"forward"`` (finite input and params, non-finite output),
        ``"backward"`` (finite forward pass; the layer's backward pass made
        the gradient non-finite), or ``None`` when everything was finite.
      place: the layer's place, e.g. ``"serial[2]"``; ``""`` for the network
        itself, ``"loss"`` for code outside any layer.
      path: the layer's params path, e.g. ``"['2_dense']"``.
      layer: the layer as printed, e.g. ``"Dense(features=4)"``.
      values: the layer's input, params, output (and, for ``"backward"``, the
        cotangents and params gradients) with their non-finite counts.
      loss: the scalar the backward pass differentiated.
      nonfinite_batch: batch paths with non-finite values.
      nonfinite_params: params paths with non-finite values.
      layers: the number of layer calls replayed.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> net = fnn.serial(fnn.Dense(2), fnn.Tanh())
      >>> _, params = net.init(jax.random.key(0), (-1, 2))
      >>> x = jnp.array([[1.0, jnp.nan]])
      >>> print(fnn.find_nonfinite(net, params, x))  # doctest: +ELLIPSIS
      find_nonfinite: the input of Dense(features=2) at serial[0] (params
      ['0_dense']) is already NaN or Inf (non-finite batch values: batch).
      value        shape   nan  inf
      input        (1, 2)  1    0
      params['b']  (2,)    0    0
      params['w']  (2, 2)  0    0
      output       (1, 2)  2    0
    """

    cause: str | None
    place: str | None
    path: str | None
    layer: str | None
    values: tuple[ValueCount, ...]
    loss: float
    nonfinite_batch: tuple[str, ...]
    nonfinite_params: tuple[str, ...]
    layers: int

    @property
    def found(self) -> bool:
        """Whether a NaN or Inf was found."""
        return self.cause is not None

    def summary(self) -> str:
        """One sentence: where the NaN or Inf began, and how."""
        if self.cause is None:
            return (
                f"find_nonfinite: the forward and backward passes through "
                f"{self.layers} layer calls are finite (loss {self.loss:.6g})."
            )
        if self.place == "loss":
            pass_ = "forward pass" if self.cause == "forward" else "backward pass"
            return (
                f"find_nonfinite: every layer is finite; the loss (code outside "
                f"the layers) made NaN or Inf in the {pass_} (loss {self.loss:.6g})."
            )
        where = f"{self.layer} at {self.place or 'the root'} (params {self.path})"
        if self.cause == "input":
            source = ", ".join(self.nonfinite_batch) or "none; code before it"
            return (
                f"find_nonfinite: the input of {where} is already NaN or Inf "
                f"(non-finite batch values: {source})."
            )
        if self.cause == "params":
            bad = ", ".join(
                v.name
                for v in self.values
                if v.name.startswith("params") and not v.finite
            )
            return f"find_nonfinite: the params of {where} hold NaN or Inf ({bad})."
        if self.cause == "forward":
            return (
                f"find_nonfinite: {where} made NaN or Inf in the forward pass from "
                f"finite input and params."
            )
        return (
            f"find_nonfinite: the forward pass is finite; {where} made NaN or Inf "
            f"in the backward pass from a finite output cotangent."
        )

    def __str__(self) -> str:
        rows = [("value", "shape", "nan", "inf")]
        rows += [(v.name, str(v.shape), str(v.nan), str(v.inf)) for v in self.values]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [self.summary()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        return "\n".join(line.rstrip() for line in lines)


def _inexact(x: Any) -> bool:
    return jnp.issubdtype(getattr(x, "dtype", np.int32), jnp.inexact)


def _counts(name: str, tree: Any) -> list[ValueCount]:
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if _inexact(leaf):
            a = np.asarray(leaf)
            nan = int(np.isnan(a).sum())
            out.append(
                ValueCount(
                    f"{name}{jax.tree_util.keystr(path)}",
                    a.shape,
                    nan,
                    int((~np.isfinite(a)).sum()) - nan,
                )
            )
    return out


def _finite(tree: Any) -> bool:
    return all(v.finite for v in _counts("", tree))


def _bad_paths(name: str, tree: Any) -> tuple[str, ...]:
    return tuple(v.name for v in _counts(name, tree) if not v.finite)


def _probe(tree: Any) -> list:
    return [jnp.zeros_like(x) if _inexact(x) else None for x in jax.tree.leaves(tree)]


def _add(tree: Any, probe: list) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [x if z is None else x + z for x, z in zip(leaves, probe)]
    return treedef.unflatten(leaves)


def _like(tree: Any, grads: list) -> Any:
    """``tree`` with its float leaves replaced by ``grads`` (a probe's gradient)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([x if g is None else g for x, g in zip(leaves, grads)])


def _where() -> tuple[str, str]:
    keys = "".join(f"[{k!r}]" for k in current_keys() if k)
    return current_place().lstrip("."), keys


def find_nonfinite(
    model: Any,
    params: Any,
    batch: Any,
    *,
    loss: Callable[[Any], jax.Array] | None = None,
    key: jax.Array | None = None,
    state: Any = None,
    has_state: bool = False,
    **kwargs: Any,
) -> NonFiniteReport:
    """Names the first layer whose output or gradient became NaN or Inf.

    The forward pass is replayed eagerly, layer by layer (every child of
    fnn's combinators), then, if it is finite, the backward pass. The report
    names the first layer to produce a non-finite value, its place and params
    path, and the cause: its ``"input"`` was already not finite, its
    ``"params"`` are not, or its own ``"forward"`` or ``"backward"``
    computation made it. Everything runs under ``jax.disable_jit``, so a
    jitted loss function is replayed too, and ``lax.scan`` (``repeat``, RNN)
    runs its layers once per iteration, each seen on its own; a layer run
    under another transformation (``jax.vmap``) is seen as the layer around
    it. It is a debugging tool: slow, eager, for one batch.

    Args:
      model: the network, an ``fnn.Layer`` (or ``fnn.with_state`` model), run
        as ``model.apply(params, batch, key=key, **kwargs)``; or a loss
        function of the training step, ``loss_fn(params, batch, key) ->
        (loss_sum, weight[, aux])`` (with ``has_state``, ``loss_fn(params,
        state, batch, key) -> (out, new_state)``), which applies the network
        itself.
      params: the params.
      batch: the network's input, or the loss function's batch.
      loss: for a network, the scalar to differentiate, ``loss(y)``; the sum
        of the outputs by default.
      key: the ``jax.random.key`` passed on (``None``: inference).
      state: the model's running state, for a ``with_state`` model or a
        loss function with ``has_state``.
      has_state: whether the loss function takes and returns the state.
      **kwargs: more keyword arguments for ``model.apply`` (e.g. ``mask=``).

    Returns:
      A :class:`NonFiniteReport`; ``report.found`` is False when everything
      is finite. ``str(report)`` is a sentence and a table of the layer's
      values with their NaN and Inf counts.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> net = fnn.serial(fnn.Dense(3), fnn.Relu(), fnn.model.elementwise(jnp.log),
      ...                  fnn.Dense(1))
      >>> _, params = net.init(jax.random.key(0), (-1, 2))
      >>> params["0_dense"]["b"] = -jnp.ones(3)  # the log's input is <= 0
      >>> report = fnn.find_nonfinite(net, params, jnp.zeros((4, 2)))
      >>> report.place, report.path, report.cause
      ('serial[2]', "['2_log']", 'forward')
    """
    with jax.disable_jit():
        forward = _forward(model, params, batch, loss, key, state, has_state, kwargs)
        calls, scalar = _replay(forward, None)
        base = dict(
            loss=float(scalar),
            nonfinite_batch=_bad_paths("batch", batch),
            nonfinite_params=_bad_paths("params", params),
            layers=len(calls),
        )
        done = sorted((c for c in calls if c["ok"]), key=lambda c: c["done"])
        for c in done:
            if not _finite(c["y"]):
                cause = "forward"
                if not _finite(c["x"]):
                    cause = "input"
                elif not _finite(c["params"]):
                    cause = "params"
                return _report(cause, c, base, [])
        if not np.isfinite(scalar):
            return NonFiniteReport("forward", "loss", None, None, (), **base)
        probes = [[_probe(c[n]) for n in ("x", "params", "y")] for c in done]
        slots = {c["id"]: i for i, c in enumerate(done)}
        grads = jax.grad(lambda probes: _replay(forward, (slots, probes))[1])(probes)
    bad = [
        c
        for c in done
        if _finite(grads[slots[c["id"]]][2]) and not _finite(grads[slots[c["id"]]][:2])
    ]
    if bad:
        c = max(bad, key=lambda c: c["start"])
        g = grads[slots[c["id"]]]
        cts = [("output cotangent", c["y"], g[2]), ("input cotangent", c["x"], g[0])]
        cts.append(("params gradient", c["params"], g[1]))
        extra = [v for n, t, g in cts for v in _counts(n, _like(t, g))]
        return _report("backward", c, base, extra)
    if not all(_finite(g) for g in grads):
        return NonFiniteReport("backward", "loss", None, None, (), **base)
    return NonFiniteReport(None, None, None, None, (), **base)


def _report(cause: str, c: dict, base: dict, extra: list) -> NonFiniteReport:
    values = _counts("input", c["x"]) + _counts("params", c["params"])
    values += _counts("output", c["y"]) + extra
    return NonFiniteReport(
        cause, c["place"], c["path"], describe(c["layer"]), tuple(values), **base
    )


def _forward(model, params, batch, loss, key, state, has_state, kwargs) -> Callable:
    """``f() -> scalar`` that runs the network or the loss function."""
    state = {} if state is None else state
    if isinstance(model, StatefulModel):

        def run():
            return model.apply(params, state, batch, key=key, **kwargs)[0]

    elif isinstance(model, tuple) and len(model) == 2:
        net = Layer(*model)

        def run():
            return apply_child(net, "", "", params, batch, key=key, **kwargs)

    elif callable(model):
        if loss is not None or kwargs:
            raise TypeError(
                "find_nonfinite: loss= and apply keyword arguments are for a "
                "network; a loss function returns its own loss sum."
            )
        if has_state:
            return lambda: unpack_loss_output(model(params, state, batch, key)[0])[0]
        return lambda: unpack_loss_output(model(params, batch, key))[0]
    else:
        raise TypeError(
            f"find_nonfinite: expected a network (an fnn.Layer) or a loss "
            f"function loss_fn(params, batch, key), got {type(model).__name__}."
        )

    def total():
        y = run()
        if loss is not None:
            return loss(y)
        return sum(jnp.sum(v) for v in jax.tree.leaves(y) if _inexact(v))

    return total


def _replay(forward: Callable, probed: tuple | None) -> tuple[list, Any]:
    """Runs ``forward(params)`` watching every layer call.

    Without probes it records each call's place, input, params and output
    (``ok`` is False for calls seen only inside a trace, e.g. a scan body);
    with ``(slots, probes)`` it adds each recorded call's zero probes.
    """
    calls: list[dict] = []
    seen: Counter = Counter()
    finished = iter(range(1 << 62))

    def watch(layer, p, x, run):
        place, path = _where()
        ident = (place, path, seen[place, path])
        seen[place, path] += 1
        if probed is not None:
            slot = probed[0].get(ident)
            if slot is None:
                return run(p, x)
            px, pp, py = probed[1][slot]
            return _add(run(_add(p, pp), _add(x, px)), py)
        call = dict(id=ident, place=place, path=path, layer=layer, x=x, params=p)
        call["start"] = len(calls)
        calls.append(call)
        y = run(p, x)
        leaves = jax.tree.leaves((x, p, y))
        call.update(y=y, done=next(finished))
        call["ok"] = not any(isinstance(v, jax.core.Tracer) for v in leaves)
        return y

    with watching(watch):
        scalar = forward()
    return calls, scalar
