"""The masks of ``fnn.losses``, and the float32 upcast every loss starts with.

A mask holds booleans, or numbers that are 1 (valid) or 0 (padding); any other
number marks its entry *bad*, and :func:`finish` makes that entry's loss NaN.
Masked entries are replaced by 0 before the loss sees them (:func:`keep`), so
their loss and gradient are exactly 0 even when the padding holds NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from fnn.model.precision import at_least_float32


def float32(x: ArrayLike) -> jax.Array:
    """``x`` upcast to float32 when it is a narrower float (bfloat16, float16);
    integer and boolean arrays pass as they are."""
    x = jnp.asarray(x)
    return at_least_float32(x) if jnp.issubdtype(x.dtype, jnp.floating) else x


# --- masks ------------------------------------------------------------------------


class Mask(NamedTuple):
    valid: jax.Array  # booleans: the entry counts
    bad: jax.Array | None  # a number other than 0 or 1 (None for a bool mask)


def per_class(mask: Mask | None) -> Mask | None:
    """A mask of ``(batch, ...)`` for values of ``(batch, ..., classes)``."""
    if mask is None:
        return None
    bad = None if mask.bad is None else mask.bad[..., None]
    return Mask(mask.valid[..., None], bad)


def full_mask(where: str, mask: ArrayLike | None, shape: tuple[int, ...]):
    """``mask`` of ``shape``; its shape must be a leading part of it.

    A number other than 0 and 1 (NaN, negative, fractional) is valid and
    ``bad``: :func:`finish` makes its loss NaN.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.shape != shape[: mask.ndim]:
        raise ValueError(
            f"{where}: expected a mask of shape {shape!r} or a leading part of it, "
            f"got {mask.shape!r}."
        )
    bad = None if mask.dtype == jnp.bool_ else (mask != 0) & (mask != 1)

    def full(m):
        m = m.reshape(m.shape + (1,) * (len(shape) - m.ndim))
        return jnp.broadcast_to(m, shape)

    return Mask(full(mask != 0), None if bad is None else full(bad))


def keep(mask: Mask | None, x: jax.Array) -> jax.Array:
    """``x`` with masked entries replaced by 0 (so their gradient is 0, not NaN)."""
    return x if mask is None else jnp.where(mask.valid, x, jnp.zeros((), x.dtype))


def finish(mask: Mask | None, loss: jax.Array) -> jax.Array:
    """The loss: 0 at masked entries, NaN where the mask is neither 0 nor 1."""
    loss = keep(mask, loss)
    if mask is None or mask.bad is None:
        return loss
    return jnp.where(mask.bad, jnp.full((), jnp.nan, loss.dtype), loss)


def same_shape(where: str, a: jax.Array, b: jax.Array, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{where}: expected {names} of the same shape, got {a.shape!r} and "
            f"{b.shape!r}."
        )
