"""Losses, reductions and prediction against float64 numpy formulas."""

from __future__ import annotations

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import fnn
from fnn import losses

RTOL_F32 = 1e-5
ATOL_F32 = 1e-5
RTOL_F64 = 1e-12
ATOL_F64 = 1e-12
GRAD_TOL_F64 = 1e-6  # check_grads in float64
PROPERTY_TOL_F64 = 1e-10  # float64 sums over a few classes
NONNEGATIVE_SLACK_F64 = 1e-12

# --- independent references: plain numpy in float64 ---------------------------


def np_log_softmax(x):
    z = x - np.max(x, axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def np_softplus(x):
    return np.logaddexp(0.0, x)


def np_ce_probs(logits, probs):
    return -np.sum(probs * np_log_softmax(logits), axis=-1)


def np_ce_ids(logits, ids, smoothing=0.0):
    k = logits.shape[-1]
    target = (1 - smoothing) * np.eye(k)[ids] + smoothing / k
    return np_ce_probs(logits, target)


def np_bce(z, y):
    # -y log s(z) - (1 - y) log(1 - s(z)), with -log s(z) = softplus(-z)
    return y * np_softplus(-z) + (1 - y) * np_softplus(z)


def np_masked_mean(x, m):
    m = np.broadcast_to(m.reshape(m.shape + (1,) * (x.ndim - m.ndim)), x.shape)
    return np.sum(np.where(m, x, 0.0)) / max(np.sum(m), 1)


RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(4, 5)) * 3
LOGITS[0] = [1e4, -1e4, 0.0, 5.0, -3.0]  # extremes in the same batch
LOGITS[1] = [-1e4, -1e4, -1e4, -1e4, 1e4]
IDS = np.array([0, 0, 3, 4])
PROBS = RNG.dirichlet(np.ones(5), size=4)
MASK = np.array([True, True, False, True])


def f32(a):
    return jnp.asarray(a, jnp.float32)


# --- values -----------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("jit", [False, True])
def test_softmax_cross_entropy_integer_labels(smoothing, jit):
    def fn(z, y):
        return losses.softmax_cross_entropy(z, y, label_smoothing=smoothing)

    fn = jax.jit(fn) if jit else fn
    loss = fn(f32(LOGITS), jnp.asarray(IDS))
    chex.assert_shape(loss, (4,))
    chex.assert_tree_all_finite(loss)
    ref = np_ce_ids(LOGITS.astype(np.float32).astype(np.float64), IDS, smoothing)
    np.testing.assert_allclose(np.asarray(loss), ref, rtol=RTOL_F32, atol=ATOL_F32)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_softmax_cross_entropy_probabilities_float64(smoothing):
    with jax.enable_x64(True):
        loss = losses.softmax_cross_entropy(
            jnp.asarray(LOGITS), jnp.asarray(PROBS), label_smoothing=smoothing
        )
    target = (1 - smoothing) * PROBS + smoothing / 5
    np.testing.assert_allclose(
        np.asarray(loss), np_ce_probs(LOGITS, target), rtol=RTOL_F64, atol=ATOL_F64
    )


def test_one_hot_and_integer_labels_agree_with_optax_smoothing():
    a = losses.softmax_cross_entropy(f32(LOGITS), IDS, label_smoothing=0.3)
    b = losses.softmax_cross_entropy(
        f32(LOGITS), np.eye(5)[IDS].astype(np.float32), label_smoothing=0.3
    )
    ref = np_ce_ids(LOGITS.astype(np.float32).astype(np.float64), IDS, 0.3)
    chex.assert_trees_all_close(a, b, rtol=RTOL_F32, atol=ATOL_F32)
    np.testing.assert_allclose(np.asarray(a), ref, rtol=RTOL_F32, atol=ATOL_F32)


def test_sigmoid_binary_cross_entropy_values():
    z = np.array([[-1e4], [-3.0], [0.0], [2.5], [1e4]])
    y = np.array([[1.0], [0.0], [1.0], [0.3], [0.0]])
    loss = losses.sigmoid_binary_cross_entropy(f32(z), f32(y))
    chex.assert_shape(loss, (5, 1))
    chex.assert_tree_all_finite(loss)
    np.testing.assert_allclose(
        np.asarray(loss), np_bce(z, y), rtol=RTOL_F32, atol=ATOL_F32
    )
    ints = losses.sigmoid_binary_cross_entropy(
        f32(z), jnp.asarray([[1], [0], [1], [0], [0]])
    )
    chex.assert_type(ints, jnp.float32)


