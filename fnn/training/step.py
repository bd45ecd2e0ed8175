"""The training step: ``make_train_step`` and the state it updates.

A loss function returns a *sum* and a *weight* (the number of valid examples or
tokens), optionally with a dict of summed metrics::

    loss_fn(params, batch, key) -> (loss_sum, weight)
    loss_fn(params, batch, key) -> (loss_sum, weight, aux)        # aux: sums
    loss_fn(params, state, batch, key) -> (out, new_state)        # has_state

The step adds gradient sums and weights over microbatches in one ``lax.scan``
and divides once at the end, so masked and uneven microbatches give exactly the
gradient of the whole batch (a mean of per-microbatch means does not). The
optimizer is given once: ``step.init(params, key=...)`` makes the state that
``step`` updates, in optax's ``init``/``update`` style.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fnn.model.options import boolean, positive_int
from fnn.model.place import train_step_scope
from fnn.training.accumulate import (
    LossFn,
    accumulate_gradients,
    check_aux_names,
    leading_size,
)
from fnn.training.loss_scale import loss_scale_options, scaled_optimizer
from fnn.training.rules import check_rules, state_shardings
from fnn.training.rules import sharding_table as rules_sharding_table
from fnn.training.sharding import (
    auto_mesh,
    data_parallel_sums,
    init_state,
    partitioned_sums,
    shard_batch,
)
from fnn.training.sharding import data_axis as mesh_data_axis
from fnn.training.train_state import TrainState
from fnn.training.update import (
    Metrics,
    apply_gradients,
    check_loss_arity,
    check_train_state,
)


def _called_by_step(loss_fn: LossFn) -> LossFn:
    """``loss_fn``, called inside :func:`fnn.model.place.train_step_scope`.

    So a layer whose mode follows the key (Dropout, BatchNorm) refuses
    ``key=None`` without ``train=`` in it: the loss forgot to pass the step's
    key on. The scope is entered while the step is traced, not when it runs.
    """

    @functools.wraps(loss_fn)
    def in_step(*args: Any) -> Any:
        with train_step_scope():
            return loss_fn(*args)

    return in_step


class TrainStep:
    """A training step and the ``init`` of the state it updates.

    Made by :func:`make_train_step`. Call it as ``step(train_state, batch) ->
    (train_state, metrics)``; make the first train state with :meth:`init`.

    Attributes:
      optimizer: the optax ``GradientTransformation`` it applies.
      accum_steps: microbatches per optimizer step.
      steps_per_call: optimizer steps per call (over stacked batches).
      mesh: the ``jax.sharding.Mesh`` it runs on, or ``None``.
      batch_multiple: the batch sizes it takes are multiples of this,
        ``accum_steps`` times the size of the mesh's data axis.
      param_rules: the params' rule table (``{pattern: PartitionSpec}``), or
        ``None`` for replicated params.
      single: the same step with ``steps_per_call=1`` (itself when it is one);
        :func:`fnn.fit` uses it to land exactly on report points.
    """

    def __init__(self, one_step: Callable, options: dict[str, Any]):
        self._one_step = one_step
        self._options = options
        self.optimizer = options["optimizer"]
        self.accum_steps = options["accum_steps"]
        self.steps_per_call = options["steps_per_call"]
        self.mesh = options["mesh"]
        self.param_rules = options["param_rules"]
        self._mesh = options["placement_mesh"]
        self._axis = options["data_axis"]
        devices = 1 if self.mesh is None else self.mesh.shape[self._axis]
        self.batch_multiple = self.accum_steps * devices
        fn = one_step if self.steps_per_call == 1 else self._many
        if options["jit"]:
            kwargs = dict(options["jit_kwargs"] or {})
            if self.mesh is not None and self.param_rules is None:
                replicated = NamedSharding(self._mesh, P())
                kwargs.setdefault("out_shardings", (replicated, replicated))
            fn = jax.jit(fn, donate_argnums=0 if options["donate"] else (), **kwargs)
        self._fn = fn
        self._single: TrainStep | None = None

    def _many(self, ts: TrainState, batches: Any) -> tuple[TrainState, Metrics]:
        k = leading_size(batches, "stacked batch")
        if k != self.steps_per_call:
            raise ValueError(
                f"train step: steps_per_call={self.steps_per_call} needs batch "
                f"leaves with a leading axis of {self.steps_per_call} (stacked "
                f"batches, see fnn.data.stack), got {k}."
            )
        return jax.lax.scan(self._one_step, ts, batches)

    @property
    def single(self) -> TrainStep:
        if self.steps_per_call == 1:
            return self
        if self._single is None:
            self._single = TrainStep(
                self._one_step, {**self._options, "steps_per_call": 1}
            )
        return self._single

    def _new_state(self, params: Any, key: jax.Array, state: Any) -> TrainState:
        opt_state = self.optimizer.init(params)
        return TrainState(jnp.zeros((), jnp.int32), params, opt_state, state, key)

    def init(self, params: Any, *, key: jax.Array, state: Any = None) -> TrainState:
        """The train state at step 0 for ``params``: this step's optimizer state.

        On a mesh the params are placed by the step's ``param_rules`` (all
        replicated without), the optimizer state is made in place with the
        shardings of its params, and the rest is replicated.

        Args:
          params: the model's params. They are copied (onto the mesh, if the
            step has one), so a donating step never frees the caller's arrays.
            Abstract params (``jax.ShapeDtypeStruct`` leaves, e.g. from
            ``jax.eval_shape``) give an abstract train state whose leaves
            carry the shardings the step would give them, allocating nothing:
            a restore target for :class:`fnn.Checkpointer`, or the input of
            :meth:`sharding_table`.
          key: a ``jax.random.key`` (a raw ``jax.random.PRNGKey`` is wrapped).
          state: the model's running state (from ``fnn.with_state``), or
            ``None`` for ``{}``.

        Returns:
          A :class:`fnn.TrainState`.

        Raises:
          ValueError: on a mesh, for ``param_rules`` that do not fit the
            params (see :func:`make_train_step`).

        Examples:
          >>> import jax, jax.numpy as jnp, optax, fnn
          >>> def loss_fn(params, batch, key):
          ...     return jnp.sum(batch["x"] * params["w"]), batch["x"].shape[0]
          >>> step = fnn.make_train_step(loss_fn, optax.sgd(0.1))
          >>> ts = step.init({"w": jnp.ones(2)}, key=jax.random.key(0))
          >>> ts.step, ts.opt_state
          (Array(0, dtype=int32), (EmptyState(), EmptyState()))
        """
        dtype = getattr(key, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
            key = key if isinstance(key, jax.ShapeDtypeStruct) else jnp.copy(key)
        elif dtype == jnp.uint32 and jnp.shape(key) == (2,):
            key = jax.random.wrap_key_data(jnp.array(key))
        else:
            raise TypeError(
                f"step.init: expected key to be a jax.random.key, e.g. "
                f"jax.random.key(0), got {key!r}."
            )
        state = {} if state is None else state
        if self.mesh is not None:
            return init_state(
                self.optimizer, self._mesh, self.param_rules, params, key, state
            )
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
            return jax.eval_shape(self._new_state, params, key, state)
        params, state = jax.tree.map(jnp.array, (params, state))
        return self._new_state(params, key, state)

    def sharding_table(self, ts: TrainState) -> str:
        """A table of where ``ts`` lives, per params path and in total.

        One row per params leaf (path, shape, dtype, the rules that match it,
        its ``PartitionSpec``, bytes per device and replicated), then the
        totals of the params, the optimizer state, the rest and the whole
        state. ``ts`` is a state from :meth:`init`, or the abstract one that
        ``init`` gives for abstract params (nothing allocated).
        """
        return rules_sharding_table(ts, self.param_rules)

    def shard(self, batch: Any) -> Any:
        """``batch`` split over the step's mesh (itself without a mesh).

        With many processes each process passes its own rows of the global
        batch. A stacked batch (``steps_per_call > 1``) is split along axis 1.
        """
        if self.mesh is None:
            return batch
        return shard_batch(
            "train step", batch, self._mesh, self._axis, stacked=self.steps_per_call > 1
        )

    def __call__(self, ts: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if self.mesh is not None:
            batch = self.shard(batch)
        return self._fn(ts, batch)

    def lower(self, ts: TrainState, batch: Any) -> Any:
        """``jax.jit(step).lower(ts, batch)``, for inspecting the compiled step."""
        if self.mesh is not None:
            batch = self.shard(batch)
        return self._fn.lower(ts, batch)

    def __repr__(self) -> str:
        opts = {k: self._options[k] for k in ("accum_steps", "steps_per_call")}
        if self.mesh is not None:
            opts["mesh"] = dict(self.mesh.shape)
        if self.param_rules is not None:
            opts["param_rules"] = self.param_rules
        return f"TrainStep({', '.join(f'{k}={v}' for k, v in opts.items())})"


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    accum_steps: int = 1,
    has_state: bool = False,
    steps_per_call: int = 1,
    mesh: Any = None,
    data_axis: str | None = None,
    param_rules: dict[str, P] | None = None,
    grad_norm: bool = False,
    loss_scale: Any = None,
    donate: bool = True,
    jit: bool = True,
    jit_kwargs: dict[str, Any] | None = None,
) -> TrainStep:
    """Builds ``step(train_state, batch) -> (train_state, metrics)`` and its ``init``.

    Each call draws the step's key, ``jax.random.fold_in(train_state.key,
    train_state.step)``; sums the gradient of ``loss_fn`` over
    ``accum_steps`` strided microbatches in one ``lax.scan`` (microbatch
    ``j`` holds rows ``j, j + k, j + 2k, ...`` and gets ``fold_in(key, j)``);
    divides by the total weight once; and applies ``optimizer``. Model state
    (BatchNorm statistics) is carried through the scan.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> (loss_sum, weight)`` or
        ``(loss_sum, weight, aux)`` with ``aux`` a dict of scalar sums; with
        ``has_state``, ``loss_fn(params, state, batch, key) -> (out,
        new_state)``. It passes ``key`` on to the network's apply
        (``key=key``), which turns on dropout and batch statistics; a network
        it applies in evaluation mode on purpose gets ``train=False``.
      optimizer: any optax ``GradientTransformation``. It is given only here:
        ``step.init(params, key=...)`` makes its state.
      accum_steps: microbatches per step; the batch size must be a multiple
        (of ``accum_steps`` times the mesh's data-axis size with a mesh).
      has_state: whether the model has running state (see above).
      steps_per_call: ``K`` optimizer steps per call, by a ``lax.scan`` over a
        batch whose leaves have a leading axis ``K`` (:func:`fnn.data.stack`);
        metrics then have a leading axis ``K``.
      mesh: a ``jax.sharding.Mesh`` to train on, e.g.
        ``jax.make_mesh((jax.device_count(),), ("data",))``; the step splits
        each batch over its data axis. Without ``param_rules``, ``step.init``
        replicates the state and each device accumulates over its own rows,
        ONE all-reduce after the scan adding the sums of all devices.
      data_axis: the mesh axis the batch is split over; by default the only
        axis of a one-dimensional mesh, else ``"data"``.
      param_rules: params placed by rules on ``mesh``: a dict of params path
        patterns (dict keys joined by ``/``, ``fnmatch`` syntax, e.g.
        ``"*/w"``) to ``PartitionSpec``s over the mesh's axes. Sharding over
        the data axis is FSDP, over another axis tensor parallelism; a path no
        rule matches is replicated, and the optimizer state follows its
        params. The step is then one program partitioned by the compiler
        (``docs/scale.md``).
      grad_norm: include the ``grad_norm`` metric, the norm of the averaged
        gradient. Off by default: it reads every gradient once more per step,
        which cost 3-17% of a step on the small CPU workloads of
        ``benchmarks/steps.py`` and 1-2% on the compute-bound one.
      loss_scale: ``"dynamic"`` (or a :class:`fnn.training.DynamicLossScale`
        with other settings) for dynamic loss scaling, the way to train a
        float16 network: the loss is multiplied by the scale before
        differentiation and the gradients divided by it; a step whose
        gradients are not all finite (on any device) leaves params and
        optimizer state as they were and halves the scale, and after
        ``growth_interval`` finite steps in a row the scale doubles. The
        scale lives in ``opt_state`` (a
        :class:`fnn.training.LossScaleState` around the optimizer's state),
        so checkpoints keep it; ``train_state.step`` counts every step,
        skipped or not. Metrics gain ``loss_scale`` (the scale the step used)
        and ``skipped`` (1.0 if its update was skipped, else 0.0).
        ``None`` (the default) scales nothing.
      donate: donate the train state's buffers to the new state
        (``donate_argnums=0``): the train state passed in must not be used
        again.
      jit: compile the step; ``False`` runs it as plain Python (for
        debugging or to ``jax.jit`` it yourself).
      jit_kwargs: more keyword arguments for ``jax.jit``, e.g.
        ``{"compiler_options": {...}}`` (see ``benchmarks/README.md``).

    Returns:
      A :class:`TrainStep`. ``metrics`` is ``{"loss": loss_sum / weight,
      "weight": weight, **{name: aux_sum / weight}}``, and ``"grad_norm"``
      (the norm of the averaged gradient) with ``grad_norm=True``.

    Raises:
      ValueError: for bad options (a rule naming an axis the mesh lacks);
        at ``step.init`` and trace time, for rules that do not fit the params
        (a dimension that does not divide over its axes, a spec longer than
        the array's rank, a path two rules give different specs, a rule that
        matches nothing); at trace time, for a batch that does not
        split into microbatches (naming both sizes), batch leaves with
        different leading sizes, a train state made for another optimizer, or
        a loss that returns the wrong things.
      ShapeError: at trace time, for a Dropout or BatchNorm that ``loss_fn``
        applies with neither a key nor ``train=`` (it forgot ``key=key``),
        naming the layer and its place.
      TypeError: for a ``loss_fn`` whose arguments contradict ``has_state``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fnn
      >>> def loss_fn(params, batch, key):
      ...     err = batch["x"] @ params["w"] - batch["y"]
      ...     return jnp.sum(err**2), batch["y"].shape[0]
      >>> step = fnn.make_train_step(loss_fn, optax.sgd(0.1), accum_steps=2)
      >>> ts = step.init({"w": jnp.zeros(2)}, key=jax.random.key(0))
      >>> batch = {"x": jnp.eye(2).repeat(2, 0), "y": jnp.ones(4)}
      >>> ts, metrics = step(ts, batch)
      >>> float(metrics["loss"]), int(ts.step)
      (1.0, 1)
    """
    owner = "make_train_step"
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"{owner}: expected an optax GradientTransformation, e.g. "
            f"optax.adam(1e-3), got {type(optimizer).__name__}."
        )
    scaling = loss_scale_options(owner, loss_scale)
    if scaling is not None:
        optimizer = scaled_optimizer(optimizer, scaling)
    options = {
        "optimizer": optimizer,
        "accum_steps": positive_int(owner, "accum_steps", accum_steps),
        "steps_per_call": positive_int(owner, "steps_per_call", steps_per_call),
        "mesh": mesh,
        "data_axis": None if mesh is None else mesh_data_axis(owner, mesh, data_axis),
        "placement_mesh": None if mesh is None else auto_mesh(mesh),
        "param_rules": None
        if param_rules is None
        else check_rules(owner, param_rules, mesh),
        "donate": boolean(owner, "donate", donate),
        "jit": boolean(owner, "jit", jit),
        "jit_kwargs": jit_kwargs,
    }
    boolean(owner, "has_state", has_state)
    boolean(owner, "grad_norm", grad_norm)
    check_loss_arity(loss_fn, has_state)
    loss_fn = _called_by_step(loss_fn)
    k, axis = options["accum_steps"], options["data_axis"]
    mesh, table = options["placement_mesh"], options["param_rules"]
    if mesh is None:
        sums_fn = functools.partial(
            accumulate_gradients, loss_fn, accum_steps=k, has_state=has_state
        )
    elif table is None:
        sums_fn = data_parallel_sums(loss_fn, mesh, axis, k, has_state)
    else:
        sums_fn = partitioned_sums(loss_fn, mesh, axis, k, has_state)

    def one_step(ts: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        check_train_state(ts, optimizer)
        key = jax.random.fold_in(ts.key, ts.step)
        scale = None if scaling is None else ts.opt_state.scale
        if table is None:
            sums = sums_fn(ts.params, ts.state, batch, key, loss_scale=scale)
        else:
            where = state_shardings("train step", ts, optimizer, mesh, table)
            ts = jax.lax.with_sharding_constraint(ts, where)
            sums = sums_fn(
                ts.params, ts.state, batch, key, where.params, loss_scale=scale
            )
        check_aux_names(sums.aux_sum)
        if scale is not None:
            sums = sums._replace(
                grad_sum=jax.tree.map(lambda g: g / scale, sums.grad_sum)
            )
        new_ts, metrics = apply_gradients(optimizer, ts, sums, grad_norm=grad_norm)
        if scale is not None:
            skipped = new_ts.opt_state.skipped - ts.opt_state.skipped
            metrics |= {"loss_scale": scale, "skipped": skipped.astype(jnp.float32)}
        if table is not None:
            new_ts = jax.lax.with_sharding_constraint(new_ts, where)
        return new_ts, metrics

    return TrainStep(one_step, options)
