"""Tests for fnn.Checkpointer: exact round trip, atomicity, clear mismatch errors."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn


class _State(NamedTuple):
    """A stand-in for a training state: the same kinds of leaves."""

    step: jax.Array
    params: Any
    opt_state: Any
    state: Any
    key: jax.Array


def _make_state(seed: int = 0, hidden: int = 3) -> _State:
    k = jax.random.key(seed)
    params = {
        "0_dense": {
            "w": jax.random.normal(k, (4, hidden)),
            "b": jnp.arange(hidden, dtype=jnp.float32),
        }
    }
    opt_state = optax.adam(1e-3).init(params)
    return _State(jnp.asarray(7, jnp.int32), params, opt_state, None, k)


def _assert_same(a: _State, b: _State) -> None:
    chex.assert_trees_all_equal_structs(a, b)
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    for x, y in zip(la, lb):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            chex.assert_equal(str(jax.random.key_impl(x)), str(jax.random.key_impl(y)))
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        chex.assert_equal(np.asarray(x).dtype, np.asarray(y).dtype)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_is_exact(tmp_path, async_save):
    saved = _make_state(0)
    meta = {"epoch": 2, "batch": 5, "history": [{"step": 1, "loss": 0.5}]}
    with fnn.Checkpointer(tmp_path, async_save=async_save) as ckpt:
        ckpt.save(7, saved, metadata=meta)
        restored, got_meta = ckpt.restore(_make_state(1))
        chex.assert_equal(ckpt.latest_step(), 7)
        chex.assert_equal(ckpt.metadata(), meta)
    _assert_same(saved, restored)
    chex.assert_equal(got_meta, meta)
    # The restored key draws the same numbers as the saved one.
    np.testing.assert_array_equal(
        jax.random.uniform(saved.key, (3,)), jax.random.uniform(restored.key, (3,))
    )


def test_reopened_directory_sees_checkpoints_and_keeps_the_latest(tmp_path):
    with fnn.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, _make_state(step), metadata={"step": step})
    with fnn.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        chex.assert_equal(ckpt.all_steps(), [3, 4])
        chex.assert_equal(ckpt.latest_step(), 4)
        restored, meta = ckpt.restore(_make_state(0), step=3)
        chex.assert_equal(meta, {"step": 3})
    _assert_same(restored, _make_state(3))


def test_half_written_checkpoint_is_ignored(tmp_path):
    with fnn.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _make_state(1))
    # A crash during the save of step 2 leaves Orbax's temporary directory.
    tmp_dir = tmp_path / "2.orbax-checkpoint-tmp-1234567890"
    (tmp_dir / "tree").mkdir(parents=True)
    (tmp_dir / "tree" / "partial").write_bytes(b"\x00" * 10)
    with fnn.Checkpointer(tmp_path) as ckpt:
        chex.assert_equal(ckpt.latest_step(), 1)
        chex.assert_equal(ckpt.all_steps(), [1])
        restored, _ = ckpt.restore(_make_state(0))
    _assert_same(restored, _make_state(1))


def test_missing_leaf_names_the_path(tmp_path):
    state = _make_state(0)
    with fnn.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        bigger = state._replace(params={**state.params, "1_dense": {"w": jnp.ones(2)}})
        with pytest.raises(ValueError, match=r"target has a leaf at .*\['1_dense'\]"):
            ckpt.restore(bigger)
        smaller = state._replace(
            params={"0_dense": {"w": state.params["0_dense"]["w"]}}
        )
        with pytest.raises(ValueError, match=r"checkpoint has a leaf at .*\['b'\]"):
            ckpt.restore(smaller)


def test_shape_and_dtype_mismatch_name_the_leaf_and_both(tmp_path):
    with fnn.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _make_state(0, hidden=3))
        with pytest.raises(ValueError, match=r"\['b'\].*\(3,\).*\(5,\)"):
            ckpt.restore(_make_state(0, hidden=5))
        wrong_dtype = _make_state(0)._replace(step=jnp.asarray(7, jnp.float32))
        with pytest.raises(ValueError, match=r"\.step.*int32.*float32"):
            ckpt.restore(wrong_dtype)


def test_errors_for_bad_use(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        fnn.Checkpointer(tmp_path, max_to_keep=0)
    with fnn.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore(_make_state(0))
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(1, _make_state(0), metadata={"bad": object()})
        ckpt.save(1, _make_state(0))
        with pytest.raises(ValueError, match="already holds"):
            ckpt.save(1, _make_state(0))
        with pytest.raises(FileNotFoundError, match=r"step 5.*\[1\]"):
            ckpt.restore(_make_state(0), step=5)


def test_nothing_is_pickled(tmp_path):
    with fnn.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _make_state(0), metadata={"epoch": 0})
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                head = f.read(2)
            # Every pickle protocol >= 2 starts with the PROTO opcode 0x80.
            assert head[:1] != b"\x80", f"{name} looks like a pickle"
