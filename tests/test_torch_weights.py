"""PyTorch weights into fnn (``fnn.load_params(..., layout="torch")``), one
layer kind at a time.

PyTorch is not needed: each test writes weights in PyTorch's names and
layouts with numpy and safetensors, and compares fnn's output with a numpy
formula of PyTorch's documented computation (in float64), never with fnn.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import safetensors.numpy

import fnn

RTOL_F32 = 1e-5  # fnn in float32 against the float64 numpy reference
ATOL_F32 = 1e-5


def _rng(seed=0):
    return np.random.default_rng(seed)


def _randn(rng, *shape, scale=0.5):
    return (rng.normal(size=shape) * scale).astype(np.float32)


def _torch_file(tmp_path, tensors):
    path = str(tmp_path / "torch.safetensors")
    safetensors.numpy.save_file(tensors, path)
    return path


def _close(actual, expected):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=RTOL_F32, atol=ATOL_F32
    )


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def _f64(a):
    return np.asarray(a, np.float64)


def test_torch_linear(tmp_path):
    rng = _rng(1)
    w, b, x = _randn(rng, 3, 5), _randn(rng, 3), _randn(rng, 4, 5)
    path = _torch_file(tmp_path, {"fc.weight": w, "fc.bias": b})
    net = fnn.serial(fnn.Dense(3))
    _, params = net.init(jax.random.key(0), (-1, 5))
    params = fnn.load_params(path, params, layout="torch", mapping={"fc": "0_dense"})
    _close(net.apply(params, x), _f64(x) @ _f64(w).T + b)


def _np_conv(x, w, b, stride, pad, dilation, groups):
    """PyTorch's ConvNd: cross-correlation, x (N, C, *S), w (O, C/g, *K)."""
    n = x.ndim - 2
    x = np.pad(_f64(x), [(0, 0), (0, 0)] + [(pad, pad)] * n)
    o, cg, *k = w.shape
    out_size = [
        (x.shape[2 + i] - dilation * (k[i] - 1) - 1) // stride + 1 for i in range(n)
    ]
    y = np.zeros((x.shape[0], o, *out_size))
    per = o // groups
    for oc in range(o):
        g = oc // per
        for pos in np.ndindex(*out_size):
            for tap in np.ndindex(*k):
                idx = tuple(p * stride + t * dilation for p, t in zip(pos, tap))
                patch = x[(slice(None), slice(g * cg, (g + 1) * cg), *idx)]
                y[(slice(None), oc, *pos)] += patch @ _f64(w[(oc, slice(None), *tap)])
    return y + _f64(b).reshape(1, o, *[1] * n)