def test_squared_error_and_mean_squared_error():
    p, t = RNG.normal(size=(3, 2)), RNG.normal(size=(3, 2))
    m = np.array([True, False, True])
    se = losses.squared_error(f32(p), f32(t), m)
    expected = np.where(m[:, None], (p - t) ** 2, 0.0)
    np.testing.assert_allclose(np.asarray(se), expected, rtol=RTOL_F32, atol=ATOL_F32)
    mse = losses.mean_squared_error(f32(p), f32(t), mask=m)
    np.testing.assert_allclose(
        float(mse), np_masked_mean((p - t) ** 2, m), rtol=RTOL_F32, atol=ATOL_F32
    )
    np.testing.assert_allclose(
        float(losses.mean_squared_error(f32(p), f32(t))),
        np.mean((p - t) ** 2),
        rtol=RTOL_F32,
        atol=ATOL_F32,
    )


# --- masks ------------------------------------------------------------------------


def test_masked_entries_are_zero_even_with_nan_inputs_and_have_zero_gradient():
    logits = LOGITS.copy()
    logits[2] = np.nan  # a padded row, e.g. from an out-of-range Embed id
    ids = IDS.copy()
    ids[2] = -100  # a padding label

    def total(z):
        per = losses.softmax_cross_entropy(z, jnp.asarray(ids), MASK)
        return losses.mean(per, MASK)

    loss = losses.softmax_cross_entropy(f32(logits), jnp.asarray(ids), MASK)
    assert float(loss[2]) == 0.0
    ref = np_ce_ids(LOGITS.astype(np.float32).astype(np.float64), IDS)
    keep = np.asarray(MASK)
    np.testing.assert_allclose(
        np.asarray(loss)[keep], ref[keep], rtol=RTOL_F32, atol=ATOL_F32
    )
    g = jax.grad(total)(f32(logits))
    chex.assert_tree_all_finite(g)
    np.testing.assert_array_equal(np.asarray(g[2]), np.zeros(5))


@pytest.mark.parametrize(
    "loss_fn, args",
    [
        (losses.squared_error, (np.ones((4, 3)), np.zeros((4, 3)))),
        (losses.sigmoid_binary_cross_entropy, (np.ones((4, 3)), np.zeros((4, 3)))),
        (losses.softmax_cross_entropy, (np.ones((4, 3)), np.zeros(4, np.int32))),
    ],
)
def test_nan_padding_never_leaks(loss_fn, args):
    a, b = (np.array(v) for v in args)
    a = a.astype(np.float32)
    a[1] = np.nan
    m = np.array([True, False, True, True])
    grad = jax.grad(lambda x: jnp.sum(loss_fn(x, b, m)))(f32(a))
    chex.assert_tree_all_finite(loss_fn(f32(a), b, m))
    chex.assert_tree_all_finite(grad)
    np.testing.assert_array_equal(np.asarray(grad[1]), np.zeros(3))


def test_sum_and_weight_and_mean():
    x = RNG.normal(size=(4, 3))
    m = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 1, 1]], bool)
    s, w = losses.sum_and_weight(f32(x), m)
    np.testing.assert_allclose(float(s), np.sum(x[m]), rtol=RTOL_F32, atol=ATOL_F32)
    assert float(w) == 7.0
    np.testing.assert_allclose(
        float(losses.mean(f32(x), m)), np.mean(x[m]), rtol=RTOL_F32, atol=ATOL_F32
    )
    # a per-example (batch,) mask over (batch, features) values
    rows = np.array([True, False, True, False])
    s, w = losses.sum_and_weight(f32(x), rows)
    np.testing.assert_allclose(float(s), np.sum(x[rows]), rtol=RTOL_F32, atol=ATOL_F32)
    assert float(w) == 6.0
    s, w = losses.sum_and_weight(f32(x))
    assert float(w) == 12.0


def test_all_masked_gives_zero_sum_zero_weight_and_no_nan():
    x = f32(RNG.normal(size=(3,)))
    none = jnp.zeros(3, bool)
    s, w = losses.sum_and_weight(x, none)
    assert (float(s), float(w)) == (0.0, 0.0)
    assert float(losses.mean(x, none)) == 0.0
    g = jax.grad(lambda v: losses.mean(v, none))(x)
    np.testing.assert_array_equal(np.asarray(g), np.zeros(3))
    assert float(losses.accuracy(f32(LOGITS[:3]), IDS[:3], none)) == 0.0


