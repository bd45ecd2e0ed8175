"""The function :func:`fnn.check_grads` checks, as a hashable description.

A :class:`Target` says how to call ``f`` with new values of the checked input
leaves, which of its outputs are compared, and which derivatives of it (a VJP,
a JVP, ...) are taken. It holds no arrays: the checked leaves, the other array
leaves and the derivatives' fixed vectors are passed to :func:`flat` as
arguments. So a target can be a static argument of ``jax.jit``, and checking the
same function again at new values reuses JAX's compiled programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


class Static:
    """A non-array argument leaf, compared by value when hashable, else by identity.

    The type is part of the comparison, so ``1`` and ``1.0`` stay apart.
    """

    def __init__(self, value: Any):
        self.value = value
        try:
            self._hash = hash((type(value), value))
            self._by_value = True
        except TypeError:
            self._hash = id(value)
            self._by_value = False

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Static) or type(other.value) is not type(self.value):
            return False
        if self.value is other.value:
            return True
        if not (self._by_value and other._by_value):
            return False
        try:
            return bool(self.value == other.value)
        except Exception:  # noqa: BLE001 - an __eq__ that gives no bool: unequal
            return False


@dataclasses.dataclass(frozen=True)
class Target:
    """``f``, or a derivative of it, as a function of the checked input leaves.

    Attributes:
      f: the user's function, called as ``f.value(*args)``.
      treedef: the tree structure of ``args``.
      checked: flat positions (in ``args``' leaves) of the checked leaves.
      dynamic: flat positions of the other array leaves, passed as ``rest``.
      static: ``(position, Static)`` pairs for the remaining leaves.
      paths: the checked leaves' names for messages, e.g. ``"args[0]['w']"``.
      outputs: positions, among ``f``'s output leaves, of the compared ones.
      steps: the derivatives taken, innermost first: ``"vjp"`` or ``"jvp"``.
    """

    f: Static
    treedef: Any
    checked: tuple[int, ...]
    dynamic: tuple[int, ...]
    static: tuple[tuple[int, Static], ...]
    paths: tuple[str, ...]
    outputs: tuple[int, ...] = ()
    steps: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``"f"``, ``"vjp(f)"``, ``"jvp(vjp(f))"``, ..."""
        label = "f"
        for step in self.steps:
            label = f"{step}({label})"
        return label


def call(target: Target, xs: tuple, rest: tuple) -> Any:
    """``f``'s full output at the checked leaves ``xs`` and other leaves ``rest``."""
    leaves: list[Any] = [None] * target.treedef.num_leaves
    for pos, x in zip(target.checked, xs):
        leaves[pos] = x
    for pos, x in zip(target.dynamic, rest):
        leaves[pos] = x
    for pos, s in target.static:
        leaves[pos] = s.value
    return target.f.value(*jax.tree_util.tree_unflatten(target.treedef, leaves))


def flat(target: Target, xs: tuple, rest: tuple, vecs: tuple) -> jax.Array:
    """The target's compared outputs at ``xs``, as one float64 vector.

    ``vecs[k]`` is the fixed vector of ``target.steps[k]``: an output cotangent
    (a flat vector) for ``"vjp"``, a tuple of input tangents for ``"jvp"``.
    """

    def fn(v):
        outs = jax.tree.leaves(call(target, v, rest))
        return jnp.concatenate([jnp.ravel(outs[j]) for j in target.outputs])

    label = "f"
    for step, vec in zip(target.steps, vecs):
        fn = _vjp(fn, vec, label, target.paths) if step == "vjp" else _jvp(fn, vec)
        label = f"{step}({label})"
    return fn(xs)


def _vjp(fn: Callable, cotangent: jax.Array, label: str, paths: tuple) -> Callable:
    def grad_fn(v):
        cts = jax.vjp(fn, v)[1](cotangent)[0]
        for path, ct in zip(paths, cts):
            if ct.dtype != jnp.float64:
                raise ValueError(
                    f"the VJP of {label} returned {ct.dtype} cotangents for the "
                    f"float64 input {path}, so it cannot be checked in float64; "
                    f"return cotangents in the input's dtype."
                )
        return jnp.concatenate([jnp.ravel(ct) for ct in cts])

    return grad_fn


def _jvp(fn: Callable, tangents: tuple) -> Callable:
    def jvp_fn(v):
        return jax.jvp(fn, (v,), (tangents,))[1]

    return jvp_fn


def output_layout(target: Target, out_info: Any) -> tuple:
    """``(layout, outputs)`` of ``f``'s output structure ``out_info``.

    ``layout`` holds ``(name, shape)`` of each compared output leaf, ``outputs``
    their positions among the output leaves; integer outputs are left out.

    Raises:
      ValueError: if a float output is not float64 (``f`` casts to lower
        precision), or there is no float output with elements.
    """
    layout, outputs = [], []
    flat_out = jax.tree_util.tree_flatten_with_path(out_info)[0]
    for j, (path, y) in enumerate(flat_out):
        name = "out" + jax.tree_util.keystr(path)
        if not jnp.issubdtype(y.dtype, jnp.inexact):
            continue
        if y.dtype != jnp.float64:
            raise ValueError(
                f"{target.label} returned {y.dtype} at {name} when called with "
                f"float64 inputs, so it cannot be checked in float64; remove casts "
                f"to lower precision (such as .astype(jnp.float32)) or cast to the "
                f"input's dtype instead."
            )
        if y.size:
            layout.append((name, tuple(y.shape)))
            outputs.append(j)
    if not outputs:
        raise ValueError(
            f"{target.label} has no floating-point output elements to differentiate."
        )
    return tuple(layout), tuple(outputs)
