"""Where a layer is in its network, and the errors that say so.

Combinators run each child inside :func:`child_scope`, which records the child's
place (``serial[2]``) and its params key (``'2_dense'``). :func:`fail` reads that
place, so a shape error deep in a network still says where it happened. The
context variables here also hold the running-state frame of
:mod:`fnn.model.state` and what :func:`fnn.summary` records, so that a check can
trace a layer on the side (:func:`aside`) without disturbing either.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, NoReturn

import jax


class ShapeError(ValueError):
    """A layer was given an input it cannot take.

    The message names the layer, its place in the network and the expected
    versus actual value, e.g.
    ``Dense(features=10) at serial[2]: expected input with last dimension 392,
    got 1568.``
    """


ShapeError.__module__ = "fnn"  # tracebacks print its public name, fnn.ShapeError


class _Frame(NamedTuple):
    key: str  # params key, e.g. '2_dense'
    place: str  # what errors print, e.g. 'serial[2]'


_PATH: contextvars.ContextVar[tuple[_Frame, ...]] = contextvars.ContextVar(
    "fnn_path", default=()
)
_WATCH: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "fnn_watch", default=None
)
_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "fnn_record", default=None
)
# True while a layer's apply runs: only the outermost call checks its params.
_APPLYING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fnn_applying", default=False
)
# The running-state frame of fnn.model.state (None outside fnn.with_state). It
# lives here so that a check can trace init or apply on the side (aside())
# without declaring or writing state in the network being traced.
state_frame: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fnn_state", default=None
)
# True while a training step (fnn.make_train_step) traces the user's loss
# function: a layer whose mode follows the key then refuses key=None unless
# train= names the mode (fnn.model.mode.is_training).
_TRAIN_STEP: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fnn_train_step", default=False
)


def is_applying() -> bool:
    """Whether a layer's apply is running, so a call to apply is not the outermost."""
    return _APPLYING.get()


@contextlib.contextmanager
def applying() -> Iterator[None]:
    """Marks the outermost apply as running; the applies inside skip its checks."""
    token = _APPLYING.set(True)
    try:
        yield
    finally:
        _APPLYING.reset(token)


def in_train_step() -> bool:
    """Whether a training step is tracing (or running) its loss function."""
    return _TRAIN_STEP.get()


@contextlib.contextmanager
def train_step_scope() -> Iterator[None]:
    """Marks the user's loss function as called by a training step.

    The step enters it around each call of the loss, which happens while
    ``jit`` traces the step: it costs nothing when the compiled step runs.
    """
    token = _TRAIN_STEP.set(True)
    try:
        yield
    finally:
        _TRAIN_STEP.reset(token)


def recorder() -> list | None:
    """The list :func:`recording` collects into, or ``None`` outside it."""
    return _RECORD.get()


@contextlib.contextmanager
def aside(*, applying: bool = True) -> Iterator[None]:
    """Runs a side trace for a check: no state frame, no recording for summary,
    not part of a training step.

    With ``applying``, layers applied inside skip their own params check (the
    caller checks what it needs).
    """
    tokens = (
        state_frame.set(None),
        _RECORD.set(None),
        _APPLYING.set(applying),
        _TRAIN_STEP.set(False),
    )
    try:
        yield
    finally:
        _TRAIN_STEP.reset(tokens[3])
        _APPLYING.reset(tokens[2])
        _RECORD.reset(tokens[1])
        state_frame.reset(tokens[0])


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


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collects ``(place, keys, layer, output_shape, params)`` for every child."""
    token = _RECORD.set([])
    try:
        yield _RECORD.get()
    finally:
        _RECORD.reset(token)


def watched() -> Callable | None:
    """The watcher of :func:`watching`, or ``None``."""
    return _WATCH.get()


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
