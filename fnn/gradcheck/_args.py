"""Arguments of :func:`fnn.check_grads`: upcast, mask, and split into leaves.

The checked leaves (float arrays at the checked argnums) become float64 arrays;
the other array leaves are passed alongside them; everything else (Python
numbers, strings) is held by the :class:`~fnn.gradcheck._target.Target`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fnn.gradcheck._fd import element_scale
from fnn.gradcheck._target import Static, Target


@dataclasses.dataclass(frozen=True, eq=False)
class Leaf:
    """One checked input leaf.

    Attributes:
      path: its name, e.g. ``"args[0]['w']"``.
      shape: its shape.
      offset: where it starts in the flat input vector.
      x: its float64 values, flattened.
      scale: the step scale of each element, flattened.
      active: the indices, in the flat input vector, that the mask keeps.
    """

    path: str
    shape: tuple[int, ...]
    offset: int
    x: np.ndarray
    scale: np.ndarray
    active: np.ndarray

    @property
    def size(self) -> int:
        return self.x.size


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """The leaves to check, the target ``f`` and the other array leaves."""

    leaves: tuple[Leaf, ...]
    target: Target
    rest: tuple


def _is_float(x) -> bool:
    if isinstance(x, bool | int):
        return False
    if isinstance(x, float):
        return True
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _mask_lookup(mask, args) -> dict[str, np.ndarray]:
    if mask is None:
        return {}
    tree = mask(*args) if callable(mask) else mask
    if not isinstance(tree, tuple | list) or len(tree) != len(args):
        raise ValueError(
            f"mask must give one entry (None or a pytree of booleans) per "
            f"positional argument, {len(args)} in all, got {type(tree).__name__}."
        )
    flat = jax.tree_util.tree_flatten_with_path(tuple(tree))[0]
    return {jax.tree_util.keystr(p): np.asarray(v, dtype=bool) for p, v in flat}


def prepare(f, args, argnums, mask, names, eps, notes) -> Prepared:
    """Upcast ``args``, pick the checked leaves, and describe ``f`` of them."""
    masks = _mask_lookup(mask, args)
    flat, treedef = jax.tree_util.tree_flatten_with_path(args)
    leaves, checked, dynamic, rest, static = [], [], [], [], []
    skipped, empty, upcast, masked, offset = [], [], set(), 0, 0
    for pos, (path, value) in enumerate(flat):
        argnum = path[0].idx
        name = names[argnum] + jax.tree_util.keystr(path[1:])
        if argnum in argnums and _is_float(value):
            x = np.asarray(value, dtype=np.float64)
        elif _is_array(value):
            if argnum in argnums and jnp.issubdtype(value.dtype, jnp.complexfloating):
                raise ValueError(f"check_grads does not support complex input {name}.")
            if argnum in argnums:
                skipped.append(f"{name} ({value.dtype})")
            if _is_float(value):
                value = jax.device_put(np.asarray(value, dtype=np.float64))
            dynamic.append(pos)
            rest.append(value)
            continue
        else:
            if argnum in argnums and not isinstance(value, float):
                skipped.append(f"{name} ({type(value).__name__})")
            static.append((pos, Static(value)))
            continue
        dtype = getattr(value, "dtype", None) or np.asarray(value).dtype
        if dtype != jnp.float64:
            upcast.add(str(dtype))
        if x.size == 0:
            empty.append(f"{name} (shape {x.shape})")
            dynamic.append(pos)
            rest.append(jax.device_put(x))
            continue
        keep = masks.get(jax.tree_util.keystr(path), np.ones((), bool))
        try:
            keep = np.broadcast_to(keep, x.shape).ravel()
        except ValueError:
            raise ValueError(
                f"mask for {name} has shape {keep.shape}, which does not broadcast "
                f"to the input's shape {x.shape}."
            ) from None
        masked += int(keep.size - keep.sum())
        scale = element_scale(x.ravel()) if eps is None else np.ones(x.size)
        active = offset + np.flatnonzero(keep)
        leaves.append(Leaf(name, x.shape, offset, x.ravel(), scale, active))
        checked.append(pos)
        offset += x.size
    if upcast:
        notes.append(f"inputs upcast from {', '.join(sorted(upcast))} to float64.")
    if skipped:
        notes.append(f"skipped non-float inputs: {', '.join(skipped)}.")
    if empty:
        notes.append(f"skipped empty inputs: {', '.join(empty)}.")
    if masked:
        notes.append(f"mask excluded {masked} input elements.")
    target = Target(
        f=Static(f),
        treedef=treedef,
        checked=tuple(checked),
        dynamic=tuple(dynamic),
        static=tuple(static),
        paths=tuple(leaf.path for leaf in leaves),
    )
    return Prepared(tuple(leaves), target, tuple(rest))
