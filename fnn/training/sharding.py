"""A training step on a mesh, with ``jax.sharding``.

A training step built with a ``jax.sharding.Mesh`` (``make_train_step(...,
mesh=mesh)``) splits every batch along its leading axis over the mesh's data
axis. This module puts arrays where the step wants them, in one process or
many (with many processes each one passes its own rows of the global batch,
and ``jax.make_array_from_process_local_data`` assembles the global array),
and computes the step's gradient sums in one of two ways:

* :func:`data_parallel_sums` for replicated params (no ``param_rules``):
  ``jax.shard_map`` over the data axis, each device accumulating over its own
  rows, ONE ``psum`` after the scan;
* :func:`partitioned_sums` for params placed by ``param_rules``
  (:mod:`fnn.training.rules`): the global program under ``jax.jit``, with the
  params and batch constrained to their shardings and the collectives left to
  the compiler's partitioner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fnn.training.accumulate import GradSums, LossFn, accumulate_gradients, leading_size
from fnn.training.rules import state_shardings
from fnn.training.train_state import TrainState


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


def auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis ``Auto``: the compiler places what is not given.

    ``jax.make_mesh`` makes ``Explicit`` axes, under which every operation of
    the model would need its output sharding spelt out; the step's own
    placements (the params' rules, the batch's data axis) are constraints, and
    the partitioner propagates them through the model.
    """
    return mesh.update(axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def place(tree: Any, shardings: Any, *, local_rows: int | None = None) -> Any:
    """Puts every leaf of ``tree`` on its sharding, from this process's data.

    ``shardings`` is one ``NamedSharding`` for every leaf, or a tree of them
    shaped like ``tree``. In one process this is ``jax.device_put`` of a copy
    (a replicated ``device_put`` can reuse the caller's buffer, which a
    donating step would then delete under the caller). With many processes
    each one passes all of a params leaf (``jax.make_array_from_callback``
    takes each device's part of it), or its ``local_rows`` of the leading
    (or, for stacked batches, second) axis of a batch leaf
    (``jax.make_array_from_process_local_data`` assembles the global array).
    Leaves already on their sharding are kept as they are.
    """
    n = jax.process_count()

    def put(x: Any, sharding: NamedSharding) -> Any:
        if isinstance(x, jax.core.Tracer):
            return x  # traced (e.g. under jax.eval_shape): placed by the caller
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            data = put(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        if n == 1:
            return jax.device_put(jnp.array(x, copy=True), sharding)
        x = np.asarray(x)
        if local_rows is None:
            return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])
        shape = list(x.shape)
        shape[_batch_dim(sharding)] *= n
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put(x, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def init_state(
    optimizer: Any, mesh: Mesh, table: Any, params: Any, key: Any, state: Any
) -> TrainState:
    """``step.init`` on a mesh: the train state placed by the rule ``table``.

    The params, running state and key are copied onto their shardings, and
    the optimizer state is made in place by a compiled function whose output
    is constrained to the state's shardings, as the step's is: the state that
    ``init`` returns has the very shardings the compiled step returns, so the
    step compiles once. An FSDP state is never whole on one device. Abstract
    params give the abstract state, each leaf a ``jax.ShapeDtypeStruct`` with
    the sharding that compiled function gives it.
    """

    def new_state(params: Any, key: Any, state: Any) -> TrainState:
        count = jnp.zeros((), jnp.int32)
        return TrainState(count, params, optimizer.init(params), state, key)

    shapes = jax.eval_shape(new_state, params, key, state)
    where = state_shardings("step.init", shapes, optimizer, mesh, table)
    make = jax.jit(
        lambda *args: jax.lax.with_sharding_constraint(new_state(*args), where)
    )
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
        compiled = make.lower(params, key, state).compile()
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            shapes,
            compiled.output_shardings,
        )
    params, state, key = place(
        (params, state, key), (where.params, where.state, where.key)
    )
    return make(params, key, state)


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


def _check_split(b: int, n: int, k: int) -> None:
    if b % (n * k):
        raise ValueError(
            f"train step: a batch of {b} examples does not split over {n} "
            f"devices x accum_steps={k}; use a batch size that is a multiple "
            f"of {n * k}."
        )


def data_parallel_sums(
    loss_fn: LossFn, mesh: Mesh, axis: str, k: int, has_state: bool
) -> Callable:
    """Gradient sums of the whole global batch with one all-reduce.

    Each device runs :func:`accumulate_gradients` over its own rows inside
    ``jax.shard_map``, then ONE ``psum`` after the scan adds gradient sums,
    weights, loss and metric sums (and the running state, averaged). Device
    ``d`` draws its randomness from ``fold_in(step key, d)``.
    """
    n = mesh.shape[axis]

    def local_sums(params, state, batch, key, loss_scale):
        key = jax.random.fold_in(key, jax.lax.axis_index(axis))
        sums = accumulate_gradients(
            loss_fn,
            params,
            state,
            batch,
            key,
            accum_steps=k,
            has_state=has_state,
            loss_scale=loss_scale,
        )
        sums = psum_fused(sums, axis)
        return sums._replace(state=jax.tree.map(mean_over(n), sums.state))

    # Unchecked on purpose: with replication checking on, the gradient of the
    # replicated params is made replicated by an all-reduce per microbatch
    # inside the scan; here each device differentiates its own rows' loss and
    # the psum above adds the results once.
    sharded = jax.shard_map(
        local_sums,
        mesh=mesh,
        in_specs=(P(), P(), P(axis), P(), P()),
        out_specs=P(),
        check_vma=False,
    )

    def sums_fn(params, state, batch, key, loss_scale=None) -> GradSums:
        _check_split(leading_size(batch), n, k)
        return sharded(params, state, batch, key, loss_scale)

    return sums_fn


def partitioned_sums(
    loss_fn: LossFn, mesh: Mesh, axis: str, k: int, has_state: bool
) -> Callable:
    """Gradient sums of the global batch for params placed by rules.

    The step is one global program: :func:`accumulate_gradients` runs on the
    whole batch, split over ``axis``, and the loss sees the params constrained
    to their shardings (``jax.lax.with_sharding_constraint``). The gradient of
    a constraint is the same constraint, so each microbatch's gradient, and the
    accumulator it is added to, carry the params' sharding: the partitioner
    gathers sharded params where the model uses them and reduces each
    microbatch's gradient onto its shards. The key is the step's, for the
    global batch, as on one device.
    """
    n = mesh.shape[axis]
    rows = NamedSharding(mesh, P(axis))

    def sums_fn(
        params, state, batch, key, param_shardings, loss_scale=None
    ) -> GradSums:
        _check_split(leading_size(batch), n, k)

        def constrained(p, *args):
            *head, mb, mb_key = args
            p = jax.lax.with_sharding_constraint(p, param_shardings)
            mb = jax.lax.with_sharding_constraint(mb, rows)
            return loss_fn(p, *head, mb, mb_key)

        batch = jax.lax.with_sharding_constraint(batch, rows)
        return accumulate_gradients(
            constrained,
            params,
            state,
            batch,
            key,
            accum_steps=k,
            has_state=has_state,
            loss_scale=loss_scale,
        )

    return sums_fn
