"""fnn.find_nonfinite (fnn/gradcheck/nonfinite.py): it names the layer where a
NaN or Inf began and why, and fit's NonFiniteLossError leads to it.

Each test plants the NaN in one known place of a 2 -> 3 -> 3 -> 1 network
whose third layer takes a log.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn

NET = fnn.serial(
    fnn.Dense(3), fnn.Tanh(), fnn.model.elementwise(jnp.log, name="log"), fnn.Dense(1)
)


def make_params(bias):
    """Params whose tanh layer outputs tanh(bias) everywhere (w = 0)."""
    params = NET.init(jax.random.key(0), (-1, 2))[1]
    params["0_dense"] = {"w": jnp.zeros((2, 3)), "b": jnp.full(3, bias)}
    return params


X = np.ones((4, 2), np.float32)


def test_a_log_of_negative_values_is_named_in_the_third_layer():
    report = fnn.find_nonfinite(NET, make_params(-1.0), X)  # log(tanh(-1)) = nan
    assert (report.place, report.path, report.cause) == (
        "serial[2]",
        "['2_log']",
        "forward",
    )
    values = {v.name: v for v in report.values}
    assert values["input"].finite and values["output"].nan == 12
    assert "serial[2]" in str(report) and "forward pass" in str(report)


def test_a_nan_in_the_input_batch_is_the_input():
    x = X.copy()
    x[1, 0] = np.nan
    report = fnn.find_nonfinite(NET, make_params(1.0), x)
    assert (report.place, report.cause) == ("serial[0]", "input")
    assert report.nonfinite_batch == ("batch",)
    assert report.nonfinite_params == ()


def test_a_nan_in_the_params_is_the_params():
    params = make_params(1.0)
    params["3_dense"]["w"] = params["3_dense"]["w"].at[0, 0].set(jnp.nan)
    report = fnn.find_nonfinite(NET, params, X)
    assert (report.place, report.path, report.cause) == (
        "serial[3]",
        "['3_dense']",
        "params",
    )
    assert report.nonfinite_params == ("params['3_dense']['w']",)
    assert "params['w']" in report.summary()


def test_a_nan_made_in_a_backward_pass_is_the_backward():
    net = fnn.serial(fnn.Dense(3), fnn.Relu(), fnn.model.elementwise(jnp.sqrt, "sqrt"))
    params = net.init(jax.random.key(0), (-1, 2))[1]
    params["0_dense"]["b"] = -10.0 * jnp.ones(3)  # relu gives 0; sqrt'(0) = inf
    report = fnn.find_nonfinite(net, params, X)
    assert (report.place, report.path, report.cause) == (
        "serial[2]",
        "['2_sqrt']",
        "backward",
    )
    values = {v.name: v for v in report.values}
    assert values["output cotangent"].finite
    assert values["input cotangent"].inf == 12


def test_everything_finite_finds_nothing():
    report = fnn.find_nonfinite(NET, make_params(1.0), X, loss=lambda y: y.sum())
    assert not report.found and report.layers == 5  # the root and 4 layers
    assert "are finite" in str(report)


def loss_fn(params, batch, key):
    y = NET.apply(params, batch["x"], key=key)[:, 0]
    return jnp.sum((y - batch["y"]) ** 2), y.shape[0]


def test_fit_gives_the_failing_batch_to_find_nonfinite():
    x = np.ones((16, 2), np.float32)
    x[9, 1] = np.nan  # the third batch of 4, in order
    data = {"x": x, "y": np.zeros(16, np.float32)}
    step = fnn.make_train_step(loss_fn, optax.sgd(0.0))
    params = make_params(1.0)
    ts = step.init(params, key=jax.random.key(0))
    with pytest.raises(fnn.training.NonFiniteLossError) as info:
        fnn.fit(step, ts, data, batch_size=4, epochs=1, shuffle=False, progress=False)
    err = info.value
    assert err.step == 3
    np.testing.assert_array_equal(err.batch["x"], x[8:12])
    assert any("fnn.find_nonfinite(loss_fn" in n for n in err.__notes__)
    report = fnn.find_nonfinite(loss_fn, params, err.batch)
    assert (report.place, report.cause) == ("serial[0]", "input")
    assert report.nonfinite_batch == ("batch['x']",)


def test_a_model_that_is_not_a_layer_or_a_function_is_an_error():
    with pytest.raises(TypeError, match="find_nonfinite: expected a network"):
        fnn.find_nonfinite(3, {}, X)
