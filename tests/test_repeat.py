"""repeat(layer, n): stacked params, one scan; equal to n explicit serial copies."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.model.state import declare_state, read_state, write_state

from suite import check_layer_properties, state_as_params

RTOL_F32 = 1e-5
ATOL_F32 = 1e-5
N = 3


def _block():
    return fnn.residual(fnn.serial(fnn.Dense(3), fnn.Tanh()))


def _unstack(stacked, i):
    return jax.tree.map(lambda a: a[i], stacked)


def test_property_suite():
    check_layer_properties(fnn.repeat(_block(), N), (-1, 3))


def test_property_suite_with_state():
    block = fnn.serial(fnn.Dense(3), fnn.BatchNorm())
    check_layer_properties(
        state_as_params(fnn.repeat(block, 2)),
        (-1, 3),
        apply_kwargs={"train": True},
    )


def test_params_are_stacked_and_keyed_by_the_child():
    shape, params = fnn.repeat(fnn.named("block", _block()), 4).init(
        jax.random.key(0), (-1, 3)
    )
    assert shape == (-1, 3)
    chex.assert_trees_all_equal_shapes(
        params,
        {
            "block": {
                "serial": {
                    "0_dense": {"w": np.zeros((4, 3, 3)), "b": np.zeros((4, 3))},
                    "1_tanh": {},
                }
            }
        },
    )


def test_init_matches_serial_init_copy_by_copy():
    key = jax.random.key(7)
    _, stacked = fnn.repeat(_block(), N).init(key, (-1, 3))
    _, copies = fnn.serial(*[_block()] * N).init(key, (-1, 3))
    for i in range(N):
        chex.assert_trees_all_equal(
            _unstack(stacked["residual"], i), copies[f"{i}_residual"]
        )


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_equals_explicit_serial_copies_with_the_same_params(jit):
    layer = fnn.repeat(_block(), N)
    _, params = layer.init(jax.random.key(0), (-1, 3))
    x = jax.random.normal(jax.random.key(1), (2, 3))
    # the reference: the block written out by hand, in numpy, copy after copy
    want = np.asarray(x, np.float64)
    for i in range(N):
        p = _unstack(params["residual"]["serial"]["0_dense"], i)
        want = want + np.tanh(want @ np.asarray(p["w"]) + np.asarray(p["b"]))
    apply = jax.jit(layer.apply) if jit else layer.apply
    np.testing.assert_allclose(apply(params, x), want, rtol=RTOL_F32, atol=ATOL_F32)
    net = fnn.serial(*[_block()] * N)
    serial_params = {f"{i}_residual": _unstack(params["residual"], i) for i in range(N)}
    np.testing.assert_allclose(
        apply(params, x), net.apply(serial_params, x), rtol=RTOL_F32, atol=ATOL_F32
    )


def test_keys_and_kwargs_reach_each_copy_as_in_serial():
    block = fnn.serial(fnn.Dense(4), fnn.Dropout(0.5))
    layer = fnn.repeat(block, N)
    _, params = layer.init(jax.random.key(0), (-1, 4))
    x = jnp.ones((5, 4))
    key = jax.random.key(3)
    net = fnn.serial(*[block] * N)
    serial_params = {f"{i}_serial": _unstack(params["serial"], i) for i in range(N)}
    got = layer.apply(params, x, key=key)
    want = net.apply(serial_params, x, key=key)
    np.testing.assert_allclose(got, want, rtol=RTOL_F32, atol=ATOL_F32)
    assert not np.allclose(got, layer.apply(params, x))  # dropout was on
    # train=False reaches the Dropout in every copy
    np.testing.assert_allclose(
        layer.apply(params, x, key=key, train=False),
        layer.apply(params, x),
        rtol=RTOL_F32,
        atol=ATOL_F32,
    )


def _running_sum():
    """A stateful test layer: adds 1, keeps the running sum of its inputs."""
    desc = "RunningSum()"

    def init_fn(key, shape):
        declare_state(desc, {"total": jnp.zeros(())})
        return shape, {}

    def apply_fn(params, x, **kwargs):
        write_state(desc, {"total": read_state(desc)["total"] + jnp.sum(x)})
        return x + 1

    return fnn.make_layer("running_sum", desc, init_fn, apply_fn)


def test_state_is_stacked_and_carried_through_the_scan():
    model = fnn.with_state(fnn.repeat(_running_sum(), N))
    _, params, state = model.init(jax.random.key(0), (-1, 2))
    chex.assert_trees_all_equal(state, {"running_sum": {"total": jnp.zeros(N)}})
    x = jnp.array([[1.0, 2.0]])
    y, state = jax.jit(model.apply)(params, state, x)
    y, state = model.apply(params, state, x)
    # copy i sees x + i; two calls add twice its input sum (numbers by hand)
    np.testing.assert_allclose(y, x + N, rtol=RTOL_F32, atol=ATOL_F32)
    want = np.array([2 * (3.0 + 2 * i) for i in range(N)])
    np.testing.assert_allclose(
        state["running_sum"]["total"], want, rtol=RTOL_F32, atol=ATOL_F32
    )


def test_stateful_layer_without_with_state_explains():
    layer = fnn.repeat(_running_sum(), 2)
    _, params = layer.init(jax.random.key(0), (-1, 2))
    with pytest.raises(fnn.ShapeError, match=r"wrap the network with fnn.with_state"):
        layer.apply(params, jnp.ones((1, 2)))


def test_compiled_program_does_not_grow_with_n():
    def n_equations(n):
        layer = fnn.repeat(_block(), n)
        _, params = layer.init(jax.random.key(0), (-1, 3))
        jaxpr = jax.make_jaxpr(layer.apply)(params, jnp.ones((2, 3)))
        return len(jaxpr.eqns), [e.primitive.name for e in jaxpr.eqns]

    (small, prims), (large, _) = n_equations(2), n_equations(16)
    assert "scan" in prims
    assert small == large


def test_bad_arguments_and_shapes():
    with pytest.raises(
        ValueError,
        match=r"repeat: expected n \(the number of copies\) to be a positive",
    ):
        fnn.repeat(_block(), 0)
    with pytest.raises(TypeError, match=r"repeat: argument 0 must be a layer"):
        fnn.repeat(fnn.Relu, 2)
    with pytest.raises(
        fnn.ShapeError,
        match=r"repeat\(Dense\(features=2\), n=3\) at serial\[1\]: the repeated "
        r"layer maps shape \(-1, 4\) to \(-1, 2\); repeat needs a layer that keeps",
    ):
        fnn.serial(fnn.Dense(4), fnn.repeat(fnn.Dense(2), 3)).init(
            jax.random.key(0), (-1, 3)
        )
