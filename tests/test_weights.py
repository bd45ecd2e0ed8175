"""Tests for params files, export and tied embeddings (fnn.save_params,
fnn.load_params, fnn.training.export); PyTorch weights are in test_torch_weights.py."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

import fnn

RTOL_F32 = 1e-5  # an exported artifact against apply, both float32
ATOL_F32 = 1e-5


# --- params files -------------------------------------------------------------


def _mlp_params(seed=0, classes=3):
    net = fnn.serial(fnn.Dense(8), fnn.Relu(), fnn.Dense(classes))
    return net, net.init(jax.random.key(seed), (-1, 4))[1]


def test_params_file_round_trip_keys_are_paths(tmp_path):
    _, params = _mlp_params()
    params["2_dense"]["b"] = params["2_dense"]["b"].astype(jnp.bfloat16)
    path = tmp_path / "p.safetensors"
    fnn.save_params(path, params)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        chex.assert_equal(
            sorted(f.keys()), ["0_dense/b", "0_dense/w", "2_dense/b", "2_dense/w"]
        )
    loaded = fnn.load_params(path)  # no target: nested dicts
    chex.assert_trees_all_equal(loaded, {k: v for k, v in params.items() if v})
    chex.assert_trees_all_equal_dtypes(loaded, {k: v for k, v in params.items() if v})
    _, fresh = _mlp_params(seed=1)
    into = fnn.load_params(path, fresh)
    chex.assert_trees_all_equal(into["0_dense"], params["0_dense"])
    chex.assert_equal(into["2_dense"]["b"].dtype, jnp.float32)  # the target's dtype
    assert os.listdir(tmp_path) == ["p.safetensors"]


def test_params_file_errors_list_every_path(tmp_path):
    _, params = _mlp_params()
    path = tmp_path / "p.safetensors"
    fnn.save_params(path, params)
    renamed = {"hidden": params["0_dense"], "out": params["2_dense"], "x": {"w": 1.0}}
    with pytest.raises(ValueError) as info:
        fnn.load_params(path, renamed)
    message = str(info.value)
    for p in ("hidden/w", "hidden/b", "out/w", "out/b", "x/w"):
        assert p in message, message
    for p in ("0_dense/w", "0_dense/b", "2_dense/w", "2_dense/b"):
        assert p in message, message
    got = fnn.load_params(
        path, renamed, mapping={"0_dense": "hidden", "2_dense": "out"}, exclude=["x"]
    )
    chex.assert_trees_all_equal(got["out"], params["2_dense"])
    _, five = _mlp_params(classes=5)
    with pytest.raises(ValueError, match=r"2_dense/w \(saved float32\[8, 3\], target"):
        fnn.load_params(path, five)
    with pytest.raises(ValueError, match="PRNG key"):
        fnn.save_params(tmp_path / "k.safetensors", {"k": jax.random.key(0)})


def test_damaged_params_file_is_an_error(tmp_path):
    _, params = _mlp_params()
    path = str(tmp_path / "p.safetensors")
    fnn.save_params(path, params)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[-5] ^= 8  # inside the last array's bytes
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match=r"array .* in .*p.safetensors does not match"):
        fnn.load_params(path)
    with open(path, "wb") as f:
        f.write(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fnn.load_params(path)


# --- export -------------------------------------------------------------------


def test_export_round_trip_cnn():
    cnn = fnn.serial(
        fnn.Conv(4, (3, 3)), fnn.Relu(), fnn.MaxPool((2, 2), strides=2),
        fnn.Flatten(), fnn.Dense(3),
    )  # fmt: skip
    _, params = cnn.init(jax.random.key(0), (-1, 8, 8, 1))
    blob = fnn.training.export(cnn, params, (-1, 8, 8, 1))
    exported = jax.export.deserialize(blob)
    for batch in (1, 5):
        x = jax.random.normal(jax.random.key(batch), (batch, 8, 8, 1))
        chex.assert_trees_all_close(
            exported.call(x), cnn.apply(params, x), rtol=RTOL_F32, atol=ATOL_F32
        )


def test_export_round_trip_stateful_model():
    model = fnn.with_state(fnn.serial(fnn.Dense(6), fnn.BatchNorm(), fnn.Tanh()))
    _, params, state = model.init(jax.random.key(0), (-1, 3))
    x = jax.random.normal(jax.random.key(1), (16, 3))
    _, state = model.apply(params, state, x, train=True)  # running statistics
    blob = fnn.training.export(model, params, (-1, 3), state=state)
    exported = jax.export.deserialize(blob)
    for batch in (2, 7):
        x = jax.random.normal(jax.random.key(batch), (batch, 3))
        chex.assert_trees_all_close(
            exported.call(x), model.apply(params, state, x)[0],
            rtol=RTOL_F32, atol=ATOL_F32,
        )  # fmt: skip
    with pytest.raises(ValueError, match="needs state="):
        fnn.training.export(model, params, (-1, 3))


# --- tied embeddings ------------------------------------------------------------


def tied_lm(vocab, features, body):
    """The recipe of docs/weights.md: the output layer is the transposed table."""
    embed = fnn.Embed(vocab, features)

    def init(key, input_shape):
        k_embed, k_body = jax.random.split(key)
        shape, embed_params = embed.init(k_embed, input_shape)
        shape, body_params = body.init(k_body, shape)
        return shape[:-1] + (vocab,), {"embed": embed_params, "body": body_params}

    def apply(params, ids, **kwargs):
        h = body.apply(params["body"], embed.apply(params["embed"], ids), **kwargs)
        return h @ params["embed"]["table"].T

    return fnn.make_layer("tied_lm", f"tied_lm({vocab}, {features})", init, apply)


def test_tied_embedding_gradients_add_up():
    vocab, features = 7, 4
    body = fnn.serial(fnn.Dense(5), fnn.Tanh(), fnn.Dense(features))
    lm = tied_lm(vocab, features, body)
    _, params = lm.init(jax.random.key(0), (-1, 3))
    chex.assert_equal(len(jax.tree.leaves(params["embed"])), 1)  # one table
    ids = jnp.array([[1, 2, 3], [4, 5, 6]])
    targets = jnp.array([[2, 3, 4], [5, 6, 0]])

    def loss(p):
        logits = lm.apply(p, ids)
        return jnp.mean(fnn.losses.softmax_cross_entropy(logits, targets))

    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)

        def of_table(table):  # the loss as a function of the shared leaf
            return loss({**params64, "embed": {"table": table}})

        fnn.check_grads(of_table, (params64["embed"]["table"],), modes=("rev",))
        tied = jax.jit(jax.grad(loss))(params64)["embed"]["table"]

        def untied(table_in, table_out):  # the same network, two tables
            x = body.apply(params64["body"], table_in[ids])
            logits = x @ table_out.T
            return jnp.mean(fnn.losses.softmax_cross_entropy(logits, targets))

        table = params64["embed"]["table"]
        g_in, g_out = jax.jit(jax.grad(untied, argnums=(0, 1)))(table, table)
    g_in, g_out, tied = np.asarray(g_in), np.asarray(g_out), np.asarray(tied)
    assert np.abs(g_in).max() > 0 and np.abs(g_out).max() > 0  # both uses count
    np.testing.assert_allclose(tied, g_in + g_out, rtol=1e-12, atol=1e-12)
