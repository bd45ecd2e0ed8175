"""Pooling: windowed max/avg against numpy loops and Flax; masked global pooling."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.model.layers.pool import masked_max, masked_mean

from suite import BATCH, check_layer_properties

RTOL_F32 = 1e-6
ATOL_F32 = 1e-6


def _pads(n, k, s, padding):
    if padding == "VALID":
        return (0, 0)
    if padding == "SAME":  # TensorFlow's rule: output ceil(n / s)
        total = max((-(-n // s) - 1) * s + k - n, 0)
        return total // 2, total - total // 2
    return padding


def np_pool(x, window, strides, padding, kind, count_include_pad=True):
    """A loop over windows of a channels-last array; padding never wins a max."""
    nsp = x.ndim - 2
    padding = padding if isinstance(padding, str) else list(padding)
    pads = [
        _pads(
            x.shape[1 + i],
            window[i],
            strides[i],
            padding if isinstance(padding, str) else padding[i],
        )
        for i in range(nsp)
    ]
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, [(0, 0), *pads, (0, 0)], constant_values=fill)
    real = np.pad(np.ones(x.shape[1:-1]), pads)
    out_sp = [(xp.shape[1 + i] - window[i]) // strides[i] + 1 for i in range(nsp)]
    y = np.zeros((x.shape[0], *out_sp, x.shape[-1]))
    for o in itertools.product(*map(range, out_sp)):
        sl = tuple(
            slice(o[i] * strides[i], o[i] * strides[i] + window[i]) for i in range(nsp)
        )
        cells = xp[(slice(None), *sl)].reshape(x.shape[0], -1, x.shape[-1])
        if kind == "max":
            y[(slice(None), *o)] = cells.max(axis=1)
        else:
            n = np.prod(window) if count_include_pad else real[sl].sum()
            y[(slice(None), *o)] = cells.sum(axis=1) / n
    return y


CASES = [
    # window, strides, padding, input shape
    ((2,), (2,), "VALID", (2, 7, 3)),
    ((3,), (1,), "SAME", (2, 5, 2)),
    ((2, 2), (2, 2), "VALID", (2, 4, 6, 3)),
    ((3, 3), (2, 2), "SAME", (1, 5, 6, 2)),
    ((2, 3), (1, 2), ((1, 0), (1, 2)), (1, 4, 5, 2)),
    ((2, 2, 2), (1, 2, 2), "SAME", (1, 3, 4, 5, 2)),
]


@pytest.mark.parametrize("window, strides, padding, in_shape", CASES)
def test_max_and_avg_pool_match_numpy(window, strides, padding, in_shape):
    x = jax.random.normal(jax.random.key(0), in_shape)
    for layer, kind, include in [
        (fnn.MaxPool(window, strides, padding), "max", True),
        (fnn.AvgPool(window, strides, padding), "avg", True),
        (fnn.AvgPool(window, strides, padding, count_include_pad=False), "avg", False),
    ]:
        shape, _ = layer.init(None, (-1, *in_shape[1:]))
        y = layer.apply({}, x)
        ref = np_pool(np.asarray(x), window, strides, padding, kind, include)
        chex.assert_trees_all_close(y, ref, rtol=RTOL_F32, atol=ATOL_F32)
        assert shape == (-1, *ref.shape[1:])


def test_default_strides_are_one_as_in_stax_and_flax():
    shape, _ = fnn.MaxPool((2, 2)).init(None, (-1, 6, 6, 1))
    assert shape == (-1, 5, 5, 1)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_avg_pool_matches_flax(padding):
    nn = pytest.importorskip("flax.linen")
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 3))
    ours = fnn.AvgPool((3, 2), strides=(2, 2), padding=padding).apply({}, x)
    theirs = nn.avg_pool(x, (3, 2), strides=(2, 2), padding=padding)
    chex.assert_trees_all_close(ours, theirs, rtol=RTOL_F32, atol=ATOL_F32)
    ours = fnn.MaxPool((3, 2), strides=(2, 2), padding=padding).apply({}, x)
    theirs = nn.max_pool(x, (3, 2), strides=(2, 2), padding=padding)
    chex.assert_trees_all_close(ours, theirs, rtol=RTOL_F32, atol=ATOL_F32)


# --- masked global pooling -----------------------------------------------------------

LENGTHS = np.array([5, 2, 0, 3])


def _padded(key, lengths=LENGTHS, time=5, features=3):
    x = jax.random.normal(key, (len(lengths), time, features))
    mask = np.arange(time)[None, :] < lengths[:, None]
    return x, jnp.asarray(mask)


@pytest.mark.parametrize(
    "layer, np_reduce",
    [(fnn.GlobalMeanPool(), np.mean), (fnn.GlobalMaxPool(), np.max)],
)
def test_masked_pooling_equals_pooling_the_unpadded_rows(layer, np_reduce):
    x, mask = _padded(jax.random.key(0))
    y = jax.jit(lambda x, m: layer.apply({}, x, mask=m))(x, mask)
    for b, n in enumerate(LENGTHS):
        want = np_reduce(np.asarray(x[b, :n]), axis=0) if n else np.zeros(3)
        chex.assert_trees_all_close(y[b], want, rtol=RTOL_F32, atol=ATOL_F32)


@pytest.mark.parametrize("fn", [masked_mean, masked_max])
def test_padding_values_never_matter(fn):
    x, mask = _padded(jax.random.key(1))
    garbage = jnp.where(mask[..., None], x, jnp.array(jnp.nan))
    garbage = garbage.at[1, 4, 0].set(jnp.inf)
    chex.assert_trees_all_close(
        fn(garbage, mask, 1), fn(x, mask, 1), rtol=RTOL_F32, atol=ATOL_F32
    )
    grad = jax.grad(lambda v: fn(v, mask, 1).sum())(garbage)
    chex.assert_tree_all_finite(grad)
    np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(mask)], 0.0)


@pytest.mark.parametrize("fn", [masked_mean, masked_max])
def test_fully_masked_row_gives_zero_and_finite_gradients(fn):
    x = jax.random.normal(jax.random.key(2), (2, 4, 3))
    mask = jnp.zeros((2, 4), bool)
    chex.assert_trees_all_equal(fn(x, mask, 1), jnp.zeros((2, 3)))
    grad = jax.grad(lambda v: fn(v, mask, 1).sum())(x)
    chex.assert_trees_all_equal(grad, jnp.zeros_like(x))
    _, tangent = jax.jvp(lambda v: fn(v, mask, 1), (x,), (jnp.ones_like(x),))
    chex.assert_tree_all_finite(tangent)


def test_mask_of_full_rank_and_several_axes():
    x = jax.random.normal(jax.random.key(3), (2, 3, 4, 5))
    mask = jax.random.bernoulli(jax.random.key(4), 0.6, (2, 3, 4, 5))
    got = fnn.GlobalMeanPool(axis=(1, 2)).apply({}, x, mask=mask)
    xn, mn = np.asarray(x), np.asarray(mask)
    want = (xn * mn).sum((1, 2)) / np.maximum(mn.sum((1, 2)), 1)
    chex.assert_trees_all_close(got, want, rtol=RTOL_F32, atol=ATOL_F32)


def test_unmasked_global_pool_matches_numpy():
    x = jax.random.normal(jax.random.key(5), (2, 4, 6, 3))
    for layer, ref in [
        (fnn.GlobalMeanPool((1, 2)), np.mean),
        (fnn.GlobalMaxPool((1, -2)), np.max),
    ]:
        shape, _ = layer.init(None, (-1, 4, 6, 3))
        assert shape == (-1, 3)
        chex.assert_trees_all_close(
            layer.apply({}, x),
            ref(np.asarray(x), axis=(1, 2)),
            rtol=RTOL_F32,
            atol=ATOL_F32,
        )


# --- the property suite ---------------------------------------------------------------

MASK = jnp.asarray(np.arange(4)[None, :] < np.array([4, 1, 0])[:, None])


@pytest.mark.parametrize(
    "layer, in_shape, kwargs",
    [
        (fnn.MaxPool((2, 2), strides=2), (-1, 4, 4, 2), {}),
        (fnn.MaxPool((3,), padding="SAME"), (-1, 5, 2), {}),
        (fnn.AvgPool((2, 2), padding="SAME"), (-1, 3, 3, 2), {}),
        (
            fnn.AvgPool((2, 2, 2), padding="SAME", count_include_pad=False),
            (-1, 3, 3, 3, 1),
            {},
        ),
        (fnn.GlobalMeanPool(), (-1, 4, 3), {}),
        (fnn.GlobalMaxPool(), (-1, 4, 3), {}),
        (fnn.GlobalMeanPool(), (-1, 4, 3), {"mask": MASK}),
        (fnn.GlobalMaxPool(), (-1, 4, 3), {"mask": MASK}),
    ],
)
def test_properties(layer, in_shape, kwargs):
    assert MASK.shape == (BATCH, 4)
    check_layer_properties(layer, in_shape, apply_kwargs=kwargs)


# --- errors -------------------------------------------------------------------------


def test_errors():
    pool = fnn.serial(fnn.Dense(2), fnn.MaxPool((2, 2)))
    with pytest.raises(fnn.ShapeError) as e:
        pool.init(jax.random.key(0), (-1, 8, 3))
    assert str(e.value) == (
        "MaxPool((2, 2)) at serial[1]: expected input of rank 4 (batch, height, "
        "width, channels) for a 2-D pooling window, got shape (-1, 8, 2)."
    )
    with pytest.raises(fnn.ShapeError, match="smaller than the window"):
        fnn.AvgPool((3, 3)).init(None, (-1, 2, 5, 1))
    with pytest.raises(fnn.ShapeError, match="expected a mask broadcastable to"):
        fnn.GlobalMeanPool().apply({}, jnp.ones((2, 4, 3)), mask=jnp.ones((2, 3)))
    with pytest.raises(fnn.ShapeError, match="distinct non-batch axes"):
        fnn.GlobalMaxPool(axis=0).init(None, (-1, 4, 3))
    with pytest.raises(fnn.ShapeError, match="out of range"):
        fnn.GlobalMaxPool(axis=3).init(None, (-1, 4, 3))
    with pytest.raises(ValueError, match="masked_mean|expected a mask"):
        masked_mean(jnp.ones((2, 4, 3)), jnp.ones((4,)), 1)
    with pytest.raises(ValueError, match="MaxPool: expected window to be a tuple"):
        fnn.MaxPool(2)
    with pytest.raises(ValueError, match="GlobalMeanPool: expected an int axis"):
        fnn.GlobalMeanPool(axis="time")


@pytest.mark.parametrize("make", [fnn.MaxPool, fnn.AvgPool])
def test_input_smaller_than_the_window_at_apply(make):
    # init saw (-1, 5, 1); apply gets 2 steps, which would leave an empty output
    net = fnn.serial(fnn.model.Identity(), make((3,)))
    _, params = net.init(None, (-1, 5, 1))
    with pytest.raises(fnn.ShapeError) as e:
        jax.jit(net.apply)(params, jnp.ones((2, 2, 1)))
    message = str(e.value)
    assert message.startswith(f"{make.__name__}((3,)) at serial[1]: ")
    assert "input of shape (2, 2, 1) is smaller than the window (3,)" in message


@pytest.mark.parametrize("make", [fnn.GlobalMeanPool, fnn.GlobalMaxPool])
def test_global_pool_over_an_empty_axis(make):
    net = fnn.serial(fnn.model.Identity(), make())
    _, params = net.init(None, (-1, 4, 3))
    for mask in (None, jnp.ones((2, 0), bool)):
        with pytest.raises(fnn.ShapeError) as e:
            jax.jit(net.apply)(params, jnp.ones((2, 0, 3)), mask=mask)
        message = str(e.value)
        assert message.startswith(f"{make.__name__}(axis=1) at serial[1]: ")
        assert "(1,)" in message and "(2, 0, 3)" in message
