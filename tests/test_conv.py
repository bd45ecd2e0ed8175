"""Conv and ConvTranspose: numerics against numpy loops and Flax, shapes, errors."""

from __future__ import annotations

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fnn

from suite import check_layer_properties

RTOL_F32 = 1e-5
ATOL_F32 = 1e-5


# --- independent references -------------------------------------------------------


def _same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's SAME rule: output ceil(n / s), the extra cell at the end."""
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def np_conv(x, w, strides, padding, dilation, groups=1):
    """A direct loop convolution, channels last; ``w`` is (*kernel, in/g, out)."""
    nsp = x.ndim - 2
    ks = w.shape[:nsp]
    dk = [(k - 1) * d + 1 for k, d in zip(ks, dilation)]
    if padding == "VALID":
        pads = [(0, 0)] * nsp
    elif padding == "SAME":
        pads = [_same_pads(x.shape[1 + i], dk[i], strides[i]) for i in range(nsp)]
    else:
        pads = padding
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    out_sp = [(xp.shape[1 + i] - dk[i]) // strides[i] + 1 for i in range(nsp)]
    cin_g, cout = w.shape[-2], w.shape[-1]
    cout_g = cout // groups
    y = np.zeros((x.shape[0], *out_sp, cout))
    for o in itertools.product(*map(range, out_sp)):
        for k in itertools.product(*map(range, ks)):
            pos = tuple(o[i] * strides[i] + k[i] * dilation[i] for i in range(nsp))
            patch = xp[(slice(None), *pos)]  # (batch, cin)
            for g in range(groups):
                xs = patch[:, g * cin_g : (g + 1) * cin_g]
                ws = w[k][:, g * cout_g : (g + 1) * cout_g]
                y[(slice(None), *o, slice(g * cout_g, (g + 1) * cout_g))] += xs @ ws
    return y


def np_conv_transpose_valid(x, w, strides, dilation):
    """lax.conv_transpose (transpose_kernel=False) with VALID padding, as a scatter.

    Input cell ``i`` adds ``x[i] * w[k]`` at ``i * s + (dk - 1) - k * d``; the
    output is ``n * s + max(dk - s, 0)`` long (zeros past the last scatter).
    """
    nsp = x.ndim - 2
    ks = w.shape[:nsp]
    dk = [(k - 1) * d + 1 for k, d in zip(ks, dilation)]
    out_sp = [
        x.shape[1 + i] * strides[i] + max(dk[i] - strides[i], 0) for i in range(nsp)
    ]
    y = np.zeros((x.shape[0], *out_sp, w.shape[-1]))
    for i in itertools.product(*(range(n) for n in x.shape[1:-1])):
        for k in itertools.product(*map(range, ks)):
            pos = tuple(
                i[a] * strides[a] + dk[a] - 1 - k[a] * dilation[a] for a in range(nsp)
            )
            y[(slice(None), *pos)] += x[(slice(None), *i)] @ w[k]
    return y


def _run(layer, in_shape, seed=0):
    shape, params = layer.init(jax.random.key(seed), (-1, *in_shape[1:]))
    params = jax.tree.map(
        lambda a: jax.random.normal(jax.random.key(seed + 1), a.shape), params
    )
    x = jax.random.normal(jax.random.key(seed + 2), in_shape)
    return shape, params, x, layer.apply(params, x)


# --- numerics -----------------------------------------------------------------------

CONV_CASES = [
    # kernel, strides, padding, dilation, groups, input shape
    ((3,), (1,), "SAME", (1,), 1, (2, 7, 3)),
    ((3,), (2,), "VALID", (1,), 1, (2, 8, 2)),
    ((2,), (3,), "SAME", (2,), 1, (1, 9, 2)),
    ((3, 3), (1, 1), "SAME", (1, 1), 1, (2, 5, 6, 2)),
    ((3, 2), (2, 1), "VALID", (1, 2), 1, (1, 7, 6, 3)),
    ((2, 2), (2, 2), ((1, 0), (2, 1)), (1, 1), 1, (1, 5, 4, 2)),
    ((3, 3), (1, 1), "SAME", (1, 1), 2, (1, 4, 4, 4)),
    ((2, 2, 2), (1, 2, 1), "SAME", (1, 1, 1), 1, (1, 3, 4, 3, 2)),
]


@pytest.mark.parametrize("ks, strides, padding, dilation, groups, in_shape", CONV_CASES)
def test_conv_matches_numpy_loop(ks, strides, padding, dilation, groups, in_shape):
    layer = fnn.Conv(
        4,
        ks,
        strides=strides,
        padding=padding,
        dilation=dilation,
        feature_group_count=groups,
    )
    shape, params, x, y = _run(layer, in_shape)
    ref = np_conv(
        np.asarray(x), np.asarray(params["w"]), strides, padding, dilation, groups
    ) + np.asarray(params["b"])
    chex.assert_trees_all_close(y, ref, rtol=RTOL_F32, atol=ATOL_F32)
    assert shape[1:] == y.shape[1:]


@pytest.mark.parametrize(
    "ks, strides, dilation, in_shape",
    [
        ((3,), (2,), (1,), (2, 4, 3)),
        ((2,), (3,), (1,), (1, 3, 2)),
        ((3,), (1,), (2,), (1, 4, 2)),
        ((3, 2), (2, 2), (1, 1), (1, 3, 2, 2)),
    ],
)
def test_conv_transpose_valid_matches_numpy_scatter(ks, strides, dilation, in_shape):
    layer = fnn.ConvTranspose(
        3, ks, strides=strides, padding="VALID", dilation=dilation
    )
    shape, params, x, y = _run(layer, in_shape)
    ref = np_conv_transpose_valid(
        np.asarray(x), np.asarray(params["w"]), strides, dilation
    ) + np.asarray(params["b"])
    chex.assert_trees_all_close(y, ref, rtol=RTOL_F32, atol=ATOL_F32)
    assert shape[1:] == y.shape[1:]


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((1, 2), (0, 1))])
@pytest.mark.parametrize("strides", [1, 2])
def test_matches_flax(padding, strides):
    nn = pytest.importorskip("flax.linen")
    x = jax.random.normal(jax.random.key(0), (2, 6, 5, 3))
    for ours, theirs in [
        (
            fnn.Conv(4, (3, 2), strides=strides, padding=padding),
            nn.Conv(4, (3, 2), strides=strides, padding=padding),
        ),
        (
            fnn.ConvTranspose(4, (3, 2), strides=strides, padding=padding),
            nn.ConvTranspose(4, (3, 2), strides=strides, padding=padding),
        ),
    ]:
        _, params = ours.init(jax.random.key(1), (-1, 6, 5, 3))
        flax_params = {"params": {"kernel": params["w"], "bias": params["b"]}}
        chex.assert_trees_all_close(
            ours.apply(params, x),
            theirs.apply(flax_params, x),
            rtol=RTOL_F32,
            atol=ATOL_F32,
        )


