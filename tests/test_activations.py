"""Activations against float64 numpy formulas, as functions and as layers."""

from __future__ import annotations

import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fnn

from suite import check_layer_properties

RTOL_F32 = 1e-5
ATOL_F32 = 1e-6
RTOL_F64 = 1e-12
ATOL_F64 = 1e-12
PROPERTY_TOL_F64 = 1e-10  # sums of up to 8 exponentials in float64

# --- independent references: plain numpy in float64 ---------------------------


def np_sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def np_erf(x):
    return np.vectorize(math.erf)(x)


def np_gelu_exact(x):
    return 0.5 * x * (1 + np_erf(x / math.sqrt(2)))


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_log_softmax(x, axis=-1):
    z = x - np.max(x, axis=axis, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def np_softmax(x, axis=-1):
    return np.exp(np_log_softmax(x, axis))


# name: (function, layer, kwargs, numpy reference)
CASES = {
    "sigmoid": (jax.nn.sigmoid, fnn.Sigmoid, {}, np_sigmoid),
    "tanh": (jnp.tanh, fnn.Tanh, {}, np.tanh),
    "hard_tanh": (jax.nn.hard_tanh, fnn.HardTanh, {}, lambda x: np.clip(x, -1, 1)),
    "relu": (jax.nn.relu, fnn.Relu, {}, lambda x: np.maximum(x, 0)),
    "leaky_relu": (
        jax.nn.leaky_relu,
        fnn.LeakyRelu,
        {"negative_slope": 0.2},
        lambda x: np.where(x >= 0, x, 0.2 * x),
    ),
    "swish": (fnn.swish, fnn.Swish, {"beta": 1.7}, lambda x: x * np_sigmoid(1.7 * x)),
    "gelu": (fnn.gelu, fnn.Gelu, {}, np_gelu_exact),
    "gelu_tanh": (fnn.gelu, fnn.Gelu, {"approximate": True}, np_gelu_tanh),
    "softmax": (jax.nn.softmax, fnn.Softmax, {}, np_softmax),
    "softmax_axis0": (
        jax.nn.softmax,
        fnn.Softmax,
        {"axis": 0},
        lambda x: np_softmax(x, 0),
    ),
    "log_softmax": (jax.nn.log_softmax, fnn.LogSoftmax, {}, np_log_softmax),
    "elu": (
        jax.nn.elu,
        fnn.Elu,
        {"alpha": 0.5},
        lambda x: np.where(x > 0, x, 0.5 * np.expm1(np.minimum(x, 0))),
    ),
    "softplus": (jax.nn.softplus, fnn.Softplus, {}, lambda x: np.logaddexp(0, x)),
}
NAMES = sorted(CASES)

# moderate values plus the extremes every activation must survive
X = np.array(
    [[-1e4, -30.0, -2.5, -1.0, -0.3, 0.0], [0.2, 0.7, 1.0, 3.0, 30.0, 1e4]],
    np.float64,
)


@pytest.mark.parametrize("name", NAMES)
def test_function_matches_numpy_float64(name):
    fn, _, kwargs, ref = CASES[name]
    with jax.enable_x64(True):
        y = fn(jnp.asarray(X), **kwargs)
        chex.assert_type(y, jnp.float64)
        np.testing.assert_allclose(np.asarray(y), ref(X), rtol=RTOL_F64, atol=ATOL_F64)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("jit", [False, True])
def test_layer_matches_numpy_float32(name, jit):
    _, layer_fn, kwargs, ref = CASES[name]
    layer = layer_fn(**kwargs)
    apply = jax.jit(layer.apply) if jit else layer.apply
    y = apply({}, jnp.asarray(X, jnp.float32))
    chex.assert_type(y, jnp.float32)
    chex.assert_tree_all_finite(y)
    x32 = X.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(np.asarray(y), ref(x32), rtol=RTOL_F32, atol=ATOL_F32)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_finite_at_extremes(name):
    fn, _, kwargs, _ = CASES[name]
    x = jnp.asarray(X, jnp.float32)
    g = jax.grad(lambda v: jnp.sum(jnp.sin(fn(v, **kwargs))))(x)
    chex.assert_tree_all_finite(g)


@pytest.mark.parametrize("name", NAMES)
def test_layer_properties(name):
    _, layer_fn, kwargs, _ = CASES[name]
    out_shape, params = check_layer_properties(layer_fn(**kwargs), (-1, 2, 3))
    assert out_shape == (-1, 2, 3)
    assert params == {}


def test_elementwise_layer_properties_and_values():
    layer = fnn.model.elementwise(jnp.sin)
    check_layer_properties(layer, (-1, 5))
    x = np.linspace(-3, 3, 10).reshape(2, 5)
    y = layer.apply({}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(y), np.sin(x), rtol=RTOL_F32, atol=ATOL_F32)


def test_kind_names_key_params():
    net = fnn.serial(
        fnn.Dense(2),
        fnn.Relu(),
        fnn.LeakyRelu(),
        fnn.Gelu(),
        fnn.Softmax(),
        fnn.model.elementwise(lambda x: x**2),
        fnn.model.elementwise(jnp.square, name="sq"),
    )
    _, params = net.init(jax.random.key(0), (-1, 3))
    assert list(params) == [
        "0_dense",
        "1_relu",
        "2_leaky_relu",
        "3_gelu",
        "4_softmax",
        "5_elementwise",
        "6_sq",
    ]


def test_defaults_and_repr():
    assert repr(fnn.LeakyRelu()) == "LeakyRelu(negative_slope=0.01)"
    assert repr(fnn.Swish()) == "Swish(beta=1.0)"
    assert repr(fnn.Gelu()) == "Gelu(approximate=False)"
    assert repr(fnn.Softmax()) == "Softmax(axis=-1)"
    assert repr(fnn.Elu()) == "Elu(alpha=1.0)"
    assert repr(fnn.Relu()) == "Relu()"


def test_gelu_default_is_exact_not_jax_default():
    x = np.array([-2.0, -0.5, 0.5, 1.0, 2.0])
    y = fnn.Gelu().apply({}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(
        np.asarray(y), np_gelu_exact(x), rtol=RTOL_F32, atol=ATOL_F32
    )
    gap = np.max(np.abs(np_gelu_exact(x) - np_gelu_tanh(x)))
    assert gap > 100 * ATOL_F32  # the two forms are distinguishable here
    assert np.max(np.abs(np.asarray(y) - np_gelu_tanh(x))) > 100 * ATOL_F32


def test_swish_beta_one_is_silu():
    x = np.linspace(-4, 4, 9)
    y = fnn.Swish().apply({}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(
        np.asarray(y), x / (1 + np.exp(-x)), rtol=RTOL_F32, atol=ATOL_F32
    )


def test_softmax_axis_out_of_range_at_init():
    with pytest.raises(fnn.ShapeError) as e:
        fnn.Softmax(axis=5).init(jax.random.key(0), (-1, 10))
    assert str(e.value) == (
        "Softmax(axis=5): axis 5 is out of range for an input of rank 2 "
        "(shape (-1, 10))."
    )


def test_axis_error_names_place_and_fires_at_apply():
    net = fnn.serial(fnn.Dense(3), fnn.LogSoftmax(axis=-3))
    with pytest.raises(fnn.ShapeError, match=r"LogSoftmax\(axis=-3\) at serial\[1\]"):
        net.init(jax.random.key(0), (-1, 4))
    with pytest.raises(fnn.ShapeError, match="axis 2 is out of range"):
        fnn.Softmax(axis=2).apply({}, jnp.ones((2, 3)))
    with pytest.raises(fnn.ShapeError, match="axis 2 is out of range"):
        jax.jit(fnn.Softmax(axis=2).apply)({}, jnp.ones((2, 3)))


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: fnn.LeakyRelu("0.1"),
            "LeakyRelu: expected negative_slope to be a finite number",
        ),
        (
            lambda: fnn.LeakyRelu(True),
            "LeakyRelu: expected negative_slope to be a finite number",
        ),
        (lambda: fnn.Swish(float("nan")), "Swish: expected beta to be a finite number"),
        (lambda: fnn.Elu(None), "Elu: expected alpha to be a finite number"),
        (lambda: fnn.Gelu(1), "Gelu: expected approximate to be a bool"),
        (lambda: fnn.Softmax(1.0), "Softmax: expected axis to be an int"),
        (lambda: fnn.LogSoftmax(True), "LogSoftmax: expected axis to be an int"),
        (lambda: fnn.model.elementwise(3), "elementwise: expected a function"),
        (
            lambda: fnn.model.elementwise(jnp.sin, name=""),
            "elementwise: expected a non",
        ),
    ],
)
def test_constructor_arguments_are_validated(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_elementwise_rejects_shape_changing_function():
    with pytest.raises(fnn.ShapeError, match="must keep the shape"):
        fnn.model.elementwise(lambda x: x[..., :1], name="head").init(None, (-1, 3))


def test_bad_input_shape_is_a_shape_error():
    with pytest.raises(fnn.ShapeError, match=r"Relu\(\): expected one input shape"):
        fnn.Relu().init(jax.random.key(0), ((-1, 3), (-1, 3)))


# --- properties -------------------------------------------------------------------

small_batches = hnp.arrays(
    np.float64,
    (3, 5),  # one shape: one compilation
    elements=st.floats(-1e3, 1e3),
)


@settings(max_examples=20, deadline=None)
@given(x=small_batches)
def test_log_softmax_normalises(x):
    with jax.enable_x64(True):
        y = np.asarray(jax.nn.log_softmax(jnp.asarray(x)))
    np.testing.assert_allclose(
        np.sum(np.exp(y), axis=-1), 1.0, rtol=PROPERTY_TOL_F64, atol=PROPERTY_TOL_F64
    )
    assert np.all(y <= 0)


@settings(max_examples=20, deadline=None)
@given(x=small_batches, shift=st.floats(-1e4, 1e4))
def test_softmax_invariant_to_shifts(x, shift):
    with jax.enable_x64(True):
        y = np.asarray(jax.nn.softmax(jnp.asarray(x)))
        y_shifted = np.asarray(jax.nn.softmax(jnp.asarray(x + shift)))
    np.testing.assert_allclose(
        y_shifted, y, rtol=PROPERTY_TOL_F64, atol=PROPERTY_TOL_F64
    )
    np.testing.assert_allclose(
        y, np_softmax(x), rtol=PROPERTY_TOL_F64, atol=PROPERTY_TOL_F64
    )
