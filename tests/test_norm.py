"""LayerNorm, RMSNorm and BatchNorm against numpy formulas and Flax; BatchNorm state."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn

from suite import check_layer_properties, state_as_params

RTOL_F32 = 1e-5
ATOL_F32 = 1e-5
EPS = 1e-5  # the layers' default epsilon


def _random_params(params, seed=1):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)]
    )


# --- LayerNorm and RMSNorm ---------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, (1, 2), (-2,)])
def test_layer_norm_matches_numpy(axis):
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 3, 4))
    layer = fnn.LayerNorm(axis=axis)
    _, params = layer.init(jax.random.key(0), (-1, 3, 4))
    params = _random_params(params)
    y = jax.jit(layer.apply)(params, x)
    ax = tuple(a % 3 for a in ((axis,) if isinstance(axis, int) else axis))
    xn = np.asarray(x, np.float64)
    mean = xn.mean(ax, keepdims=True)
    var = xn.var(ax, keepdims=True)
    shape = [xn.shape[i] if i in ax else 1 for i in range(3)]
    want = (xn - mean) / np.sqrt(var + EPS) * np.reshape(
        params["scale"], shape
    ) + np.reshape(params["bias"], shape)
    chex.assert_trees_all_close(y, want, rtol=RTOL_F32, atol=ATOL_F32)


def test_rms_norm_matches_numpy():
    x = jax.random.normal(jax.random.key(0), (3, 5, 6))
    layer = fnn.RMSNorm()
    _, params = layer.init(jax.random.key(0), (-1, 5, 6))
    params = _random_params(params)
    assert list(params) == ["scale"]
    xn = np.asarray(x, np.float64)
    scale = np.asarray(params["scale"])
    want = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + EPS) * scale
    chex.assert_trees_all_close(
        layer.apply(params, x), want, rtol=RTOL_F32, atol=ATOL_F32
    )


def test_layer_and_rms_norm_match_flax():
    nn = pytest.importorskip("flax.linen")
    x = jax.random.normal(jax.random.key(0), (4, 6))
    for ours, theirs in [
        (fnn.LayerNorm(), nn.LayerNorm(epsilon=EPS)),
        (fnn.RMSNorm(), nn.RMSNorm(epsilon=EPS)),
    ]:
        _, params = ours.init(jax.random.key(0), (-1, 6))
        params = _random_params(params)
        chex.assert_trees_all_close(
            ours.apply(params, x),
            theirs.apply({"params": params}, x),
            rtol=RTOL_F32,
            atol=ATOL_F32,
        )


def test_without_scale_and_bias():
    layer = fnn.LayerNorm(use_scale=False, use_bias=False)
    _, params = layer.init(jax.random.key(0), (-1, 4))
    assert params == {}
    y = layer.apply(params, jnp.array([[1.0, 2.0, 3.0, 4.0]]))
    chex.assert_trees_all_close(
        y[0],
        (np.arange(1, 5) - 2.5) / np.sqrt(1.25 + EPS),
        rtol=RTOL_F32,
        atol=ATOL_F32,
    )


def test_low_precision_input_is_normalised_in_float32():
    x = (1000.0 + jax.random.normal(jax.random.key(0), (2, 64))).astype(jnp.bfloat16)
    layer = fnn.LayerNorm(use_scale=False, use_bias=False, param_dtype=jnp.bfloat16)
    _, params = layer.init(jax.random.key(0), (-1, 64))
    y = layer.apply(params, x)
    assert y.dtype == jnp.bfloat16
    xn = np.asarray(x.astype(jnp.float32), np.float64)
    want = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + EPS)
    chex.assert_trees_all_close(y.astype(jnp.float32), want, rtol=1e-2, atol=2e-2)


# --- BatchNorm ---------------------------------------------------------------------


def _np_batch_norm(x, axes, scale, bias, mean=None, var=None):
    xn = np.asarray(x, np.float64)
    scale, bias = np.asarray(scale), np.asarray(bias)
    if mean is None:
        mean = xn.mean(axes)
        var = xn.var(axes)
    return (xn - mean) / np.sqrt(var + EPS) * scale + bias, mean, var


def test_batch_norm_training_then_evaluation():
    momentum = 0.9
    model = fnn.with_state(fnn.BatchNorm(momentum=momentum))
    _, params, state = model.init(jax.random.key(0), (-1, 4, 4, 3))
    chex.assert_trees_all_equal(state, {"mean": jnp.zeros(3), "var": jnp.ones(3)})
    params = _random_params(params)
    step = jax.jit(lambda p, s, x, k: model.apply(p, s, x, key=k))
    run_mean, run_var = np.zeros(3), np.ones(3)
    for i in range(2):
        x = 2.0 + 3.0 * jax.random.normal(jax.random.key(10 + i), (5, 4, 4, 3))
        y, state = step(params, state, x, jax.random.key(i))
        want, mean, var = _np_batch_norm(x, (0, 1, 2), params["scale"], params["bias"])
        chex.assert_trees_all_close(y, want, rtol=RTOL_F32, atol=ATOL_F32)
        run_mean = momentum * run_mean + (1 - momentum) * mean
        run_var = momentum * run_var + (1 - momentum) * var
        chex.assert_trees_all_close(
            state, {"mean": run_mean, "var": run_var}, rtol=RTOL_F32, atol=ATOL_F32
        )
    # evaluation: running statistics, state unchanged
    x = jax.random.normal(jax.random.key(20), (2, 4, 4, 3))
    for kwargs in ({}, {"key": jax.random.key(5), "train": False}):
        y, new_state = model.apply(params, state, x, **kwargs)
        want, _, _ = _np_batch_norm(
            x, None, params["scale"], params["bias"], run_mean, run_var
        )
        chex.assert_trees_all_close(y, want, rtol=RTOL_F32, atol=ATOL_F32)
        chex.assert_trees_all_equal(new_state, state)
    # train=True without a key also trains
    _, trained = model.apply(params, state, x, train=True)
    assert not np.allclose(trained["mean"], state["mean"])


def test_batch_norm_matches_flax():
    nn = pytest.importorskip("flax.linen")
    x = 1.0 + jax.random.normal(jax.random.key(0), (6, 5))
    model = fnn.with_state(fnn.BatchNorm())
    _, params, state = model.init(jax.random.key(0), (-1, 5))
    params = _random_params(params)
    state = {"mean": jnp.full(5, 0.5), "var": jnp.full(5, 2.0)}
    theirs = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=EPS)
    variables = {"params": params, "batch_stats": state}
    y_flax, updated = theirs.apply(variables, x, mutable=["batch_stats"])
    y, new_state = model.apply(params, state, x, key=jax.random.key(1))
    chex.assert_trees_all_close(y, y_flax, rtol=RTOL_F32, atol=ATOL_F32)
    chex.assert_trees_all_close(
        new_state, updated["batch_stats"], rtol=RTOL_F32, atol=ATOL_F32
    )
    y_eval, _ = model.apply(params, state, x)
    y_flax_eval = nn.BatchNorm(use_running_average=True, epsilon=EPS).apply(
        variables, x
    )
    chex.assert_trees_all_close(y_eval, y_flax_eval, rtol=RTOL_F32, atol=ATOL_F32)


def test_batch_norm_mask_excludes_padding_from_statistics():
    momentum = 0.5
    model = fnn.with_state(fnn.BatchNorm(momentum=momentum))
    _, params, state = model.init(jax.random.key(0), (-1, 4, 3))
    x = jax.random.normal(jax.random.key(0), (2, 4, 3))
    mask = jnp.array([[True, True, True, False], [True, False, False, False]])
    x = jnp.where(mask[..., None], x, 1e6)  # padding with wild values
    y, new = model.apply(params, state, x, key=jax.random.key(1), mask=mask)
    valid = np.asarray(x)[np.asarray(mask)]  # (4, 3)
    want, mean, var = _np_batch_norm(valid, 0, 1.0, 0.0)
    chex.assert_trees_all_close(y[np.asarray(mask)], want, rtol=RTOL_F32, atol=ATOL_F32)
    chex.assert_trees_all_close(
        new,
        {"mean": (1 - momentum) * mean, "var": momentum + (1 - momentum) * var},
        rtol=RTOL_F32,
        atol=ATOL_F32,
    )


def test_axis_name_gives_global_batch_statistics():
    model = fnn.with_state(fnn.BatchNorm(axis_name="devices"))
    _, params, state = model.init(jax.random.key(0), (-1, 3))
    x = 1.0 + jax.random.normal(jax.random.key(0), (8, 3))
    one_device = fnn.with_state(fnn.BatchNorm())
    y_global, s_global = one_device.apply(params, state, x, train=True)
    per_device = jax.vmap(
        lambda xs: model.apply(params, state, xs, train=True), axis_name="devices"
    )
    y, s = per_device(x.reshape(2, 4, 3))
    chex.assert_trees_all_close(y.reshape(8, 3), y_global, rtol=RTOL_F32, atol=ATOL_F32)
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a[0], s), s_global, rtol=RTOL_F32, atol=ATOL_F32
    )
    want, _, _ = _np_batch_norm(x, 0, 1.0, 0.0)
    chex.assert_trees_all_close(y_global, want, rtol=RTOL_F32, atol=ATOL_F32)


def test_state_paths_and_a_network_without_state():
    net = fnn.serial(fnn.Conv(4, (3, 3)), fnn.BatchNorm(), fnn.Relu(), fnn.Dropout(0.1))
    _, _, state = fnn.with_state(net).init(jax.random.key(0), (-1, 6, 6, 1))
    assert jax.tree_util.keystr(jax.tree.leaves_with_path(state)[0][0]) == (
        "['1_batchnorm']['mean']"
    )
    plain = fnn.serial(fnn.Dense(4), fnn.LayerNorm(), fnn.Dropout(0.5))
    shape, params = plain.init(jax.random.key(0), (-1, 3))  # no state anywhere
    y = plain.apply(params, jnp.ones((2, 3)), key=jax.random.key(1))
    chex.assert_shape(y, (2, 4))
    assert fnn.with_state(plain).init(jax.random.key(0), (-1, 3))[2] == {}


def test_batch_norm_outside_with_state_explains():
    layer = fnn.serial(fnn.Dense(3), fnn.BatchNorm())
    _, params = layer.init(jax.random.key(0), (-1, 2))
    with pytest.raises(
        fnn.ShapeError,
        match=r"BatchNorm\(\) at serial\[1\]: this layer keeps running state; "
        r"wrap the network with fnn.with_state",
    ):
        layer.apply(params, jnp.ones((4, 2)))


# --- the property suite -----------------------------------------------------------


@pytest.mark.parametrize(
    "layer, in_shape, kwargs",
    [
        (fnn.LayerNorm(), (-1, 4, 5), {}),
        (fnn.LayerNorm(axis=(1, 2)), (-1, 3, 4), {}),
        (fnn.RMSNorm(), (-1, 6), {}),
        (state_as_params(fnn.BatchNorm()), (-1, 4), {"train": True}),
        (state_as_params(fnn.BatchNorm()), (-1, 4), {}),
        (state_as_params(fnn.BatchNorm()), (-1, 3, 3, 2), {"key": jax.random.key(0)}),
    ],
)
def test_properties(layer, in_shape, kwargs):
    check_layer_properties(layer, in_shape, apply_kwargs=kwargs)


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: fnn.LayerNorm(epsilon=0.0),
            r"LayerNorm: expected epsilon to be a number > 0\.0, got 0\.0",
        ),
        (lambda: fnn.RMSNorm(axis="x"), "RMSNorm: expected an int axis"),
        (
            lambda: fnn.BatchNorm(momentum=1.0),
            r"BatchNorm: expected momentum to be a number in \[0\.0, 1\.0\), got 1\.0",
        ),
    ],
)
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_shape_errors():
    with pytest.raises(fnn.ShapeError, match="distinct non-batch axes"):
        fnn.LayerNorm(axis=0).init(jax.random.key(0), (-1, 4))
    with pytest.raises(fnn.ShapeError, match="out of range"):
        fnn.RMSNorm(axis=2).init(jax.random.key(0), (-1, 4))
    layer = fnn.LayerNorm()
    _, params = layer.init(jax.random.key(0), (-1, 4))
    with pytest.raises(
        fnn.ShapeError,
        match=r"LayerNorm\(\): expected input with sizes \(4,\) on axes \(1,\) "
        r"\(the sizes of its params\), got shape \(2, 5\)",
    ):
        layer.apply(params, jnp.ones((2, 5)))
    model = fnn.with_state(fnn.BatchNorm())
    _, params, state = model.init(jax.random.key(0), (-1, 4))
    with pytest.raises(fnn.ShapeError, match="expected a mask broadcastable"):
        model.apply(params, state, jnp.ones((2, 4)), train=True, mask=jnp.ones(3))


def test_running_statistics_carried_through_scan():
    momentum = 0.8
    model = fnn.with_state(fnn.BatchNorm(momentum=momentum))
    _, params, state = model.init(jax.random.key(0), (-1, 2))
    xs = 1.0 + jax.random.normal(jax.random.key(1), (3, 6, 2))  # 3 batches

    def body(state, x):
        y, state = model.apply(params, state, x, train=True)
        return state, y

    final, _ = jax.jit(lambda s: jax.lax.scan(body, s, xs))(state)
    mean, var = np.zeros(2), np.ones(2)
    for x in np.asarray(xs, np.float64):
        mean = momentum * mean + (1 - momentum) * x.mean(0)
        var = momentum * var + (1 - momentum) * x.var(0)
    chex.assert_trees_all_close(
        final, {"mean": mean, "var": var}, rtol=RTOL_F32, atol=ATOL_F32
    )


@pytest.mark.parametrize(
    "layer", [fnn.LayerNorm(), fnn.RMSNorm()], ids=["LayerNorm", "RMSNorm"]
)
def test_norms_refuse_complex_inputs(layer):
    net = fnn.serial(fnn.model.Identity(), layer)
    _, params = net.init(jax.random.key(0), (-1, 3))
    with pytest.raises(fnn.ShapeError) as e:
        jax.jit(net.apply)(params, jnp.ones((2, 3), jnp.complex64))
    assert str(e.value).startswith(
        f"{layer!r} at serial[1]: expected a real input, got dtype complex64"
    )
    # integers are normalised in floating point, as before
    assert net.apply(params, jnp.arange(6).reshape(2, 3)).dtype == jnp.float32
