"""PyTorch weights in fnn's layouts: the conversions behind
``fnn.load_params(..., layout="torch")``.

A PyTorch ``state_dict`` names weights by module (``features.0.weight``) and
keeps them in PyTorch's layouts. ``mapping`` sends each PyTorch module (an
exact name, a prefix, or an ``re.compile`` pattern) to the params path of an
fnn layer; the kind of layer is read from the module's weight names and the
target's params there, and the weights are converted:

=================  =====================================  =====================
PyTorch module     its weights                            fnn params
=================  =====================================  =====================
Linear             weight (out, in), bias                 Dense w (in, out), b
Conv1d/2d/3d       weight (out, in/groups, *k), bias      Conv w (*k, in/groups,
                                                          out), b
ConvTranspose*d    weight (in, out, *k), bias             ConvTranspose w (*k,
                                                          in, out) flipped, b
Embedding          weight (num, dim)                      Embed table
LayerNorm/RMSNorm  weight, bias                           scale, bias
BatchNorm*d        weight, bias, running_mean/var         scale, bias; state
                                                          mean, var
GRU                weight_ih_l0 (3H, in), weight_hh_l0,   RNN(GRUCell) input
                   bias_ih_l0, bias_hh_l0 (gates r, z, n) w, b; hidden w, b
LSTM               the same with 4H (gates i, f, g, o)    RNN(LSTMCell) input
                                                          w, b = b_ih + b_hh;
                                                          hidden w
MultiheadAttention in_proj_weight (3E, E), in_proj_bias,  query, key, value,
                   out_proj.weight, out_proj.bias          out: w, b
=================  =====================================  =====================

A ConvTranspose is told from a Conv by its params path (``conv_transpose``,
fnn's own key for it; keep the word in a name given with ``fnn.named``).
Recurrent layers: each layer and direction is its own module here
(``lstm.l0``, ``lstm.l1``, ``lstm.l0_reverse``); ``{"lstm": "0_rnn"}`` maps a
one-layer LSTM. ``num_batches_tracked`` (a counter fnn does not keep) is the
only key dropped; any other key that is not converted is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from fnn.training.loading import Rule, split_rename

# PyTorch stores the matrix of ``y = x @ W.T + b`` as ``W``, shape ``(out, in)``.
# Each line gives fnn's layout from it: Dense's ``w`` (and so the projections
# of MultiHeadAttention, which are Dense layers) and the recurrent cells'
# ``w`` are ``(in, out)``. If Dense's layout changes, change its line (and
# attention's) here.
MATRIX = {
    "dense": np.transpose,
    "attention": np.transpose,
    "recurrent": np.transpose,
}

_RECURRENT = re.compile(r"(weight|bias)_(ih|hh)_l(\d+)(_reverse)?")
DROPPED = "num_batches_tracked"
_RNN_KEYS = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}


def module_names(keys: list[str]) -> dict[str, str]:
    """``{name: PyTorch key}``, where a recurrent layer's ``weight_ih_l1``
    is named ``l1.weight_ih`` (so each layer is its own module)."""
    out = {}
    for key in keys:
        module, _, attr = key.rpartition(".")
        m = _RECURRENT.fullmatch(attr)
        if m:
            attr = f"l{m[3]}{m[4] or ''}.{m[1]}_{m[2]}"
        out[f"{module}.{attr}" if module else attr] = key
    return out


def _linear(a: dict) -> dict:
    out = {"w": (MATRIX["dense"](a["weight"]), "weight")}
    if "bias" in a:
        out["b"] = (a["bias"], "bias")
    return out


def _conv(a: dict, transposed: bool) -> dict:
    w = a["weight"]
    spatial = tuple(range(2, w.ndim))
    if transposed:  # (in, out, *k) -> (*k, in, out), the taps flipped
        w = np.flip(w, spatial).transpose(*spatial, 0, 1)
    else:  # (out, in, *k) -> (*k, in, out)
        w = w.transpose(*spatial, 1, 0)
    out = {"w": (np.ascontiguousarray(w), "weight")}
    if "bias" in a:
        out["b"] = (a["bias"], "bias")
    return out


def _attention(a: dict) -> dict:
    m, out = MATRIX["attention"], {}
    names = ("query", "key", "value")
    if "in_proj_weight" in a:
        for name, w in zip(names, np.split(a["in_proj_weight"], 3)):
            out[f"{name}/w"] = (m(w), "in_proj_weight")
    else:
        for name in names:
            out[f"{name}/w"] = (
                m(a[f"{name[0]}_proj_weight"]),
                f"{name[0]}_proj_weight",
            )
    if "in_proj_bias" in a:
        for name, b in zip(names, np.split(a["in_proj_bias"], 3)):
            out[f"{name}/b"] = (b, "in_proj_bias")
    out["out/w"] = (m(a["out_proj.weight"]), "out_proj.weight")
    if "out_proj.bias" in a:
        out["out/b"] = (a["out_proj.bias"], "out_proj.bias")
    return out


def _recurrent(a: dict, names: set) -> dict:
    """GRU or LSTM weights of one layer (``a`` keyed ``weight_ih`` ...)."""
    m = MATRIX["recurrent"]
    w_ih, w_hh = a["weight_ih"], a["weight_hh"]
    cells = [c for c in ("gru/", "lstm/") if any(n.startswith(c) for n in names)]
    cell = cells[0] if cells else ""
    out = {
        f"{cell}input/w": (m(w_ih), "weight_ih"),
        f"{cell}hidden/w": (m(w_hh), "weight_hh"),
    }
    if w_ih.shape[0] == 3 * w_hh.shape[1]:  # GRU: both biases, as GRUCell
        for side, where in (("ih", "input"), ("hh", "hidden")):
            if f"bias_{side}" in a:
                out[f"{cell}{where}/b"] = (a[f"bias_{side}"], f"bias_{side}")
    else:  # LSTM: fnn keeps the sum of the two biases
        biases = [k for k in ("bias_ih", "bias_hh") if k in a]
        if biases:
            out[f"{cell}input/b"] = (sum(a[k] for k in biases), *biases)
    return out


def _convert(head: str, a: dict, names: set) -> tuple[dict, dict]:
    """``(params, state)`` of one module, relative to its layer: ``{path:
    (array, PyTorch names it comes from)}``."""
    if "in_proj_weight" in a or "q_proj_weight" in a:
        return _attention(a), {}
    layers = {k.split(".")[0] for k in a if "." in k}
    flat = {k.split(".", 1)[-1]: v for k, v in a.items()}
    if set(flat) & {"weight_ih", "weight_hh"} and set(flat) <= _RNN_KEYS:
        if len(layers) > 1 or len(flat) < len(a):
            return {}, {}  # several layers under one fnn path
        (layer,) = layers or {""}
        prefix = f"{layer}." if layer else ""
        out = _recurrent(flat, names)
        return {k: (v, *(prefix + n for n in ns)) for k, (v, *ns) in out.items()}, {}
    if "running_mean" in a:
        params = {"scale": (a["weight"], "weight"), "bias": (a["bias"], "bias")}
        state = {
            "mean": (a["running_mean"], "running_mean"),
            "var": (a["running_var"], "running_var"),
        }
        return (params if "weight" in a else {}), state
    if "weight" not in a:
        return {}, {}
    if "table" in names:
        return {"table": (a["weight"], "weight")}, {}
    if "scale" in names:
        params = {"scale": (a["weight"], "weight")}
        if "bias" in a:
            params["bias"] = (a["bias"], "bias")
        return params, {}
    if a["weight"].ndim == 2:
        return _linear(a), {}
    if a["weight"].ndim in (3, 4, 5):
        return _conv(a, "conv_transpose" in head), {}
    return {}, {}


def convert(
    caller: str,
    file: str,
    tensors: Mapping[str, np.ndarray],
    mapping: Mapping[Rule, str | None],
    params_paths: list[str],
) -> tuple[dict, dict, dict]:
    """PyTorch weights as ``(params, state, origin)``, flat by fnn path.

    ``origin`` gives, for each fnn path, the PyTorch key(s) it came from.

    Raises:
      ValueError: listing every PyTorch key that no mapping entry covers, or
        that could not be converted.
    """
    names = module_names(list(tensors))
    groups: dict[str, dict[str, str]] = {}
    unmatched, whole = [], []
    for name, key in names.items():
        found = split_rename(name, mapping, ".")
        if found is None:
            continue
        if found is ...:
            unmatched.append(key)
        elif not found[1]:
            whole.append(key)
        else:
            groups.setdefault(found[0], {})[found[1]] = key
    if unmatched or whole:
        detail = f"{len(unmatched)} match no entry of mapping: {', '.join(unmatched)}"
        if whole:
            detail = f"{', '.join(whole)} are mapped as single weights, not modules"
        raise ValueError(
            f"{caller}: {detail} (PyTorch keys in {file}); map each module "
            f"(e.g. {{'encoder.0': '0_dense'}}) to an fnn layer's params path, "
            f"or to None to leave it out."
        )
    params, state, origin, left = {}, {}, {}, []
    for head, keys in groups.items():
        under = {
            p[len(head) + 1 :] if head else p
            for p in params_paths
            if not head or p.startswith(head + "/")
        }
        arrays = {attr: np.asarray(tensors[key]) for attr, key in keys.items()}
        p, s = _convert(head, arrays, under)
        used = {n for _, *ns in (*p.values(), *s.values()) for n in ns} | {DROPPED}
        left += [key for attr, key in keys.items() if attr not in used]
        for side, out in (("", p), ("state:", s)):
            for rel, (value, *from_) in out.items():
                path = f"{head}/{rel}" if head else rel
                (params if not side else state)[path] = value
                origin[side + path] = ", ".join(keys[n] for n in from_)
    if left:
        raise ValueError(
            f"{caller}: the PyTorch keys {', '.join(left)} in {file} could not "
            f"be converted (a layer fnn has no form for, several recurrent "
            f"layers under one fnn path, or attention's bias_k/bias_v); map "
            f"them to None to leave them out."
        )
    return params, state, origin
