"""Running state (BatchNorm statistics), kept apart from params.

A network without stateful layers never sees state: its ``init`` returns
``(output_shape, params)`` and its ``apply`` returns ``y``. A network with
stateful layers is wrapped once with :func:`with_state`, which threads the state
explicitly at the top::

    model = fnn.with_state(net)
    out_shape, params, state = model.init(key, input_shape)
    y, state = model.apply(params, state, x, key=key)

Inside, the state is a nested dict keyed by the same paths as params
(``state['2_batchnorm']['mean']``), so it is easy to read and to checkpoint.
Stateful layers use :func:`declare_state`, :func:`read_state` and
:func:`write_state`; a layer that scans over copies of itself (``repeat``, an
RNN) runs its body with :func:`run_init` / :func:`run_apply` to keep the state
of each iteration inside the scan. This is the design of Haiku's
``transform_with_state``, with the state paths of fnn's params.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax

from fnn.model.compare import (
    apply_shape,
    concrete_shapes,
    input_spec,
    mismatch,
    signature_of,
    tree_diff,
)
from fnn.model.core import (
    Layer,
    check_key,
    checked,
    describe,
    fail,
    fit_error,
    init_aside,
)
from fnn.model.place import applying, current_keys, state_frame


class _StateFrame:
    def __init__(self, base: int, state_in: Any):
        self.base = base  # length of the path at which this frame is rooted
        self.state_in = state_in
        self.state_out: Any = {}


_FRAME = state_frame  # the frame of the layer being run, or None (fnn.model.place)


def _rel_keys(frame: _StateFrame) -> tuple[str, ...]:
    return current_keys()[frame.base :]


def _get(tree: Any, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _set(tree: Any, keys: tuple[str, ...], value: Any) -> Any:
    if not keys:
        return value
    tree = dict(tree) if isinstance(tree, dict) else {}
    tree[keys[0]] = _set(tree.get(keys[0], {}), keys[1:], value)
    return tree


@contextlib.contextmanager
def _frame(state_in: Any) -> Iterator[_StateFrame]:
    frame = _StateFrame(len(current_keys()), state_in)
    token = _FRAME.set(frame)
    try:
        yield frame
    finally:
        _FRAME.reset(token)


def run_init(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """Runs ``fn()`` and returns ``(its result, the state it declared)``.

    The state is keyed relative to the current place, so a scanning layer can
    call this inside ``jax.vmap`` to build stacked state for its copies.
    """
    with _frame(None) as frame:
        out = fn()
    return out, frame.state_out


def run_apply(fn: Callable[[], Any], state: Any) -> tuple[Any, Any]:
    """Runs ``fn()`` reading ``state``; returns ``(its result, the new state)``.

    State that ``fn`` reads but does not write is passed on unchanged.
    """
    with _frame(state) as frame:
        frame.state_out = state if state is not None else {}
        out = fn()
    return out, frame.state_out


def declare_state(desc: str, value: Any) -> None:
    """Declares the initial state of the layer being initialised.

    Outside :func:`with_state` this does nothing; the layer's apply will then
    ask for state and explain how to get it.
    """
    frame = _FRAME.get()
    if frame is not None:
        frame.state_out = _set(frame.state_out, _rel_keys(frame), value)


def read_state(desc: str) -> Any:
    """The state of the layer being applied.

    Raises:
      ShapeError: outside :func:`with_state`, or when the state tree has no entry
        for this layer; the message names the layer and its place.
    """
    frame = _FRAME.get()
    if frame is None:
        fail(
            desc,
            "this layer keeps running state; wrap the network with "
            "fnn.with_state(net) and call its init and apply.",
        )
    value = _get(frame.state_in, _rel_keys(frame))
    if value is None:
        keys = "".join(f"[{k!r}]" for k in _rel_keys(frame))
        fail(desc, f"the state tree has no entry at state{keys}.")
    return value


def peek_state() -> Any:
    """The state of the layer being applied, or ``None`` when it has none.

    For layers that may or may not hold state (``repeat`` of any layer): no
    error outside :func:`with_state` or for a stateless child.
    """
    frame = _FRAME.get()
    return None if frame is None else _get(frame.state_in, _rel_keys(frame))


def write_state(desc: str, value: Any) -> None:
    """Sets the new state of the layer being applied."""
    frame = _FRAME.get()
    if frame is None:
        read_state(desc)  # raises the explanation
    frame.state_out = _set(frame.state_out, _rel_keys(frame), value)


class StatefulModel(NamedTuple):
    """A network with running state, from :func:`with_state`.

    Attributes:
      init: ``init(key, input_shape) -> (output_shape, params, state)``.
      apply: ``apply(params, state, x, *, key=None, **kwargs) -> (y, new_state)``.
    """

    init: Callable[..., tuple[Any, Any, Any]]
    apply: Callable[..., tuple[Any, Any]]


def with_state(layer: Layer) -> StatefulModel:
    """Threads running state (e.g. BatchNorm statistics) through ``layer``.

    Its ``apply``, when it traces (or runs eagerly) for a new signature, checks
    ``key``, and compares ``params`` and ``state`` by path and leaf shape with
    what ``init`` makes for the input's shape, as a layer's outermost apply
    does (see :func:`fnn.make_layer`); swapped params and state are named as
    such.

    Args:
      layer: any layer, usually a network with stateful layers inside.

    Returns:
      A :class:`StatefulModel` whose ``init`` also returns the initial state and
      whose ``apply`` takes the state and returns the new one. A network
      without stateful layers gets the state ``{}``.

    Raises:
      ShapeError: at apply, when params or state do not fit the network.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> model = fnn.with_state(fnn.serial(fnn.Dense(3), fnn.Relu()))
      >>> shape, params, state = model.init(jax.random.key(0), (-1, 2))
      >>> state
      {}
      >>> y, state = model.apply(params, state, jnp.ones((4, 2)))
      >>> y.shape
      (4, 3)
    """
    init, apply = layer
    desc = f"with_state({describe(layer)})"

    def init_fn(key: jax.Array, input_shape: Any):
        (out_shape, params), state = run_init(lambda: init(key, input_shape))
        return out_shape, params, state

    def apply_fn(params: Any, state: Any, x: Any, **kwargs: Any):
        with applying():
            check_key(desc, kwargs.get("key"))
            return checked(
                lambda: run_apply(lambda: apply(params, x, **kwargs), state),
                lambda cause: _check_fit(apply_fn, desc, init, params, state, x, cause),
            )

    init_fn.fnn_layer = layer  # type: ignore[attr-defined]
    return StatefulModel(init_fn, apply_fn)


def _check_fit(owner, desc: str, init, params, state, x, cause) -> None:
    """Fails unless params and state fit what ``init`` makes for ``x``'s shape."""
    state = {} if state is None else state  # run_apply takes None for no state
    if not concrete_shapes(x):
        return  # symbolic dimensions (jax.export): no init to compare with
    spec = input_spec(x)
    sig = (spec, signature_of(params, state))
    if getattr(owner, "fnn_verified", None) == sig:
        return

    def initial() -> tuple[Any, Any]:
        (_, p), s = run_init(lambda: init(jax.random.key(0), spec))
        return p, s

    found = init_aside(desc, spec, initial, cause)
    if found is None:
        return  # the error of apply stands
    (want_params, want_state), owners = found
    p_diff = tree_diff(want_params, params)
    s_diff = tree_diff(want_state, state)
    shape = apply_shape(x)
    if (p_diff or s_diff) and not (
        tree_diff(want_params, state) or tree_diff(want_state, params)
    ):
        detail = "params and state are swapped; call apply(params, state, x)."
        fit_error(desc, detail, cause)
    elif p_diff:
        fit_error(desc, mismatch("params", p_diff, owners, shape), cause)
    elif s_diff:
        fit_error(desc, mismatch("state", s_diff, owners, shape), cause)
    elif cause is None:
        owner.fnn_verified = sig  # type: ignore[attr-defined]
