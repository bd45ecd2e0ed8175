"""Normalization: LayerNorm, RMSNorm, and BatchNorm with running statistics.

LayerNorm and RMSNorm normalise each example over its feature axes and are
stateless. BatchNorm normalises each feature over the batch (and every other
non-feature axis); it keeps running mean and variance as *state* (see
:func:`fnn.with_state`), updated while training and used for inference.
Statistics, and the scale and bias applied to the normalised values, are
computed in float32 (float64 for float64 inputs) whatever the input's and the
compute dtype; the result is cast to the compute dtype. BatchNorm's running
statistics are stored in float32 (at least) whatever ``param_dtype``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.nn import initializers

from fnn.model.core import Layer, fail, library_layer, signature
from fnn.model.layers.pool import broadcast_mask, mask_error
from fnn.model.mode import is_training
from fnn.model.options import boolean, number
from fnn.model.precision import (
    at_least_float32,
    cast_floating,
    init_param,
    layer_dtypes,
    result_dtype,
    shown_dtype,
)
from fnn.model.shapes import axes_arg, check_real, check_shape, non_batch_axes
from fnn.model.state import declare_state, read_state, write_state


def _check_options(owner: str, epsilon: Any, **flags: Any) -> None:
    number(owner, "epsilon", epsilon, low=0.0, low_open=True)
    for name, value in flags.items():
        boolean(owner, name, value)


def _resolve(
    desc: str, axes: tuple[int, ...], shape: tuple[int, ...]
) -> tuple[int, ...]:
    """The feature axes as non-negative ints; fails if they do not fit ``shape``."""
    out = non_batch_axes(desc, axes, shape)
    if any(shape[a] == -1 for a in out):
        fail(desc, f"the normalised axes {out!r} must be known, got {shape!r}.")
    return out


def _features(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[a] for a in axes)


def _check_features(
    desc: str, x: jax.Array, axes: tuple[int, ...], want: Any, source: str = "params"
) -> None:
    if _features(x.shape, axes) != tuple(want):
        fail(
            desc,
            f"expected input with sizes {tuple(want)!r} on axes {axes!r} (the sizes "
            f"of its {source}), got shape {x.shape!r}.",
        )


def _broadcastable(v: jax.Array, rank: int, axes: tuple[int, ...]) -> jax.Array:
    """A per-feature array ``v`` reshaped to broadcast against an input of ``rank``.

    Unlike :func:`fnn.model.shapes.expand_left`, the feature axes need not be trailing.
    """
    it = iter(v.shape)
    return v.reshape(tuple(next(it) if i in axes else 1 for i in range(rank)))


def _affine(y, params, x, axes, dtype):
    """``y * scale + bias`` in ``y``'s (float32 or wider) dtype, then cast to
    the compute dtype (``dtype``, or input and params promoted together)."""
    out_dtype = result_dtype(dtype, x, params)
    params = cast_floating(params, dtype)
    if "scale" in params:
        y = y * _broadcastable(params["scale"], x.ndim, axes)
    if "bias" in params:
        y = y + _broadcastable(params["bias"], x.ndim, axes)
    return y.astype(out_dtype)


def _init_affine(key, feat, use_scale, use_bias, scale_init, bias_init, param_dtype):
    k_s, k_b = jax.random.split(key)
    params = {}
    if use_scale:
        params["scale"] = init_param(scale_init, k_s, feat, param_dtype)
    if use_bias:
        params["bias"] = init_param(bias_init, k_b, feat, param_dtype)
    return params


def LayerNorm(
    *,
    epsilon: float = 1e-5,
    use_scale: bool = True,
    use_bias: bool = True,
    axis: int | tuple[int, ...] = -1,
    scale_init: initializers.Initializer = initializers.ones,
    bias_init: initializers.Initializer = initializers.zeros,
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype | None = None,
) -> Layer:
    """Normalises each example over ``axis``: ``(x - mean) / sqrt(var + eps)``.

    Then ``* scale + bias``, per feature.

    Args:
      epsilon: added to the variance. ``1e-5``, as PyTorch, Equinox and Haiku's
        examples (Flax uses ``1e-6``), so weights from those carry over exactly.
      use_scale: whether to multiply by a learned ``scale`` (init ones).
      use_bias: whether to add a learned ``bias`` (init zeros).
      axis: the feature axis or axes normalised over, default the last. The
        batch axis 0 cannot be one of them.
      scale_init: initializer for ``scale``.
      bias_init: initializer for ``bias``.
      param_dtype: the dtype the params are stored in.
      dtype: the dtype of the result; ``None`` gives the input's and the
        params' dtypes promoted together. The statistics are float32 either
        way.

    Returns:
      The layer; params ``{'scale': features, 'bias': features}`` where
      ``features`` is the input's shape on ``axis``; output shape = input shape.

    Raises:
      ValueError: for a bad option.
      ShapeError: if ``axis`` does not fit the input, its sizes are unknown, or
        (at apply) they differ from init's or the input is complex.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> norm = fnn.LayerNorm()
      >>> shape, params = norm.init(jax.random.key(0), (-1, 4))
      >>> shape, params["scale"].shape
      ((-1, 4), (4,))
      >>> y = norm.apply(params, jnp.array([[1.0, 2.0, 3.0, 4.0]]))
      >>> float(y.mean()), round(float(y.std()), 3)
      (0.0, 1.0)
    """
    _check_options("LayerNorm", epsilon, use_scale=use_scale, use_bias=use_bias)
    axes = axes_arg("LayerNorm", axis)
    shown = {"epsilon": epsilon} if epsilon != 1e-5 else {}
    shown |= {} if axis == -1 else {"axis": axis}
    param_dtype, dtype = layer_dtypes("LayerNorm", param_dtype, dtype)
    desc = signature("LayerNorm", **shown, **shown_dtype(dtype))

    def init_fn(key, input_shape):
        shape = check_shape(desc, input_shape, min_rank=2)
        feat = _features(shape, _resolve(desc, axes, shape))
        params = _init_affine(
            key, feat, use_scale, use_bias, scale_init, bias_init, param_dtype
        )
        return shape, params

    def apply_fn(params, x, **kwargs):
        x = jnp.asarray(x)
        check_real(desc, x, integers=True)
        ax = _resolve(desc, axes, x.shape)
        if params:
            _check_features(desc, x, ax, next(iter(params.values())).shape)
        xc = at_least_float32(x)
        mean = jnp.mean(xc, ax, keepdims=True)
        var = jnp.mean(jnp.square(xc - mean), ax, keepdims=True)
        return _affine((xc - mean) * lax.rsqrt(var + epsilon), params, x, ax, dtype)

    return library_layer("layernorm", desc, init_fn, apply_fn)


def RMSNorm(
    *,
    epsilon: float = 1e-5,
    use_scale: bool = True,
    axis: int | tuple[int, ...] = -1,
    scale_init: initializers.Initializer = initializers.ones,
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype | None = None,
) -> Layer:
    """Root-mean-square normalisation: ``x / sqrt(mean(x**2) + eps) * scale``.

    LayerNorm without centring and without bias (Zhang and Sennrich, 2019).

    Args:
      epsilon: added to the mean square; ``1e-5``, as LayerNorm.
      use_scale: whether to multiply by a learned ``scale`` (init ones).
      axis: the feature axis or axes, default the last.
      scale_init: initializer for ``scale``.
      param_dtype: the dtype the params are stored in.
      dtype: the dtype of the result; ``None`` gives the input's and the
        params' dtypes promoted together. The statistics are float32 either
        way.

    Returns:
      The layer; params ``{'scale': features}``; output shape = input shape.

    Raises:
      ValueError: for a bad option.
      ShapeError: as :func:`LayerNorm`.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> norm = fnn.RMSNorm(epsilon=1e-6)
      >>> shape, params = norm.init(jax.random.key(0), (-1, 2))
      >>> y = norm.apply(params, jnp.array([[3.0, 4.0]]))  # rms = sqrt(12.5)
      >>> [round(v, 4) for v in y[0].tolist()]
      [0.8485, 1.1314]
    """
    _check_options("RMSNorm", epsilon, use_scale=use_scale)
    axes = axes_arg("RMSNorm", axis)
    shown = {"epsilon": epsilon} if epsilon != 1e-5 else {}
    shown |= {} if axis == -1 else {"axis": axis}
    param_dtype, dtype = layer_dtypes("RMSNorm", param_dtype, dtype)
    desc = signature("RMSNorm", **shown, **shown_dtype(dtype))

    def init_fn(key, input_shape):
        shape = check_shape(desc, input_shape, min_rank=2)
        feat = _features(shape, _resolve(desc, axes, shape))
        params = _init_affine(
            key, feat, use_scale, False, scale_init, None, param_dtype
        )
        return shape, params

    def apply_fn(params, x, **kwargs):
        x = jnp.asarray(x)
        check_real(desc, x, integers=True)
        ax = _resolve(desc, axes, x.shape)
        if params:
            _check_features(desc, x, ax, params["scale"].shape)
        xc = at_least_float32(x)
        ms = jnp.mean(jnp.square(xc), ax, keepdims=True)
        return _affine(xc * lax.rsqrt(ms + epsilon), params, x, ax, dtype)

    return library_layer("rmsnorm", desc, init_fn, apply_fn)


def _batch_stats(x, reduce_axes, mask, axis_name):
    """Per-feature mean and (biased) variance over ``reduce_axes`` and devices."""
    m = None if mask is None else broadcast_mask(x, mask)

    def total(v):
        s = jnp.sum(v if m is None else jnp.where(m, v, 0), reduce_axes, keepdims=True)
        return s if axis_name is None else lax.psum(s, axis_name)

    if m is None:
        count = 1
        for a in reduce_axes:
            count *= x.shape[a]
        if axis_name is not None:
            count = lax.psum(count, axis_name)
    else:
        count = jnp.maximum(total(jnp.ones_like(x)), 1)
    mean = total(x) / count
    var = total(jnp.square(x - mean)) / count
    return mean, var


def BatchNorm(
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    use_scale: bool = True,
    use_bias: bool = True,
    axis: int | tuple[int, ...] = -1,
    axis_name: str | None = None,
    scale_init: initializers.Initializer = initializers.ones,
    bias_init: initializers.Initializer = initializers.zeros,
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype | None = None,
) -> Layer:
    """Batch normalisation, with running mean and variance kept as state.

    Each feature is normalised over every axis but ``axis`` (the batch, and
    for images the spatial axes). The layer needs :func:`fnn.with_state`.

    **Train or evaluate.** Apply trains when it gets a ``key`` (so the one key
    that turns on dropout also turns on batch statistics), or when
    ``train=True`` is passed; ``train=False`` evaluates even with a key. Inside
    the loss function of a training step (:func:`fnn.make_train_step`), no key
    and no ``train=`` is an error (the loss forgot ``key=key``). While
    training it normalises with the batch's statistics and updates the state:
    ``running = momentum * running + (1 - momentum) * batch`` (Flax's and
    Haiku's convention; PyTorch's ``momentum`` is ``1 -`` this one), with the
    biased batch variance, as Flax. While evaluating it uses the running
    statistics and leaves the state unchanged.

    Args:
      momentum: the running statistics' decay, in ``[0, 1)``; 0.99 as Flax.
      epsilon: added to the variance; ``1e-5`` as Flax and PyTorch.
      use_scale: whether to multiply by a learned ``scale`` (init ones).
      use_bias: whether to add a learned ``bias`` (init zeros).
      axis: the feature axis or axes, default the last (channels last).
      axis_name: a mapped axis name (``shard_map``, ``pmap``) over which batch
        statistics are averaged with ``lax.psum``, so every device
        normalises with the global batch's statistics. Under plain ``jax.jit``
        with a sharded batch the statistics are already global: leave it None.
      scale_init: initializer for ``scale``.
      bias_init: initializer for ``bias``.
      param_dtype: the dtype the params are stored in. The running
        statistics are float32 (float64 if ``param_dtype`` is).
      dtype: the dtype of the result, as in :func:`LayerNorm`.

    Returns:
      The layer; params ``{'scale': features, 'bias': features}``, state
      ``{'mean': features, 'var': features}`` (init zeros and ones); output
      shape = input shape. While training, apply also takes ``mask=``: true at
      valid positions, of the input's shape without the feature axis (e.g.
      ``(batch, time)``), so padding does not enter the statistics.

    Raises:
      ValueError: for a bad option.
      ShapeError: if ``axis`` does not fit the input, at apply outside
        :func:`fnn.with_state`, for a complex input, for a mask that does
        not fit, or for no key and no ``train=`` inside a training step's
        loss function.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> model = fnn.with_state(fnn.serial(fnn.Dense(4), fnn.BatchNorm()))
      >>> shape, params, state = model.init(jax.random.key(0), (-1, 3))
      >>> jax.tree.map(jnp.shape, state)
      {'1_batchnorm': {'mean': (4,), 'var': (4,)}}
      >>> x = jnp.arange(6.0).reshape(2, 3)
      >>> y, state = model.apply(params, state, x, train=True)  # batch statistics
      >>> y, _ = model.apply(params, state, x)  # no key: running statistics
    """
    number("BatchNorm", "momentum", momentum, low=0.0, high=1.0, high_open=True)
    _check_options("BatchNorm", epsilon, use_scale=use_scale, use_bias=use_bias)
    axes = axes_arg("BatchNorm", axis)
    shown = {"momentum": momentum} if momentum != 0.99 else {}
    shown |= {"epsilon": epsilon} if epsilon != 1e-5 else {}
    shown |= {} if axis == -1 else {"axis": axis}
    shown |= {} if axis_name is None else {"axis_name": axis_name}
    param_dtype, dtype = layer_dtypes("BatchNorm", param_dtype, dtype)
    desc = signature("BatchNorm", **shown, **shown_dtype(dtype))

    def init_fn(key, input_shape):
        shape = check_shape(desc, input_shape, min_rank=2)
        feat = _features(shape, _resolve(desc, axes, shape))
        params = _init_affine(
            key, feat, use_scale, use_bias, scale_init, bias_init, param_dtype
        )
        stats = jnp.promote_types(param_dtype, jnp.float32)
        declare_state(
            desc, {"mean": jnp.zeros(feat, stats), "var": jnp.ones(feat, stats)}
        )
        return shape, params

    def apply_fn(params, x, *, key=None, train=None, mask=None, **kwargs):
        x = jnp.asarray(x)
        check_real(desc, x, integers=True)
        ax = _resolve(desc, axes, x.shape)
        state = read_state(desc)
        _check_features(desc, x, ax, state["mean"].shape, "running statistics")
        xc = at_least_float32(x)
        if is_training(key, train, desc):
            red = tuple(i for i in range(x.ndim) if i not in ax)
            if mask is not None:
                detail = mask_error(x.shape, tuple(jnp.shape(mask)))
                if detail is not None:
                    fail(desc, detail)
            mean, var = _batch_stats(xc, red, mask, axis_name)
            new = {
                name: (
                    momentum * state[name]
                    + (1 - momentum) * lax.stop_gradient(v).reshape(state[name].shape)
                ).astype(state[name].dtype)
                for name, v in (("mean", mean), ("var", var))
            }
            write_state(desc, new)
        else:
            mean = _broadcastable(state["mean"], x.ndim, ax)
            var = _broadcastable(state["var"], x.ndim, ax)
        return _affine((xc - mean) * lax.rsqrt(var + epsilon), params, x, ax, dtype)

    return library_layer("batchnorm", desc, init_fn, apply_fn)
