"""Tests of fnn.train: accumulation by lax.scan, the step, evaluation.

Gradients are checked against numpy formulas for a masked linear least-squares
loss, ``sum_i m_i (x_i . w + b - y_i)^2``, whose gradient is
``2 X^T (m * r)`` and ``2 sum(m * r)``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn
from fnn.state import declare_state, read_state, write_state

EXACT_RTOL_F64 = 1e-12  # accumulation must equal the global batch, up to rounding
MEAN_OF_MEANS_MIN_RELERR = 1e-3  # a mean of means is off by far more than that
F32_RTOL = 1e-6
F32_ATOL = 1e-6

B, D = 12, 3


def _data(seed=0, b=B, d=D):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, d))
    y = rng.normal(size=(b,))
    return x, y


def _uneven_mask(b=B, k=3):
    # microbatch j = rows j::k; valid counts per microbatch are 4, 2, 1.
    mask = np.zeros(b, bool)
    for j, n_valid in enumerate([4, 2, 1]):
        mask[j::k][:n_valid] = True
    return mask


def linear_loss(params, batch, key):
    r = batch["x"] @ params["w"] + params["b"] - batch["y"]
    m = batch["mask"]
    n_pos = jnp.sum(jnp.where(m, r > 0, False))
    return jnp.sum(jnp.where(m, r**2, 0.0)), jnp.sum(m), {"pos": n_pos}


def np_grad_sum(w, b, x, y, m):
    r = (x @ w + b - y) * m
    return {"w": 2 * x.T @ r, "b": 2 * np.sum(r)}


def _rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _params(dtype=jnp.float64):
    return {"w": jnp.array([0.5, -1.0, 2.0], dtype), "b": jnp.array(0.3, dtype)}


def test_accumulation_equals_global_batch_and_mean_of_means_does_not():
    with jax.enable_x64(True):
        x, y = _data()
        m = _uneven_mask()
        params = _params()
        batch = {"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.asarray(m)}
        w, b = np.asarray(params["w"]), float(params["b"])
        ref = np_grad_sum(w, b, x, y, m)
        ref_mean = {k: v / m.sum() for k, v in ref.items()}
        for k in (1, 2, 3, 4, 6):
            sums = fnn.accumulate_gradients(
                linear_loss, params, {}, batch, None, accum_steps=k
            )
            assert float(sums.weight) == m.sum()
            for name in ("w", "b"):
                got = np.asarray(sums.grad_sum[name]) / float(sums.weight)
                np.testing.assert_allclose(
                    got, ref_mean[name], rtol=EXACT_RTOL_F64, atol=0
                )
        # The mean of per-microbatch means (k = 3, microbatch j = rows j::3)
        # weighs the one valid example of microbatch 2 like the four of
        # microbatch 0: it is not the global-batch gradient.
        per_mb = [
            {
                kk: v / m[j::3].sum()
                for kk, v in np_grad_sum(w, b, x[j::3], y[j::3], m[j::3]).items()
            }
            for j in range(3)
        ]
        mean_of_means = np.mean([g["w"] for g in per_mb], axis=0)
        with pytest.raises(AssertionError):
            np.testing.assert_allclose(
                mean_of_means, ref_mean["w"], rtol=EXACT_RTOL_F64, atol=0
            )
        assert _rel(mean_of_means, ref_mean["w"]) > MEAN_OF_MEANS_MIN_RELERR


def _recording_loss(params, state, batch, key):
    """Records, per microbatch, the rows it saw and a draw from its key."""
    c = state["count"]
    state = {
        "count": c + 1,
        "rows": state["rows"].at[c].set(batch["row"]),
        "draws": state["draws"].at[c].set(jax.random.uniform(key, ())),
    }
    return (jnp.sum(params["w"] * batch["row"]), batch["row"].shape[0]), state


def _recording_state(k, b):
    return {
        "count": jnp.zeros((), jnp.int32),
        "rows": jnp.zeros((k, b // k), jnp.float32),
        "draws": jnp.zeros((k,), jnp.float32),
    }


def test_microbatches_are_strided_and_keys_differ():
    k, b = 4, 12
    key = jax.random.key(7)
    batch = {"row": jnp.arange(b, dtype=jnp.float32)}
    sums = fnn.accumulate_gradients(
        _recording_loss,
        {"w": jnp.array(1.0)},
        _recording_state(k, b),
        batch,
        key,
        accum_steps=k,
        has_state=True,
    )
    rows = np.asarray(sums.state["rows"])
    for j in range(k):
        np.testing.assert_array_equal(rows[j], np.arange(b)[j::k])
    # The same rows as the spec: reshape (B // k, k) then swap the axes.
    np.testing.assert_array_equal(rows, np.arange(b).reshape(b // k, k).T)
    draws = np.asarray(sums.state["draws"])
    expected = [float(jax.random.uniform(jax.random.fold_in(key, j))) for j in range(k)]
    np.testing.assert_array_equal(draws, np.asarray(expected, np.float32))
    assert len(set(draws.tolist())) == k


def test_train_key_advances_and_step_keys_differ():
    k, b = 2, 4
    opt = optax.sgd(0.0)
    ts = fnn.TrainState.create(
        {"w": jnp.array(1.0)}, opt, key=jax.random.key(3), state=_recording_state(k, b)
    )
    step = fnn.make_train_step(_recording_loss, opt, accum_steps=k, has_state=True)
    batch = {"row": jnp.arange(b, dtype=jnp.float32)}
    key0 = jax.random.key_data(ts.key).copy()
    ts, _ = step(ts, batch)
    first = np.asarray(ts.state["draws"]).copy()
    key1 = jax.random.key_data(ts.key).copy()
    ts = ts._replace(state={**ts.state, "count": jnp.zeros((), jnp.int32)})
    ts, _ = step(ts, batch)
    assert not np.array_equal(key0, key1)
    assert not np.array_equal(first, np.asarray(ts.state["draws"]))
    assert int(ts.step) == 2


def test_batch_not_divisible_is_a_clear_error():
    opt = optax.sgd(0.1)
    ts = fnn.TrainState.create(_params(jnp.float32), opt, key=jax.random.key(0))
    step = fnn.make_train_step(linear_loss, opt, accum_steps=4)
    x, y = _data(b=10)
    batch = {"x": x, "y": y, "mask": np.ones(10, bool)}
    with pytest.raises(ValueError, match=r"batch of 10 .*accum_steps=4"):
        step(ts, batch)


def test_batch_leaves_must_share_leading_size():
    with pytest.raises(ValueError, match=r"share the leading size.*'x'.*'y'"):
        fnn.accumulate_gradients(
            linear_loss,
            _params(jnp.float32),
            {},
            {"x": jnp.ones((4, D)), "y": jnp.ones(3), "mask": jnp.ones(4, bool)},
            None,
            accum_steps=2,
        )


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match="make_train_step: accum_steps"):
        fnn.make_train_step(linear_loss, optax.sgd(0.1), accum_steps=bad)
    with pytest.raises(ValueError, match="make_train_step: steps_per_call"):
        fnn.make_train_step(linear_loss, optax.sgd(0.1), steps_per_call=bad)


def test_loss_protocol_error():
    def mean_loss(params, batch, key):
        return jnp.mean(batch["x"] @ params["w"])

    with pytest.raises(TypeError, match=r"\(loss_sum, weight\)"):
        fnn.accumulate_gradients(
            mean_loss, _params(jnp.float32), {}, {"x": jnp.ones((2, D))}, None
        )


def _batch(seed, b=B):
    x, y = _data(seed, b)
    return {"x": x, "y": y, "mask": _uneven_mask(b)}


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
        params = _params()
        ts = fnn.TrainState.create(
            jax.tree.map(jnp.copy, params), opt, key=jax.random.key(0)
        )  # the step donates the train state's buffers
        step = fnn.make_train_step(linear_loss, opt, accum_steps=3)
        ref_params, ref_opt_state = params, opt.init(params)
        for seed in range(3):
            batch = _batch(seed)
            ts, metrics = step(ts, jax.tree.map(jnp.asarray, batch))
            m = batch["mask"]
            w, b = np.asarray(ref_params["w"]), float(ref_params["b"])
            g = {
                k: v / m.sum()
                for k, v in np_grad_sum(w, b, batch["x"], batch["y"], m).items()
            }
            r = batch["x"] @ w + b - batch["y"]
            np.testing.assert_allclose(
                float(metrics["loss"]), np.sum(m * r**2) / m.sum(), rtol=1e-12
            )
            np.testing.assert_allclose(
                float(metrics["pos"]), np.sum(m & (r > 0)) / m.sum(), rtol=1e-12
            )
            np.testing.assert_allclose(
                float(metrics["grad_norm"]),
                np.sqrt(np.sum(g["w"] ** 2) + g["b"] ** 2),
                rtol=1e-12,
            )
            g = jax.tree.map(jnp.asarray, g)
            updates, ref_opt_state = opt.update(g, ref_opt_state, ref_params)
            ref_params = optax.apply_updates(ref_params, updates)
            chex.assert_trees_all_close(
                ts.params, ref_params, rtol=EXACT_RTOL_F64, atol=EXACT_RTOL_F64
            )
        assert int(ts.step) == 3


def test_step_is_traced_once_and_donates():
    n_traces = []

    def loss(params, batch, key):
        n_traces.append(1)
        return linear_loss(params, batch, key)

    opt = optax.adam(0.01)
    ts = fnn.TrainState.create(_params(jnp.float32), opt, key=jax.random.key(0))
    step = fnn.make_train_step(loss, opt, accum_steps=3)
    ts, _ = step(ts, _batch(0))
    after_first = len(n_traces)
    old = ts
    for seed in range(1, 4):
        ts, _ = step(ts, _batch(seed))
    assert len(n_traces) == after_first
    assert old.params["w"].is_deleted()  # donated
    # The same through chex: the unjitted step, jitted once, traces once.
    plain = fnn.make_train_step(loss, opt, accum_steps=3, jit=False)
    jitted = jax.jit(chex.assert_max_traces(plain, n=1), donate_argnums=0)
    for seed in range(4):
        ts, _ = jitted(ts, _batch(seed))


def test_steps_per_call_equals_single_steps():
    K = 3
    with jax.enable_x64(True):
        opt = optax.adam(0.05)
        batches = [jax.tree.map(jnp.asarray, _batch(s)) for s in range(K)]
        ts1 = fnn.TrainState.create(_params(), opt, key=jax.random.key(0))
        single = fnn.make_train_step(linear_loss, opt, accum_steps=3)
        losses = []
        for batch in batches:
            ts1, metrics = single(ts1, batch)
            losses.append(float(metrics["loss"]))
        tsK = fnn.TrainState.create(_params(), opt, key=jax.random.key(0))
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
    ts = fnn.TrainState.create(params, opt, key=jax.random.key(0), state=state)
    step = fnn.make_train_step(loss, opt, accum_steps=k, has_state=True)
    x = np.arange(b * 2, dtype=np.float32).reshape(b, 2)
    ts, metrics = step(ts, {"x": x})
    assert float(ts.state["0_counter"]["count"]) == k
    # microbatch j adds count j to each of its b // k * 2 outputs
    expected = (x.sum() + sum(j * (b // k) * 2 for j in range(k))) / x.size
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=F32_RTOL)
    ts, _ = step(ts, {"x": x})
    assert float(ts.state["0_counter"]["count"]) == 2 * k


def test_bf16_params_accumulate_in_float32():
    k = 16
    # Each microbatch (one row) has the gradient 1 + 2**-6, exact in bf16; their
    # sum, 16.25, is exact in float32 but a bf16 running sum gives 16.125.
    g = 1 + 2.0**-6
    params = {"w": jnp.array(1.0, jnp.bfloat16)}
    batch = {"c": jnp.full((k,), g, jnp.bfloat16)}

    def loss(params, batch, key):
        return params["w"] * jnp.sum(batch["c"]), batch["c"].shape[0]

    sums = fnn.accumulate_gradients(loss, params, {}, batch, None, accum_steps=k)
    assert sums.grad_sum["w"].dtype == jnp.float32
    assert sums.loss_sum.dtype == jnp.float32
    assert float(sums.grad_sum["w"]) == k * g
    bf16_sum = jnp.zeros((), jnp.bfloat16)
    for _ in range(k):
        bf16_sum = bf16_sum + jnp.asarray(g, jnp.bfloat16)
    assert float(bf16_sum) != k * g  # what a bf16 accumulator would give
    x, y = _data(1, 64)
    params = _params(jnp.bfloat16)
    batch = {"x": jnp.asarray(x, jnp.bfloat16), "y": jnp.asarray(y, jnp.bfloat16)}
    batch["mask"] = jnp.ones(64, bool)
    # The step keeps the params and the optimizer state in bf16.
    opt = optax.adam(0.01)
    ts = fnn.TrainState.create(params, opt, key=jax.random.key(0))
    ts, _ = fnn.make_train_step(linear_loss, opt, accum_steps=k)(ts, batch)
    chex.assert_trees_all_equal_dtypes(ts.params, params)
    chex.assert_trees_all_equal_dtypes(ts.opt_state, opt.init(params))


def test_zero_weight_leaves_params_unchanged():
    opt = optax.adam(0.1)
    params = _params(jnp.float32)
    ts = fnn.TrainState.create(params, opt, key=jax.random.key(0))
    step = fnn.make_train_step(linear_loss, opt, accum_steps=2, donate=False)
    batch = {**_batch(0), "mask": np.zeros(B, bool)}
    new, metrics = step(ts, batch)
    chex.assert_trees_all_equal(new.params, params)
    chex.assert_trees_all_equal(new.opt_state, ts.opt_state)
    chex.assert_tree_all_finite(metrics)
    assert float(metrics["weight"]) == 0.0 and float(metrics["loss"]) == 0.0
    assert int(new.step) == 1


def test_train_state_create():
    ts = fnn.TrainState.create(
        _params(jnp.float32), optax.sgd(1.0), key=jax.random.key(0)
    )
    assert ts.step.dtype == jnp.int32 and ts.step.shape == ()
    assert ts.state == {}
    assert jnp.issubdtype(ts.key.dtype, jax.dtypes.prng_key)
    raw = fnn.TrainState.create({}, optax.sgd(1.0), key=jax.random.PRNGKey(0))
    assert jnp.issubdtype(raw.key.dtype, jax.dtypes.prng_key)
    chex.assert_trees_all_equal_structs(
        jax.tree.map(jnp.zeros_like, ts.params), ts.params
    )


def test_evaluate_with_padded_batches_is_exact():
    with jax.enable_x64(True):
        n = 11
        x, y = _data(2, n)
        params = _params()
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
        ts = fnn.TrainState.create(params, optax.sgd(0.1), key=jax.random.key(0))
        assert fnn.evaluate(eval_step, ts, padded()) == got


def test_eval_with_state_reads_train_state():
    model = fnn.with_state(fnn.serial(Counter()))
    _, params, state = model.init(jax.random.key(0), (-1, 2))
    state = {"0_counter": {"count": jnp.array(5.0)}}

    def metric(params, state, batch, key):
        y, state = model.apply(params, state, batch["x"], key=key)
        return (jnp.sum(y), y.size), state

    step = fnn.make_eval_step(metric, has_state=True)
    ts = fnn.TrainState.create(
        params, optax.sgd(0.1), key=jax.random.key(0), state=state
    )
    x = np.ones((3, 2), np.float32)
    assert fnn.evaluate(step, ts, [{"x": x}])["loss"] == 6.0
    assert fnn.evaluate(step, params, [{"x": x}], state=state)["loss"] == 6.0
    with pytest.raises(ValueError, match="no batches"):
        fnn.evaluate(step, ts, [])
