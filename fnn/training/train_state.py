"""The train state: step, params, optimizer state, model state and key, in few buffers.

A jitted call pays for every array that goes in and comes out: on a 2-core CPU
each leaf of the arguments and results costs a few microseconds of dispatch
(``benchmarks/overhead.py``), which on a small model is more than the step's
arithmetic. Adam keeps three arrays per parameter, so a three-layer MLP's
train state is 21 arrays, and every step passes all of them twice.

:class:`TrainState` therefore *packs* its small leaves: every leaf with at most
``pack_max_size`` elements (default :data:`PACK_MAX_SIZE`) goes, flattened, into
one buffer per dtype; larger leaves stay separate arrays, since slicing them
out of a buffer inside the step would copy them. The packing is invisible to
code that reads the attributes: ``ts.params`` is the params pytree, inside
``jit`` as outside (outside, the first read unpacks with one compiled call and
keeps the result). What changes is what ``jax.tree.leaves(ts)`` sees: the
packed buffers and the large leaves, which is what ``jit``, donation,
``device_put`` and sharding act on. :class:`fnn.Checkpointer` stores the
unpacked fields (:attr:`TrainState.fields`), so a checkpoint names every leaf
by its path and does not depend on the packing.

On the tiny MLP of ``benchmarks/steps.py`` the packed state makes
:func:`fnn.make_train_step` faster than the hand-written step, whose 19 leaves
are unpacked; ``pack_max_size=0`` turns packing off.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["PACK_MAX_SIZE", "TrainState", "TrainStateFields", "scan_train_state"]

PACK_MAX_SIZE = 4096
"""Leaves with at most this many elements are packed (16 KiB of float32)."""


class TrainStateFields(NamedTuple):
    """The fields of a :class:`TrainState` as a plain pytree (nothing packed).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fnn
      >>> ts = fnn.TrainState.create({"w": jnp.ones(2)}, optax.sgd(0.1),
      ...                            key=jax.random.key(0))
      >>> ts.fields._fields
      ('step', 'params', 'opt_state', 'state', 'key')
      >>> len(jax.tree.leaves(ts.fields._replace(key=None)))  # step, w
      2
    """

    step: Any
    params: Any
    opt_state: Any
    state: Any
    key: Any


class _Layout:
    """Where each leaf of the fields lives: the pytree's aux data (hashable)."""

    __slots__ = ("treedef", "slots", "names", "key_impl", "pack_max_size", "_hash")

    def __init__(self, treedef, slots, names, key_impl, pack_max_size):
        self.treedef = treedef  # of TrainStateFields, key as raw key data
        self.slots = slots  # per leaf: (child, offset or -1 if whole, shape, dtype)
        self.names = names  # per child: its name in key paths
        self.key_impl = key_impl
        self.pack_max_size = pack_max_size
        self._hash = hash((treedef, slots, names, key_impl, pack_max_size))

    def _astuple(self):
        return (self.treedef, self.slots, self.names, self.key_impl, self.pack_max_size)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, _Layout) or self._hash != other._hash:
            return False
        return self._astuple() == other._astuple()


_LAYOUTS: dict[_Layout, _Layout] = {}


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _layout(fields: TrainStateFields, pack_max_size: int) -> tuple[_Layout, list]:
    """The layout of ``fields`` (key as raw data) and its leaves as arrays."""
    key_impl = None
    if fields.key is not None:
        key_impl = str(jax.random.key_impl(fields.key))
        fields = fields._replace(key=jax.random.key_data(fields.key))
    with_path, treedef = jax.tree_util.tree_flatten_with_path(fields)
    leaves = [x if hasattr(x, "dtype") else jnp.asarray(x) for _, x in with_path]
    groups: dict[str, list[int]] = {}
    for i, x in enumerate(leaves):
        small = pack_max_size > 0 and math.prod(x.shape) <= pack_max_size
        if small and not _is_key(x):
            groups.setdefault(str(np.dtype(x.dtype)), []).append(i)
    slots: list[Any] = [None] * len(leaves)
    names = []
    for dtype in sorted(groups):
        if len(groups[dtype]) < 2:  # nothing to gain: keep it whole
            continue
        offset = 0
        for i in groups[dtype]:
            slots[i] = (len(names), offset, tuple(leaves[i].shape), dtype)
            offset += math.prod(leaves[i].shape)
        names.append(f"packed_{dtype}")
    for i, (path, x) in enumerate(with_path):
        if slots[i] is None:
            slots[i] = (len(names), -1, tuple(x.shape), str(x.dtype))
            names.append(jax.tree_util.keystr(path)[1:])  # drop the leading "."
    layout = _Layout(treedef, tuple(slots), tuple(names), key_impl, pack_max_size)
    # One object per distinct layout: jit compares the aux data of its
    # arguments with the cached ones on every call, and identity is cheapest.
    return _LAYOUTS.setdefault(layout, layout), leaves


