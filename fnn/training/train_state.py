"""The train state: everything a training step reads and writes, as plain data."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class TrainState(NamedTuple):
    """Everything a training step reads and writes: a plain pytree of arrays.

    A ``NamedTuple``, so ``jax.tree``, ``jax.jit``, Orbax and chex see its
    leaves under the params' own paths (``.params['0_dense']['w']``). Make it
    with the step's own ``init`` (``step = fnn.make_train_step(loss_fn,
    optimizer)``; ``train_state = step.init(params, key=key)``), so the
    optimizer state comes from the optimizer that will update it; change it
    with ``_replace``.

    Attributes:
      step: int32 scalar, the number of optimizer steps taken.
      params: the model's params (nested dicts of arrays).
      opt_state: the optax optimizer's state for ``params``.
      state: the model's running state (BatchNorm statistics); ``{}`` when
        the model has none.
      key: a ``jax.random.key``, fixed for the run; step ``t`` draws its
        randomness from ``jax.random.fold_in(key, t)``, so a resumed run draws
        what an uninterrupted one does.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, fnn
      >>> def loss_fn(params, batch, key):
      ...     return jnp.sum((batch["x"] * params["w"]) ** 2), batch["x"].size
      >>> step = fnn.make_train_step(loss_fn, optax.adam(0.1))
      >>> ts = step.init({"w": jnp.zeros(3)}, key=jax.random.key(0))
      >>> int(ts.step), ts.state, ts.params["w"].shape
      (0, {}, (3,))
      >>> [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      ...     ts.params)]
      ["['w']"]
    """

    step: jax.Array
    params: Any
    opt_state: Any
    state: Any
    key: jax.Array
