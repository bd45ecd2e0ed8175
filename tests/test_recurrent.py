"""GRUCell, LSTMCell and RNN against numpy step-by-step loops (and Flax)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn

from suite import check_layer_properties
from suite import init_perturbed as _init

RTOL_F32 = 1e-5
ATOL_F32 = 1e-5
VARIANCE_SIGMAS = 6  # tolerance in standard errors of a sample variance
ORTHOGONAL_ATOL_F32 = 1e-4


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _np_gru(p, xs):
    """Reference GRU over xs (batch, time, in); returns (outputs, h)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    wi, bi, wh, bh = (
        p["input"]["w"],
        p["input"]["b"],
        p["hidden"]["w"],
        p["hidden"]["b"],
    )
    f = wh.shape[0]
    h = np.zeros((xs.shape[0], f))
    outs = []
    for t in range(xs.shape[1]):
        x = np.asarray(xs[:, t], np.float64)
        r = _sigmoid(x @ wi[:, :f] + bi[:f] + h @ wh[:, :f] + bh[:f])
        z = _sigmoid(
            x @ wi[:, f : 2 * f] + bi[f : 2 * f] + h @ wh[:, f : 2 * f] + bh[f : 2 * f]
        )
        n = np.tanh(
            x @ wi[:, 2 * f :] + bi[2 * f :] + r * (h @ wh[:, 2 * f :] + bh[2 * f :])
        )
        h = (1 - z) * n + z * h
        outs.append(h)
    return np.stack(outs, 1), h


