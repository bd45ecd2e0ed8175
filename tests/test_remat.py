"""fnn.remat and repeat(remat=...): same values and gradients, less memory."""

import chex
import jax
import jax.numpy as jnp
import pytest

import fnn

F32_RTOL = 1e-5  # recomputation may fuse float32 arithmetic differently


def _block():
    return fnn.residual(fnn.serial(fnn.Dense(16), fnn.Tanh(), fnn.Dense(16)))


def _grads(net, params, x):
    return jax.jit(jax.grad(lambda p: jnp.sum(net.apply(p, x) ** 2)))(params)


@pytest.mark.parametrize(
    "policy", [None, jax.checkpoint_policies.dots_with_no_batch_dims_saveable]
)
def test_remat_gives_the_same_values_and_gradients(policy):
    plain = fnn.serial(_block(), fnn.Dense(2))
    wrapped = fnn.serial(fnn.remat(_block(), policy=policy), fnn.Dense(2))
    _, params = plain.init(jax.random.key(0), (-1, 16))
    _, params_w = wrapped.init(jax.random.key(0), (-1, 16))
    chex.assert_trees_all_equal(params, params_w)  # same keys, same values
    x = jax.random.normal(jax.random.key(1), (3, 16))
    chex.assert_trees_all_close(
        wrapped.apply(params, x), plain.apply(params, x), rtol=F32_RTOL
    )
    chex.assert_trees_all_close(
        _grads(wrapped, params, x), _grads(plain, params, x), rtol=F32_RTOL
    )
    # forward mode too
    t = jax.tree.map(jnp.ones_like, params)
    _, jvp_w = jax.jvp(lambda p: wrapped.apply(p, x), (params,), (t,))
    _, jvp_p = jax.jvp(lambda p: plain.apply(p, x), (params,), (t,))
    chex.assert_trees_all_close(jvp_w, jvp_p, rtol=F32_RTOL)


def test_remat_keeps_running_state_and_keyword_arguments():
    def net(wrap):
        return fnn.with_state(
            fnn.serial(
                wrap(fnn.serial(fnn.Dense(4), fnn.BatchNorm())), fnn.Dropout(0.5)
            )
        )

    plain, wrapped = net(lambda l: l), net(fnn.remat)
    _, params, state = plain.init(jax.random.key(0), (-1, 3))
    x = jax.random.normal(jax.random.key(1), (6, 3))
    for kwargs in ({"train": False}, {"key": jax.random.key(2)}, {}):
        y_p, s_p = plain.apply(params, state, x, **kwargs)
        y_w, s_w = wrapped.apply(params, state, x, **kwargs)
        chex.assert_trees_all_close((y_w, s_w), (y_p, s_p), rtol=F32_RTOL)
    table = fnn.summary(
        fnn.serial(fnn.remat(fnn.serial(fnn.Dense(4), fnn.Relu()))), (-1, 3)
    )
    assert "remat(serial(2 layers))" in table and "Dense(features=4)" in table


def test_repeat_remat_cuts_the_backward_memory_with_the_same_gradients():
    x = jax.random.normal(jax.random.key(1), (32, 16))
    out = {}
    for remat in (False, True):
        net = fnn.serial(fnn.repeat(_block(), 8, remat=remat), fnn.Dense(1))
        _, params = net.init(jax.random.key(0), (-1, 16))
        f = jax.jit(jax.grad(lambda p, net=net: jnp.sum(net.apply(p, x))))
        memory = f.lower(params).compile().memory_analysis()
        out[remat] = (f(params), memory)
    chex.assert_trees_all_close(out[True][0], out[False][0], rtol=F32_RTOL)
    if out[True][1] is not None:  # the backend reports memory
        # the scan keeps one block input per copy instead of every activation
        kept, plain = (out[k][1].temp_size_in_bytes for k in (True, False))
        assert kept < plain / 2, (kept, plain)


def test_bad_arguments():
    with pytest.raises(ValueError, match="remat: expected policy"):
        fnn.remat(fnn.Dense(2), policy="dots")
    with pytest.raises(ValueError, match="repeat: expected remat to be a bool"):
        fnn.repeat(_block(), 2, remat="yes")
    with pytest.raises(TypeError, match="remat: argument 0 must be a layer"):
        fnn.remat(fnn.Dense)
    assert repr(fnn.repeat(_block(), 2, remat=True)).endswith("n=2, remat=True)")
