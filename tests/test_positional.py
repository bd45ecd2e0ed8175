"""fnn.PositionalEmbedding: the fixed sinusoidal table and a learned one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn

from suite import check_layer_properties

RTOL_F32 = 1e-5
ATOL_F32 = 1e-5


@pytest.mark.parametrize(
    "layer",
    [
        fnn.PositionalEmbedding(),
        fnn.PositionalEmbedding(max_len=8),
        fnn.PositionalEmbedding(8, learned=True),
    ],
    ids=["sinusoidal", "sinusoidal-max-len", "learned"],
)
def test_property_suite(layer):
    check_layer_properties(layer, (-1, 5, 3))


@pytest.mark.parametrize("features", [4, 5])
def test_sinusoidal_matches_the_paper_formula(features):
    layer = fnn.PositionalEmbedding()
    x = jax.random.normal(jax.random.key(0), (2, 6, features))
    want = np.asarray(x, np.float64).copy()
    for pos in range(6):
        for j in range(features):
            angle = pos / 10000 ** (2 * (j // 2) / features)
            want[:, pos, j] += math.sin(angle) if j % 2 == 0 else math.cos(angle)
    for apply in (layer.apply, jax.jit(layer.apply)):
        np.testing.assert_allclose(apply({}, x), want, rtol=RTOL_F32, atol=ATOL_F32)


def test_learned_adds_the_first_rows_of_its_table():
    layer = fnn.PositionalEmbedding(10, learned=True)
    shape, params = layer.init(jax.random.key(0), (-1, 4, 3))
    assert shape == (-1, 4, 3)
    assert params["table"].shape == (10, 3)
    x = jax.random.normal(jax.random.key(1), (2, 4, 3))
    want = np.asarray(x) + np.asarray(params["table"])[None, :4]
    np.testing.assert_allclose(
        layer.apply(params, x), want, rtol=RTOL_F32, atol=ATOL_F32
    )
    # a shorter sequence uses fewer rows of the same table
    np.testing.assert_allclose(
        layer.apply(params, x[:, :2]), want[:, :2], rtol=RTOL_F32, atol=ATOL_F32
    )


def test_unknown_time_is_allowed_at_init():
    assert fnn.PositionalEmbedding(4, learned=True).init(
        jax.random.key(0), (-1, -1, 2)
    )[0] == (-1, -1, 2)


@pytest.mark.parametrize(
    "layer",
    [
        fnn.PositionalEmbedding(max_len=4),
        fnn.PositionalEmbedding(4, learned=True),
    ],
    ids=["sinusoidal", "learned"],
)
def test_too_long_sequences_are_an_error(layer):
    match = r"the input has 5 time steps but max_len is 4"
    with pytest.raises(fnn.ShapeError, match=match):
        layer.init(jax.random.key(0), (-1, 5, 3))
    _, params = layer.init(jax.random.key(0), (-1, 4, 3))
    with pytest.raises(fnn.ShapeError, match=r"at serial\[0\]: the input has 5"):
        fnn.serial(layer).apply({"0_" + _kind(layer): params}, jnp.ones((1, 5, 3)))


def _kind(layer):
    return fnn.model.core.layer_name(layer)


def test_bad_arguments_and_shapes():
    with pytest.raises(
        ValueError, match=r"PositionalEmbedding: expected max_len to be a positive"
    ):
        fnn.PositionalEmbedding(0, learned=True)
    with pytest.raises(ValueError, match=r"learned=True needs max_len"):
        fnn.PositionalEmbedding(learned=True)
    with pytest.raises(ValueError, match=r"PositionalEmbedding: expected max_len"):
        fnn.PositionalEmbedding(max_len=-1)
    layer = fnn.PositionalEmbedding(4, learned=True)
    _, params = layer.init(jax.random.key(0), (-1, 2, 3))
    with pytest.raises(
        fnn.ShapeError,
        match=r"PositionalEmbedding\(max_len=4, learned=True\) at serial\[0\]: "
        r"expected input with 3 features, got shape \(1, 2, 5\)",
    ):
        fnn.serial(layer).apply({"0_position": params}, jnp.ones((1, 2, 5)))
    with pytest.raises(fnn.ShapeError, match=r"expected input of shape \(batch, time"):
        fnn.PositionalEmbedding().init(jax.random.key(0), (-1, 3))