def test_depthwise_conv_is_per_channel():
    layer = fnn.Conv(3, (3,), feature_group_count=3, use_bias=False)
    _, params, x, y = _run(layer, (2, 6, 3))
    chex.assert_shape(params["w"], (3, 1, 3))
    for c in range(3):
        ref = np_conv(
            np.asarray(x[..., c : c + 1]),
            np.asarray(params["w"][:, :, c : c + 1]),
            (1,),
            "SAME",
            (1,),
        )
        chex.assert_trees_all_close(
            y[..., c : c + 1], ref, rtol=RTOL_F32, atol=ATOL_F32
        )


# --- the property suite ---------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, in_shape",
    [
        (fnn.Conv(2, (3,)), (-1, 5, 2)),
        (fnn.Conv(2, (2, 3), strides=(2, 1), padding="VALID"), (-1, 5, 4, 2)),
        (fnn.Conv(4, (3, 3), dilation=2, feature_group_count=2), (-1, 5, 5, 2)),
        (fnn.Conv(2, (2, 2, 2), padding=((1, 0), (0, 1), (1, 1))), (-1, 3, 3, 3, 1)),
        (fnn.ConvTranspose(2, (3,), strides=2), (-1, 4, 2)),
        (fnn.ConvTranspose(2, (2, 3), strides=(2, 1), padding="VALID"), (-1, 3, 3, 2)),
        (fnn.ConvTranspose(2, (2, 2, 2), strides=2), (-1, 2, 2, 2, 1)),
    ],
)
def test_properties(layer, in_shape):
    check_layer_properties(layer, in_shape)


