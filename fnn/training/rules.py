"""Params sharded by a rule table of path patterns.

A rule table maps params path patterns to ``jax.sharding.PartitionSpec``s over
the mesh's named axes::

    {"*/w": P("data", "tp"), "*/b": P("tp")}

A params path is the leaf's dict keys joined by ``/`` (``['0_dense']['w']`` is
``0_dense/w``), and a pattern is an ``fnmatch`` pattern matched against the
whole path (``*`` matches any characters, ``/`` included). A path that no rule
matches is replicated; a path that several rules match is an error unless they
give it the same spec; a rule that matches no path is an error (a misspelt
pattern would otherwise replicate silently). The optimizer state follows its
params (``optax.tree_utils.tree_map_params``), and everything else in a train
state (the step, the key, the model's running state) is replicated.

:func:`state_shardings` turns a table into the ``NamedSharding`` of every leaf
of a train state; :func:`sharding_table` prints what a state holds per device.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fnn.training.train_state import TrainState

Rules = Mapping[str, P]


def path_name(path: tuple) -> str:
    """A params path as its keys joined by ``/``, e.g. ``0_dense/w``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _axes(entry: Any) -> tuple:
    """The mesh axes of one spec entry: ``None``, a name, or a tuple of names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check_rules(owner: str, rules: Any, mesh: Mesh | None) -> dict[str, P]:
    """Checks a rule table against ``mesh``, before any params are seen.

    Raises:
      TypeError: for a table that is not a mapping of ``str`` patterns to
        ``PartitionSpec``s.
      ValueError: without a mesh, or for a spec that names an axis the mesh
        lacks, or one axis twice.
    """
    if mesh is None:
        raise ValueError(
            f"{owner}: param_rules place the params on a mesh; pass mesh= too, "
            f"e.g. jax.make_mesh((jax.device_count(),), ('data',))."
        )
    if not isinstance(rules, Mapping):
        raise TypeError(
            f"{owner}: expected param_rules to be a dict of params path patterns "
            f"to PartitionSpecs, e.g. {{'*/w': P('data')}}, got {rules!r}."
        )
    for pattern, spec in rules.items():
        if not isinstance(pattern, str) or not isinstance(spec, P):
            raise TypeError(
                f"{owner}: param_rules maps str patterns to "
                f"jax.sharding.PartitionSpec, got {pattern!r}: {spec!r}."
            )
        axes = []
        for entry in spec:
            if not all(isinstance(a, str) for a in _axes(entry)):
                raise TypeError(
                    f"{owner}: rule {pattern!r}: {spec_text(spec)} has the entry "
                    f"{entry!r}; an entry is None, a mesh axis name or a tuple "
                    f"of them."
                )
            axes += _axes(entry)
        for axis in axes:
            if axis not in mesh.axis_names:
                raise ValueError(
                    f"{owner}: rule {pattern!r}: {spec_text(spec)} names the axis "
                    f"{axis!r}, but the mesh has the axes {mesh.axis_names!r}."
                )
        if len(set(axes)) < len(axes):
            raise ValueError(
                f"{owner}: rule {pattern!r}: {spec_text(spec)} uses a mesh axis "
                f"twice; an array is split over each axis at most once."
            )
    return dict(rules)


def spec_text(spec: P) -> str:
    """A spec as ``P('data', None)``, the same on every supported JAX.

    (``str(PartitionSpec(...))`` changed between JAX releases.)

    >>> spec_text(P(None, ("data", "tp")))
    "P(None, ('data', 'tp'))"
    >>> spec_text(P("data"))
    "P('data',)"
    """
    entries = [repr(e) for e in spec]
    return f"P({', '.join(entries)}{',' if len(entries) == 1 else ''})"


def _normal(spec: P, ndim: int) -> tuple:
    entries = [_axes(e) for e in spec]
    return tuple(entries + [()] * (ndim - len(entries)))


def _spec_for(owner: str, name: str, shape: tuple, rules: dict, mesh: Mesh) -> P:
    """The spec of the params leaf at ``name``: the one its rules agree on."""
    hits = [pattern for pattern in rules if fnmatch.fnmatchcase(name, pattern)]
    if not hits:
        return P()
    for pattern in hits:
        spec = rules[pattern]
        if len(spec) > len(shape):
            raise ValueError(
                f"{owner}: rule {pattern!r} gives params path {name!r} the spec "
                f"{spec_text(spec)} with {len(spec)} entries, but its shape "
                f"{shape!r} has rank {len(shape)}; drop the extra entries."
            )
    if len({_normal(rules[p], len(shape)) for p in hits}) > 1:
        listing = ", ".join(f"{p!r}: {spec_text(rules[p])}" for p in hits)
        raise ValueError(
            f"{owner}: params path {name!r} is matched by rules with different "
            f"specs ({listing}); make the patterns match it once, or give them "
            f"the same spec."
        )
    pattern, spec = hits[0], rules[hits[0]]
    for dim, entry in enumerate(spec):
        axes = _axes(entry)
        size = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % size:
            where = f"axis {axes[0]!r}" if len(axes) == 1 else f"axes {axes!r}"
            raise ValueError(
                f"{owner}: params path {name!r} of shape {shape!r} has dimension "
                f"{dim} of size {shape[dim]}, which does not divide over mesh "
                f"{where} of size {size} (rule {pattern!r}: {spec_text(spec)}); "
                f"change the rule or make that dimension a multiple of {size}."
            )
    return spec


def param_specs(owner: str, params: Any, rules: dict[str, P], mesh: Mesh) -> Any:
    """The ``PartitionSpec`` of every params leaf under ``rules`` (a params tree).

    Raises:
      ValueError: for a path matched by rules with different specs, a spec
        with more entries than its array's rank, a dimension that does not
        divide over its mesh axes (naming the path, the dimension and the axis
        size), or a rule that matches no path.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [path_name(path) for path, _ in leaves]
    specs = [
        _spec_for(owner, name, tuple(np.shape(leaf)), rules, mesh)
        for name, (_, leaf) in zip(names, leaves)
    ]
    for pattern in rules:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(
                f"{owner}: the rule {pattern!r} matches no params path; the paths "
                f"are {names[:4]!r}{' ...' if len(names) > 4 else ''} (dict keys "
                f"joined by '/', matched with fnmatch)."
            )
    return jax.tree_util.tree_unflatten(treedef, specs)


