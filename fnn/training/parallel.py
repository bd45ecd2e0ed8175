"""Data parallel training over every device of every process, on ``jax.sharding``.

The params and the optimizer state are replicated on every device; the batch is
split along its first axis over a one-dimensional mesh. One training step runs,
on each device, the same strided-microbatch scan that :mod:`fnn.train` runs on
one device, over that device's shard of the batch only. The gradient sums, the
weights and the metric sums of all microbatches are then added across devices
by ONE all-reduce, outside the scan, and every device applies the same optax
update to its copy of the params::

    mesh = fnn.data_mesh()
    train_state = fnn.replicate(train_state, mesh)
    step = fnn.make_parallel_train_step(loss_fn, optax.adam(1e-3), mesh,
                                        accum_steps=4)
    for batch in batches:
        train_state, metrics = step(train_state, fnn.shard_batch(batch, mesh))

Many hosts start with :func:`fnn.initialize` (``jax.distributed.initialize``); the
same code then spans the devices of every process, and :func:`shard_batch` takes
each process's own part of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fnn.training.compiling import jit_step
from fnn.training.step import (
    Metrics,
    TrainState,
    accumulate_gradients,
    apply_gradients,
    check_step_counts,
    leading_size,
    scan_steps,
    step_key,
)


def data_mesh(
    devices: Sequence[jax.Device] | None = None, axis_name: str = "data"
) -> Mesh:
    """A one-dimensional mesh over ``devices`` for data parallelism.

    Args:
      devices: the devices, by default ``jax.devices()``: every device of every
        process, in the order JAX gives them (process by process).
      axis_name: the mesh axis the batch is split along; BatchNorm layers that
        should average statistics across devices take the same name
        (``BatchNorm(axis_name="data")``).

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(len(devices),)``.

    Raises:
      ValueError: for an empty device list or an empty axis name.

    Examples:
      >>> import fnn
      >>> mesh = fnn.data_mesh()
      >>> mesh.axis_names, mesh.size >= 1
      (('data',), True)
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("data_mesh: expected at least one device, got none.")
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(
            f"data_mesh: expected a non-empty axis name, got {axis_name!r}."
        )
    return Mesh(np.asarray(devices), (axis_name,))


def _axis(mesh: Mesh, owner: str) -> str:
    if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
        raise ValueError(
            f"{owner}: expected a one-dimensional mesh from fnn.data_mesh(), "
            f"got {mesh!r}."
        )
    return mesh.axis_names[0]