def _pack(layout: _Layout, leaves: list) -> list:
    """The children (packed buffers and whole leaves) of ``leaves``."""
    parts: list[list] = [[] for _ in layout.names]
    for (child, offset, _, _), x in zip(layout.slots, leaves):
        parts[child].append(jnp.ravel(x) if offset >= 0 else x)
    return [p[0] if len(p) == 1 else jnp.concatenate(p) for p in parts]


def _unpack(layout: _Layout, children: list) -> list:
    """The leaves of the fields, sliced out of ``children``."""
    leaves = []
    for child, offset, shape, _ in layout.slots:
        x = children[child]
        if offset >= 0:
            x = x[offset : offset + math.prod(shape)].reshape(shape)
        leaves.append(x)
    return leaves


def _fields_of(layout: _Layout, children: list) -> TrainStateFields:
    """The fields, unpacked from ``children``, the key wrapped again."""
    fields = jax.tree.unflatten(layout.treedef, _unpack(layout, children))
    if layout.key_impl is not None:
        key = jax.random.wrap_key_data(fields.key, impl=layout.key_impl)
        fields = fields._replace(key=key)
    return fields


def _traced(xs: list) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


_pack_jit = jax.jit(_pack, static_argnums=0)
_fields_jit = jax.jit(_fields_of, static_argnums=0)


class TrainState:
    """Everything a training step reads and writes, as one pytree.

    Attributes:
      step: int32 scalar array, the number of steps taken.
      params: the model's params (nested dicts of arrays).
      opt_state: the optax optimizer's state.
      state: the model's running state (BatchNorm statistics); ``{}`` when the
        model has none.
      key: a ``jax.random.key``, fixed; step ``t`` uses
        ``jax.random.fold_in(key, t)`` (:func:`fnn.step_key`).
      fields: all five as a :class:`TrainStateFields` named tuple.

    Its leaves, as ``jit`` sees them, are few: leaves with at most
    ``pack_max_size`` elements are packed into one buffer per dtype (see the
    module's documentation). Build it with :meth:`create`, change it with
    :meth:`replace`; it is immutable.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fnn
      >>> params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
      >>> ts = fnn.TrainState.create(params, optax.adam(0.1), key=jax.random.key(0))
      >>> int(ts.step), ts.state, ts.params["w"].shape
      (0, {}, (3,))
      >>> [leaf.shape for leaf in jax.tree.leaves(ts)]  # floats, ints, key
      [(12,), (2,), (2,)]
      >>> ts.replace(step=jnp.asarray(5, jnp.int32)).step
      Array(5, dtype=int32)
    """

    __slots__ = ("_children", "_layout", "_fields")

    def __init__(
        self,
        step: Any,
        params: Any,
        opt_state: Any,
        state: Any = None,
        key: Any = None,
        *,
        pack_max_size: int = PACK_MAX_SIZE,
    ):
        if key is not None and not _is_key(key):
            key = jax.random.wrap_key_data(key)
        step = step if hasattr(step, "dtype") else jnp.asarray(step, jnp.int32)
        fields = TrainStateFields(
            step, params, opt_state, {} if state is None else state, key
        )
        layout, leaves = _layout(fields, pack_max_size)
        self._children = (_pack if _traced(leaves) else _pack_jit)(layout, leaves)
        self._layout = layout
        self._fields = fields

    @classmethod
    def create(
        cls,
        params: Any,
        optimizer: optax.GradientTransformation,
        *,
        key: jax.Array,
        state: Any = None,
        pack_max_size: int = PACK_MAX_SIZE,
    ) -> TrainState:
        """A train state at step 0.

        Args:
          params: the model's params.
          optimizer: any optax ``GradientTransformation``; its state is
            ``optimizer.init(params)``.
          key: a ``jax.random.key`` (a typed key; a raw ``PRNGKey`` is converted).
          state: the model's running state, or ``None`` for ``{}``.
          pack_max_size: leaves with at most this many elements are packed
            into one buffer per dtype; 0 packs nothing.

        Returns:
          The :class:`TrainState`. Small leaves are copied into the packed
          buffers and the key is copied; large leaves are held as they are,
          and a donating step frees them: pass ``jax.tree.map(jnp.copy,
          params)`` to keep using the originals.

        Examples:
          >>> import jax, jax.numpy as jnp, optax, fnn
          >>> ts = fnn.TrainState.create(
          ...     {"w": jnp.ones(2)}, optax.adam(1e-3), key=jax.random.key(1)
          ... )
          >>> ts.step.dtype
          dtype('int32')
        """
        # A copy: a donating step frees the state's buffers, and the caller's
        # key should outlive the state built from it.
        return cls(
            jnp.zeros((), jnp.int32),
            params,
            optimizer.init(params),
            state,
            jnp.copy(key),
            pack_max_size=pack_max_size,
        )

    @property
    def fields(self) -> TrainStateFields:
        """All five fields, unpacked (read once, then kept).

        Examples:
          >>> import jax, jax.numpy as jnp, optax, fnn
          >>> ts = fnn.TrainState.create({"w": jnp.ones(2)}, optax.sgd(0.1),
          ...                            key=jax.random.key(0))
          >>> out = jax.jit(lambda t: t)(ts)  # packed buffers only
          >>> out.fields.params["w"]
          Array([1., 1.], dtype=float32)
        """
        if self._fields is None:
            children = list(self._children)
            if _traced(children):
                self._fields = _fields_of(self._layout, children)
            elif all(isinstance(c, jax.Array | np.ndarray) for c in children):
                self._fields = _fields_jit(self._layout, children)
            else:  # abstract, e.g. from jax.eval_shape: shapes and dtypes only
                self._fields = jax.eval_shape(
                    lambda c: _fields_of(self._layout, c), children
                )
        return self._fields

    step = property(lambda self: self.fields.step)
    params = property(lambda self: self.fields.params)
    opt_state = property(lambda self: self.fields.opt_state)
    state = property(lambda self: self.fields.state)
    key = property(lambda self: self.fields.key)

    def replace(self, **changes: Any) -> TrainState:
        """A new train state with the named fields replaced.

        Examples:
          >>> import jax, jax.numpy as jnp, optax, fnn
          >>> ts = fnn.TrainState.create({"w": jnp.ones(2)}, optax.sgd(0.1),
          ...                            key=jax.random.key(0))
          >>> ts.replace(params={"w": jnp.zeros(2)}).params["w"]
          Array([0., 0.], dtype=float32)
        """
        unknown = set(changes) - set(TrainStateFields._fields)
        if unknown:
            raise TypeError(
                f"TrainState.replace: unknown fields {sorted(unknown)}; the fields "
                f"are {list(TrainStateFields._fields)}."
            )
        fields = self.fields._replace(**changes)
        return TrainState(*fields, pack_max_size=self._layout.pack_max_size)

    _replace = replace  # the name a NamedTuple gives it

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{name}: {len(jax.tree.leaves(getattr(self, name)))} leaves"
            for name in ("params", "opt_state", "state")
        )
        return f"TrainState(step={self.step}, {sizes}, buffers={len(self._children)})"


