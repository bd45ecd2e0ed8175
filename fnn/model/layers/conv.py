"""Conv and ConvTranspose: convolutions over 1, 2 or 3 spatial axes, channels last.

The rank comes from ``kernel_size``: ``(3,)`` is a 1-D convolution over inputs
``(batch, width, channels)``, ``(3, 3)`` a 2-D one over ``(batch, height, width,
channels)``, ``(3, 3, 3)`` a 3-D one over ``(batch, depth, height, width,
channels)``. Kernels are laid out ``(*kernel_size, in_channels, features)``, as
in Flax, so weights move between the two libraries unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.nn import initializers

from fnn.model.core import Layer, fail, library_layer, signature
from fnn.model.options import boolean, positive_int
from fnn.model.precision import init_param, layer_dtypes, shown_dtype, to_compute
from fnn.model.shapes import (
    check_real,
    check_shape,
    expand_left,
    kernel_tuple,
    window_padding,
    window_tuple,
)

_NUMBERS = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}
_AXES = {
    1: "(batch, width, channels)",
    2: "(batch, height, width, channels)",
    3: "(batch, depth, height, width, channels)",
}


def _window_options(
    owner: str,
    kernel_size: Any,
    strides: Any,
    dilation: Any,
    padding: Any,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], Any]:
    """Checks the options Conv and ConvTranspose share; returns kernel size,
    strides, dilation (tuples of the kernel's rank) and the padding."""
    ks = kernel_tuple(owner, kernel_size)
    n = len(ks)
    strides_t = window_tuple(owner, "strides", strides, n)
    dilation_t = window_tuple(owner, "dilation", dilation, n)
    return ks, strides_t, dilation_t, window_padding(owner, padding, n)


def _describe(
    kind: str, features: int, ks: tuple[int, ...], dtype: Any, **options: Any
) -> str:
    defaults = {"strides": 1, "padding": "SAME", "dilation": 1}
    defaults |= {"feature_group_count": 1, "use_bias": True}
    shown = {k: v for k, v in options.items() if v != defaults[k]}
    return signature(kind, features, ks, **shown, **shown_dtype(dtype))


def check_spatial_rank(
    desc: str, shape: tuple[int, ...], n: int, what: str = "convolution"
) -> None:
    """Fails unless ``shape`` is ``(batch, *n spatial sizes, channels)``."""
    if len(shape) != n + 2:
        fail(
            desc,
            f"expected input of rank {n + 2} {_AXES[n]} for a {n}-D {what}, "
            f"got shape {shape!r}.",
        )


def check_spatial_input(
    desc: str, input_shape: Any, n: int, what: str = "convolution"
) -> tuple[int, ...]:
    """Checks an init ``input_shape`` for a layer with ``n`` spatial axes."""
    shape = check_shape(desc, input_shape)
    check_spatial_rank(desc, shape, n, what)
    if -1 in shape[1:]:
        fail(desc, f"only the batch dimension may be unknown (-1), got {shape!r}.")
    return shape


def _check_apply_input(desc: str, x: jax.Array, n: int, channels: int) -> None:
    check_real(desc, x)
    shape = tuple(jnp.shape(x))
    check_spatial_rank(desc, shape, n)
    if shape[-1] != channels:
        fail(
            desc,
            f"expected input with {channels} channels (last dimension), "
            f"got shape {shape!r}.",
        )


def _out_shape(
    desc: str,
    shape: tuple[int, ...],
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    padding: Any,
) -> tuple[int, ...]:
    """``(batch, *spatial)``; fails when a spatial size is below 1 (no output)."""
    if any(d < 1 for d in spatial):
        fail(
            desc,
            f"input of shape {shape!r} is too small for this kernel, stride and "
            f"padding: the window {kernel!r} (dilated) with padding {padding!r} "
            f"leaves an output of spatial size {tuple(map(int, spatial))!r}; give "
            "a larger input, a smaller kernel or padding='SAME'.",
        )
    return (shape[0], *map(int, spatial))


def _dilated(ks: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    return tuple((k - 1) * d + 1 for k, d in zip(ks, dilation))


def _kernel_and_bias(
    key: jax.Array,
    w_shape: tuple[int, ...],
    use_bias: bool,
    w_init: initializers.Initializer,
    b_init: initializers.Initializer,
    dtype: Any,
) -> dict[str, jax.Array]:
    """Params ``{'w': w_shape, 'b': (features,)}``, no ``'b'`` without a bias."""
    k_w, k_b = jax.random.split(key)
    params = {"w": init_param(w_init, k_w, w_shape, dtype)}
    if use_bias:
        params["b"] = init_param(b_init, k_b, w_shape[-1:], dtype)
    return params


def _add_bias(params: dict[str, jax.Array], y: jax.Array, use_bias: bool) -> jax.Array:
    """``y`` plus the bias ``params['b']`` over its last (channel) axis."""
    return y + expand_left(params["b"].astype(y.dtype), y.ndim) if use_bias else y


def _same_dtype(x: Any, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    dtype = jnp.result_type(x, w)
    return jnp.asarray(x, dtype), w.astype(dtype)


def Conv(
    features: int,
    kernel_size: tuple[int, ...],
    *,
    strides: int | tuple[int, ...] = 1,
    padding: str | tuple[tuple[int, int], ...] = "SAME",
    dilation: int | tuple[int, ...] = 1,
    feature_group_count: int = 1,
    use_bias: bool = True,
    w_init: initializers.Initializer = initializers.lecun_normal(),
    b_init: initializers.Initializer = initializers.zeros,
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype | None = None,
) -> Layer:
    """A convolution, channels last, on ``lax.conv_general_dilated``.

    ``kernel_size`` must be a tuple; its length (1, 2 or 3) is the number of
    spatial axes. An int is refused rather than guessed at: ``Conv(8, 3)`` could
    mean ``(3,)`` or ``(3, 3)``.

    Args:
      features: the number of output channels.
      kernel_size: the window, e.g. ``(3, 3)``.
      strides: the step of the window, an int for every spatial axis or a tuple.
      padding: ``"SAME"`` (output size ``ceil(input / stride)``), ``"VALID"`` (no
        padding) or one ``(low, high)`` pair per spatial axis. ``"SAME"`` is the
        default, as in Flax, so stacks of stride-1 convolutions keep their size.
      dilation: spacing of the kernel's taps (atrous convolution).
      feature_group_count: split input and output channels into this many
        groups convolved separately; ``in_channels`` makes it depthwise.
      use_bias: whether to add ``b``.
      w_init: initializer for ``w``, shape ``(*kernel_size, in_channels //
        feature_group_count, features)``; LeCun normal, as Dense.
      b_init: initializer for ``b``, shape ``(features,)``; zeros.
      param_dtype: the dtype the params are stored in.
      dtype: the computation dtype (input and params are cast to it);
        ``None`` promotes the input's and the params' dtypes, as
        :func:`fnn.Dense`.

    Returns:
      The layer; params ``{'w': ..., 'b': (features,)}``. An input of shape
      ``(batch, *spatial, in_channels)`` gives ``(batch, *out_spatial,
      features)``.

    Raises:
      ValueError: for a bad option, or ``features`` not divisible by
        ``feature_group_count``.
      ShapeError: at init, for an input of the wrong rank, unknown spatial
        sizes, channels not divisible by ``feature_group_count``, or too small
        for the kernel (an empty output); at apply, for the wrong rank or
        number of channels, an input too small for the kernel, or one that is
        not real floating-point.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> conv = fnn.Conv(8, (3, 3), strides=2)
      >>> shape, params = conv.init(jax.random.key(0), (-1, 28, 28, 1))
      >>> shape, params["w"].shape
      ((-1, 14, 14, 8), (3, 3, 1, 8))
      >>> conv.apply(params, jnp.ones((2, 28, 28, 1))).shape
      (2, 14, 14, 8)
    """
    features = positive_int("Conv", "features", features)
    boolean("Conv", "use_bias", use_bias)
    param_dtype, dtype = layer_dtypes("Conv", param_dtype, dtype)
    ks, strides_t, dilation_t, pad = _window_options(
        "Conv", kernel_size, strides, dilation, padding
    )
    n = len(ks)
    groups = positive_int("Conv", "feature_group_count", feature_group_count)
    if features % groups:
        raise ValueError(
            f"Conv: features={features} is not divisible by "
            f"feature_group_count={groups}."
        )
    desc = _describe(
        "Conv",
        features,
        ks,
        strides=strides,
        padding=padding,
        dilation=dilation,
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
    )
    numbers = _NUMBERS[n]

    def init_fn(key, input_shape):
        shape = check_spatial_input(desc, input_shape, n)
        if shape[-1] % groups:
            fail(
                desc,
                f"input channels {shape[-1]} are not divisible by "
                f"feature_group_count={groups}.",
            )
        out = out_shape(shape)
        w_shape = (*ks, shape[-1] // groups, features)
        return out, _kernel_and_bias(
            key, w_shape, use_bias, w_init, b_init, param_dtype
        )

    def out_shape(shape):
        dk = _dilated(ks, dilation_t)
        out = lax.conv_general_shape_tuple(
            (1, *shape[1:]),
            (*dk, shape[-1] // groups, features),
            strides_t,
            pad,
            numbers,
        )
        return (*_out_shape(desc, shape, tuple(out[1:-1]), dk, pad), features)

    def apply_fn(params, x, **kwargs):
        _check_apply_input(desc, x, n, params["w"].shape[-2] * groups)
        out_shape(tuple(jnp.shape(x)))  # fails for an input too small for the kernel
        x, params = to_compute(dtype, x, params)
        x, w = _same_dtype(x, params["w"])
        y = lax.conv_general_dilated(
            x,
            w,
            strides_t,
            pad,
            rhs_dilation=dilation_t,
            dimension_numbers=numbers,
            feature_group_count=groups,
        )
        return _add_bias(params, y, use_bias)

    return library_layer("conv", desc, init_fn, apply_fn)


def ConvTranspose(
    features: int,
    kernel_size: tuple[int, ...],
    *,
    strides: int | tuple[int, ...] = 1,
    padding: str | tuple[tuple[int, int], ...] = "SAME",
    dilation: int | tuple[int, ...] = 1,
    use_bias: bool = True,
    w_init: initializers.Initializer = initializers.lecun_normal(),
    b_init: initializers.Initializer = initializers.zeros,
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype | None = None,
) -> Layer:
    """A transposed convolution (upsampling), channels last, on ``lax.conv_transpose``.

    It follows ``lax.conv_transpose`` with ``transpose_kernel=False``, as stax's
    ``ConvTranspose`` and Flax's ``ConvTranspose`` do, so their shapes and
    weights carry over: with ``"SAME"`` padding the output's spatial size is
    ``input * stride``; with ``"VALID"`` it is ``input * stride + max(k - stride,
    0)`` (``k`` the dilated kernel size); explicit ``(low, high)`` pairs pad the
    stride-dilated input, as in ``lax.conv_transpose``.

    Args:
      features: the number of output channels.
      kernel_size: the window, a tuple of 1, 2 or 3 ints (an int is refused,
        as in :func:`Conv`).
      strides: the upsampling factor per spatial axis.
      padding: ``"SAME"``, ``"VALID"`` or one ``(low, high)`` pair per axis.
      dilation: spacing of the kernel's taps.
      use_bias: whether to add ``b``.
      w_init: initializer for ``w``, shape ``(*kernel_size, in_channels,
        features)``; LeCun normal.
      b_init: initializer for ``b``, shape ``(features,)``; zeros.
      param_dtype: the dtype the params are stored in.
      dtype: the computation dtype (input and params are cast to it);
        ``None`` promotes the input's and the params' dtypes, as
        :func:`fnn.Dense`.

    Returns:
      The layer; params ``{'w': ..., 'b': (features,)}``.

    Raises:
      ValueError: for a bad option.
      ShapeError: at init, for an input of the wrong rank or with unknown
        spatial sizes; at init or apply, for an input too small for the kernel
        and padding (an empty output); at apply, for the wrong rank or number
        of channels, or an input that is not real floating-point.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> up = fnn.ConvTranspose(4, (3, 3), strides=2)
      >>> shape, params = up.init(jax.random.key(0), (-1, 7, 7, 8))
      >>> shape, params["w"].shape
      ((-1, 14, 14, 4), (3, 3, 8, 4))
      >>> up.apply(params, jnp.ones((2, 7, 7, 8))).shape
      (2, 14, 14, 4)
    """
    features = positive_int("ConvTranspose", "features", features)
    boolean("ConvTranspose", "use_bias", use_bias)
    param_dtype, dtype = layer_dtypes("ConvTranspose", param_dtype, dtype)
    ks, strides_t, dilation_t, pad = _window_options(
        "ConvTranspose", kernel_size, strides, dilation, padding
    )
    n = len(ks)
    desc = _describe(
        "ConvTranspose",
        features,
        ks,
        strides=strides,
        padding=padding,
        dilation=dilation,
        use_bias=use_bias,
        dtype=dtype,
    )
    numbers = _NUMBERS[n]

    def init_fn(key, input_shape):
        shape = check_spatial_input(desc, input_shape, n)
        out = out_shape(shape)
        w_shape = (*ks, shape[-1], features)
        return out, _kernel_and_bias(
            key, w_shape, use_bias, w_init, b_init, param_dtype
        )

    def out_shape(shape):
        dk = _dilated(ks, dilation_t)
        out = lax.conv_transpose_shape_tuple(
            (1, *shape[1:]), (*dk, shape[-1], features), strides_t, pad, numbers
        )
        return (*_out_shape(desc, shape, tuple(out[1:-1]), dk, pad), features)

    def apply_fn(params, x, **kwargs):
        _check_apply_input(desc, x, n, params["w"].shape[-2])
        out_shape(tuple(jnp.shape(x)))  # fails for an input too small for the kernel
        x, params = to_compute(dtype, x, params)
        x, w = _same_dtype(x, params["w"])
        y = lax.conv_transpose(
            x,
            w,
            strides_t,
            pad,
            rhs_dilation=dilation_t,
            dimension_numbers=numbers,
        )
        return _add_bias(params, y, use_bias)

    return library_layer("conv_transpose", desc, init_fn, apply_fn)