def opt_state_specs(
    optimizer: optax.GradientTransformation, opt_state: Any, params: Any, specs: Any
) -> Any:
    """Specs of ``opt_state``: every params-shaped part follows its params.

    ``optax.tree_utils.tree_map_params`` finds the parts of the state that
    mirror the params (Adam's ``mu`` and ``nu``, momentum traces); their
    leaves get the spec of their params leaf when they have its shape (and
    are replicated otherwise, like Adafactor's factored statistics). All
    other leaves (counts, hyperparameters) are replicated.
    """

    def follow(leaf: Any, param: Any, spec: P) -> P:
        return spec if np.shape(leaf) == np.shape(param) else P()

    return optax.tree_utils.tree_map_params(
        optimizer,
        follow,
        opt_state,
        params,
        specs,
        transform_non_params=lambda _: P(),
    )


def state_shardings(
    owner: str,
    ts: TrainState,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: dict[str, P] | None,
) -> TrainState:
    """The ``NamedSharding`` of every leaf of ``ts`` (real or abstract).

    Params follow ``rules`` (all replicated for ``None``), the optimizer state
    follows its params, and the step, the model's running state and the key
    are replicated.
    """
    replicated = NamedSharding(mesh, P())
    if rules is None:
        return jax.tree.map(lambda _: replicated, ts)
    specs = param_specs(owner, ts.params, rules, mesh)
    opt_specs = opt_state_specs(optimizer, ts.opt_state, ts.params, specs)

    def named(spec: P) -> NamedSharding:
        return NamedSharding(mesh, spec)

    return TrainState(
        replicated,
        jax.tree.map(named, specs),
        jax.tree.map(named, opt_specs),
        jax.tree.map(lambda _: replicated, ts.state),
        replicated,
    )


def _bytes(leaf: Any) -> tuple[int, int]:
    """``(bytes per device, bytes in all)`` of an array or abstract array."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, leaf)  # keys are replicated
        size = math.prod(data.shape) * np.dtype(data.dtype).itemsize
        return size, size
    sharding = getattr(leaf, "sharding", None)
    shard = leaf.shape if sharding is None else sharding.shard_shape(leaf.shape)
    itemsize = np.dtype(leaf.dtype).itemsize
    return math.prod(shard) * itemsize, math.prod(leaf.shape) * itemsize


def _spec_name(leaf: Any) -> str:
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return spec_text(sharding.spec)
    return "-" if sharding is None else "one device"


def sharding_table(ts: TrainState, rules: dict[str, P] | None) -> str:
    """A table of the params' shardings and a train state's bytes per device.

    One row per params leaf (path, shape, dtype, the rules that match it, the
    spec it has, its bytes per device and replicated), then the totals of the
    params, the optimizer state, the rest (step, running state, key) and the
    whole state. The specs and sizes are read from the leaves' own shardings,
    so the table says where ``ts`` really is.
    """
    rows = [("path", "shape", "dtype", "rule", "spec", "bytes/device", "replicated")]
    for path, leaf in jax.tree_util.tree_leaves_with_path(ts.params):
        name = path_name(path)
        hits = [p for p in rules or () if fnmatch.fnmatchcase(name, p)]
        per_device, total = _bytes(leaf)
        rows.append(
            (
                name,
                str(tuple(leaf.shape)),
                str(leaf.dtype),
                ", ".join(hits) or "-",
                _spec_name(leaf),
                f"{per_device:,}",
                f"{total:,}",
            )
        )
    parts = {
        "params": ts.params,
        "opt_state": ts.opt_state,
        "step, state, key": (ts.step, ts.state, ts.key),
    }
    sums = {
        name: np.sum([_bytes(x) for x in jax.tree.leaves(part)] or [[0, 0]], axis=0)
        for name, part in parts.items()
    }
    sums["train state"] = np.sum(list(sums.values()), axis=0)
    for name, (per_device, total) in sums.items():
        rows.append((f"total {name}", "", "", "", "", f"{per_device:,}", f"{total:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(7)]
    lines = [
        "  ".join(
            c.rjust(w) if i >= 5 else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    ]
    return "\n".join(lines)