def _np_lstm(p, xs):
    """Reference LSTM over xs (batch, time, in); returns (outputs, (c, h))."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    wi, b, wh = p["input"]["w"], p["input"]["b"], p["hidden"]["w"]
    f = wh.shape[0]
    c = h = np.zeros((xs.shape[0], f))
    outs = []
    for t in range(xs.shape[1]):
        x = np.asarray(xs[:, t], np.float64)
        gates = [
            x @ wi[:, k * f : (k + 1) * f]
            + b[k * f : (k + 1) * f]
            + h @ wh[:, k * f : (k + 1) * f]
            for k in range(4)
        ]
        i, fg, g, o = (
            _sigmoid(gates[0]),
            _sigmoid(gates[1]),
            np.tanh(gates[2]),
            _sigmoid(gates[3]),
        )
        c = fg * c + i * g
        h = o * np.tanh(c)
        outs.append(h)
    return np.stack(outs, 1), (c, h)


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


LENGTHS = jnp.array([4, 2, 1])


@pytest.mark.parametrize(
    ("layer", "kwargs"),
    [
        (fnn.RNN(fnn.GRUCell(3)), {}),
        (fnn.RNN(fnn.LSTMCell(3), reverse=True), {}),
        (fnn.RNN(fnn.GRUCell(2), return_sequences=False), {"lengths": LENGTHS}),
        (fnn.RNN(fnn.LSTMCell(2), return_carry=True), {"lengths": LENGTHS}),
    ],
    ids=["gru", "lstm-reverse", "gru-last-lengths", "lstm-carry-lengths"],
)
def test_property_suite(layer, kwargs):
    check_layer_properties(layer, (-1, 4, 2), apply_kwargs=kwargs)


@pytest.mark.parametrize(
    ("cell", "reference"),
    [(fnn.GRUCell(3), _np_gru), (fnn.LSTMCell(3), _np_lstm)],
    ids=["gru", "lstm"],
)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_matches_numpy_loop(cell, reference, jit):
    layer = fnn.RNN(cell, return_carry=True)
    params = _init(layer, (-1, 5, 2))
    x = _x((2, 5, 2))
    apply = jax.jit(layer.apply) if jit else layer.apply
    ys, carry = apply(params, x)
    want_ys, want_carry = reference(params[cell.name], np.asarray(x))
    np.testing.assert_allclose(ys, want_ys, rtol=RTOL_F32, atol=ATOL_F32)
    chex.assert_trees_all_close(carry, want_carry, rtol=RTOL_F32, atol=ATOL_F32)


@pytest.mark.parametrize(
    ("cell", "reference"),
    [(fnn.GRUCell(3), _np_gru), (fnn.LSTMCell(3), _np_lstm)],
    ids=["gru", "lstm"],
)
def test_reverse_is_the_forward_loop_on_the_flipped_sequence(cell, reference):
    layer = fnn.RNN(cell, reverse=True)
    params = _init(layer, (-1, 4, 2))
    x = _x((2, 4, 2))
    want, _ = reference(params[cell.name], np.asarray(x)[:, ::-1])
    np.testing.assert_allclose(
        layer.apply(params, x), want[:, ::-1], rtol=RTOL_F32, atol=ATOL_F32
    )


@pytest.mark.parametrize("cell", [fnn.GRUCell(3), fnn.LSTMCell(3)], ids=["gru", "lstm"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_lengths_equal_the_truncated_sequences(cell, reverse):
    layer = fnn.RNN(cell, reverse=reverse, return_carry=True)
    params = _init(layer, (-1, 5, 2))
    x = _x((3, 5, 2))
    lengths = [5, 3, 1]
    ys, carry = jax.jit(layer.apply)(params, x, lengths=jnp.array(lengths))
    for b, n in enumerate(lengths):
        ys_b, carry_b = layer.apply(params, x[b : b + 1, :n])
        np.testing.assert_allclose(
            ys[b : b + 1, :n], ys_b, rtol=RTOL_F32, atol=ATOL_F32
        )
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, b=b: a[b : b + 1], carry),
            carry_b,
            rtol=RTOL_F32,
            atol=ATOL_F32,
        )
        np.testing.assert_array_equal(ys[b, n:], 0.0)


def test_mask_equals_lengths_and_last_output_is_at_the_true_end():
    layer = fnn.RNN(fnn.GRUCell(3), return_sequences=False)
    params = _init(layer, (-1, 4, 2))
    x = _x((2, 4, 2))
    lengths = jnp.array([4, 2])
    mask = jnp.arange(4)[None, :] < lengths[:, None]
    by_lengths = layer.apply(params, x, lengths=lengths)
    by_mask = layer.apply(params, x, mask=mask)
    np.testing.assert_allclose(by_lengths, by_mask, rtol=RTOL_F32, atol=ATOL_F32)
    want, _ = _np_gru(params["gru"], np.asarray(x[1:, :2]))
    np.testing.assert_allclose(by_mask[1], want[0, -1], rtol=RTOL_F32, atol=ATOL_F32)


def test_matches_flax_cells_with_mapped_weights():
    nn = pytest.importorskip("flax.linen")
    x = _x((2, 4, 3))
    f = 5

    gru = fnn.RNN(fnn.GRUCell(f), return_carry=True)
    p = _init(gru, (-1, 4, 3))["gru"]
    wi, bi, wh, bh = (
        p["input"]["w"],
        p["input"]["b"],
        p["hidden"]["w"],
        p["hidden"]["b"],
    )
    # Flax's GRU has one bias per gate (the hidden one only for n)
    p = {
        "input": {"w": wi, "b": bi},
        "hidden": {"w": wh, "b": bh.at[: 2 * f].set(0.0)},
    }
    cols = {g: slice(k * f, (k + 1) * f) for k, g in enumerate("rzn")}
    flax_params = {
        **{f"i{g}": {"kernel": wi[:, s], "bias": bi[s]} for g, s in cols.items()},
        **{f"h{g}": {"kernel": wh[:, s]} for g, s in cols.items()},
    }
    flax_params["hn"]["bias"] = bh[cols["n"]]
    want_ys, want_h = _flax_scan(nn.GRUCell(f), flax_params, jnp.zeros((2, f)), x)
    ys, h = gru.apply({"gru": p}, x)
    np.testing.assert_allclose(ys, want_ys, rtol=RTOL_F32, atol=ATOL_F32)
    np.testing.assert_allclose(h, want_h, rtol=RTOL_F32, atol=ATOL_F32)

    lstm = fnn.RNN(fnn.LSTMCell(f), return_carry=True)
    p = _init(lstm, (-1, 4, 3))["lstm"]
    wi, b, wh = p["input"]["w"], p["input"]["b"], p["hidden"]["w"]
    cols = {g: slice(k * f, (k + 1) * f) for k, g in enumerate("ifgo")}
    flax_params = {
        **{f"i{g}": {"kernel": wi[:, s]} for g, s in cols.items()},
        **{f"h{g}": {"kernel": wh[:, s], "bias": b[s]} for g, s in cols.items()},
    }
    zeros = jnp.zeros((2, f))
    want_ys, want_carry = _flax_scan(
        nn.OptimizedLSTMCell(f), flax_params, (zeros, zeros), x
    )
    ys, carry = lstm.apply({"lstm": p}, x)
    np.testing.assert_allclose(ys, want_ys, rtol=RTOL_F32, atol=ATOL_F32)
    chex.assert_trees_all_close(carry, want_carry, rtol=RTOL_F32, atol=ATOL_F32)


def _flax_scan(cell, params, carry, x):
    outs = []
    for t in range(x.shape[1]):
        carry, y = cell.apply({"params": params}, carry, x[:, t])
        outs.append(y)
    return jnp.stack(outs, 1), carry


def test_params_and_carry_shapes():
    shape, params = fnn.RNN(fnn.LSTMCell(4), return_carry=True).init(
        jax.random.key(0), (-1, 7, 3)
    )
    assert shape == ((-1, 7, 4), ((-1, 4), (-1, 4)))
    chex.assert_trees_all_equal_shapes(
        params,
        {
            "lstm": {
                "input": {"w": np.zeros((3, 16)), "b": np.zeros(16)},
                "hidden": {"w": np.zeros((4, 16))},
            }
        },
    )
    assert fnn.RNN(fnn.GRUCell(4), return_sequences=False).init(
        jax.random.key(0), (-1, 7, 3)
    )[0] == (-1, 4)


@pytest.mark.parametrize(
    "cell", [fnn.GRUCell(128), fnn.LSTMCell(128)], ids=["gru", "lstm"]
)
def test_input_weights_have_variance_one_over_fan_in_and_hidden_are_orthogonal(
    cell,
):
    """LeCun normal on the input weights (Var = 1 / in_features); the hidden
    weights of each gate are an orthogonal map of the hidden state."""
    n_in, f = 64, cell.features
    params = cell.init(jax.random.key(0), n_in)
    w = np.asarray(params["input"]["w"], np.float64)
    tol = VARIANCE_SIGMAS * np.sqrt(2 / w.size)  # standard error of a variance
    assert abs(w.var() * n_in - 1) < tol, w.var() * n_in
    wh = np.asarray(params["hidden"]["w"], np.float64)  # h @ wh: all gates at once
    np.testing.assert_allclose(wh @ wh.T, np.eye(f), atol=ORTHOGONAL_ATOL_F32)


def test_bad_arguments():
    with pytest.raises(
        ValueError, match=r"GRUCell: expected features to be a positive int"
    ):
        fnn.GRUCell(0)
    with pytest.raises(
        ValueError, match=r"LSTMCell: expected features to be a positive int"
    ):
        fnn.LSTMCell(2.5)
    with pytest.raises(TypeError, match=r"RNN: expected a cell such as"):
        fnn.RNN(fnn.Dense(3))


def test_bad_inputs_name_the_layer():
    layer = fnn.RNN(fnn.GRUCell(3))
    with pytest.raises(
        fnn.ShapeError,
        match=r"RNN\(GRUCell\(features=3\)\): expected input of rank at least 3, "
        r"got shape \(-1, 4\)",
    ):
        layer.init(jax.random.key(0), (-1, 4))
    with pytest.raises(fnn.ShapeError, match=r"with known features, got \(-1, 4, -1\)"):
        layer.init(jax.random.key(0), (-1, 4, -1))
    net = fnn.serial(layer)
    _, params = net.init(jax.random.key(0), (-1, 4, 2))
    with pytest.raises(
        fnn.ShapeError,
        match=r"GRUCell\(features=3\) at serial\[0\]: expected input with last "
        r"dimension 2 at each step, got 5",
    ):
        net.apply(params, jnp.ones((1, 4, 5)))
    x = jnp.ones((2, 4, 2))
    with pytest.raises(fnn.ShapeError, match=r"expected integer lengths of shape"):
        net.apply(params, x, lengths=jnp.array([1, 2, 3]))
    with pytest.raises(fnn.ShapeError, match=r"expected a mask of shape"):
        net.apply(params, x, mask=jnp.ones((2, 3), bool))
    with pytest.raises(fnn.ShapeError, match=r"either lengths= or mask=, not both"):
        net.apply(params, x, lengths=jnp.array([1, 2]), mask=jnp.ones((2, 4), bool))


def test_complex_input_is_refused_with_the_place():
    net = fnn.serial(fnn.model.Identity(), fnn.RNN(fnn.GRUCell(3)))
    _, params = net.init(jax.random.key(0), (-1, 4, 2))
    with pytest.raises(fnn.ShapeError) as e:
        jax.jit(net.apply)(params, jnp.ones((2, 4, 2), jnp.complex64))
    assert str(e.value).startswith(
        "RNN(GRUCell(features=3)) at serial[1]: expected a real input, got dtype "
        "complex64"
    )