@pytest.mark.parametrize("value", [np.nan, -1.0, 0.5, 2.0])
def test_a_mask_value_other_than_0_or_1_gives_nan_not_a_valid_entry(value):
    x = f32(np.array([1.0, 2.0, 4.0]))
    mask = f32(np.array([1.0, value, 0.0]))
    s, w = losses.sum_and_weight(x, mask)
    assert np.isnan(float(s)) and np.isnan(float(w))
    assert np.isnan(float(losses.mean(x, mask)))
    per = losses.squared_error(x, f32(np.zeros(3)), mask)
    assert np.isnan(np.asarray(per)).tolist() == [False, True, False]
    logits = f32(LOGITS[:3])
    per = losses.softmax_cross_entropy(logits, IDS[:3], mask)
    assert np.isnan(np.asarray(per)).tolist() == [False, True, False]
    # integer and boolean masks of 0 and 1 are masks, as before
    s, w = losses.sum_and_weight(x, jnp.array([1, 1, 0]))
    assert (float(s), float(w)) == (3.0, 2.0)


def test_sum_and_weight_accumulates_exactly_over_uneven_microbatches():
    per = RNG.normal(size=(8,))
    mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)  # 4 valid, then 1 valid
    s1, w1 = losses.sum_and_weight(f32(per[:4]), mask[:4])
    s2, w2 = losses.sum_and_weight(f32(per[4:]), mask[4:])
    exact = np.mean(per[mask])
    np.testing.assert_allclose(
        float((s1 + s2) / (w1 + w2)), exact, rtol=RTOL_F32, atol=ATOL_F32
    )
    mean_of_means = (np.mean(per[:4]) + per[4]) / 2
    assert abs(mean_of_means - exact) > 1e-3  # why the pair exists


# --- stability and gradients ------------------------------------------------------


def test_finite_values_and_gradients_at_large_logits():
    z = f32(LOGITS)
    g_ids = jax.grad(lambda v: jnp.sum(losses.softmax_cross_entropy(v, IDS)))(z)
    g_probs = jax.grad(lambda v: jnp.sum(losses.softmax_cross_entropy(v, f32(PROBS))))(
        z
    )
    zb = f32([[-1e4], [1e4], [1e4]])
    yb = f32([[1.0], [0.0], [1.0]])
    g_bce = jax.grad(lambda v: jnp.sum(losses.sigmoid_binary_cross_entropy(v, yb)))(zb)
    chex.assert_tree_all_finite((g_ids, g_probs, g_bce))
    # d/dz of softmax cross-entropy is softmax(z) - target
    softmax = np.exp(np_log_softmax(LOGITS.astype(np.float32).astype(np.float64)))
    np.testing.assert_allclose(
        np.asarray(g_ids), softmax - np.eye(5)[IDS], rtol=RTOL_F32, atol=ATOL_F32
    )
    np.testing.assert_allclose(
        np.asarray(g_probs), softmax - PROBS, rtol=RTOL_F32, atol=ATOL_F32
    )
    # d/dz of binary cross-entropy is sigmoid(z) - y
    np.testing.assert_allclose(
        np.asarray(g_bce), [[-1.0], [1.0], [0.0]], rtol=RTOL_F32, atol=ATOL_F32
    )


@pytest.mark.parametrize(
    "name",
    ["squared_error", "softmax_ids", "softmax_probs_smoothed", "bce", "mse"],
)
def test_gradients_match_finite_differences_float64(name):
    with jax.enable_x64(True):
        z = jnp.asarray(RNG.normal(size=(4, 5)))
        m = jnp.asarray(MASK)
        fns = {
            "squared_error": lambda v: losses.squared_error(v, jnp.asarray(PROBS), m),
            "softmax_ids": lambda v: losses.softmax_cross_entropy(v, IDS, m),
            "softmax_probs_smoothed": lambda v: losses.softmax_cross_entropy(
                v, jnp.asarray(PROBS), m, label_smoothing=0.1
            ),
            "bce": lambda v: losses.sigmoid_binary_cross_entropy(
                v, jnp.asarray(PROBS), m
            ),
            "mse": lambda v: losses.mean_squared_error(v, jnp.asarray(PROBS), m),
        }
        fn = fns[name]
        check_grads(
            lambda v: jnp.sum(jnp.sin(fn(v))),
            (z,),
            order=1,
            modes=("fwd", "rev"),
            atol=GRAD_TOL_F64,
            rtol=GRAD_TOL_F64,
        )


# --- prediction -------------------------------------------------------------------


def test_prediction_helpers():
    np.testing.assert_array_equal(
        np.asarray(fnn.losses.one_hot(jnp.asarray(IDS), 5)), np.eye(5)[IDS]
    )
    np.testing.assert_array_equal(
        np.asarray(fnn.losses.predict(f32(LOGITS))), np.argmax(LOGITS, -1)
    )
    np.testing.assert_array_equal(
        np.asarray(fnn.losses.argmax(f32([[1.0, 3.0, 3.0]]))), [1]
    )  # first on ties, as numpy
    np.testing.assert_array_equal(
        np.asarray(fnn.losses.predict(f32([[-0.1], [0.2], [0.0]]))), [0, 1, 0]
    )


