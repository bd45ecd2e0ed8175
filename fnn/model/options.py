"""The one parser of constructor options: positive ints, numbers, bools, choices.

Every layer constructor, combinator and training function checks its options
with these helpers, so an option is accepted or refused the same way
everywhere, with the same message: ``"Dense: expected features to be a positive
int, got 0."``. Integers are anything ``operator.index`` accepts (``3``,
``np.int64(3)``) except ``bool``: ``Dense(True)`` is a mistake, not one feature.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np


def as_int(value: Any) -> int | None:
    """``value`` as a Python int, or ``None`` if it is not an integer (or a bool)."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def integer(owner: str, name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as an int, at least ``minimum`` when given.

    Raises:
      ValueError: naming ``owner`` and ``name`` otherwise.

    Examples:
      >>> import numpy as np
      >>> from fnn.model.options import integer
      >>> integer("Softmax", "axis", np.int32(-1))
      -1
    """
    v = as_int(value)
    if v is None or (minimum is not None and v < minimum):
        what = {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(
            minimum, f"an int >= {minimum}"
        )
        raise ValueError(f"{owner}: expected {name} to be {what}, got {value!r}.")
    return v


def positive_int(owner: str, name: str, value: Any, *, optional: bool = False) -> Any:
    """``value`` as a positive int (``None`` passes when ``optional``).

    Raises:
      ValueError: naming ``owner`` and ``name`` otherwise.

    Examples:
      >>> import numpy as np
      >>> from fnn.model.options import positive_int
      >>> positive_int("Dense", "features", np.int64(3))
      3
      >>> positive_int("Dense", "features", True)
      Traceback (most recent call last):
      ...
      ValueError: Dense: expected features to be a positive int, got True.
    """
    if optional and value is None:
        return None
    v = as_int(value)
    if v is None or v < 1:
        extra = " or None" if optional else ""
        raise ValueError(
            f"{owner}: expected {name} to be a positive int{extra}, got {value!r}."
        )
    return v


def int_tuple(
    owner: str,
    name: str,
    value: Any,
    n: int | None = None,
    *,
    allow_int: bool = True,
    ranks: Sequence[int] = (1, 2, 3),
    minimum: int = 1,
) -> tuple[int, ...]:
    """A per-dimension option (a kernel size, strides, dilation) as a tuple.

    Args:
      owner: the constructor, for the message.
      name: the option's name.
      value: an int (the same for every dimension, when ``allow_int``) or a
        sequence of ints.
      n: the number of dimensions it must have; ``None`` accepts any length
        in ``ranks``.
      allow_int: whether a single int is accepted (for ``n`` dimensions).
      ranks: the lengths accepted when ``n`` is ``None``.
      minimum: the smallest value accepted.

    Raises:
      ValueError: naming ``owner`` and ``name`` otherwise.

    Examples:
      >>> from fnn.model.options import int_tuple
      >>> int_tuple("Conv", "strides", 2, 3)
      (2, 2, 2)
      >>> int_tuple("Conv", "kernel_size", (3, 3), allow_int=False)
      (3, 3)
    """
    if as_int(value) is not None:
        if not allow_int or n is None:
            raise ValueError(
                f"{owner}: expected {name} to be a tuple, e.g. (3,) for 1-D or "
                f"(3, 3) for 2-D, got the int {value!r}."
            )
        value_t: Any = (value,) * n
    else:
        try:
            value_t = tuple(value)
        except TypeError:
            value_t = None
    ints = None if value_t is None else [as_int(v) for v in value_t]
    lengths = (n,) if n is not None else tuple(ranks)
    if (
        ints is None
        or len(ints) not in lengths
        or any(v is None or v < minimum for v in ints)
    ):
        what = "positive ints" if minimum == 1 else f"ints >= {minimum}"
        what_one = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        counts = [str(k) for k in lengths]
        count = (
            counts[0]
            if len(counts) == 1
            else f"{', '.join(counts[:-1])} or {counts[-1]}"
        )
        if len(counts) > 4:
            count = f"{counts[0]} to {counts[-1]}"
        single = f"{what_one} or " if allow_int and n is not None else ""
        raise ValueError(
            f"{owner}: expected {name} to be {single}a tuple of {count} {what}, "
            f"got {value!r}."
        )
    return tuple(ints)


def number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float, within ``[low, high]`` (ends open if asked).

    Raises:
      ValueError: naming ``owner``, ``name`` and the range otherwise.

    Examples:
      >>> from fnn.model.options import number
      >>> number("Dropout", "rate", 0.5, low=0.0, high=1.0, high_open=True)
      0.5
      >>> number("Dropout", "rate", 1.0, low=0.0, high=1.0, high_open=True)
      Traceback (most recent call last):
      ...
      ValueError: Dropout: expected rate to be a number in [0.0, 1.0), got 1.0.
    """
    ok = not isinstance(value, bool | np.bool_)
    try:
        v = float(value) if ok and not isinstance(value, str) else math.nan
    except (TypeError, ValueError):
        v = math.nan
    ok = math.isfinite(v)
    ok = ok and (low is None or (v > low if low_open else v >= low))
    ok = ok and (high is None or (v < high if high_open else v <= high))
    if not ok:
        if low is None and high is None:
            what = "a finite number"
        elif high is None:
            what = f"a number {'>' if low_open else '>='} {low}"
        elif low is None:
            what = f"a number {'<' if high_open else '<='} {high}"
        else:
            lb, rb = "(" if low_open else "[", ")" if high_open else "]"
            what = f"a number in {lb}{low}, {high}{rb}"
        raise ValueError(f"{owner}: expected {name} to be {what}, got {value!r}.")
    return v


def boolean(owner: str, name: str, value: Any) -> bool:
    """``value`` if it is a bool.

    Raises:
      ValueError: naming ``owner`` and ``name`` otherwise.

    Examples:
      >>> from fnn.model.options import boolean
      >>> boolean("Gelu", "approximate", False)
      False
    """
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: expected {name} to be a bool, got {value!r}.")
    return value


def choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``.

    Raises:
      ValueError: naming ``owner``, ``name`` and the choices otherwise.

    Examples:
      >>> from fnn.model.options import choice
      >>> choice("batches", "remainder", "pad", ("drop", "pad", "keep"))
      'pad'
    """
    if isinstance(value, str | int | float | type(None)) and value in choices:
        return value
    raise ValueError(
        f"{owner}: expected {name} to be one of {tuple(choices)!r}, got {value!r}."
    )


def floating_dtype(owner: str, name: str, value: Any, *, optional: bool = False) -> Any:
    """``value`` as a floating ``numpy.dtype`` (``None`` passes when ``optional``).

    Accepts what ``jnp.dtype`` accepts (``jnp.bfloat16``, ``"float16"``,
    ``np.float32``) when it names a real floating-point type.

    Raises:
      ValueError: naming ``owner`` and ``name`` otherwise.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fnn.model.options import floating_dtype
      >>> floating_dtype("Dense", "dtype", jnp.bfloat16)
      dtype(bfloat16)
      >>> floating_dtype("Dense", "dtype", jnp.int8)
      Traceback (most recent call last):
      ...
      ValueError: Dense: expected dtype to be a floating dtype such as
      jnp.float32 or jnp.bfloat16, got <class 'jax.numpy.int8'>.
    """
    if optional and value is None:
        return None
    try:
        dtype = None if value is None or isinstance(value, bool) else jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        extra = " (or None)" if optional else ""
        raise ValueError(
            f"{owner}: expected {name} to be a floating dtype such as jnp.float32 "
            f"or jnp.bfloat16{extra}, got {value!r}."
        )
    return dtype