# --- init's shape arithmetic against jax.eval_shape ---


@st.composite
def conv_configs(draw):
    n = draw(st.integers(1, 3))
    ks = tuple(draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))
    strides = tuple(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)))
    dilation = tuple(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)))
    padding = draw(
        st.one_of(
            st.sampled_from(["SAME", "VALID"]),
            st.lists(
                st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=n, max_size=n
            ).map(tuple),
        )
    )
    spatial = tuple(draw(st.lists(st.integers(1, 9), min_size=n, max_size=n)))
    transpose = draw(st.booleans())
    return ks, strides, dilation, padding, spatial, transpose


@settings(max_examples=30, deadline=None)
@given(conv_configs())
def test_init_shape_equals_eval_shape(config):
    ks, strides, dilation, padding, spatial, transpose = config
    make = fnn.ConvTranspose if transpose else fnn.Conv
    layer = make(3, ks, strides=strides, padding=padding, dilation=dilation)
    in_shape = (-1, *spatial, 2)
    try:
        out_shape, params = layer.init(jax.random.key(0), in_shape)
    except fnn.ShapeError as e:
        # Only VALID or explicit padding can leave no output; check it by hand.
        assert "too small" in str(e) and padding != "SAME"
        dk = [(k - 1) * d + 1 for k, d in zip(ks, dilation)]
        pads = [sum(p) for p in padding] if padding != "VALID" else [0] * 3
        if transpose:
            sizes = [
                (n - 1) * s + p - k + 2
                for n, s, p, k in zip(spatial, strides, pads, dk)
            ]
        else:
            sizes = [
                (n + p - k) // s + 1 for n, s, p, k in zip(spatial, strides, pads, dk)
            ]
        assert min(sizes) < 1
        return
    assert out_shape[0] == -1
    x = jax.ShapeDtypeStruct((2, *spatial, 2), jnp.float32)
    y = jax.eval_shape(layer.apply, params, x)
    assert y.shape == (2, *out_shape[1:])


# --- errors ---


def test_wrong_rank_error_at_init_and_apply():
    layer = fnn.serial(fnn.Dense(2), fnn.Conv(4, (3, 3)))
    with pytest.raises(fnn.ShapeError) as e:
        layer.init(jax.random.key(0), (-1, 8, 2))
    assert str(e.value) == (
        "Conv(4, (3, 3)) at serial[1]: expected input of rank 4 (batch, height, "
        "width, channels) for a 2-D convolution, got shape (-1, 8, 2)."
    )
    conv = fnn.Conv(4, (3,))
    _, params = conv.init(jax.random.key(0), (-1, 8, 2))
    with pytest.raises(fnn.ShapeError, match=r"expected input of rank 3 \(batch, "):
        conv.apply(params, jnp.ones((8, 2)))


def test_channel_mismatch_at_apply():
    conv = fnn.Conv(4, (3, 3))
    _, params = conv.init(jax.random.key(0), (-1, 8, 8, 3))
    with pytest.raises(
        fnn.ShapeError,
        match=r"expected input with 3 channels \(last dimension\), got shape "
        r"\(2, 8, 8, 5\)",
    ):
        jax.jit(conv.apply)(params, jnp.ones((2, 8, 8, 5)))


