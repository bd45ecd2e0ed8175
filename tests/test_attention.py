"""MultiHeadAttention against a plain numpy softmax(q k^T / sqrt(d)) v."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn

from suite import check_layer_properties
from suite import init_perturbed as _init

RTOL_F32 = 1e-5
ATOL_F32 = 1e-5
RTOL_F64 = 1e-12
ATOL_F64 = 1e-12
VARIANCE_SIGMAS = 6  # tolerance in standard errors of a sample variance


def _np_attention(params, xq, xkv, num_heads, mask=None):
    """The reference: per-head softmax(q k^T / sqrt(d)) v in float64 numpy.

    ``mask`` is a boolean (batch, heads|1, q, k) array; a query row with no
    key gives a zero context, so the output there is the out bias.
    """
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xq, xkv = np.asarray(xq, np.float64), np.asarray(xkv, np.float64)

    def proj(name, x):
        y = x @ p[name]["w"] + p[name]["b"]
        return y.reshape(y.shape[:2] + (num_heads, -1))

    q, k, v = proj("query", xq), proj("key", xkv), proj("value", xkv)
    d = q.shape[-1]
    out = np.zeros(q.shape)
    batch, t_q, heads, _ = q.shape
    for b in range(batch):
        for h in range(heads):
            s = q[b, :, h] @ k[b, :, h].T / np.sqrt(d)  # (t_q, t_k)
            allowed = np.ones(s.shape, bool)
            if mask is not None:
                allowed = np.broadcast_to(
                    mask[b if mask.shape[0] > 1 else 0, h if mask.shape[1] > 1 else 0],
                    s.shape,
                )
            for i in range(t_q):
                if not allowed[i].any():
                    continue
                e = np.where(allowed[i], np.exp(s[i] - s[i][allowed[i]].max()), 0.0)
                out[b, i, h] = (e / e.sum()) @ v[b, :, h]
    out = out.reshape(batch, t_q, -1)
    return out @ p["out"]["w"] + p["out"]["b"]


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize(
    ("layer", "shape", "kwargs"),
    [
        (fnn.MultiHeadAttention(2), (-1, 4, 6), {}),
        (fnn.MultiHeadAttention(2, causal=True, qkv_features=4), (-1, 3, 6), {}),
        (fnn.MultiHeadAttention(1, out_features=3), ((-1, 3, 4), (-1, 5, 2)), {}),
        (
            fnn.MultiHeadAttention(2),
            (-1, 4, 4),
            {"mask": jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], bool)},
        ),
    ],
    ids=["self", "causal", "cross", "padding-mask"],
)
def test_property_suite(layer, shape, kwargs):
    check_layer_properties(layer, shape, apply_kwargs=kwargs)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_self_attention_matches_numpy(jit):
    layer = fnn.MultiHeadAttention(3, qkv_features=6, out_features=5)
    params = _init(layer, (-1, 4, 7))
    x = _x((2, 4, 7))
    apply = jax.jit(layer.apply) if jit else layer.apply
    want = _np_attention(params, x, x, 3)
    np.testing.assert_allclose(apply(params, x), want, rtol=RTOL_F32, atol=ATOL_F32)


def test_causal_matches_numpy():
    layer = fnn.MultiHeadAttention(2, causal=True)
    params = _init(layer, (-1, 5, 4))
    x = _x((2, 5, 4))
    tril = np.tril(np.ones((5, 5), bool))[None, None]
    want = _np_attention(params, x, x, 2, mask=tril)
    np.testing.assert_allclose(
        layer.apply(params, x), want, rtol=RTOL_F32, atol=ATOL_F32
    )


def test_cross_attention_matches_numpy():
    layer = fnn.MultiHeadAttention(2, qkv_features=4)
    params = _init(layer, ((-1, 3, 6), (-1, 5, 2)))
    xq, xkv = _x((2, 3, 6), 1), _x((2, 5, 2), 2)
    chex.assert_shape(params["key"]["w"], (2, 4))
    want = _np_attention(params, xq, xkv, 2)
    np.testing.assert_allclose(
        layer.apply(params, (xq, xkv)), want, rtol=RTOL_F32, atol=ATOL_F32
    )


def test_padding_and_attention_masks_match_numpy():
    layer = fnn.MultiHeadAttention(2, causal=True)
    params = _init(layer, (-1, 4, 4))
    x = _x((2, 4, 4))
    pad = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], bool)
    full = np.random.default_rng(0).random((2, 2, 4, 4)) < 0.7
    want_mask = np.tril(np.ones((4, 4), bool))[None, None] & pad[:, None, None] & full
    want = _np_attention(params, x, x, 2, mask=want_mask)
    got = layer.apply(params, x, mask=jnp.asarray(pad), attention_mask=full)
    np.testing.assert_allclose(got, want, rtol=RTOL_F32, atol=ATOL_F32)
    # a rank-4 mask= is an attention mask
    got4 = layer.apply(params, x, mask=jnp.asarray(want_mask))
    np.testing.assert_allclose(got4, want, rtol=RTOL_F32, atol=ATOL_F32)


def test_padded_batch_equals_unpadded_sequences():
    layer = fnn.MultiHeadAttention(2, causal=False)
    params = _init(layer, (-1, 6, 4))
    x = _x((2, 6, 4))
    lengths = [6, 3]
    pad = jnp.arange(6)[None, :] < jnp.array(lengths)[:, None]
    got = layer.apply(params, x, mask=pad)
    for b, n in enumerate(lengths):
        alone = layer.apply(params, x[b : b + 1, :n])
        np.testing.assert_allclose(
            got[b : b + 1, :n], alone, rtol=RTOL_F32, atol=ATOL_F32
        )


def test_fully_masked_row_is_finite_and_gives_the_out_bias():
    layer = fnn.MultiHeadAttention(2, causal=True)
    params = _init(layer, (-1, 3, 4))
    x = _x((2, 3, 4))
    pad = jnp.array([[True, True, True], [False, True, True]])  # row 0 of b=1: none

    def loss(p):
        return jnp.sum(layer.apply(p, x, mask=pad) ** 2)

    y = layer.apply(params, x, mask=pad)
    chex.assert_tree_all_finite(y)
    np.testing.assert_allclose(y[1, 0], params["out"]["b"], rtol=RTOL_F32, atol=0)
    chex.assert_tree_all_finite(jax.grad(loss)(params))


def test_params_are_readable_and_batch_survives():
    layer = fnn.MultiHeadAttention(2, qkv_features=4, out_features=3)
    shape, params = layer.init(jax.random.key(0), (-1, 5, 6))
    assert shape == (-1, 5, 3)
    # shapes given as lists work as tuples (e.g. read back from JSON)
    assert layer.init(jax.random.key(0), [-1, 5, 6])[0] == (-1, 5, 3)
    assert layer.init(jax.random.key(0), [[-1, 5, 6], [-1, 2, 4]])[0] == (-1, 5, 3)
    chex.assert_trees_all_equal_shapes(
        params,
        {
            "query": {"w": np.zeros((6, 4)), "b": np.zeros(4)},
            "key": {"w": np.zeros((6, 4)), "b": np.zeros(4)},
            "value": {"w": np.zeros((6, 4)), "b": np.zeros(4)},
            "out": {"w": np.zeros((4, 3)), "b": np.zeros(3)},
        },
    )


def test_projections_have_variance_one_over_their_fan_in():
    """LeCun normal on every projection: Var(w) = 1 / its input features."""
    layer = fnn.MultiHeadAttention(4, qkv_features=512, out_features=128)
    _, params = layer.init(jax.random.key(0), ((-1, 3, 128), (-1, 5, 64)))
    for name, fan_in in (("query", 128), ("key", 64), ("value", 64), ("out", 512)):
        w = np.asarray(params[name]["w"], np.float64)
        tol = VARIANCE_SIGMAS * np.sqrt(2 / w.size)  # standard error of a variance
        assert abs(w.var() * fan_in - 1) < tol, (name, w.var() * fan_in)


def test_inside_serial_receives_mask():
    net = fnn.serial(fnn.Dense(4), fnn.MultiHeadAttention(2))
    _, params = net.init(jax.random.key(0), (-1, 3, 2))
    x = _x((1, 3, 2))
    pad = jnp.array([[True, True, False]])
    got = net.apply(params, x, mask=pad)[:, :2]
    want = net.apply(params, x[:, :2])
    np.testing.assert_allclose(got, want, rtol=RTOL_F32, atol=ATOL_F32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"num_heads": 0},
            r"MultiHeadAttention: expected num_heads to be a positive int",
        ),
        (
            {"num_heads": 2, "qkv_features": -3},
            r"MultiHeadAttention: expected qkv_features to be a positive int",
        ),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fnn.MultiHeadAttention(**kwargs)


@pytest.mark.parametrize(
    ("layer", "shape", "match"),
    [
        (
            fnn.MultiHeadAttention(3),
            (-1, 4, 8),
            r"MultiHeadAttention\(3\): qkv_features 8 is not divisible by "
            r"num_heads 3",
        ),
        (
            fnn.MultiHeadAttention(2),
            (-1, 8),
            r"expected input of rank at least 3, got shape \(-1, 8\)",
        ),
        (
            fnn.MultiHeadAttention(2),
            (-1, 4, -1),
            r"the features of the queries must be known",
        ),
        (
            fnn.MultiHeadAttention(2),
            ((2, 4, 4), (3, 5, 4)),
            r"queries and keys_values must have one batch size",
        ),
    ],
)
def test_bad_input_shapes_at_init(layer, shape, match):
    with pytest.raises(fnn.ShapeError, match=match):
        layer.init(jax.random.key(0), shape)


def test_bad_inputs_at_apply_name_the_layer_and_place():
    net = fnn.serial(fnn.MultiHeadAttention(2))
    _, params = net.init(jax.random.key(0), (-1, 3, 4))
    x = jnp.ones((2, 3, 4))
    with pytest.raises(
        fnn.ShapeError,
        match=r"MultiHeadAttention\(2\) at serial\[0\]: expected queries of shape "
        r"\(batch, time, 4\), got \(2, 3, 5\)",
    ):
        net.apply(params, jnp.ones((2, 3, 5)))
    with pytest.raises(fnn.ShapeError, match=r"key padding mask of shape"):
        net.apply(params, x, mask=jnp.ones((2, 4), bool))
    with pytest.raises(fnn.ShapeError, match=r"additive float mask is not supported"):
        net.apply(params, x, mask=jnp.zeros((2, 3)))
    with pytest.raises(fnn.ShapeError, match=r"expected an attention mask of shape"):
        net.apply(params, x, attention_mask=jnp.ones((2, 3, 3, 3), bool))


def test_float64_matches_numpy_closely():
    layer = fnn.MultiHeadAttention(2, causal=True)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), _init(layer, (-1, 4, 4)))
        x = _x((2, 4, 4)).astype(jnp.float64)
        pad = np.array([[1, 1, 1, 1], [0, 1, 1, 0]], bool)
        mask = np.tril(np.ones((4, 4), bool))[None, None] & pad[:, None, None]
        got = layer.apply(params, x, mask=jnp.asarray(pad))
        chex.assert_type(got, jnp.float64)
        want = _np_attention(params, x, x, 2, mask=mask)
        np.testing.assert_allclose(got, want, rtol=RTOL_F64, atol=ATOL_F64)


def test_complex_input_is_refused_with_the_place():
    net = fnn.serial(fnn.model.Identity(), fnn.MultiHeadAttention(2))
    _, params = net.init(jax.random.key(0), (-1, 3, 4))
    with pytest.raises(fnn.ShapeError) as e:
        jax.jit(net.apply)(params, jnp.ones((2, 3, 4), jnp.complex64))
    assert str(e.value).startswith(
        "MultiHeadAttention(2) at serial[1]: expected a real input, got dtype complex64"
    )