@pytest.mark.parametrize("jit", [False, True])
def test_accuracy(jit):
    acc = jax.jit(fnn.losses.accuracy) if jit else fnn.losses.accuracy
    pred = np.argmax(LOGITS, -1)
    labels = np.array([0, 2, 3, 1])
    exact = np.mean(pred == labels)
    masked = np.mean((pred == labels)[MASK])
    np.testing.assert_allclose(float(acc(f32(LOGITS), labels)), exact, rtol=RTOL_F32)
    np.testing.assert_allclose(
        float(acc(f32(LOGITS), labels, MASK)), masked, rtol=RTOL_F32
    )
    one_hot = np.eye(5, dtype=np.float32)[labels]
    np.testing.assert_allclose(float(acc(f32(LOGITS), one_hot)), exact, rtol=RTOL_F32)
    binary = f32([[-2.0], [0.5], [3.0], [-0.1]])
    np.testing.assert_allclose(float(acc(binary, np.array([0, 1, 0, 1]))), 0.5)
    np.testing.assert_allclose(float(acc(binary, f32([[0], [1], [1], [0]]))), 1.0)


# --- errors -----------------------------------------------------------------------


def test_mismatched_label_shape_is_a_clear_error():
    with pytest.raises(ValueError) as e:
        losses.softmax_cross_entropy(f32(LOGITS), np.zeros((4, 3), np.int32))
    assert str(e.value) == (
        "softmax_cross_entropy: expected labels of shape (4,) (integer ids) or "
        "(4, 5) (probabilities) for logits of shape (4, 5), got (4, 3)."
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: losses.softmax_cross_entropy(f32(LOGITS), f32(IDS)),
            r"must be integer class ids, got dtype float32; cast them",
        ),
        (
            lambda: losses.softmax_cross_entropy(f32(LOGITS), IDS, label_smoothing=1.5),
            r"expected label_smoothing to be a number in \[0, 1\], got 1.5",
        ),
        (
            lambda: losses.softmax_cross_entropy(
                f32(LOGITS), IDS, label_smoothing=True
            ),
            r"expected label_smoothing to be a number in \[0, 1\], got True",
        ),
        (
            lambda: losses.sigmoid_binary_cross_entropy(
                f32([[0.0], [1.0]]), f32([0, 1])
            ),
            r"logits and labels of the same shape, got \(2, 1\) and \(2,\)",
        ),
        (
            lambda: losses.squared_error(f32([1.0]), f32([1.0, 2.0])),
            r"squared_error: expected predictions and targets of the same shape",
        ),
        (
            lambda: losses.mean(f32(np.ones((4, 3))), np.ones((3,), bool)),
            r"mean: expected a mask of shape \(4, 3\) or a leading part of it, "
            r"got \(3,\)",
        ),
        (
            lambda: fnn.losses.accuracy(f32(LOGITS), np.zeros((5,), np.int32)),
            r"correct: expected labels of shape \(4,\)",
        ),
    ],
)
def test_error_messages(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- properties -------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    logits=hnp.arrays(
        np.float64, (3, 4), elements=st.floats(-50, 50, allow_subnormal=False)
    ),
    ids=hnp.arrays(np.int32, (3,), elements=st.integers(0, 3)),
    smoothing=st.floats(0.0, 1.0),
)
def test_cross_entropy_matches_reference_and_is_nonnegative(logits, ids, smoothing):
    with jax.enable_x64(True):
        loss = np.asarray(
            losses.softmax_cross_entropy(
                jnp.asarray(logits), jnp.asarray(ids), label_smoothing=smoothing
            )
        )
    np.testing.assert_allclose(
        loss,
        np_ce_ids(logits, ids, smoothing),
        rtol=PROPERTY_TOL_F64,
        atol=PROPERTY_TOL_F64,
    )
    assert np.all(loss >= -NONNEGATIVE_SLACK_F64)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_out_of_range_labels_are_nan_unless_masked(smoothing):
    logits = jnp.zeros((3, 4))
    labels = jnp.array([0, 4, -1])
    loss = fnn.losses.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
    assert np.isfinite(loss[0]) and np.isnan(loss[1]) and np.isnan(loss[2])
    masked = fnn.losses.softmax_cross_entropy(
        logits, labels, jnp.array([True, False, False]), label_smoothing=smoothing
    )
    np.testing.assert_array_equal(np.isfinite(masked), [True, True, True])
