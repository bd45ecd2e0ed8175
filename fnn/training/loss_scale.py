"""Dynamic loss scaling for float16 training, kept in the optimizer state.

float16 has 5 exponent bits: gradients below about 6e-8 round to zero (and
below 6e-5 lose precision), and values above 65504 overflow. Loss scaling
multiplies the loss by a large factor before differentiating, so the
gradients flowing back through the float16 network are large enough to be
represented, and divides the gradients by the same factor before the update.
Dynamic scaling (Micikevicius et al., 2018; ``jmp.DynamicLossScale``,
PyTorch's ``GradScaler``) finds the factor as it trains: a step whose
gradients are not all finite skips its update and halves the scale; after
``growth_interval`` finite steps in a row the scale doubles.

The scale lives in the train state: :func:`scaled_optimizer` wraps the
optimizer so that ``opt_state`` is a :class:`LossScaleState` holding the
scale, the counters and the wrapped optimizer's own state. Checkpoints save
and restore it with the rest, and ``TrainState`` keeps its five fields.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fnn.model.options import integer, number


class DynamicLossScale(NamedTuple):
    """The options of dynamic loss scaling (``make_train_step(loss_scale=...)``).

    ``loss_scale="dynamic"`` is ``DynamicLossScale()``: the defaults of
    PyTorch's ``GradScaler`` and ``jmp``.

    Attributes:
      initial: the first scale, ``2**15``. Too large only costs the first few
        steps (each overflowing step halves it).
      growth_interval: finite steps in a row after which the scale is
        multiplied by ``factor``; 2000.
      factor: the growth and (inverse) back-off factor, 2. A power of two
        scales and unscales float values exactly.
      min_scale: the scale never goes below this, 1.

    Examples:
      >>> from fnn.training import DynamicLossScale
      >>> DynamicLossScale(growth_interval=100)
      DynamicLossScale(initial=32768.0, growth_interval=100, factor=2.0, min_scale=1.0)
    """

    initial: float = 2.0**15
    growth_interval: int = 2000
    factor: float = 2.0
    min_scale: float = 1.0


class LossScaleState(NamedTuple):
    """The ``opt_state`` of a step with loss scaling.

    Attributes:
      scale: the current loss scale, a float32 scalar.
      good_steps: finite steps since the scale last changed (int32).
      skipped: the number of updates skipped so far (int32).
      inner: the wrapped optimizer's state, unchanged by skipped steps.
    """

    scale: jax.Array
    good_steps: jax.Array
    skipped: jax.Array
    inner: Any


def loss_scale_options(owner: str, value: Any) -> DynamicLossScale | None:
    """``make_train_step``'s ``loss_scale`` as options (``None``: no scaling).

    Raises:
      ValueError: naming ``owner`` for anything but ``None``, ``"dynamic"`` or
        a :class:`DynamicLossScale` with valid fields.
    """
    if value is None:
        return None
    if isinstance(value, str) and value == "dynamic":
        return DynamicLossScale()
    if not isinstance(value, DynamicLossScale):
        raise ValueError(
            f"{owner}: expected loss_scale to be None, 'dynamic' or a "
            f"fnn.training.DynamicLossScale(...), got {value!r}."
        )
    return DynamicLossScale(
        initial=number(owner, "loss_scale.initial", value.initial, low=1.0),
        growth_interval=integer(
            owner, "loss_scale.growth_interval", value.growth_interval, minimum=1
        ),
        factor=number(owner, "loss_scale.factor", value.factor, low=1.0, low_open=True),
        min_scale=number(owner, "loss_scale.min_scale", value.min_scale, low=0.0),
    )


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating leaf of ``tree`` is finite (a boolean scalar).

    Examples:
      >>> import jax.numpy as jnp
      >>> from fnn.training.loss_scale import all_finite
      >>> bool(all_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.inf])}))
      False
    """
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def scaled_optimizer(
    optimizer: optax.GradientTransformation, options: DynamicLossScale
) -> optax.GradientTransformation:
    """``optimizer`` that skips non-finite gradients and adapts the loss scale.

    It is given the gradients already divided by the scale. When every one is
    finite it applies ``optimizer``'s update and counts a good step (the scale
    grows by ``options.factor`` after ``options.growth_interval`` of them);
    otherwise its updates are zeros, ``optimizer``'s state stays as it was
    (its step count too, so a schedule does not advance), and the scale
    shrinks by ``options.factor`` (not below ``options.min_scale``). As in
    ``optax.apply_if_finite``, the choice is a ``jnp.where`` per leaf, which
    runs the same on one device and sharded.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from fnn.training.loss_scale import DynamicLossScale, scaled_optimizer
      >>> opt = scaled_optimizer(optax.sgd(1.0), DynamicLossScale(initial=8.0))
      >>> params = {"w": jnp.ones(2)}
      >>> state = opt.init(params)
      >>> bad = {"w": jnp.array([jnp.nan, 1.0])}
      >>> updates, state = opt.update(bad, state, params)
      >>> updates["w"], float(state.scale), int(state.skipped)
      (Array([0., 0.], dtype=float32), 4.0, 1)
    """

    def init_fn(params: Any) -> LossScaleState:
        return LossScaleState(
            scale=jnp.asarray(options.initial, jnp.float32),
            good_steps=jnp.zeros((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
            inner=optimizer.init(params),
        )

    def update_fn(grads: Any, state: LossScaleState, params: Any = None):
        finite = all_finite(grads)
        updates, inner = optimizer.update(grads, state.inner, params)
        updates = jax.tree.map(
            lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates
        )
        inner = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), inner, state.inner
        )
        good = jnp.where(finite, state.good_steps + 1, 0)
        grown = state.scale * options.factor
        grow = (good >= options.growth_interval) & jnp.isfinite(grown)
        shrunk = jnp.maximum(state.scale / options.factor, options.min_scale)
        scale = jnp.where(finite, jnp.where(grow, grown, state.scale), shrunk)
        new = LossScaleState(
            scale=scale.astype(jnp.float32),
            good_steps=jnp.where(grow, 0, good).astype(jnp.int32),
            skipped=state.skipped + (~finite).astype(jnp.int32),
            inner=inner,
        )
        return updates, new

    return optax.GradientTransformation(init_fn, update_fn)