def _place(
    tree: Any,
    sharding: NamedSharding,
    global_shape: Callable[[tuple], tuple],
    *,
    copy: bool,
) -> Any:
    """Puts every leaf of ``tree`` on ``sharding``, from this process's data.

    In one process this is ``jax.device_put`` (of a copy with ``copy``: a
    replicated ``device_put`` reuses the device-0 buffer, which a donating
    step would then delete under the caller). With many processes each one
    passes its own part (all of it for a replicated leaf), and
    ``jax.make_array_from_process_local_data`` assembles the global array.
    """
    if jax.process_count() == 1:
        if copy:
            tree = jax.tree.map(lambda x: jnp.asarray(x).copy(), tree)
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if not isinstance(x, jax.Array):
            x = np.asarray(x)
        return jax.make_array_from_process_local_data(
            sharding, x, global_shape(tuple(x.shape))
        )

    return jax.tree.map(put, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A copy of ``tree`` on every device of ``mesh`` (params, optimizer state).

    Every process must pass the same values (same seed, or restored from the
    same checkpoint). The result never shares buffers with ``tree``, so a
    donating train step leaves ``tree`` usable.

    Args:
      tree: a pytree of arrays, e.g. a :class:`fnn.TrainState`.
      mesh: from :func:`data_mesh`.

    Returns:
      The same tree of global ``jax.Array`` s, sharded ``PartitionSpec()``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> mesh = fnn.data_mesh()
      >>> w = fnn.replicate({"w": jnp.ones(3)}, mesh)["w"]
      >>> w.sharding.is_fully_replicated
      True
    """
    _axis(mesh, "replicate")
    sharding = NamedSharding(mesh, P())
    return _place(tree, sharding, lambda shape: shape, copy=True)


def shard_batch(batch: Any, mesh: Mesh, *, stacked: bool = False) -> Any:
    """Splits a batch along its batch axis over the devices of ``mesh``.

    In one process ``batch`` is the global batch. With many processes each
    process passes only its own rows, the same number in every process; the
    global batch is the processes' rows in process order (built by
    ``jax.make_array_from_process_local_data``), so its batch axis is
    ``jax.process_count()`` times the local one.

    Args:
      batch: a pytree of arrays sharing the batch size, which must be a
        multiple of the number of devices (of this process's devices, with
        many processes).
      mesh: from :func:`data_mesh`.
      stacked: the leaves are stacked batches of shape ``(K, B, ...)`` for
        ``steps_per_call=K``; the batch axis is then axis 1.

    Returns:
      The same tree of global ``jax.Array`` s, sharded
      ``PartitionSpec("data")`` (``PartitionSpec(None, "data")`` if stacked).

    Raises:
      ValueError: when a leaf has no batch axis or its batch does not split
        evenly over the devices; the message names both sizes.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> mesh = fnn.data_mesh()
      >>> x = fnn.shard_batch({"x": jnp.zeros((8, 3))}, mesh)["x"]
      >>> x.shape, len(x.sharding.device_set) == mesh.size
      ((8, 3), True)
    """
    axis = _axis(mesh, "shard_batch")
    dim = 1 if stacked else 0
    processes = jax.process_count()
    local_devices = mesh.size // processes
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        shape = tuple(np.shape(leaf))
        if len(shape) <= dim or shape[dim] % local_devices:
            raise ValueError(
                f"shard_batch: batch{jax.tree_util.keystr(path)} of shape "
                f"{shape!r} does not split along axis {dim} over "
                f"{local_devices} devices; use a batch size that is a multiple "
                f"of {local_devices}."
            )
    spec = P(None, axis) if stacked else P(axis)

    def global_shape(s):
        return s[:dim] + (s[dim] * processes,) + s[dim + 1 :]

    return _place(batch, NamedSharding(mesh, spec), global_shape, copy=False)


def make_parallel_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    accum_steps: int = 1,
    has_state: bool = False,
    steps_per_call: int = 1,
    donate: bool = True,
    jit: bool = True,
    grad_norm: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
    """The data-parallel twin of :func:`fnn.make_train_step`.

    Same ``loss_fn``, same metrics, and the same update the whole global batch
    gives on one device: each device runs :func:`fnn.accumulate_gradients`
    over its own shard of the batch (``accum_steps`` strided microbatches, one
    ``lax.scan``), then ONE ``lax.psum`` after the scan adds the gradient sums,
    weights, loss and metric sums (and the running state) across devices, and
    every device applies the same optax update (:func:`fnn.apply_gradients`).
    ``make_train_step(..., mesh=mesh)`` calls this.

    Each device ``d`` draws its randomness (dropout) from
    ``fold_in(step_key, d)``, so devices do not repeat each other's masks.

    Args:
      loss_fn: as for :func:`fnn.make_train_step`.
      optimizer: an optax ``GradientTransformation``.
      mesh: a one-dimensional mesh from :func:`data_mesh`.
      accum_steps: microbatches per device per step; the global batch must be
        a multiple of ``mesh.size * accum_steps``.
      has_state: whether ``loss_fn`` takes and returns running state. The new
        state is averaged across devices in the same all-reduce (integer
        leaves, equal on every device, are kept). For BatchNorm statistics of
        the whole global batch instead of a per-device average, build the
        BatchNorm with ``axis_name=`` the mesh's axis name (``"data"``).
      steps_per_call: ``K`` optimizer steps per call over stacked batches of
        shape ``(K, B, ...)``; shard them with ``shard_batch(...,
        stacked=True)``.
      donate: donate the input train state's buffers to the output.
      jit: compile the step (``False`` returns the plain function).
      grad_norm: compute the ``grad_norm`` metric (see
        :func:`fnn.make_train_step`).

    Returns:
      ``step(train_state, batch) -> (train_state, metrics)``; pass a train
      state from :func:`replicate` and a batch from :func:`shard_batch`. The
      returned train state is replicated like the one passed in.

    Raises:
      ValueError: for a bad mesh, ``accum_steps`` or ``steps_per_call``; at
        trace time, for a batch that does not split into ``mesh.size *
        accum_steps`` (naming the sizes).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fnn
      >>> def loss_fn(params, batch, key):
      ...     err = batch["x"] @ params["w"] - batch["y"]
      ...     return jnp.sum(err**2), err.shape[0]
      >>> mesh = fnn.data_mesh()
      >>> opt = optax.sgd(0.1)
      >>> ts = fnn.TrainState.create({"w": jnp.zeros(2)}, opt, key=jax.random.key(0))
      >>> step = fnn.make_parallel_train_step(loss_fn, opt, mesh, accum_steps=2)
      >>> batch = {"x": jnp.ones((8, 2)), "y": jnp.ones(8)}
      >>> ts, metrics = step(fnn.replicate(ts, mesh), fnn.shard_batch(batch, mesh))
      >>> ts.params["w"], float(metrics["loss"])
      (Array([0.2, 0.2], dtype=float32), 1.0)
    """
    owner = "make_parallel_train_step"
    axis = _axis(mesh, owner)
    check_step_counts(owner, accum_steps, steps_per_call)
    n = mesh.size

    def local_sums(params, state, batch, key):
        key = jax.random.fold_in(key, lax.axis_index(axis))
        sums = accumulate_gradients(
            loss_fn,
            params,
            state,
            batch,
            key,
            accum_steps=accum_steps,
            has_state=has_state,
        )
        # The one all-reduce of the step: every sum and the state in one tuple.
        sums = psum_fused(sums, axis)
        return sums._replace(state=jax.tree.map(_mean(n), sums.state))

    sharded_sums = jax.shard_map(
        local_sums,
        mesh=mesh,
        in_specs=(P(), P(), P(axis), P()),
        out_specs=P(),
        # Unchecked on purpose: with replication checking on, the gradient of
        # the replicated params is itself made replicated by an all-reduce per
        # microbatch inside the scan. Here each device differentiates its own
        # shard's loss, and the psum above adds the results once.
        check_vma=False,
    )

    def one_step(ts: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        b = leading_size(batch)
        if b % (n * accum_steps):
            raise ValueError(
                f"{owner}: a batch of {b} examples does not split over {n} "
                f"devices x accum_steps={accum_steps}; use a batch size that "
                f"is a multiple of {n * accum_steps}."
            )
        sums = sharded_sums(ts.params, ts.state, batch, step_key(ts))
        return apply_gradients(optimizer, ts, sums, grad_norm=grad_norm)

    step = scan_steps(one_step, steps_per_call, owner)
    if jit:
        # The new train state comes out replicated like the one that went in.
        out = (NamedSharding(mesh, P()), NamedSharding(mesh, P()))
        step = jit_step(step, donate=donate, out_shardings=out)
    return step


def psum_fused(tree: Any, axis_name: str) -> Any:
    """``lax.psum(tree, axis_name)`` as one all-reduce wherever it can be.

    XLA all-reduces leaves of different dtypes separately: a float32 weight
    next to float64 gradients costs a second all-reduce. Every leaf that
    casts safely (exactly) to the widest floating dtype in ``tree`` is summed
    in that dtype and cast back; only leaves that cannot (large integers into
    float32) get their own all-reduce.

    Args:
      tree: a pytree of arrays, inside ``shard_map`` over ``axis_name``.
      axis_name: the mesh axis to sum over.

    Returns:
      The summed tree, each leaf with its own dtype.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, fnn
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = fnn.data_mesh()
      >>> f = jax.shard_map(lambda t: fnn.psum_fused(t, "data"), mesh=mesh,
      ...                   in_specs=P(), out_specs=P(), check_vma=False)
      >>> out = f({"g": jnp.ones(2), "n": jnp.int32(3)})
      >>> out["n"].dtype, bool(out["n"] == 3 * mesh.size)
      (dtype('int32'), True)
    """
    leaves, treedef = jax.tree.flatten(tree)
    floats = [x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    if not floats:
        return lax.psum(tree, axis_name)
    wide = jnp.result_type(*floats)
    safe = [np.can_cast(x.dtype, wide, "safe") for x in leaves]
    summed = lax.psum(
        [x.astype(wide) if ok else x for x, ok in zip(leaves, safe)], axis_name
    )
    out = [y.astype(x.dtype) for x, y in zip(leaves, summed)]
    return jax.tree.unflatten(treedef, out)


def _mean(n: int) -> Callable[[jax.Array], jax.Array]:
    def mean(x: jax.Array) -> jax.Array:
        return x / n if jnp.issubdtype(x.dtype, jnp.inexact) else x // n

    return mean