def scan_train_state(
    one_step: Callable[[Any, Any], tuple[Any, Any]],
    ts: Any,
    batches: Any,
) -> tuple[Any, Any]:
    """``lax.scan(one_step, ts, batches)``, carrying the unpacked fields.

    Packing pays at the boundary of a call; between the steps of one scan the
    carry stays unpacked, so no step slices or concatenates buffers. A ``ts``
    that is not a :class:`TrainState` is scanned as it is.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fnn
      >>> from fnn.training.train_state import scan_train_state
      >>> ts = fnn.TrainState.create({"w": jnp.ones(2)}, optax.sgd(1.0),
      ...                            key=jax.random.key(0))
      >>> def one_step(ts, x):
      ...     return ts.replace(step=ts.step + 1, params={"w": ts.params["w"] * x}), x
      >>> ts, xs = scan_train_state(one_step, ts, jnp.arange(1.0, 4.0))
      >>> int(ts.step), ts.params["w"]
      (3, Array([6., 6.], dtype=float32))
    """

    if not isinstance(ts, TrainState):
        return jax.lax.scan(one_step, ts, batches)

    def body(fields: TrainStateFields, batch: Any) -> tuple[TrainStateFields, Any]:
        new_ts, out = one_step(ts.replace(**fields._asdict()), batch)
        return new_ts.fields, out

    fields, out = jax.lax.scan(body, ts.fields, batches)
    return ts.replace(**fields._asdict()), out


def _flatten_with_keys(ts: TrainState):
    keys = [jax.tree_util.GetAttrKey(name) for name in ts._layout.names]
    return list(zip(keys, ts._children)), ts._layout


def _flatten(ts: TrainState):
    return ts._children, ts._layout


def _unflatten(layout: _Layout, children) -> TrainState:
    ts = object.__new__(TrainState)
    ts._children = list(children)
    ts._layout = layout
    ts._fields = None
    return ts


jax.tree_util.register_pytree_with_keys(
    TrainState, _flatten_with_keys, _unflatten, _flatten
)
