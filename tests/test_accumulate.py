"""Gradient accumulation (fnn/training/accumulate.py): microbatch sums equal the
global batch exactly.

Gradients are checked against numpy formulas for a masked linear least-squares
loss, ``sum_i m_i (x_i . w + b - y_i)^2``, whose gradient is
``2 X^T (m * r)`` and ``2 sum(m * r)``. The helpers here are shared with
``test_train.py``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn
from fnn.training.accumulate import accumulate_gradients

EXACT_RTOL_F64 = 1e-12  # accumulation must equal the global batch, up to rounding
MEAN_OF_MEANS_MIN_RELERR = 1e-3  # a mean of means is off by far more than that

B, D = 12, 3


def make_data(seed=0, b=B, d=D):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, d))
    y = rng.normal(size=(b,))
    return x, y


def uneven_mask(b=B, k=3):
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


def rel_err(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def make_params(dtype=jnp.float64):
    return {"w": jnp.array([0.5, -1.0, 2.0], dtype), "b": jnp.array(0.3, dtype)}


def make_batch(seed, b=B):
    x, y = make_data(seed, b)
    return {"x": x, "y": y, "mask": uneven_mask(b)}


def recording_loss(params, state, batch, key):
    """Records, per microbatch, the rows it saw and a draw from its key."""
    c = state["count"]
    state = {
        "count": c + 1,
        "rows": state["rows"].at[c].set(batch["row"]),
        "draws": state["draws"].at[c].set(jax.random.uniform(key, ())),
    }
    return (jnp.sum(params["w"] * batch["row"]), batch["row"].shape[0]), state


def init_state(params, opt, *, key, state=None):
    """A train state for ``opt``, as ``make_train_step(..., opt).init`` makes it."""
    step = fnn.make_train_step(lambda params, batch, key: (0.0, 1.0), opt)
    return step.init(params, key=key, state=state)


def recording_state(k, b):
    return {
        "count": jnp.zeros((), jnp.int32),
        "rows": jnp.zeros((k, b // k), jnp.float32),
        "draws": jnp.zeros((k,), jnp.float32),
    }


def test_accumulation_equals_global_batch_and_mean_of_means_does_not():
    with jax.enable_x64(True):
        x, y = make_data()
        m = uneven_mask()
        params = make_params()
        batch = {"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.asarray(m)}
        w, b = np.asarray(params["w"]), float(params["b"])
        ref = np_grad_sum(w, b, x, y, m)
        ref_mean = {k: v / m.sum() for k, v in ref.items()}
        for k in (1, 2, 3, 4, 6):
            sums = accumulate_gradients(
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
        assert rel_err(mean_of_means, ref_mean["w"]) > MEAN_OF_MEANS_MIN_RELERR


def test_microbatches_are_strided_and_keys_differ():
    k, b = 4, 12
    key = jax.random.key(7)
    batch = {"row": jnp.arange(b, dtype=jnp.float32)}
    sums = accumulate_gradients(
        recording_loss,
        {"w": jnp.array(1.0)},
        recording_state(k, b),
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


def test_batch_leaves_must_share_leading_size():
    with pytest.raises(ValueError, match=r"share the leading size.*'x'.*'y'"):
        accumulate_gradients(
            linear_loss,
            make_params(jnp.float32),
            {},
            {"x": jnp.ones((4, D)), "y": jnp.ones(3), "mask": jnp.ones(4, bool)},
            None,
            accum_steps=2,
        )


def test_loss_protocol_error():
    def mean_loss(params, batch, key):
        return jnp.mean(batch["x"] @ params["w"])

    with pytest.raises(TypeError, match=r"\(loss_sum, weight\)"):
        accumulate_gradients(
            mean_loss, make_params(jnp.float32), {}, {"x": jnp.ones((2, D))}, None
        )


def test_bf16_params_accumulate_in_float32():
    k = 16
    # Each microbatch (one row) has the gradient 1 + 2**-6, exact in bf16; their
    # sum, 16.25, is exact in float32 but a bf16 running sum gives 16.125.
    g = 1 + 2.0**-6
    params = {"w": jnp.array(1.0, jnp.bfloat16)}
    batch = {"c": jnp.full((k,), g, jnp.bfloat16)}

    def loss(params, batch, key):
        return params["w"] * jnp.sum(batch["c"]), batch["c"].shape[0]

    sums = accumulate_gradients(loss, params, {}, batch, None, accum_steps=k)
    assert sums.grad_sum["w"].dtype == jnp.float32
    assert sums.loss_sum.dtype == jnp.float32
    assert float(sums.grad_sum["w"]) == k * g
    bf16_sum = jnp.zeros((), jnp.bfloat16)
    for _ in range(k):
        bf16_sum = bf16_sum + jnp.asarray(g, jnp.bfloat16)
    assert float(bf16_sum) != k * g  # what a bf16 accumulator would give
    x, y = make_data(1, 64)
    params = make_params(jnp.bfloat16)
    batch = {"x": jnp.asarray(x, jnp.bfloat16), "y": jnp.asarray(y, jnp.bfloat16)}
    batch["mask"] = jnp.ones(64, bool)
    # The step keeps the params and the optimizer state in bf16.
    opt = optax.adam(0.01)
    ts = init_state(params, opt, key=jax.random.key(0))
    ts, _ = fnn.make_train_step(linear_loss, opt, accum_steps=k)(ts, batch)
    chex.assert_trees_all_equal_dtypes(ts.params, params)
    chex.assert_trees_all_equal_dtypes(ts.opt_state, opt.init(params))
