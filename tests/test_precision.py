"""Mixed precision: param_dtype/dtype per layer, fnn.precision, float32 islands
(norm statistics, softmax, losses), float32 accumulation, dynamic loss scaling."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn
from fnn.training import DynamicLossScale
from fnn.training.accumulate import accumulate_gradients

BF16 = jnp.bfloat16
F16 = jnp.float16
F32 = jnp.float32
RTOL_BF16 = 2e-2  # bfloat16 keeps 8 bits of mantissa: 2**-8 ~ 4e-3 per rounding
ATOL_BF16 = 2e-2
RTOL_F32 = 1e-6


def dtypes(tree):
    return {str(x.dtype) for x in jax.tree.leaves(tree)}


# --- (d) param_dtype and dtype on each layer kind -------------------------------------

X3 = jax.random.normal(jax.random.key(1), (2, 5, 4))
LAYERS = {
    "Dense": (lambda **d: fnn.Dense(3, **d), X3),
    "Embed": (lambda **d: fnn.Embed(7, 3, **d), jnp.array([[1, 2, 3]])),
    "Conv": (lambda **d: fnn.Conv(3, (3,), **d), X3),
    "ConvTranspose": (lambda **d: fnn.ConvTranspose(3, (2,), strides=2, **d), X3),
    "MultiHeadAttention": (lambda **d: fnn.MultiHeadAttention(2, **d), X3),
    "GRUCell": (lambda **d: fnn.RNN(fnn.GRUCell(3, **d)), X3),
    "LSTMCell": (lambda **d: fnn.RNN(fnn.LSTMCell(3, **d)), X3),
    "LayerNorm": (lambda **d: fnn.LayerNorm(**d), X3),
    "RMSNorm": (lambda **d: fnn.RMSNorm(**d), X3),
    "PositionalEmbedding": (
        lambda **d: fnn.PositionalEmbedding(8, learned=True, **d),
        X3,
    ),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_dtype_is_the_computation_and_param_dtype_the_storage(name):
    make, x = LAYERS[name]
    shape = (-1, *x.shape[1:])
    layer = make(dtype=BF16)  # float32 params, bfloat16 computation
    _, params = layer.init(jax.random.key(0), shape)
    assert dtypes(params) == {"float32"}
    y = layer.apply(params, x)
    assert y.dtype == BF16
    ref = make()  # float32 all through, the same params
    want = ref.apply(params, x)
    assert want.dtype == F32
    chex.assert_trees_all_close(y.astype(F32), want, rtol=0.1, atol=0.1)

    stored = make(param_dtype=BF16)  # bfloat16 params, computation inferred
    _, params16 = stored.init(jax.random.key(0), shape)
    assert dtypes(params16) == {"bfloat16"}
    x16 = x.astype(BF16) if jnp.issubdtype(x.dtype, jnp.floating) else x
    assert stored.apply(params16, x16).dtype == BF16


def test_batchnorm_computes_in_dtype_and_keeps_float32_statistics():
    model = fnn.with_state(fnn.BatchNorm(param_dtype=BF16, dtype=BF16))
    _, params, state = model.init(jax.random.key(0), (-1, 4))
    assert dtypes(params) == {"bfloat16"} and dtypes(state) == {"float32"}
    x = 100.0 + jax.random.normal(jax.random.key(1), (16, 4))
    y, state = model.apply(params, state, x, train=True)
    assert y.dtype == BF16 and dtypes(state) == {"float32"}
    mean = np.asarray(x, np.float64).mean(0)
    chex.assert_trees_all_close(state["mean"], 0.01 * mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fnn.Dense(3, dtype=jnp.int32),
        lambda: fnn.Conv(3, (3,), param_dtype="int8"),
        lambda: fnn.LayerNorm(dtype=jnp.complex64),
        lambda: fnn.GRUCell(3, dtype="bogus"),
    ],
)
def test_a_dtype_that_is_not_floating_is_an_error_naming_the_layer(make):
    with pytest.raises(ValueError, match=r"^(Dense|Conv|LayerNorm|GRUCell): expected"):
        make()


def test_layer_norm_statistics_are_float32_for_bfloat16_computation():
    x = 1000.0 + jax.random.normal(jax.random.key(0), (4, 64))
    layer = fnn.LayerNorm(use_scale=False, use_bias=False, dtype=BF16)
    y = layer.apply({}, x)
    assert y.dtype == BF16
    xn = np.asarray(x, np.float64)
    want = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
    chex.assert_trees_all_close(y.astype(F32), want, rtol=RTOL_BF16, atol=ATOL_BF16)
    # The same formula with bfloat16 statistics is far off: 1000 + x rounds
    # to a multiple of 4 in bfloat16, and so does its mean.
    xb = x.astype(BF16)
    mean = jnp.mean(xb, -1, keepdims=True, dtype=BF16)
    var = jnp.mean(jnp.square(xb - mean), -1, keepdims=True, dtype=BF16)
    naive = ((xb - mean) * jax.lax.rsqrt(var + 1e-5)).astype(F32)
    assert float(jnp.max(jnp.abs(naive - want))) > 0.5


def test_softmax_layers_compute_in_float32_and_keep_the_input_dtype():
    x = (jnp.arange(12.0).reshape(2, 6) * 7.3).astype(BF16)
    for layer, fn in (
        (fnn.Softmax(), jax.nn.softmax),
        (fnn.LogSoftmax(), jax.nn.log_softmax),
    ):
        y = layer.apply({}, x)
        assert y.dtype == BF16
        want = fn(x.astype(F32)).astype(BF16)  # float32 math, rounded once
        chex.assert_trees_all_equal(y, want)


def test_losses_are_float32_for_bfloat16_inputs():
    logits = jax.random.normal(jax.random.key(0), (4, 3)).astype(BF16)
    labels = jnp.array([0, 1, 2, 1])
    losses = [
        fnn.losses.softmax_cross_entropy(logits, labels),
        fnn.losses.softmax_cross_entropy(logits, labels, label_smoothing=0.1),
        fnn.losses.sigmoid_binary_cross_entropy(logits, jnp.ones((4, 3), BF16)),
        fnn.losses.squared_error(logits, jnp.zeros((4, 3), BF16)),
        *fnn.losses.sum_and_weight(jnp.ones(3, BF16)),
    ]
    assert {x.dtype for x in losses} == {jnp.dtype(F32)}
    want = optax.losses.softmax_cross_entropy_with_integer_labels(
        logits.astype(F32), labels
    )
    chex.assert_trees_all_close(losses[0], want, rtol=RTOL_F32, atol=RTOL_F32)


# --- (c) fnn.precision: params, gradients and optimizer state stay float32 ------------


def test_precision_keeps_params_grads_and_optimizer_state_float32():
    net = fnn.serial(fnn.Dense(8), fnn.LayerNorm(), fnn.Gelu(), fnn.Dense(3))
    mixed = fnn.precision(net, compute=BF16, output=F32)
    _, params = mixed.init(jax.random.key(0), (-1, 5))
    x = jax.random.normal(jax.random.key(1), (4, 5))
    labels = jnp.array([0, 1, 2, 0])

    def loss_fn(p, batch, key):
        logits = mixed.apply(p, batch["x"])
        assert logits.dtype == F32
        per_example = fnn.losses.softmax_cross_entropy(logits, batch["y"])
        return fnn.losses.sum_and_weight(per_example)

    grad_fn = jax.jit(jax.grad(lambda p: loss_fn(p, {"x": x, "y": labels}, None)[0]))
    grads = grad_fn(params)
    assert dtypes(grads) == {"float32"}
    step = fnn.make_train_step(loss_fn, optax.adam(1e-2))
    ts = step.init(params, key=jax.random.key(2))
    ts, metrics = step(ts, {"x": x, "y": labels})
    assert dtypes(ts.params) == {"float32"} and dtypes(ts.opt_state) <= {
        "float32",
        "int32",
    }
    assert metrics["loss"].dtype == F32
    inner = net.apply(jax.tree.map(lambda a: a.astype(BF16), params), x.astype(BF16))
    assert inner.dtype == BF16  # what the policy runs inside
    chex.assert_trees_all_close(
        mixed.apply(params, x), inner.astype(F32), rtol=RTOL_F32, atol=RTOL_F32
    )


def test_precision_refuses_a_dtype_that_is_not_floating():
    with pytest.raises(ValueError, match="^precision: expected compute"):
        fnn.precision(fnn.Dense(2), compute=jnp.int8)


# --- (e) composition: with_state, remat, repeat ---------------------------------------


def test_precision_composes_with_state_remat_and_repeat():
    block = fnn.residual(fnn.serial(fnn.Dense(4), fnn.BatchNorm(), fnn.Tanh()))
    net = fnn.serial(fnn.remat(fnn.repeat(block, 2)), fnn.Dense(2))
    model = fnn.with_state(fnn.precision(net, compute=BF16, output=F32))
    _, params, state = model.init(jax.random.key(0), (-1, 4))
    x = jax.random.normal(jax.random.key(1), (8, 4))

    def loss(p, s):
        y, s = model.apply(p, s, x, train=True)
        return jnp.sum(y**2), s

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (value, new_state), grads = grad_fn(params, state)
    assert value.dtype == F32
    assert dtypes(new_state) == {"float32"} and dtypes(grads) == {"float32"}
    plain = fnn.with_state(net)  # the same network in float32
    want, want_state = plain.apply(params, state, x, train=True)
    got, _ = model.apply(params, state, x, train=True)
    chex.assert_trees_all_close(got, want, rtol=0.1, atol=0.1)
    chex.assert_trees_all_close(new_state, want_state, rtol=1e-2, atol=1e-2)
    inside = fnn.repeat(fnn.precision(fnn.Dense(4), compute=BF16), 3)
    _, p = inside.init(jax.random.key(0), (-1, 4))
    assert inside.apply(p, x.astype(BF16)).dtype == BF16


# --- item 4: the accumulation scan sums in float32 ------------------------------------


def test_bfloat16_params_accumulate_gradients_in_float32():
    layer = fnn.Dense(1, use_bias=False, param_dtype=BF16)
    _, params = layer.init(jax.random.key(0), (-1, 3))
    x = jax.random.normal(jax.random.key(1), (64, 3)).astype(BF16)

    def loss_fn(p, batch, key):
        return jnp.sum(layer.apply(p, batch["x"]).astype(F32) ** 2), 1.0

    sums = accumulate_gradients(loss_fn, params, {}, {"x": x}, None, accum_steps=16)
    assert sums.grad_sum["w"].dtype == F32
    # The float32 sum of the 16 microbatches' bfloat16 gradients (rows j::16).
    parts = [
        jax.grad(lambda p, j=j: loss_fn(p, {"x": x[j::16]}, None)[0])(params)
        for j in range(16)
    ]
    assert {g["w"].dtype for g in parts} == {jnp.dtype(BF16)}
    want = sum(np.asarray(g["w"], np.float64) for g in parts)
    chex.assert_trees_all_close(
        sums.grad_sum["w"], want.astype(np.float32), rtol=1e-6, atol=1e-6
    )
    step = fnn.make_train_step(loss_fn, optax.sgd(1e-3), accum_steps=16)
    ts, _ = step(step.init(params, key=jax.random.key(0)), {"x": x})
    assert dtypes(ts.params) == {"bfloat16"}  # cast back to the params' dtype


# --- (b) dynamic loss scaling ---------------------------------------------------------


def _sum_loss(p, batch, key):
    return jnp.sum(batch["x"] @ p["w"]), 1.0


def test_a_non_finite_gradient_skips_the_update_and_halves_the_scale():
    step = fnn.make_train_step(
        _sum_loss, optax.adam(0.1), loss_scale=DynamicLossScale(initial=8.0)
    )
    ts = step.init({"w": jnp.ones(2)}, key=jax.random.key(0))
    ts, m = step(ts, {"x": jnp.array([[1.0, 2.0]])})  # finite: applied
    assert float(m["skipped"]) == 0.0 and float(m["loss_scale"]) == 8.0
    before = jax.tree.map(np.asarray, (ts.params, ts.opt_state.inner))
    ts, m = step(ts, {"x": jnp.array([[jnp.inf, 2.0]])})
    assert float(m["skipped"]) == 1.0 and float(m["loss_scale"]) == 8.0
    chex.assert_trees_all_equal((ts.params, ts.opt_state.inner), before)
    assert float(ts.opt_state.scale) == 4.0 and int(ts.opt_state.skipped) == 1
    assert int(ts.step) == 2  # the step counts every batch, skipped or not


def test_the_scale_grows_after_growth_interval_finite_steps():
    options = DynamicLossScale(initial=4.0, growth_interval=3)
    step = fnn.make_train_step(
        _sum_loss, optax.sgd(0.1), loss_scale=options, steps_per_call=4
    )
    ts = step.init({"w": jnp.ones(2)}, key=jax.random.key(0))
    ts, m = step(ts, {"x": jnp.ones((4, 1, 2))})
    np.testing.assert_array_equal(m["loss_scale"], [4.0, 4.0, 4.0, 8.0])
    np.testing.assert_array_equal(m["skipped"], [0.0, 0.0, 0.0, 0.0])
    assert float(ts.opt_state.scale) == 8.0 and int(ts.opt_state.good_steps) == 1
    # The gradients are the unscaled ones: plain SGD moved w by 4 * 0.1 * x.
    chex.assert_trees_all_close(ts.params["w"], 1.0 - 0.4 * jnp.ones(2), rtol=1e-6)


def _float16_regression(loss_scale):
    """A linear model computing in float16 whose loss is weighted by 1e-9.

    The gradient reaching the float16 output, 2e-9 * error, is below the
    smallest float16 (6e-8): it rounds to 0 and Adam, which would otherwise
    be indifferent to the weight, gets no signal. Scaled by 2**15 it is 6e-5,
    a float16 number.
    """
    model = fnn.precision(fnn.Dense(1), compute=F16, output=F32)
    _, params = model.init(jax.random.key(0), (-1, 4))
    x = jax.random.normal(jax.random.key(1), (32, 4))
    y = x @ jnp.array([[1.0], [-2.0], [0.5], [3.0]]) + 0.5

    def loss_fn(p, batch, key):
        err = fnn.losses.squared_error(model.apply(p, batch["x"]), batch["y"])
        return 1e-9 * jnp.sum(err), batch["x"].shape[0]

    step = fnn.make_train_step(
        loss_fn, optax.adam(0.3), loss_scale=loss_scale, steps_per_call=100
    )
    ts = step.init(params, key=jax.random.key(2))
    stacked = {
        "x": jnp.broadcast_to(x, (100, *x.shape)),
        "y": jnp.broadcast_to(y, (100, *y.shape)),
    }
    ts, m = step(ts, stacked)
    return float(m["loss"][0]) * 1e9, float(m["loss"][-1]) * 1e9, ts, m


def test_float16_training_needs_dynamic_loss_scaling_to_learn():
    first, last, ts, _ = _float16_regression(None)
    assert last == pytest.approx(first, rel=1e-6)  # every gradient underflowed
    first, last, ts, m = _float16_regression("dynamic")
    assert last < 0.01  # the mean squared error, from 14.3
    assert float(m["skipped"].sum()) == 0.0 and float(ts.opt_state.scale) == 2.0**15


def test_loss_scaling_on_a_mesh_with_rules_and_state():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    model = fnn.with_state(fnn.serial(fnn.Dense(2), fnn.BatchNorm()))
    _, params, state = model.init(jax.random.key(0), (-1, 2))

    def loss_fn(p, s, batch, key):
        y, s = model.apply(p, s, batch["x"], key=key)
        return (jnp.sum(y * batch["scale"]), batch["x"].shape[0]), s

    n = 2 * jax.device_count()
    good = {"x": jnp.ones((n, 2)).at[0].set(3.0), "scale": jnp.ones((n, 2))}
    bad = dict(good, scale=good["scale"].at[-1].set(jnp.inf))  # one device's rows
    for rules in (None, {"*/w": jax.sharding.PartitionSpec()}):
        step = fnn.make_train_step(
            loss_fn,
            optax.sgd(0.1),
            has_state=True,
            mesh=mesh,
            param_rules=rules,
            accum_steps=2,
            loss_scale="dynamic",
        )
        ts = step.init(params, key=jax.random.key(1), state=state)
        ts, m = step(ts, good)
        assert float(m["skipped"]) == 0.0
        kept = jax.tree.map(np.asarray, ts.params)
        ts, m = step(ts, bad)
        assert float(m["skipped"]) == 1.0 and float(ts.opt_state.scale) == 2.0**14
        chex.assert_trees_all_equal(ts.params, kept)


def test_bad_loss_scale_options_are_errors():
    with pytest.raises(ValueError, match="^make_train_step: expected loss_scale"):
        fnn.make_train_step(_sum_loss, optax.sgd(0.1), loss_scale="static")
    with pytest.raises(ValueError, match="growth_interval"):
        fnn.make_train_step(
            _sum_loss, optax.sgd(0.1), loss_scale=DynamicLossScale(growth_interval=0)
        )


def test_fit_history_reports_the_scale_and_the_skipped_updates():
    from fnn.training.history import MetricLog

    log = MetricLog()
    log.add(
        1,
        {
            "loss": jnp.array([1.0, 3.0]),
            "weight": jnp.array([1.0, 1.0]),
            "grad_norm": jnp.array([2.0, jnp.inf]),
            "loss_scale": jnp.array([8.0, 8.0]),
            "skipped": jnp.array([0.0, 1.0]),
        },
    )
    log.pull(last_checkpoint=None)
    assert log.means() == {
        "loss": 2.0,
        "grad_norm": 2.0,
        "loss_scale": 8.0,
        "skipped": 1.0,
    }


# --- (a) a bfloat16 MLP on the digits trains as well as float32 -----------------------


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    split = train_test_split(
        d.data,
        d.target.astype(np.int32),
        test_size=0.25,
        random_state=0,
        stratify=d.target,
    )
    x_train, x_test, y_train, y_test = split
    mean, std = x_train.mean(0), np.where(x_train.std(0) > 0, x_train.std(0), 1.0)
    prep = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    return prep(x_train), y_train, prep(x_test), y_test


def _digits_accuracy(model, data, epochs=4, batch=128):
    x_train, y_train, x_test, y_test = data
    _, params = model.init(jax.random.key(0), (-1, 64))

    def loss_fn(p, b, key):
        logits = model.apply(p, b["x"])
        return fnn.losses.sum_and_weight(
            fnn.losses.softmax_cross_entropy(logits, b["y"])
        )

    per_epoch = len(y_train) // batch
    step = fnn.make_train_step(loss_fn, optax.adam(3e-3), steps_per_call=per_epoch)
    ts = step.init(params, key=jax.random.key(1))
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        rows = rng.permutation(len(y_train))[: per_epoch * batch].reshape(
            per_epoch, batch
        )
        ts, m = step(ts, {"x": x_train[rows], "y": y_train[rows]})
    assert m["loss"].dtype == F32
    return float(fnn.losses.accuracy(model.apply(ts.params, x_test), y_test)), ts


def test_bfloat16_digits_mlp_matches_float32_accuracy():
    data = _digits()
    net = fnn.serial(fnn.Dense(64), fnn.Relu(), fnn.Dense(10))
    acc32, _ = _digits_accuracy(net, data)
    mixed = fnn.precision(net, compute=BF16, output=F32)
    acc16, ts = _digits_accuracy(mixed, data)
    assert acc32 > 0.9
    assert abs(acc16 - acc32) <= 0.01, (acc16, acc32)
    assert dtypes(ts.params) == {"float32"}
