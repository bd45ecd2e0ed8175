"""The layer contract: ``Layer``, the place of a layer in its network, and errors.

A layer is a pair of pure functions::

    init(key, input_shape) -> (output_shape, params)
    apply(params, x, *, key=None, **kwargs) -> y

Combinators run each child inside :func:`child_scope`, which records the child's
place (``serial[2]``) and its params key (``'2_dense'``). Errors raised with
:func:`fail` read that place, so a shape error deep in a network still says where
it happened. All of this is Python that runs while tracing; a jitted step pays
nothing for it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, NoReturn, Protocol

import jax

Shape = tuple[int, ...]
Params = Any


class InitFn(Protocol):
    """``init(key, input_shape) -> (output_shape, params)``."""

    def __call__(self, key: jax.Array, input_shape: Any) -> tuple[Any, Params]: ...


class ApplyFn(Protocol):
    """``apply(params, x, *, key=None, **kwargs) -> y``."""

    def __call__(
        self, params: Params, x: Any, *, key: jax.Array | None = None, **kwargs: Any
    ) -> Any: ...


class Layer(NamedTuple):
    """A layer: the pair of pure functions ``(init, apply)``.

    It unpacks like a stax pair, so ``init, apply = fnn.Dense(3)`` works.

    Attributes:
      init: ``init(key, input_shape) -> (output_shape, params)``. ``input_shape``
        is a tuple whose leading batch dimension may be ``-1``; multi-input layers
        take a tuple of shapes.
      apply: ``apply(params, x, *, key=None, **kwargs) -> y``. ``key=None`` means
        deterministic inference; unknown keyword arguments are ignored, so
        combinators can pass options (``mask=``, ``train=``) to every child.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> init, apply = fnn.Dense(3)
      >>> out_shape, params = init(jax.random.key(0), (-1, 4))
      >>> out_shape
      (-1, 3)
      >>> apply(params, jnp.ones((2, 4))).shape
      (2, 3)
    """

    init: InitFn
    apply: ApplyFn

    def __repr__(self) -> str:
        return describe(self)


class ShapeError(ValueError):
    """A layer was given an input it cannot take.

    The message names the layer, its place in the network and the expected
    versus actual value, e.g.
    ``Dense(features=10) at serial[2]: expected input with last dimension 392,
    got 1568.``
    """


ShapeError.__module__ = "fnn"  # tracebacks print its public name, fnn.ShapeError


def make_layer(name: str, desc: str, init_fn: InitFn, apply_fn: ApplyFn) -> Layer:
    """Builds a :class:`Layer` and tags it with a short name and a description.

    ``name`` becomes part of the params key chosen by combinators
    (``'0_dense'``); ``desc`` is how errors and :func:`fnn.summary` print the
    layer (``'Dense(features=10)'``).

    Args:
      name: short lower-case kind name, e.g. ``"dense"``.
      desc: the constructor call as the user wrote it, e.g. ``"Dense(features=3)"``.
      init_fn: the layer's init function.
      apply_fn: the layer's apply function.

    Returns:
      The layer.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> def init(key, shape):
      ...     return shape, {}
      >>> def apply(params, x, **kwargs):
      ...     return 2 * x
      >>> double = fnn.make_layer("double", "Double()", init, apply)
      >>> double
      Double()
      >>> fnn.serial(double).init(None, (-1, 2))[1]
      {'0_double': {}}
    """
    init_fn.fnn_name = name  # type: ignore[attr-defined]
    init_fn.fnn_desc = desc  # type: ignore[attr-defined]
    return Layer(init_fn, apply_fn)


def layer_name(layer: Layer) -> str:
    """The short kind name of ``layer`` (``'layer'`` for an untagged pair)."""
    return getattr(layer[0], "fnn_name", "layer")


def describe(layer: Layer) -> str:
    """How ``layer`` is printed in errors (``'Dense(features=3)'``)."""
    return getattr(layer[0], "fnn_desc", f"{layer_name(layer)}(...)")


def signature(name: str, *args: Any, **kwargs: Any) -> str:
    """Formats a constructor call, e.g. ``signature('Dense', 3)`` -> ``'Dense(3)'``."""
    parts = [repr(a) for a in args]
    parts += [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


# --- the place of the layer being traced ------------------------------------


class _Frame(NamedTuple):
    key: str  # params key, e.g. '2_dense'
    place: str  # what errors print, e.g. 'serial[2]'


_PATH: contextvars.ContextVar[tuple[_Frame, ...]] = contextvars.ContextVar(
    "fnn_path", default=()
)
_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "fnn_record", default=None
)
_WATCH: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "fnn_watch", default=None
)


def current_place() -> str:
    """The place of the layer being initialised or applied, e.g. ``serial[2]``."""
    return ".".join(f.place for f in _PATH.get())


def current_keys() -> tuple[str, ...]:
    """The params keys from the root to the layer being run."""
    return tuple(f.key for f in _PATH.get())


def fail(desc: str, detail: str) -> NoReturn:
    """Raises :class:`ShapeError` naming the layer ``desc`` and its place.

    Args:
      desc: the layer as printed, e.g. ``"Dense(features=10)"``.
      detail: one sentence, e.g. ``"expected input with last dimension 392, got
        1568."``

    Raises:
      ShapeError: always.

    Examples:
      >>> import fnn
      >>> fnn.fail("Dense(features=10)", "expected rank 2, got 3.")
      Traceback (most recent call last):
      ...
      fnn.ShapeError: Dense(features=10): expected rank 2, got 3.
    """
    place = current_place()
    at = f" at {place}" if place else ""
    raise ShapeError(f"{desc}{at}: {detail}")


@contextlib.contextmanager
def child_scope(key: str, place: str) -> Iterator[None]:
    """Runs a child layer at params key ``key`` and printed place ``place``.

    Errors other than :class:`ShapeError` (which already carry the place) get a
    note with the innermost place, once. The scope is also a
    ``jax.named_scope``, so profiles show the params key.
    """
    token = _PATH.set(_PATH.get() + (_Frame(key, place),))
    try:
        with jax.named_scope(key):
            yield
    except ShapeError:
        raise
    except Exception as e:
        notes = getattr(e, "__notes__", [])
        if not any(str(n).startswith("fnn: raised in") for n in notes):
            keys = "".join(f"[{k!r}]" for k in current_keys())
            e.add_note(f"fnn: raised in the layer at {current_place()} (params {keys})")
        raise
    finally:
        _PATH.reset(token)


def init_child(
    child: Layer, name: str, place: str, rng: jax.Array, input_shape: Any
) -> tuple[Any, Params]:
    """Initialises ``child`` at params key ``name`` and place ``place``.

    Combinators call this for each child; :func:`fnn.summary` reads what it
    records.
    """
    with child_scope(name, place):
        record = _RECORD.get()
        if record is not None:
            slot = len(record)
            record.append(None)  # parents are listed before their children
        out_shape, params = child.init(rng, input_shape)
        if record is not None:
            record[slot] = (current_place(), current_keys(), child, out_shape, params)
    return out_shape, params


def apply_child(
    child: Layer, name: str, place: str, params: Params, x: Any, **kwargs: Any
) -> Any:
    """Applies ``child`` at params key ``name`` and place ``place``.

    Inside :func:`watching`, the watcher runs the child instead.
    """
    with child_scope(name, place):
        watch = _WATCH.get()
        if watch is None:
            return child.apply(params, x, **kwargs)
        return watch(child, params, x, lambda p, v: child.apply(p, v, **kwargs))


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collects ``(place, keys, layer, output_shape, params)`` for every child."""
    token = _RECORD.set([])
    try:
        yield _RECORD.get()
    finally:
        _RECORD.reset(token)


@contextlib.contextmanager
def watching(watch: Callable) -> Iterator[None]:
    """Runs every child through ``watch(layer, params, x, run) -> y``.

    ``run(params, x)`` applies the child; :func:`current_place` and
    :func:`current_keys` say where it sits. :func:`fnn.find_nonfinite` watches
    each layer's input, params and output this way.
    """
    token = _WATCH.set(watch)
    try:
        yield
    finally:
        _WATCH.reset(token)


# --- the train/eval switch ------------------------------------------------------


def is_training(key: jax.Array | None, train: bool | None) -> bool:
    """The train/eval switch shared by Dropout and BatchNorm.

    ``train`` (an apply keyword) decides when given; otherwise a layer trains
    when it is given a ``key``. So passing a key turns on training behaviour
    everywhere in a network, and ``train=False`` turns it off.

    Examples:
      >>> import jax
      >>> from fnn.model.core import is_training
      >>> is_training(None, None), is_training(jax.random.key(0), None)
      (False, True)
      >>> is_training(jax.random.key(0), False)
      False
    """
    return key is not None if train is None else bool(train)
