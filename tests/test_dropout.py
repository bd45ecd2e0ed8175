"""Dropout: the train/eval switch, drop statistics, scaling, and stax's masks."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn

from suite import check_layer_properties

EXACT = 0.0
RTOL_F32 = 1e-6
# Drop fraction of N Bernoulli draws: allow 5 standard deviations.
N_DRAWS = 200_000
SIGMAS = 5.0


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_drop_fraction_and_scaling(rate):
    x = jnp.ones((N_DRAWS,))
    y = np.asarray(
        jax.jit(lambda k: fnn.Dropout(rate).apply({}, x, key=k))(jax.random.key(0))
    )
    dropped = np.mean(y == 0.0)
    assert abs(dropped - rate) < SIGMAS * np.sqrt(rate * (1 - rate) / N_DRAWS)
    kept = y[y != 0.0]
    np.testing.assert_allclose(kept, 1.0 / (1.0 - rate), rtol=RTOL_F32, atol=EXACT)
    # E[y] = x: the mean of y agrees with 1 within the sampling error
    std_mean = np.sqrt(rate / (1 - rate) / N_DRAWS)
    assert abs(y.mean() - 1.0) < SIGMAS * std_mean


def test_inference_is_identity():
    x = jax.random.normal(jax.random.key(0), (4, 5))
    drop = fnn.Dropout(0.5)
    chex.assert_trees_all_equal(drop.apply({}, x), x)  # no key
    key = jax.random.key(1)
    chex.assert_trees_all_equal(drop.apply({}, x, key=key, train=False), x)
    chex.assert_trees_all_equal(fnn.Dropout(0.0).apply({}, x, key=key), x)


def test_train_without_key_is_an_error():
    msg = r"Dropout\(0\.5\): train=True needs a key"
    with pytest.raises(fnn.ShapeError, match=msg):
        fnn.Dropout(0.5).apply({}, jnp.ones((2, 3)), train=True)


def test_rate_is_drop_probability_unlike_stax():
    stax = pytest.importorskip("jax.example_libraries.stax")
    x = jax.random.normal(jax.random.key(0), (8, 16))
    key = jax.random.key(3)
    _, stax_apply = stax.Dropout(0.7)  # stax: keep with probability 0.7
    chex.assert_trees_all_close(
        fnn.Dropout(0.3).apply({}, x, key=key),
        stax_apply((), x, rng=key),
        rtol=RTOL_F32,
        atol=EXACT,
    )


def test_key_determines_the_mask():
    x = jnp.ones((64,))
    drop = fnn.Dropout(0.5)
    a = drop.apply({}, x, key=jax.random.key(1))
    chex.assert_trees_all_equal(a, drop.apply({}, x, key=jax.random.key(1)))
    assert not np.array_equal(a, drop.apply({}, x, key=jax.random.key(2)))


def test_broadcast_dims_share_one_draw():
    x = jnp.ones((4, 6, 8))
    y = fnn.Dropout(0.5, broadcast_dims=(1,)).apply({}, x, key=jax.random.key(0))
    chex.assert_trees_all_equal(y, jnp.broadcast_to(y[:, :1, :], y.shape))
    assert 0 < float(jnp.mean(y == 0)) < 1
    y = fnn.Dropout(0.5, broadcast_dims=(0, -1)).apply({}, x, key=jax.random.key(0))
    chex.assert_trees_all_equal(y, jnp.broadcast_to(y[:1, :, :1], y.shape))


def test_serial_gives_each_dropout_its_own_key():
    net = fnn.serial(fnn.Dropout(0.5), fnn.Dropout(0.5))
    _, params = net.init(None, (-1, 256))
    y = net.apply(params, jnp.ones((2, 256)), key=jax.random.key(0))
    # two independent masks: about 3/4 dropped, kept values scaled twice
    assert set(np.unique(np.asarray(y)).tolist()) == {0.0, 4.0}


@pytest.mark.parametrize("kwargs", [{}, {"key": jax.random.key(7)}])
def test_properties(kwargs):
    check_layer_properties(fnn.Dropout(0.4), (-1, 5, 3), apply_kwargs=kwargs)


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, True, "0.5"])
def test_bad_rate(rate):
    with pytest.raises(ValueError, match=r"Dropout: expected rate \(the probability"):
        fnn.Dropout(rate)


def test_bad_broadcast_dims():
    with pytest.raises(ValueError, match="broadcast_dims to be a tuple of ints"):
        fnn.Dropout(0.5, broadcast_dims=1)
    with pytest.raises(fnn.ShapeError, match="out of range for an input of shape"):
        fnn.Dropout(0.5, broadcast_dims=(3,)).apply(
            {}, jnp.ones((2, 3)), key=jax.random.key(0)
        )
