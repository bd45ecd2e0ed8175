"""Comparisons behind the contract checks, as plain functions.

Each returns a description of what differs (``None`` when nothing does), for
:mod:`fnn.model.core` to turn into an error that names the layer and its place:
a params or state tree against the one ``init`` makes, the output shape ``init``
claims against the one ``apply`` returns, a PRNG key against what layers take.
They read shapes and dtypes only, so they run while tracing and cost nothing
under ``jit``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SHOWN = 3  # paths listed per kind of difference before "and N more"


def path_str(name: str, keys: tuple[Any, ...]) -> str:
    """``name`` followed by ``[k!r]`` for each key, e.g. ``params['0_dense']['w']``."""
    return name + "".join(f"[{k!r}]" for k in keys)


def _what(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))!r}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    if hasattr(value, "shape"):
        return f"an array of shape {tuple(value.shape)!r}"
    return f"a {type(value).__name__}"


def _expected(spec: Any) -> str:
    if isinstance(spec, Mapping):
        return f"a dict with keys {sorted(map(str, spec))!r}"
    if isinstance(spec, (tuple, list)):
        return f"a {type(spec).__name__} of {len(spec)}"
    if spec is None:
        return "None"
    if hasattr(spec, "shape"):
        return f"an array of shape {tuple(spec.shape)!r}"
    return f"a {type(spec).__name__}"


class TreeDiff:
    """What differs between an actual tree and the expected one, in walk order.

    Attributes:
      first: ``(keys, sentence)`` of the first leaf or node that differs (a
        shape, or a node of another kind), or ``None``.
      others: how many more leaves or nodes differ.
      missing: key paths the expected tree has and the actual one lacks.
      extra: key paths the actual tree has and the expected one lacks.
    """

    def __init__(self) -> None:
        self.first: tuple[tuple[Any, ...], str] | None = None
        self.others = 0
        self.missing: list[tuple[Any, ...]] = []
        self.extra: list[tuple[Any, ...]] = []

    def __bool__(self) -> bool:
        return bool(self.first or self.missing or self.extra)

    def describe(self, name: str, owner: str = "") -> str:
        """The differences as clauses of one sentence, paths starting ``name``.

        ``owner`` (e.g. ``" (Dense(features=4) at serial[0])"``) follows the
        first difference.
        """
        parts = []
        if self.first is not None:
            keys, sentence = self.first
            more = f", and {self.others} more differ" if self.others else ""
            parts.append(f"{path_str(name, keys)} {sentence}{owner}{more}")
        for label, paths in (("missing", self.missing), ("extra", self.extra)):
            if paths:
                shown = ", ".join(path_str(name, p) for p in paths[:SHOWN])
                more = f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
                parts.append(f"{label} {shown}{more}")
        return "; ".join(parts)


def tree_diff(expected: Any, actual: Any) -> TreeDiff:
    """Compares ``actual`` with ``expected`` (``jax.eval_shape`` leaves) by path.

    Dicts are compared by key, tuples and lists by position, leaves by shape
    only (not dtype: float64 params for a float32 network fit). Other pytree
    nodes are compared by structure.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fnn.model.compare import tree_diff
      >>> want = {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32), "b": None}
      >>> print(tree_diff(want, {"w": jnp.ones((3, 8))}).describe("params"))
      params['w'] has shape (3, 8), expected (3, 4); missing params['b']
    """
    diff = TreeDiff()
    _walk(expected, actual, (), diff)
    return diff


def _sorted(d: Mapping) -> list:
    try:
        return sorted(d)
    except TypeError:  # keys of several types
        return list(d)


def _walk(exp: Any, act: Any, keys: tuple[Any, ...], diff: TreeDiff) -> None:
    def differs(sentence: str) -> None:
        if diff.first is None:
            diff.first = (keys, sentence)
        else:
            diff.others += 1

    if isinstance(exp, Mapping):
        if not isinstance(act, Mapping):
            differs(f"is {_what(act)}, expected {_expected(exp)}")
            return
        for k in _sorted(act):  # jax's order, so jit and eager report alike
            if k in exp:
                _walk(exp[k], act[k], keys + (k,), diff)
            else:
                diff.extra.append(keys + (k,))
        diff.missing.extend(keys + (k,) for k in _sorted(exp) if k not in act)
    elif isinstance(exp, (tuple, list)) and not hasattr(exp, "_fields"):
        if not isinstance(act, (tuple, list)) or len(act) != len(exp):
            differs(f"is {_what(act)}, expected {_expected(exp)}")
            return
        for i, (e, a) in enumerate(zip(exp, act)):
            _walk(e, a, keys + (i,), diff)
    elif exp is None or not hasattr(exp, "shape"):
        e_def, a_def = jax.tree.structure(exp), jax.tree.structure(act)
        if e_def != a_def:
            differs(f"is {_what(act)}, expected {_expected(exp)}")
            return
        for e, a in zip(jax.tree.leaves(exp), jax.tree.leaves(act)):
            _walk(e, a, keys, diff)
    elif isinstance(act, (Mapping, tuple, list)) or act is None:
        differs(f"is {_what(act)}, expected {_expected(exp)}")
    else:
        try:
            shape = tuple(np.shape(act))
        except Exception:  # not an array at all
            differs(f"is {_what(act)}, expected {_expected(exp)}")
            return
        if shape != tuple(exp.shape):
            differs(f"has shape {shape!r}, expected {tuple(exp.shape)!r}")


def mismatch(name: str, diff: TreeDiff, owners: dict, x_shape: Any) -> str:
    """The sentence a params (or state) mismatch fails with, after the layer.

    ``owners`` maps key paths to the layer that owns them (``"Dense(features=4)
    at serial[0]"``); the owner of the first differing path is named.
    """
    owner = ""
    if diff.first is not None:
        keys = diff.first[0]
        for n in range(len(keys), 0, -1):
            if keys[:n] in owners:
                owner = f" ({owners[keys[:n]]})"
                break
    verb = "do" if name.endswith("s") else "does"
    return (
        f"the {name} {verb} not fit this layer for an input of shape {x_shape!r}: "
        f"{diff.describe(name, owner)}; pass the {name} its init returned."
    )


def concrete_shapes(x: Any) -> bool:
    """Whether every dimension of every array in ``x`` is a known integer (not a
    symbolic dimension of ``jax.export``)."""
    dims = [d for a in jax.tree.leaves(x) for d in np.shape(a)]
    return all(isinstance(d, int | np.integer) for d in dims)


def apply_shape(x: Any) -> Any:
    """The shape of an apply input: a tuple of shapes for a tuple of inputs, a
    dict of shapes for a dict."""
    if isinstance(x, (tuple, list)):
        return tuple(apply_shape(v) for v in x)
    if isinstance(x, Mapping):
        return {k: apply_shape(v) for k, v in x.items()}
    return tuple(int(d) for d in np.shape(x))


def input_spec(x: Any) -> Any:
    """The shape of an apply input as init takes it (see :func:`apply_shape`).

    The leading (batch) dimension of an input of rank 2 or more becomes ``-1``,
    as does an empty one, so the params are checked for any batch size.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fnn.model.compare import input_spec
      >>> input_spec((jnp.ones((5, 3)), jnp.ones(4)))
      ((-1, 3), (4,))
    """
    if isinstance(x, (tuple, list)):
        return tuple(input_spec(v) for v in x)
    if isinstance(x, Mapping):
        return {k: input_spec(v) for k, v in x.items()}
    shape = apply_shape(x)
    if len(shape) >= 2 or shape[:1] == (0,):
        shape = (-1, *shape[1:])
    return shape


def signature_of(*trees: Any) -> tuple:
    """What a check of ``trees`` depends on: their structures and leaf shapes."""
    return tuple(
        (jax.tree.structure(t), tuple(np.shape(a) for a in jax.tree.leaves(t)))
        for t in trees
    )


def probe_input(shape: Any, batch: int = 2) -> Any:
    """A float32 input of ``shape`` (or a tuple of them), ``-1`` read as ``batch``."""
    if _is_shape(shape):
        dims = tuple(batch if d == -1 else int(d) for d in shape)
        return jax.ShapeDtypeStruct(dims, np.float32)
    if isinstance(shape, (tuple, list)):
        return tuple(probe_input(s, batch) for s in shape)
    raise TypeError(f"expected a shape or a tuple of shapes, got {shape!r}.")


def shape_tree(tree: Any) -> Any:
    """The shapes of a tree of arrays, as tuples (``init``'s output convention)."""
    return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


def shapes_agree(claimed: Any, real: Any) -> bool:
    """Whether a claimed output shape (tree) matches a real one; ``-1`` matches any.

    Examples:
      >>> from fnn.model.compare import shapes_agree
      >>> shapes_agree((-1, 3), (2, 3)), shapes_agree(((-1, 3), (-1, 2)), ((2, 3),))
      (True, False)
    """
    if _is_shape(claimed) and _is_shape(real):
        return len(claimed) == len(real) and all(
            c == r or c == -1 for c, r in zip(claimed, real)
        )
    if isinstance(claimed, (tuple, list)) and isinstance(real, (tuple, list)):
        return len(claimed) == len(real) and all(map(shapes_agree, claimed, real))
    if isinstance(claimed, Mapping) and isinstance(real, Mapping):
        return claimed.keys() == real.keys() and all(
            shapes_agree(claimed[k], real[k]) for k in claimed
        )
    return False


def _is_shape(s: Any) -> bool:
    return isinstance(s, (tuple, list)) and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in s
    )


def key_problem(key: Any) -> str | None:
    """Why ``key`` cannot be a layer's PRNG key (``None`` when it can).

    A key is a ``jax.random.key`` (a typed key array of shape ``()``), or a raw
    ``jax.random.PRNGKey`` (``uint32`` data of shape ``(2,)``), which
    ``jax.random`` functions also take; ``None`` means no randomness.

    Examples:
      >>> import jax
      >>> from fnn.model.compare import key_problem
      >>> key_problem(jax.random.key(0)) is None, key_problem(0)
      (True, 'the int 0')
    """
    if key is None:
        return None
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is None or shape is None:
        return f"the {type(key).__name__} {key!r}"
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return None if tuple(shape) == () else f"a batch of keys of shape {shape!r}"
    if dtype == jnp.uint32 and tuple(shape) == (2,):
        return None
    return f"an array of dtype {dtype} and shape {tuple(shape)!r}"