def test_groups_errors():
    with pytest.raises(
        fnn.ShapeError,
        match="input channels 3 are not divisible by feature_group_count=2",
    ):
        fnn.Conv(4, (3,), feature_group_count=2).init(jax.random.key(0), (-1, 5, 3))
    with pytest.raises(ValueError, match="features=3 is not divisible"):
        fnn.Conv(3, (3,), feature_group_count=2)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: fnn.Conv(4, 3), r"Conv: expected kernel_size to be a tuple, e\.g\."),
        (lambda: fnn.Conv(4, (3, 3, 3, 3)), "tuple of 1, 2 or 3 positive ints"),
        (lambda: fnn.Conv(0, (3,)), "features to be a positive int"),
        (lambda: fnn.Conv(4, (3, 3), strides=(1, 2, 3)), "strides to be a positive"),
        (lambda: fnn.Conv(4, (3,), padding="FULL"), "expected padding 'SAME'"),
        (lambda: fnn.ConvTranspose(4, (3,), dilation=0), "dilation to be a positive"),
    ],
)
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_too_small_input_and_unknown_spatial():
    conv = fnn.Conv(2, (5, 5), padding="VALID")
    with pytest.raises(fnn.ShapeError, match="too small for this kernel"):
        conv.init(jax.random.key(0), (-1, 3, 8, 1))
    with pytest.raises(fnn.ShapeError, match="only the batch dimension may be unknown"):
        conv.init(jax.random.key(0), (-1, -1, 8, 1))


def test_kernel_layout_and_default_init_scale():
    _, params = fnn.Conv(64, (3, 3)).init(jax.random.key(0), (-1, 8, 8, 32))
    chex.assert_shape(params["w"], (3, 3, 32, 64))
    fan_in = 3 * 3 * 32
    # LeCun normal: variance 1 / fan_in (truncated normal, so a loose bound)
    assert abs(float(params["w"].std()) * math.sqrt(fan_in) - 1.0) < 0.05


@pytest.mark.parametrize(
    ("layer", "x_shape", "window"),
    [
        (fnn.Conv(2, (3,), padding="VALID"), (2, 2, 1), "(3,)"),
        (fnn.Conv(2, (2,), padding="VALID", dilation=2), (2, 2, 1), "(3,)"),
        (fnn.ConvTranspose(2, (3,), padding=((0, 0),)), (2, 1, 1), "(3,)"),
    ],
    ids=["conv", "dilated", "transpose"],
)
def test_input_too_small_for_the_kernel_at_apply(layer, x_shape, window):
    # init saw 5 steps; apply gets fewer, which would leave an empty output
    net = fnn.serial(fnn.model.Identity(), layer, fnn.GlobalMeanPool())
    _, params = net.init(jax.random.key(0), (-1, 5, 1))
    with pytest.raises(fnn.ShapeError) as e:
        jax.jit(net.apply)(params, jnp.ones(x_shape))
    message = str(e.value)
    assert message.startswith(f"{layer!r} at serial[1]: ")
    assert f"input of shape {x_shape!r} is too small" in message
    assert f"the window {window}" in message


@pytest.mark.parametrize("make", [fnn.Conv, fnn.ConvTranspose])
@pytest.mark.parametrize(
    ("dtype", "detail"),
    [
        (jnp.complex64, "expected a real input, got dtype complex64"),
        (jnp.int32, "expected a floating-point input, got dtype int32"),
    ],
)
def test_conv_refuses_complex_and_integer_inputs(make, dtype, detail):
    net = fnn.serial(fnn.model.Identity(), make(2, (3,)))
    _, params = net.init(jax.random.key(0), (-1, 4, 1))
    with pytest.raises(fnn.ShapeError) as e:
        jax.jit(net.apply)(params, jnp.ones((2, 4, 1), dtype))
    assert str(e.value).startswith(f"{make.__name__}(2, (3,)) at serial[1]: {detail}")
