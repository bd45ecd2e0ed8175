"""Placing a train state and batches on a mesh, with ``jax.sharding``.

A training step built with a ``jax.sharding.Mesh`` (``make_train_step(...,
mesh=mesh)``) splits every batch along its leading axis over the mesh's data
axis and keeps the params and optimizer state replicated. This module puts
arrays where the step wants them, in one process or many: with many processes
each one passes its own rows of the global batch, and
``jax.make_array_from_process_local_data`` assembles the global array.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def data_axis(owner: str, mesh: Any, axis: str | None) -> str:
    """The mesh axis the batch is split over: ``axis``, or the only axis.

    Raises:
      ValueError: for something that is not a ``Mesh``, or an axis it lacks.
    """
    if not isinstance(mesh, Mesh):
        raise ValueError(
            f"{owner}: expected mesh to be a jax.sharding.Mesh, e.g. "
            f"jax.make_mesh((jax.device_count(),), ('data',)), got {mesh!r}."
        )
    if axis is None:
        if len(mesh.axis_names) == 1:
            return mesh.axis_names[0]
        axis = "data"
    if axis not in mesh.axis_names:
        raise ValueError(
            f"{owner}: the mesh has axes {mesh.axis_names!r}, not the data axis "
            f"{axis!r}; pass data_axis= one of them."
        )
    return axis


def place(tree: Any, sharding: NamedSharding, *, local_rows: int | None = None) -> Any:
    """Puts every leaf of ``tree`` on ``sharding``, from this process's data.

    In one process this is ``jax.device_put`` of a copy (a replicated
    ``device_put`` can reuse the caller's buffer, which a donating step would
    then delete under the caller). With many processes each one passes its
    own part: all of a replicated leaf, or its ``local_rows`` of the leading
    (or, for stacked batches, second) axis, and
    ``jax.make_array_from_process_local_data`` assembles the global array.
    Leaves already on ``sharding`` are kept as they are.
    """
    n = jax.process_count()

    def put(x: Any) -> Any:
        if isinstance(x, jax.core.Tracer):
            return x  # traced (e.g. under jax.eval_shape): placed by the caller
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        if n == 1:
            return jax.device_put(jnp.array(x, copy=True), sharding)
        x = np.asarray(x)
        shape = list(x.shape)
        if local_rows is not None:
            dim = _batch_dim(sharding)
            shape[dim] *= n
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

    return jax.tree.map(put, tree)


def _batch_dim(sharding: NamedSharding) -> int:
    return next(i for i, s in enumerate(sharding.spec) if s is not None)


def batch_sharding(mesh: Mesh, axis: str, *, stacked: bool = False) -> NamedSharding:
    """The sharding of a batch: its batch axis (axis 1 if stacked) over ``axis``."""
    return NamedSharding(mesh, P(None, axis) if stacked else P(axis))


def shard_batch(
    owner: str, batch: Any, mesh: Mesh, axis: str, *, stacked: bool = False
) -> Any:
    """Splits ``batch`` along its batch axis over ``axis`` of ``mesh``.

    In one process ``batch`` is the global batch; with many, each process
    passes its own rows, the same number in each, and the global batch is the
    processes' rows in process order.

    Raises:
      ValueError: when a leaf has no batch axis or its rows do not split
        evenly over this process's devices; the message names both sizes.
    """
    dim = 1 if stacked else 0
    local_devices = mesh.shape[axis] // jax.process_count()
    rows = None
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        shape = tuple(np.shape(leaf))
        if len(shape) <= dim or shape[dim] % max(local_devices, 1):
            raise ValueError(
                f"{owner}: batch{jax.tree_util.keystr(path)} of shape {shape!r} "
                f"does not split along axis {dim} over {local_devices} devices; "
                f"use a batch size that is a multiple of {local_devices}."
            )
        rows = shape[dim]
    sharding = batch_sharding(mesh, axis, stacked=stacked)
    return place(batch, sharding, local_rows=rows)


def psum_fused(tree: Any, axis_name: str) -> Any:
    """``lax.psum(tree, axis_name)`` as one all-reduce wherever it can be.

    XLA all-reduces leaves of different dtypes separately: a float32 weight
    next to float64 gradients costs a second all-reduce. Every leaf that
    casts exactly to the widest floating dtype in ``tree`` is summed in that
    dtype and cast back; only leaves that cannot (large integers into
    float32) get their own all-reduce.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from fnn.training.sharding import psum_fused
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> f = jax.shard_map(lambda t: psum_fused(t, "data"), mesh=mesh,
      ...                   in_specs=P(), out_specs=P(), check_vma=False)
      >>> out = f({"g": jnp.ones(2), "n": jnp.int32(3)})
      >>> out["n"].dtype, bool(out["n"] == 3 * mesh.size)
      (dtype('int32'), True)
    """
    leaves, treedef = jax.tree.flatten(tree)
    floats = [x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    if not floats:
        return jax.lax.psum(tree, axis_name)
    wide = jnp.result_type(*floats)
    safe = [np.can_cast(x.dtype, wide, "safe") for x in leaves]
    summed = jax.lax.psum(
        [x.astype(wide) if ok else x for x, ok in zip(leaves, safe)], axis_name
    )
    out = [y.astype(x.dtype) for x, y in zip(leaves, summed)]
    return jax.tree.unflatten(treedef, out)


def mean_over(n: int) -> Callable[[jax.Array], jax.Array]:
    """Divides a cross-device sum by ``n`` (floor division for integers)."""

    def mean(x: jax.Array) -> jax.Array:
        return x / n if jnp.issubdtype(x.dtype, jnp.inexact) else x // n

    return mean
