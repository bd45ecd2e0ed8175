"""Tests of the training step (fnn.make_train_step), its options, evaluation.

Reference gradients come from the numpy formulas in ``test_accumulate.py``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_accumulate import (
    EXACT_RTOL_F64,
    B,
    init_state,
    linear_loss,
    make_batch,
    make_data,
    make_params,
    np_grad_sum,
    recording_loss,
    recording_state,
)

import fnn
from fnn.model.state import declare_state, read_state, write_state

F32_RTOL = 1e-6


def test_step_keys_differ_and_derive_from_the_fixed_key():
    k, b = 2, 4
    opt = optax.sgd(0.0)
    ts = init_state(
        {"w": jnp.array(1.0)}, opt, key=jax.random.key(3), state=recording_state(k, b)
    )
    step = fnn.make_train_step(recording_loss, opt, accum_steps=k, has_state=True)
    batch = {"row": jnp.arange(b, dtype=jnp.float32)}
    key0 = jax.random.key_data(ts.key).copy()
    ts, _ = step(ts, batch)
    first = np.asarray(ts.state["draws"]).copy()
    key1 = jax.random.key_data(ts.key).copy()
    ts = ts._replace(state={**ts.state, "count": jnp.zeros((), jnp.int32)})
    ts, _ = step(ts, batch)
    np.testing.assert_array_equal(key0, key1)  # the base key stays fixed
    assert not np.array_equal(first, np.asarray(ts.state["draws"]))
    assert int(ts.step) == 2


def test_batch_not_divisible_is_a_clear_error():
    opt = optax.sgd(0.1)
    ts = init_state(make_params(jnp.float32), opt, key=jax.random.key(0))
    step = fnn.make_train_step(linear_loss, opt, accum_steps=4)
    x, y = make_data(b=10)
    batch = {"x": x, "y": y, "mask": np.ones(10, bool)}
    with pytest.raises(ValueError, match=r"batch of 10 .*accum_steps=4"):
        step(ts, batch)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match="make_train_step: expected accum_steps"):
        fnn.make_train_step(linear_loss, optax.sgd(0.1), accum_steps=bad)
    with pytest.raises(ValueError, match="make_train_step: expected steps_per_call"):
        fnn.make_train_step(linear_loss, optax.sgd(0.1), steps_per_call=bad)
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        fnn.make_train_step(linear_loss, optax.sgd)


@pytest.mark.parametrize(
    "opt",
    [
        optax.sgd(0.1),
        optax.adam(0.05),
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.05)),
    ],
    ids=["sgd", "adam", "clip_adamw"],
)
def test_step_matches_optax_on_numpy_gradient(opt):
    with jax.enable_x64(True):
        params = make_params()
        ts = init_state(
            jax.tree.map(jnp.copy, params), opt, key=jax.random.key(0)
        )  # the step donates the train state's buffers
        step = fnn.make_train_step(linear_loss, opt, accum_steps=3, grad_norm=True)
        ref_params, ref_opt_state = params, opt.init(params)
        for seed in range(3):
            batch = make_batch(seed)
            ts, metrics = step(ts, jax.tree.map(jnp.asarray, batch))
            m = batch["mask"]
            w, b = np.asarray(ref_params["w"]), float(ref_params["b"])
            g = {
                k: v / m.sum()
                for k, v in np_grad_sum(w, b, batch["x"], batch["y"], m).items()
            }
            r = batch["x"] @ w + b - batch["y"]
            np.testing.assert_allclose(
                float(metrics["loss"]), np.sum(m * r**2) / m.sum(), rtol=EXACT_RTOL_F64
            )
            np.testing.assert_allclose(
                float(metrics["pos"]),
                np.sum(m & (r > 0)) / m.sum(),
                rtol=EXACT_RTOL_F64,
            )
            np.testing.assert_allclose(
                float(metrics["grad_norm"]),
                np.sqrt(np.sum(g["w"] ** 2) + g["b"] ** 2),
                rtol=EXACT_RTOL_F64,
            )
            g = jax.tree.map(jnp.asarray, g)
            updates, ref_opt_state = opt.update(g, ref_opt_state, ref_params)
            ref_params = optax.apply_updates(ref_params, updates)
            chex.assert_trees_all_close(
                ts.params, ref_params, rtol=EXACT_RTOL_F64, atol=EXACT_RTOL_F64
            )
        assert int(ts.step) == 3


def test_jit_equals_no_jit():
    with jax.enable_x64(True):
        opt = optax.adam(0.05)
        out = []
        for jit in (True, False):
            ts = init_state(make_params(), opt, key=jax.random.key(0))
            step = fnn.make_train_step(linear_loss, opt, accum_steps=3, jit=jit)
            for seed in range(2):
                ts, metrics = step(ts, jax.tree.map(jnp.asarray, make_batch(seed)))
            out.append((ts.params, ts.opt_state, metrics))
        chex.assert_trees_all_close(
            out[0], out[1], rtol=EXACT_RTOL_F64, atol=EXACT_RTOL_F64
        )


def test_step_is_traced_once_and_donates():
    n_traces = []

    def loss(params, batch, key):
        n_traces.append(1)
        return linear_loss(params, batch, key)

    opt = optax.adam(0.01)
    ts = init_state(make_params(jnp.float32), opt, key=jax.random.key(0))
    step = fnn.make_train_step(loss, opt, accum_steps=3)
    ts, _ = step(ts, make_batch(0))
    after_first = len(n_traces)
    old = ts
    for seed in range(1, 4):
        ts, _ = step(ts, make_batch(seed))
    assert len(n_traces) == after_first
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))  # donated
    # The same through chex: the unjitted step, jitted once, traces once.
    plain = fnn.make_train_step(loss, opt, accum_steps=3, jit=False)
    traced = chex.assert_max_traces(lambda ts, batch: plain(ts, batch), n=1)
    jitted = jax.jit(traced, donate_argnums=0)
    for seed in range(4):
        ts, _ = jitted(ts, make_batch(seed))


def test_steps_per_call_equals_single_steps():
    K = 3
    with jax.enable_x64(True):
        opt = optax.adam(0.05)
        batches = [jax.tree.map(jnp.asarray, make_batch(s)) for s in range(K)]
        ts1 = init_state(make_params(), opt, key=jax.random.key(0))
        single = fnn.make_train_step(linear_loss, opt, accum_steps=3)
        losses = []
        for batch in batches:
            ts1, metrics = single(ts1, batch)
            losses.append(float(metrics["loss"]))
        tsK = init_state(make_params(), opt, key=jax.random.key(0))
        multi = fnn.make_train_step(linear_loss, opt, accum_steps=3, steps_per_call=K)
        stacked = next(fnn.data.stack(batches, K))
        tsK, metricsK = multi(tsK, stacked)
        chex.assert_shape(metricsK["loss"], (K,))
        np.testing.assert_allclose(metricsK["loss"], losses, rtol=EXACT_RTOL_F64)
        chex.assert_trees_all_close(
            tsK.params, ts1.params, rtol=EXACT_RTOL_F64, atol=EXACT_RTOL_F64
        )
        assert int(tsK.step) == K
        np.testing.assert_array_equal(
            jax.random.key_data(tsK.key), jax.random.key_data(ts1.key)
        )
        with pytest.raises(ValueError, match="leading axis of 3.*got 2"):
            multi(tsK, next(fnn.data.stack(batches, 2)))


def Counter():
    """A toy stateful layer: y = s * x + count, then count += 1."""
    desc = "Counter()"

    def init_fn(key, input_shape):
        declare_state(desc, {"count": jnp.zeros((), jnp.float32)})
        return input_shape, {"s": jnp.ones((), jnp.float32)}

    def apply_fn(params, x, **kwargs):
        count = read_state(desc)["count"]
        write_state(desc, {"count": count + 1})
        return params["s"] * x + count

    return fnn.make_layer("counter", desc, init_fn, apply_fn)


def test_model_state_is_carried_through_the_scan():
    k, b = 4, 8
    model = fnn.with_state(fnn.serial(Counter()))
    _, params, state = model.init(jax.random.key(0), (-1, 2))

    def loss(params, state, batch, key):
        y, state = model.apply(params, state, batch["x"], key=key)
        return (jnp.sum(y), y.size), state

    opt = optax.sgd(0.0)
    ts = init_state(params, opt, key=jax.random.key(0), state=state)
    step = fnn.make_train_step(loss, opt, accum_steps=k, has_state=True)
    x = np.arange(b * 2, dtype=np.float32).reshape(b, 2)
    ts, metrics = step(ts, {"x": x})
    assert float(ts.state["0_counter"]["count"]) == k
    # microbatch j adds count j to each of its b // k * 2 outputs
    expected = (x.sum() + sum(j * (b // k) * 2 for j in range(k))) / x.size
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=F32_RTOL)
    ts, _ = step(ts, {"x": x})
    assert float(ts.state["0_counter"]["count"]) == 2 * k


def test_zero_weight_gives_a_zero_gradient_not_nan():
    batch = {**make_batch(0), "mask": np.zeros(B, bool)}
    params = make_params(jnp.float32)
    # plain SGD: a zero gradient leaves params unchanged
    sgd = optax.sgd(0.1)
    ts = init_state(params, sgd, key=jax.random.key(0))
    step = fnn.make_train_step(linear_loss, sgd, accum_steps=2, donate=False)
    new, metrics = step(ts, batch)
    chex.assert_trees_all_equal(new.params, params)
    # Adam: its moments decay, params stay finite
    adam = optax.adam(0.1)
    ts = init_state(params, adam, key=jax.random.key(0))
    step = fnn.make_train_step(linear_loss, adam, accum_steps=2, donate=False)
    new, metrics = step(ts, batch)
    chex.assert_tree_all_finite((new.params, new.opt_state))
    chex.assert_tree_all_finite(metrics)
    assert float(metrics["weight"]) == 0.0 and float(metrics["loss"]) == 0.0
    assert int(new.step) == 1


def test_init_makes_the_state_for_its_own_optimizer():
    step = fnn.make_train_step(linear_loss, optax.adam(0.1), donate=False)
    params = make_params(jnp.float32)
    ts = step.init(params, key=jax.random.key(0))
    assert isinstance(ts, fnn.TrainState) and ts._fields == (
        "step",
        "params",
        "opt_state",
        "state",
        "key",
    )
    assert ts.step.dtype == jnp.int32 and ts.step.shape == ()
    assert ts.state == {}
    assert jnp.issubdtype(ts.key.dtype, jax.dtypes.prng_key)
    chex.assert_trees_all_equal(ts.opt_state, optax.adam(0.1).init(params))
    paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(ts)
    ]
    assert ".params['w']" in paths and ".params['b']" in paths
    raw = step.init(params, key=jax.random.PRNGKey(0))
    assert jnp.issubdtype(raw.key.dtype, jax.dtypes.prng_key)
    # the step donates its state, never the caller's params
    step2 = fnn.make_train_step(linear_loss, optax.adam(0.1))
    step2(step2.init(params, key=jax.random.key(0)), make_batch(0))
    assert not params["w"].is_deleted()
    with pytest.raises(TypeError, match="jax.random.key"):
        step.init(params, key=0)


def test_a_state_made_for_another_optimizer_is_a_clear_error():
    params = make_params(jnp.float32)
    sgd_state = fnn.make_train_step(linear_loss, optax.sgd(0.1)).init(
        params, key=jax.random.key(0)
    )
    adam_step = fnn.make_train_step(linear_loss, optax.adam(0.1))
    with pytest.raises(ValueError, match=r"opt_state was not made by this step"):
        adam_step(sgd_state, make_batch(0))
    other = fnn.make_train_step(linear_loss, optax.adam(0.1)).init(
        {"w": jnp.zeros(5), "b": jnp.zeros(())}, key=jax.random.key(0)
    )
    with pytest.raises(ValueError, match=r"opt_state.*has shape \(5,\)"):
        adam_step(other._replace(params=params), make_batch(0))
    with pytest.raises(TypeError, match="expected a fnn.TrainState"):
        adam_step({"params": params}, make_batch(0))


def test_loss_arity_that_contradicts_has_state_is_a_clear_error():
    def stateful(params, state, batch, key):
        return (jnp.sum(params["w"]), 1.0), state

    with pytest.raises(TypeError, match="has_state=True"):
        fnn.make_train_step(stateful, optax.sgd(0.1))
    with pytest.raises(TypeError, match="has_state=False"):
        fnn.make_train_step(linear_loss, optax.sgd(0.1), has_state=True)


def test_non_scalar_aux_is_a_clear_error_at_the_first_trace():
    def loss(params, batch, key):
        s, w, _ = linear_loss(params, batch, key)
        return s, w, {"per_example": batch["x"][:, 0]}

    step = fnn.make_train_step(loss, optax.sgd(0.1))
    ts = step.init(make_params(jnp.float32), key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"aux\['per_example'\] must be a scalar"):
        step(ts, make_batch(0))


def test_evaluate_with_padded_batches_is_exact():
    with jax.enable_x64(True):
        n = 11
        x, y = make_data(2, n)
        params = make_params()
        eval_step = fnn.make_eval_step(linear_loss)
        data = {"x": x, "y": y}

        def padded():
            for batch in fnn.data.batches(data, 4, shuffle=False, remainder="pad"):
                yield jax.tree.map(jnp.asarray, batch)

        got = fnn.evaluate(eval_step, params, padded())
        r = x @ np.asarray(params["w"]) + float(params["b"]) - y
        np.testing.assert_allclose(got["loss"], np.mean(r**2), rtol=EXACT_RTOL_F64)
        np.testing.assert_allclose(got["pos"], np.mean(r > 0), rtol=EXACT_RTOL_F64)
        assert got["weight"] == n
        ts = init_state(params, optax.sgd(0.1), key=jax.random.key(0))
        assert fnn.evaluate(eval_step, ts, padded()) == got


def test_eval_with_state_reads_train_state():
    model = fnn.with_state(fnn.serial(Counter()))
    _, params, state = model.init(jax.random.key(0), (-1, 2))
    state = {"0_counter": {"count": jnp.array(5.0)}}

    def metric(params, state, batch, key):
        y, state = model.apply(params, state, batch["x"], key=key)
        return (jnp.sum(y), y.size), state

    step = fnn.make_eval_step(metric, has_state=True)
    ts = init_state(params, optax.sgd(0.1), key=jax.random.key(0), state=state)
    x = np.ones((3, 2), np.float32)
    assert fnn.evaluate(step, ts, [{"x": x}])["loss"] == 6.0
    assert fnn.evaluate(step, params, [{"x": x}], state=state)["loss"] == 6.0
    with pytest.raises(ValueError, match="no batches"):
        fnn.evaluate(step, ts, [])


def test_aux_may_not_shadow_metric_names():
    def loss(params, batch, key):
        s, w, _ = linear_loss(params, batch, key)
        return s, w, {"loss": s}

    opt = optax.sgd(0.1)
    ts = init_state(make_params(jnp.float32), opt, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"may not use the names \['loss'\]"):
        fnn.make_train_step(loss, opt)(ts, make_batch(0))
    with pytest.raises(ValueError, match=r"may not use the names \['loss'\]"):
        fnn.make_eval_step(loss)(ts, make_batch(0))


def test_grad_norm_false_drops_only_that_metric():
    with jax.enable_x64(True):
        opt = optax.adam(0.05)
        out = []
        for grad_norm in (True, False):
            ts = init_state(make_params(), opt, key=jax.random.key(0))
            step = fnn.make_train_step(
                linear_loss, opt, accum_steps=3, steps_per_call=2, grad_norm=grad_norm
            )
            batches = [jax.tree.map(jnp.asarray, make_batch(s)) for s in range(2)]
            ts, metrics = step(ts, next(fnn.data.stack(batches, 2)))
            out.append((ts, metrics))
        (ts_on, m_on), (ts_off, m_off) = out
        assert set(m_on) - set(m_off) == {"grad_norm"}
        assert {"loss", "weight"} <= set(m_off)
        chex.assert_trees_all_close(
            (ts_off.params, m_off),
            (ts_on.params, {k: m_on[k] for k in m_off}),
            rtol=EXACT_RTOL_F64,
            atol=EXACT_RTOL_F64,
        )


def test_evaluate_refuses_a_weight_that_counts_the_padding():
    def unmasked(params, batch, key):  # ignores batch["mask"]
        r = batch["x"] @ params["w"] + params["b"] - batch["y"]
        return jnp.sum(r**2), r.shape[0]

    x, y = make_data(2, 11)
    data = {"x": x.astype(np.float32), "y": y.astype(np.float32)}
    params = make_params(jnp.float32)
    padded = fnn.data.batches(data, 4, shuffle=False, remainder="pad")
    with pytest.raises(ValueError, match="weight counts the padding rows"):
        fnn.evaluate(fnn.make_eval_step(unmasked), params, padded)
    # without padding rows the same metric function is fine
    whole = fnn.data.batches(data, 11, shuffle=False, remainder="pad")
    assert fnn.evaluate(fnn.make_eval_step(unmasked), params, whole)["weight"] == 11


def test_evaluate_refuses_nan_metrics():
    x, y = make_data(2, 8)
    x[5, 1] = np.nan
    data = {"x": x.astype(np.float32), "y": y.astype(np.float32)}
    batches = fnn.data.batches(data, 4, shuffle=False, remainder="pad")
    with pytest.raises(FloatingPointError, match=r"\['loss'.*1 of 2 batches"):
        fnn.evaluate(fnn.make_eval_step(linear_loss), make_params(jnp.float32), batches)


def _mode_net(layer):
    """A tiny network whose mode follows the key, its params, state and batch."""
    model = fnn.with_state(fnn.serial(fnn.Dense(2), layer))
    _, params, state = model.init(jax.random.key(0), (-1, 3))
    return model, params, state, {"x": jnp.arange(12.0).reshape(4, 3)}


@pytest.mark.parametrize(
    ("layer", "name"),
    [(fnn.Dropout(0.5), "Dropout"), (fnn.BatchNorm(), "BatchNorm")],
    ids=["dropout", "batchnorm"],
)
def test_a_loss_that_forgets_the_key_is_an_error_naming_the_layer(layer, name):
    model, params, state, batch = _mode_net(layer)

    def make_loss(apply_kwargs):
        def loss_fn(p, st, b, key):
            y, st = model.apply(p, st, b["x"], **apply_kwargs(key))
            return (jnp.sum(y**2), 4.0), st

        return loss_fn

    def run(loss_fn, jit=True):
        step = fnn.make_train_step(loss_fn, optax.sgd(0.1), has_state=True, jit=jit)
        return step(step.init(params, key=jax.random.key(1), state=state), batch)

    for jit in (True, False):
        with pytest.raises(fnn.ShapeError) as err:
            run(make_loss(lambda key: {}), jit=jit)
        msg = str(err.value)
        assert msg.startswith(f"{name}") and "at serial[1]" in msg
        assert "key=key" in msg and "train=False" in msg
    ts, _ = run(make_loss(lambda key: {"key": key}))  # the right loss
    if name == "BatchNorm":  # it trained: the running mean moved
        assert float(jnp.abs(ts.state["1_batchnorm"]["mean"]).sum()) > 0
    ts, _ = run(make_loss(lambda key: {"train": False}))  # evaluation on purpose
    chex.assert_trees_all_equal(ts.state, state)
    # outside a training step, no key is inference, as before
    y, _ = model.apply(params, state, batch["x"])
    sums = fnn.make_eval_step(make_loss(lambda key: {"key": key}), has_state=True)(
        params, batch, state=state
    )
    assert y.shape == (4, 2) and float(sums["weight"]) == 4.0
