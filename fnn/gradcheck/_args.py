"""Arguments of :func:`fnn.check_grads`: upcast, mask and flatten into one vector."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fnn.gradcheck import _fd as fd


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One checked input leaf: where it sits in the flat float64 input vector."""

    path: str
    shape: tuple[int, ...]
    offset: int
    size: int


def unflatten(x, leaves):
    """The leaf arrays of the flat input vector ``x``."""
    return tuple(x[v.offset : v.offset + v.size].reshape(v.shape) for v in leaves)


def _is_float(x) -> bool:
    if isinstance(x, bool | int):
        return False
    if isinstance(x, float):
        return True
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _to64(x):
    return jax.device_put(np.asarray(x, dtype=np.float64)) if _is_float(x) else x


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


def prepare(f, args, argnums, mask, names, eps, notes):
    """Upcast ``args`` and flatten the checked leaves into one float64 vector.

    Returns ``(leaves, x0, scale, active, tree_fn)``: ``tree_fn(x)`` is ``f`` of
    the flat vector ``x``; ``active`` lists the flat indices the mask keeps.
    """
    masks = _mask_lookup(mask, args)
    flat, treedef = jax.tree_util.tree_flatten_with_path(args)
    all64, leaves, xs, scales, actives, positions = [], [], [], [], [], []
    skipped, upcast, masked, offset = [], set(), 0, 0
    for pos, (path, value) in enumerate(flat):
        argnum = path[0].idx
        checked = argnum in argnums
        all64.append(_to64(value) if checked or not isinstance(value, float) else value)
        if not checked:
            continue
        name = names[argnum] + jax.tree_util.keystr(path[1:])
        if not _is_float(value):
            if jnp.iscomplexobj(value):
                raise ValueError(f"check_grads does not support complex input {name}.")
            skipped.append(f"{name} ({np.asarray(value).dtype})")
            continue
        dtype = getattr(value, "dtype", None) or np.asarray(value).dtype
        if dtype != jnp.float64:
            upcast.add(str(dtype))
        x = np.asarray(all64[-1], dtype=np.float64)
        keep = masks.get(jax.tree_util.keystr(path), np.ones((), bool))
        try:
            keep = np.broadcast_to(keep, x.shape).ravel()
        except ValueError:
            raise ValueError(
                f"mask for {name} has shape {keep.shape}, which does not broadcast "
                f"to the input's shape {x.shape}."
            ) from None
        masked += int(keep.size - keep.sum())
        leaves.append(Leaf(name, x.shape, offset, x.size))
        xs.append(x.ravel())
        scales.append(fd.element_scale(x.ravel()) if eps is None else np.ones(x.size))
        actives.append(offset + np.flatnonzero(keep))
        positions.append(pos)
        offset += x.size
    if upcast:
        notes.append(f"inputs upcast from {', '.join(sorted(upcast))} to float64.")
    if skipped:
        notes.append(f"skipped non-float inputs: {', '.join(skipped)}.")
    if masked:
        notes.append(f"mask excluded {masked} input elements.")

    def tree_fn(x):
        leaves_now = list(all64)
        for p, val in zip(positions, unflatten(x, leaves)):
            leaves_now[p] = val
        return f(*jax.tree_util.tree_unflatten(treedef, leaves_now))

    if not leaves:
        return leaves, np.zeros(0), np.zeros(0), [], tree_fn
    return leaves, np.concatenate(xs), np.concatenate(scales), actives, tree_fn
