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
import math
from collections.abc import Iterator, Sequence
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
      fnn.core.ShapeError: Dense(features=10): expected rank 2, got 3.
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
    """Applies ``child`` at params key ``name`` and place ``place``."""
    with child_scope(name, place):
        return child.apply(params, x, **kwargs)


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collects ``(place, keys, layer, output_shape, params)`` for every child."""
    token = _RECORD.set([])
    try:
        yield _RECORD.get()
    finally:
        _RECORD.reset(token)


# --- shapes -------------------------------------------------------------------


def is_shape(s: Any) -> bool:
    """Whether ``s`` is one shape (a tuple of ints) rather than a tuple of shapes."""
    return isinstance(s, tuple) and all(isinstance(d, int) for d in s)


def check_shape(desc: str, input_shape: Any, *, min_rank: int = 1) -> Shape:
    """Checks ``input_shape`` is one shape of rank ``>= min_rank``; returns it."""
    if isinstance(input_shape, list):
        input_shape = tuple(input_shape)
    if not is_shape(input_shape):
        fail(desc, f"expected one input shape (a tuple of ints), got {input_shape!r}.")
    if len(input_shape) < min_rank:
        fail(
            desc,
            f"expected input of rank at least {min_rank}, got shape {input_shape!r}.",
        )
    if any(d < -1 or d == 0 for d in input_shape):
        fail(
            desc,
            f"expected positive dimensions (or -1 for the batch), got {input_shape!r}.",
        )
    return input_shape


def check_shapes(
    desc: str, input_shape: Any, n: int | None = None
) -> tuple[Shape, ...]:
    """Checks ``input_shape`` is a tuple of ``n`` shapes (any number if None)."""
    if (
        not isinstance(input_shape, (tuple, list))
        or not all(
            is_shape(tuple(s)) if isinstance(s, (tuple, list)) else False
            for s in input_shape
        )
        or not input_shape
    ):
        fail(desc, f"expected a tuple of input shapes, got {input_shape!r}.")
    shapes = tuple(tuple(s) for s in input_shape)
    if n is not None and len(shapes) != n:
        fail(desc, f"expected {n} inputs, got {len(shapes)}: {shapes!r}.")
    return shapes


def dims_agree(a: int, b: int) -> bool:
    """Whether two dimensions agree, ``-1`` (unknown batch) agreeing with any."""
    return a == b or a == -1 or b == -1


def shapes_agree(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether two shapes agree dimension by dimension, ``-1`` being a wildcard."""
    return len(a) == len(b) and all(dims_agree(x, y) for x, y in zip(a, b))


def size(shape: Sequence[int]) -> int:
    """The number of elements of a shape without unknown (``-1``) dimensions."""
    return math.prod(shape)


def check_input(
    desc: str, x: Any, expected: Sequence[int], what: str = "input"
) -> None:
    """Checks at trace time that ``x.shape`` agrees with ``expected`` (-1 wildcard).

    ``expected`` may be shorter than ``x.shape``; then only the trailing
    dimensions are compared.
    """
    shape = getattr(x, "shape", None)
    if shape is None:
        fail(desc, f"expected an array {what}, got {type(x).__name__}.")
    tail = tuple(shape[len(shape) - len(expected) :]) if len(expected) else ()
    if len(shape) < len(expected) or not shapes_agree(tail, tuple(expected)):
        fail(
            desc,
            f"expected {what} with trailing dimensions {tuple(expected)!r}, "
            f"got shape {tuple(shape)!r}.",
        )


def expand_left(a: jax.Array, ndim: int) -> jax.Array:
    """``a`` reshaped to rank ``ndim`` by adding leading axes of size 1.

    Broadcasting a bias ``(features,)`` against ``(batch, features)`` this way is
    explicit, so fnn runs under ``jax_numpy_rank_promotion="raise"``.

    Examples:
      >>> import jax.numpy as jnp, fnn.core
      >>> fnn.core.expand_left(jnp.ones(3), 3).shape
      (1, 1, 3)
    """
    return a.reshape((1,) * (ndim - a.ndim) + a.shape)


# --- windows (convolution, pooling) and the train/eval switch -----------------


def window_tuple(owner: str, name: str, value: Any, n: int) -> tuple[int, ...]:
    """Normalises a per-spatial-dimension option (strides, dilation) to ``n`` ints.

    An int means the same value for every spatial dimension; a sequence must
    have exactly ``n`` positive ints.

    Raises:
      ValueError: naming ``owner`` and ``name`` otherwise.

    Examples:
      >>> from fnn.core import window_tuple
      >>> window_tuple("Conv", "strides", 2, 3)
      (2, 2, 2)
      >>> window_tuple("Conv", "strides", (1, 2), 2)
      (1, 2)
    """
    items = (value,) * n if isinstance(value, int) else value
    try:
        items = tuple(items)
    except TypeError:
        items = ()
    if len(items) != n or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items
    ):
        raise ValueError(
            f"{owner}: expected {name} to be a positive int or a tuple of {n} "
            f"positive ints, got {value!r}."
        )
    return items


def window_padding(owner: str, padding: Any, n: int) -> str | tuple[tuple[int, int]]:
    """Normalises ``padding``: ``"SAME"``, ``"VALID"`` or ``n`` ``(low, high)`` pairs.

    Raises:
      ValueError: naming ``owner`` for anything else.

    Examples:
      >>> from fnn.core import window_padding
      >>> window_padding("Conv", "same", 2)
      'SAME'
      >>> window_padding("Conv", [(1, 1), (0, 2)], 2)
      ((1, 1), (0, 2))
    """
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID"):
            return padding.upper()
    else:
        try:
            pairs = tuple(tuple(p) for p in padding)
        except TypeError:
            pairs = ()
        if len(pairs) == n and all(
            len(p) == 2 and all(isinstance(v, int) and v >= 0 for v in p) for p in pairs
        ):
            return pairs
    raise ValueError(
        f"{owner}: expected padding 'SAME', 'VALID' or {n} (low, high) pairs of "
        f"non-negative ints, got {padding!r}."
    )


def is_training(key: jax.Array | None, train: bool | None) -> bool:
    """The train/eval switch shared by Dropout and BatchNorm.

    ``train`` (an apply keyword) decides when given; otherwise a layer trains
    when it is given a ``key``. So passing a key turns on training behaviour
    everywhere in a network, and ``train=False`` turns it off.

    Examples:
      >>> import jax
      >>> from fnn.core import is_training
      >>> is_training(None, None), is_training(jax.random.key(0), None)
      (False, True)
      >>> is_training(jax.random.key(0), False)
      False
    """
    return key is not None if train is None else bool(train)
