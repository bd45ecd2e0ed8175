"""Tests of fnn.TrainState's packing and of the compiled step's options."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn
from fnn.compiling import jit_step


def _mixed_params(empty=True):
    k = jax.random.split(jax.random.key(0), 3)
    params = {
        "big": jax.random.normal(k[0], (80, 60)),  # 4800 > 4096: stays whole
        "w": jax.random.normal(k[1], (5, 3)),
        "b": jnp.arange(3, dtype=jnp.float32),
        "scalar": jnp.asarray(2.5, jnp.float32),
        "half": jax.random.normal(k[2], (4,)).astype(jnp.bfloat16),
    }
    if empty:  # Orbax cannot save an empty array; packing handles one
        params["empty"] = jnp.zeros((0, 4))
    return params


def _mixed_state():
    return {
        "count": jnp.asarray(3, jnp.int32),
        "ids": jnp.arange(4, dtype=jnp.int32),
        "seen": jnp.array([True, False]),
        "mean": jnp.ones(3),
    }


def _create(pack_max_size=fnn.train_state.PACK_MAX_SIZE, empty=True):
    return fnn.TrainState.create(
        _mixed_params(empty),
        optax.adam(1e-2),
        key=jax.random.key(7),
        state=_mixed_state(),
        pack_max_size=pack_max_size,
    )


def _assert_fields_equal(a: fnn.TrainState, b: fnn.TrainState) -> None:
    fa, fb = a.fields, b.fields
    chex.assert_trees_all_equal(fa._replace(key=None), fb._replace(key=None))
    chex.assert_trees_all_equal_dtypes(fa._replace(key=None), fb._replace(key=None))
    np.testing.assert_array_equal(
        jax.random.key_data(fa.key), jax.random.key_data(fb.key)
    )


def test_fields_survive_packing_eagerly_and_under_jit():
    expected = fnn.TrainState.create(
        _mixed_params(), optax.adam(1e-2), key=jax.random.key(7), pack_max_size=0
    ).replace(state=_mixed_state())
    ts = _create()
    # Reading a state that came out of jit (nothing cached) unpacks it.
    through_jit = jax.jit(lambda t: t)(ts)
    assert through_jit._fields is None
    for got in (ts, through_jit):
        _assert_fields_equal(got, expected)
    # Inside jit the fields are the same arrays, and a changed state packs.
    out = jax.jit(lambda t: t.replace(step=t.step + 2, params=t.params))(ts)
    assert int(out.step) == 2
    chex.assert_trees_all_equal(out.params, expected.params)
    assert jax.random.key_impl(out.key) == jax.random.key_impl(expected.key)


def test_small_leaves_pack_into_one_buffer_per_dtype():
    ts = _create()
    n_fields = len(jax.tree.leaves(ts.fields._replace(key=None))) + 1
    packed = jax.tree_util.tree_flatten_with_path(ts)[0]
    names = [jax.tree_util.keystr(path) for path, _ in packed]
    # bfloat16 (half and its mu, nu), float32 (w, b, scalar, empty, mean and
    # the mu, nu of the params), int32 (step, count, ids, Adam's count); the
    # three big leaves, the one bool leaf and the key data stay whole.
    assert names == [
        ".packed_bfloat16",
        ".packed_float32",
        ".packed_int32",
        ".params['big']",
        ".opt_state[0].mu['big']",
        ".opt_state[0].nu['big']",
        ".state['seen']",
        ".key",
    ]
    assert len(packed) < n_fields == 25
    unpacked = jax.tree.leaves(_create(pack_max_size=0))
    assert len(unpacked) == n_fields


def test_replace_keeps_packing_and_rejects_unknown_fields():
    ts = _create(pack_max_size=10)
    assert ts.replace(step=jnp.asarray(1, jnp.int32))._layout.pack_max_size == 10
    assert ts._replace is not None and int(ts._replace(step=4).step) == 4
    with pytest.raises(TypeError, match=r"unknown fields \['parms'\]"):
        ts.replace(parms={})
    assert "TrainState(step=0, params: 6 leaves" in repr(ts)


def test_the_key_given_to_create_outlives_a_donating_step():
    key = jax.random.key(3)
    opt = optax.sgd(0.1)
    ts = fnn.TrainState.create({"w": jnp.ones(2)}, opt, key=key)
    step = fnn.make_train_step(lambda p, b, k: (jnp.sum(p["w"] * b), 1), opt)
    step(ts, jnp.ones(2))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(ts))
    assert jax.random.split(key).shape == (2,)


def _loss(params, batch, key):
    pred = jnp.tanh(batch["x"] @ params["w1"] + params["b1"][None]) @ params["w2"]
    err = pred[:, 0] - batch["y"]
    return jnp.sum(err**2), batch["y"].shape[0]


def _train(pack_max_size, steps_per_call=1, accum_steps=2):
    k = jax.random.split(jax.random.key(1), 4)
    params = {
        "w1": jax.random.normal(k[0], (3, 8)),
        "b1": jnp.zeros(8),
        "w2": jax.random.normal(k[1], (8, 1)),
    }
    opt = optax.adam(0.05)
    ts = fnn.TrainState.create(
        params, opt, key=jax.random.key(0), pack_max_size=pack_max_size
    )
    step = fnn.make_train_step(
        _loss, opt, accum_steps=accum_steps, steps_per_call=steps_per_call
    )
    x = jax.random.normal(k[2], (6, 8, 3))
    batches = {"x": x, "y": jnp.sin(x.sum(-1))}
    if steps_per_call > 1:
        batches = jax.tree.map(lambda a: a.reshape(3, 2, 8, *a.shape[2:]), batches)
    history = []
    for i in range(len(batches["y"])):
        ts, metrics = step(ts, jax.tree.map(lambda a, i=i: a[i], batches))
        history.append(metrics)
    return ts, history


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_packing_does_not_change_training(steps_per_call):
    packed, m_packed = _train(fnn.train_state.PACK_MAX_SIZE, steps_per_call)
    unpacked, m_unpacked = _train(0, steps_per_call)
    assert len(jax.tree.leaves(packed)) < len(jax.tree.leaves(unpacked))
    assert int(packed.step) == int(unpacked.step) == 6
    chex.assert_trees_all_close(packed.params, unpacked.params, rtol=1e-6)
    chex.assert_trees_all_close(packed.opt_state, unpacked.opt_state, rtol=1e-6)
    chex.assert_trees_all_close(m_packed, m_unpacked, rtol=1e-6)


def test_step_returns_the_layout_it_was_given():
    opt = optax.sgd(0.1)
    params = {"w1": jnp.ones((3, 8)), "b1": jnp.zeros(8), "w2": jnp.ones((8, 1))}
    ts = fnn.TrainState.create(params, opt, key=jax.random.key(0))
    step = fnn.make_train_step(_loss, opt)
    batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros(4)}
    new, _ = step(ts, batch)
    # The same object, so jit's cache check on the next call is an identity test.
    assert new._layout is ts._layout
    assert jax.tree.structure(new) == jax.tree.structure(ts)


def test_checkpoint_stores_the_fields_whatever_the_packing(tmp_path):
    ts = _create(empty=False)
    with fnn.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(0, ts)
        ckpt.wait()
        paths = [r["path"] for r in ckpt._read_meta(0)["leaves"]]
        assert ".params['w']" in paths and ".opt_state[0].mu['half']" in paths
        assert not any("packed" in p for p in paths)
        for target_packing in (0, 100):
            target = _create(pack_max_size=target_packing, empty=False).replace(
                step=jnp.asarray(99, jnp.int32)
            )
            restored, _ = ckpt.restore(target)
            assert isinstance(restored, fnn.TrainState)
            assert restored._layout.pack_max_size == target_packing
            _assert_fields_equal(restored, ts)


def test_vmapped_ensemble_equals_members_trained_alone():
    opt = optax.adam(0.05)

    def create(key):
        k1, k2 = jax.random.split(key)
        params = {
            "w1": jax.random.normal(k1, (3, 8)),
            "b1": jnp.zeros(8),
            "w2": jax.random.normal(k2, (8, 1)),
        }
        return fnn.TrainState.create(params, opt, key=key)

    keys = jax.random.split(jax.random.key(5), 3)
    step = fnn.make_train_step(_loss, opt)
    x = jax.random.normal(jax.random.key(6), (8, 3))
    batch = {"x": x, "y": jnp.cos(x[:, 0])}
    ensemble = jax.vmap(create)(keys)
    assert not keys.is_deleted()  # create copies the key it is given
    ensemble, metrics = jax.vmap(step, in_axes=(0, None))(ensemble, batch)
    for i, key in enumerate(keys):
        alone, m = step(create(key), batch)
        member = jax.tree.map(lambda a, i=i: a[i], ensemble)
        chex.assert_trees_all_close(member.params, alone.params, rtol=1e-5)
        np.testing.assert_allclose(metrics["loss"][i], m["loss"], rtol=1e-5)


def test_jit_step_runs_nested_and_is_plain_jit_without_donation():
    # That the top-level call compiles with the option is checked on the
    # compiled program in test_overhead.py (no copies of donated weights).
    f = jit_step(lambda x: x * 2, donate=True)
    outer = jax.jit(lambda x: f(x) + 1)
    np.testing.assert_array_equal(outer(jnp.ones(2)), [3.0, 3.0])
    np.testing.assert_array_equal(jax.vmap(f)(jnp.ones((2, 2))), 2 * np.ones((2, 2)))
    np.testing.assert_array_equal(f(jnp.ones(2)), [2.0, 2.0])
    plain = jit_step(lambda x: x * 2, donate=False)
    assert isinstance(plain, type(jax.jit(lambda x: x)))


def test_abstract_state_from_eval_shape_has_abstract_fields_and_restores(tmp_path):
    ts = _create(empty=False)
    abstract = jax.eval_shape(lambda: _create(empty=False))
    assert isinstance(abstract.params["w"], jax.ShapeDtypeStruct)
    assert abstract.params["w"].shape == (5, 3)
    assert abstract.params["half"].dtype == jnp.bfloat16
    assert abstract.step.dtype == jnp.int32
    assert jax.dtypes.issubdtype(abstract.key.dtype, jax.dtypes.prng_key)
    with fnn.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(0, ts)
        restored, _ = ckpt.restore(abstract)
    _assert_fields_equal(restored, ts)