@pytest.mark.parametrize(
    "spatial, kernel, stride, pad, dilation, groups",
    [((9,), (3,), 1, 0, 2, 1), ((7, 6), (3, 2), 2, 1, 1, 2)],
    ids=["conv1d", "conv2d"],
)
def test_torch_conv(tmp_path, spatial, kernel, stride, pad, dilation, groups):
    rng = _rng(2)
    c_in, c_out = 4, 6
    w = _randn(rng, c_out, c_in // groups, *kernel)
    b, x = _randn(rng, c_out), _randn(rng, 2, c_in, *spatial)  # PyTorch's NC...
    path = _torch_file(tmp_path, {"features.0.weight": w, "features.0.bias": b})
    n = len(spatial)
    conv = fnn.Conv(c_out, kernel, strides=stride, padding=((pad, pad),) * n,
                    dilation=dilation, feature_group_count=groups)  # fmt: skip
    net = fnn.serial(conv)
    _, params = net.init(jax.random.key(0), (-1, *spatial, c_in))
    params = fnn.load_params(
        path, params, layout="torch", mapping={"features.0": "0_conv"}
    )
    y = net.apply(params, np.moveaxis(x, 1, -1))  # channels last
    _close(
        np.moveaxis(np.asarray(y), -1, 1),
        _np_conv(x, w, b, stride, pad, dilation, groups),
    )


def _np_conv_transpose(x, w, b, stride, pad, output_padding):
    """PyTorch's ConvTranspose2d: every input pixel scatters w (C, O, kh, kw)."""
    n_, c, h, wd = x.shape
    _, o, kh, kw = w.shape
    out_h = (h - 1) * stride - 2 * pad + kh + output_padding
    out_w = (wd - 1) * stride - 2 * pad + kw + output_padding
    y = np.zeros((n_, o, out_h, out_w))
    for i in range(h):
        for j in range(wd):
            for a in range(kh):
                for bb in range(kw):
                    r, s = i * stride - pad + a, j * stride - pad + bb
                    if 0 <= r < out_h and 0 <= s < out_w:
                        y[:, :, r, s] += _f64(x[:, :, i, j]) @ _f64(w[:, :, a, bb])
    return y + _f64(b).reshape(1, o, 1, 1)


def test_torch_conv_transpose(tmp_path):
    rng = _rng(3)
    stride, pad, output_padding, k = 2, 1, 1, 3
    w, b, x = _randn(rng, 4, 5, k, k), _randn(rng, 5), _randn(rng, 2, 4, 5, 6)
    path = _torch_file(tmp_path, {"up.weight": w, "up.bias": b})
    lo, hi = k - 1 - pad, k - 1 - pad + output_padding
    net = fnn.serial(
        fnn.ConvTranspose(5, (k, k), strides=stride, padding=((lo, hi),) * 2)
    )
    _, params = net.init(jax.random.key(0), (-1, 5, 6, 4))
    params = fnn.load_params(
        path, params, layout="torch", mapping={"up": "0_conv_transpose"}
    )
    y = np.moveaxis(np.asarray(net.apply(params, np.moveaxis(x, 1, -1))), -1, 1)
    _close(y, _np_conv_transpose(x, w, b, stride, pad, output_padding))


def test_torch_embedding_and_layer_norm(tmp_path):
    rng = _rng(4)
    table, scale, bias = _randn(rng, 10, 6), _randn(rng, 6) + 1, _randn(rng, 6)
    path = _torch_file(tmp_path, {
        "tok.weight": table, "norm.weight": scale, "norm.bias": bias,
    })  # fmt: skip
    net = fnn.serial(fnn.Embed(10, 6), fnn.LayerNorm())
    _, params = net.init(jax.random.key(0), (-1, 7))
    params = fnn.load_params(
        path, params, layout="torch", mapping={"tok": "0_embed", "norm": "1_layernorm"}
    )
    ids = rng.integers(0, 10, (3, 7))
    e = _f64(table)[ids]
    mean, var = e.mean(-1, keepdims=True), e.var(-1, keepdims=True)
    _close(net.apply(params, ids), (e - mean) / np.sqrt(var + 1e-5) * scale + bias)


def test_torch_batch_norm_running_statistics_go_to_the_state(tmp_path):
    rng = _rng(5)
    c = 4
    tensors = {
        "bn.weight": _randn(rng, c) + 1,
        "bn.bias": _randn(rng, c),
        "bn.running_mean": _randn(rng, c),
        "bn.running_var": rng.uniform(0.5, 2, c).astype(np.float32),
        "bn.num_batches_tracked": np.array(17, np.int64),
    }
    path = _torch_file(tmp_path, tensors)
    model = fnn.with_state(fnn.serial(fnn.BatchNorm()))
    _, params, state = model.init(jax.random.key(0), (-1, 3, 3, c))
    with pytest.raises(
        ValueError, match=r"running statistics .*target=\(params, state\)"
    ):
        fnn.load_params(path, params, layout="torch", mapping={"bn": "0_batchnorm"})
    params, state = fnn.load_params(
        path, (params, state), layout="torch", mapping={"bn": "0_batchnorm"}
    )
    x = _randn(rng, 2, c, 3, 3)  # NCHW
    y, _ = model.apply(params, state, np.moveaxis(x, 1, -1))  # evaluation
    t = {k: _f64(v).reshape(1, c, 1, 1) for k, v in tensors.items() if v.ndim}
    want = (x - t["bn.running_mean"]) / np.sqrt(t["bn.running_var"] + 1e-5)
    _close(np.moveaxis(np.asarray(y), -1, 1), want * t["bn.weight"] + t["bn.bias"])


def _np_torch_gru(x, w_ih, w_hh, b_ih, b_hh):
    h = np.zeros((x.shape[0], w_hh.shape[1]))
    outs = []
    for t in range(x.shape[1]):
        gi = _f64(x[:, t]) @ _f64(w_ih).T + b_ih
        gh = h @ _f64(w_hh).T + b_hh
        (ir, iz, in_), (hr, hz, hn) = np.split(gi, 3, -1), np.split(gh, 3, -1)
        r, z = _sigmoid(ir + hr), _sigmoid(iz + hz)
        n = np.tanh(in_ + r * hn)
        h = (1 - z) * n + z * h
        outs.append(h)
    return np.stack(outs, 1)


def _np_torch_lstm(x, w_ih, w_hh, b_ih, b_hh):
    h = c = np.zeros((x.shape[0], w_hh.shape[1]))
    outs = []
    for t in range(x.shape[1]):
        g = _f64(x[:, t]) @ _f64(w_ih).T + b_ih + h @ _f64(w_hh).T + b_hh
        i, f, gg, o = np.split(g, 4, -1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(gg)
        h = _sigmoid(o) * np.tanh(c)
        outs.append(h)
    return np.stack(outs, 1)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_torch_recurrent(tmp_path, kind):
    rng = _rng(6)
    hidden, n_in, gates = 5, 3, 3 if kind == "gru" else 4
    weights = {
        "weight_ih_l0": _randn(rng, gates * hidden, n_in),
        "weight_hh_l0": _randn(rng, gates * hidden, hidden),
        "bias_ih_l0": _randn(rng, gates * hidden),
        "bias_hh_l0": _randn(rng, gates * hidden),
    }
    path = _torch_file(tmp_path, {f"rnn.{k}": v for k, v in weights.items()})
    cell = fnn.GRUCell(hidden) if kind == "gru" else fnn.LSTMCell(hidden)
    net = fnn.serial(fnn.RNN(cell))
    _, params = net.init(jax.random.key(0), (-1, 6, n_in))
    params = fnn.load_params(path, params, layout="torch", mapping={"rnn": "0_rnn"})
    x = _randn(rng, 2, 6, n_in, scale=1.0)  # batch_first=True
    reference = _np_torch_gru if kind == "gru" else _np_torch_lstm
    _close(net.apply(params, x), reference(x, *weights.values()))


def test_torch_multihead_attention(tmp_path):
    rng = _rng(7)
    e, heads, time = 8, 2, 5
    tensors = {
        "attn.in_proj_weight": _randn(rng, 3 * e, e),
        "attn.in_proj_bias": _randn(rng, 3 * e),
        "attn.out_proj.weight": _randn(rng, e, e),
        "attn.out_proj.bias": _randn(rng, e),
    }
    path = _torch_file(tmp_path, tensors)
    net = fnn.serial(fnn.MultiHeadAttention(heads))
    _, params = net.init(jax.random.key(0), (-1, time, e))
    params = fnn.load_params(
        path, params, layout="torch", mapping={"attn": "0_attention"}
    )
    x = _randn(rng, 3, time, e, scale=1.0)  # batch_first=True, query = key = value
    t = {k: _f64(v) for k, v in tensors.items()}
    qkv = _f64(x) @ t["attn.in_proj_weight"].T + t["attn.in_proj_bias"]
    q, k, v = (a.reshape(3, time, heads, e // heads) for a in np.split(qkv, 3, -1))
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(e // heads)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    attended = np.einsum("bhts,bshd->bthd", p, v).reshape(3, time, e)
    want = attended @ t["attn.out_proj.weight"].T + t["attn.out_proj.bias"]
    _close(net.apply(params, x), want)


def test_torch_mapping_errors_list_every_key(tmp_path):
    rng = _rng(8)
    tensors = {
        "encoder.0.weight": _randn(rng, 8, 4),
        "encoder.0.bias": _randn(rng, 8),
        "encoder.2.weight": _randn(rng, 3, 8),
        "encoder.2.bias": _randn(rng, 3),
        "head.weight": _randn(rng, 2, 3),
        "head.bias": _randn(rng, 2),
    }
    path = _torch_file(tmp_path, tensors)
    net = fnn.serial(fnn.Dense(8), fnn.Relu(), fnn.Dense(3))
    _, params = net.init(jax.random.key(0), (-1, 4))
    with pytest.raises(ValueError) as info:
        fnn.load_params(path, params, layout="torch", mapping={"encoder.0": "0_dense"})
    for key in ("encoder.2.weight", "encoder.2.bias", "head.weight", "head.bias"):
        assert key in str(info.value), info.value
    pattern = {re.compile(r"encoder\.(\d+)"): r"\1_dense", "head": None}
    loaded = fnn.load_params(path, params, layout="torch", mapping=pattern)
    np.testing.assert_array_equal(loaded["2_dense"]["w"], tensors["encoder.2.weight"].T)
    # A shape that does not fit names the fnn path, the PyTorch key and both.
    _, wide = fnn.serial(fnn.Dense(9), fnn.Relu(), fnn.Dense(3)).init(
        jax.random.key(0), (-1, 4)
    )
    with pytest.raises(ValueError, match=r"0_dense/w \(from encoder\.0\.weight\)"):
        fnn.load_params(path, wide, layout="torch", mapping=pattern)
    # A target layer that nothing fills is listed too; exclude= keeps it.
    with pytest.raises(ValueError, match=r"target's 2_dense/b, 2_dense/w have no"):
        fnn.load_params(path, params, layout="torch", mapping={"encoder.0": "0_dense",
                        "encoder.2": None, "head": None})  # fmt: skip
    fnn.load_params(
        path, params, layout="torch", exclude=["2_dense"],
        mapping={"encoder.0": "0_dense", "encoder.2": None, "head": None},
    )  # fmt: skip
