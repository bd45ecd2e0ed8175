"""Weights in and out: params files (safetensors), PyTorch weights, export.

* :func:`save_params` / :func:`load_params`: a params tree to and from a
  `safetensors <https://huggingface.co/docs/safetensors>`_ file (a maintained
  format that holds arrays and a JSON header, nothing executable). Its keys are
  the leaves' paths, the keys joined with ``/`` (``0_dense/w``), and the
  header holds each array's CRC-32, checked on load.
* ``load_params(..., layout="torch")``: a PyTorch ``state_dict`` saved with
  ``safetensors.torch.save_file``, converted by a mapping of PyTorch modules
  to fnn layers (:mod:`fnn.training.torch_layout`).
* :func:`export`: a network with its params as a serialized ``jax.export``
  artifact, with a symbolic batch dimension, to run without fnn.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from fnn.model.options import choice
from fnn.model.state import StatefulModel
from fnn.training.loading import (
    Leaf,
    Rule,
    crc32,
    describe,
    excluded,
    is_key,
    match,
    nest,
    paths_and_leaves,
    rename,
)
from fnn.training.torch_layout import convert

__all__ = ["export", "load_params", "save_params"]


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Writes a params tree to a safetensors file, keyed by leaf paths.

    The key of a leaf is its path, the keys joined with ``/``
    (``jax.tree_util.keystr(path, simple=True, separator="/")``):
    ``0_dense/w``, ``encoder/1_attention/query/b``. The file's header holds
    each array's CRC-32, which :func:`load_params` checks. The file is written
    to a temporary name and renamed, so a crash never leaves half a file.

    Args:
      path: the file to write (by convention ``.safetensors``).
      params: a pytree of arrays with string keys (nested dicts); for a model
        with state, save ``{"params": params, "state": state}``.

    Raises:
      ValueError: for a PRNG key among the leaves (save a train state with
        :class:`fnn.Checkpointer`), a bare array, or a key holding ``/``.

    Examples:
      >>> import tempfile, os, jax, fnn
      >>> net = fnn.serial(fnn.Dense(4), fnn.Relu(), fnn.Dense(2))
      >>> _, params = net.init(jax.random.key(0), (-1, 3))
      >>> path = os.path.join(tempfile.mkdtemp(), "net.safetensors")
      >>> fnn.save_params(path, params)
      >>> sorted(fnn.load_params(path))
      ['0_dense', '2_dense']
    """
    path = os.fspath(path)
    paths, leaves, _ = paths_and_leaves("save_params", params)
    for name, leaf in zip(paths, leaves):
        if is_key(leaf) or name == "":
            raise ValueError(
                f"save_params: the leaf at {name or 'the root'!r} of {path} is "
                f"{'a PRNG key' if is_key(leaf) else 'a bare array'}; a params "
                f"file holds a tree of arrays under string keys (save a whole "
                f"train state with fnn.Checkpointer)."
            )
    tensors = {
        p: np.ascontiguousarray(np.asarray(leaf)) for p, leaf in zip(paths, leaves)
    }
    header = {
        "format": "fnn",
        "crc32": json.dumps({p: crc32(a) for p, a in tensors.items()}),
    }
    partial = f"{path}.partial"
    safetensors.numpy.save_file(tensors, partial, metadata=header)
    os.replace(partial, path)


def _read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except safetensors.SafetensorError as e:
        raise ValueError(
            f"load_params: {path} is not a readable safetensors file ({e})."
        ) from None
    return tensors, header


def _verify(path: str, tensors: Mapping[str, np.ndarray], header: dict) -> None:
    sums = json.loads(header.get("crc32", "{}"))
    for name, array in tensors.items():
        if name in sums and crc32(array) != sums[name]:
            raise ValueError(
                f"load_params: the array {name} in {path} does not match its "
                f"checksum (CRC-32 {crc32(array):#010x}, saved "
                f"{sums[name]:#010x}); the file is damaged."
            )


def _place(value: np.ndarray, target: Any) -> Any:
    """``value`` with the target leaf's dtype, on its device or sharding."""
    dtype = target.dtype if hasattr(target, "dtype") else np.asarray(target).dtype
    sharding = getattr(target, "sharding", None)
    if sharding is not None:
        return jax.device_put(np.asarray(value, dtype), sharding)
    return jnp.asarray(value, dtype)


def load_params(
    path: str | os.PathLike,
    target: Any = None,
    *,
    mapping: Mapping[Rule, str | None] | None = None,
    exclude: Iterable[Rule] = (),
    layout: str = "fnn",
) -> Any:
    """Reads a params file written by :func:`save_params`, or PyTorch weights.

    With ``layout="fnn"`` the file's keys are params paths (``0_dense/w``);
    ``mapping`` renames them and ``exclude`` leaves target paths out, as in
    :meth:`fnn.Checkpointer.restore`. Values are cast to the target's dtypes.
    Every leaf must find its place: the error lists every target path without
    a value, every saved key without a place and every shape that differs.

    With ``layout="torch"`` the file is a PyTorch ``state_dict`` saved with
    ``safetensors.torch.save_file``; ``mapping`` (required) sends PyTorch
    modules (exact names, prefixes, or ``re.compile`` patterns) to fnn
    layers' params paths, e.g. ``{"features.0": "0_conv", "fc": "3_dense"}``,
    and each module's weights are converted to fnn's layout (Linear, Conv and
    ConvTranspose 1-3-D, Embedding, LayerNorm, BatchNorm, GRU, LSTM,
    MultiheadAttention; see docs/weights.md). BatchNorm's running statistics
    go to the model state: pass ``target=(params, state)`` from
    :func:`fnn.with_state`'s init, and get ``(params, state)`` back.

    Args:
      path: the safetensors file.
      target: the tree to fill (its structure, shapes, dtypes and placement);
        ``None`` (``layout="fnn"`` only) returns the file's tree as nested
        dicts of arrays.
      mapping: renames of the file's names into target paths (a value of
        ``None`` leaves a name out).
      exclude: target paths (or prefixes, or patterns) not loaded; the target
        keeps its own values there (a new head).
      layout: ``"fnn"`` or ``"torch"``.

    Returns:
      The loaded tree, in ``target``'s structure.

    Raises:
      ValueError: for an unreadable or damaged file, for keys or leaves that
        do not fit (all listed by path), for a PyTorch key that no mapping
        entry covers or that cannot be converted.

    Examples:
      >>> import tempfile, os, jax, jax.numpy as jnp, fnn
      >>> net = fnn.serial(fnn.Dense(4), fnn.Relu(), fnn.Dense(2))
      >>> _, params = net.init(jax.random.key(0), (-1, 3))
      >>> path = os.path.join(tempfile.mkdtemp(), "net.safetensors")
      >>> fnn.save_params(path, params)
      >>> new_head = fnn.serial(fnn.Dense(4), fnn.Relu(), fnn.Dense(7))
      >>> _, fresh = new_head.init(jax.random.key(1), (-1, 3))
      >>> tuned = fnn.load_params(path, fresh, exclude=["2_dense"])
      >>> bool(jnp.all(tuned["0_dense"]["w"] == params["0_dense"]["w"]))
      True
    """
    path = os.fspath(path)
    choice("load_params", "layout", layout, ("fnn", "torch"))
    tensors, header = _read(path)
    if layout == "torch":
        return _load_torch(path, tensors, target, mapping, exclude)
    _verify(path, tensors, header)
    if target is None:
        out = {}
        for name, value in tensors.items():
            new = rename(name, mapping or {})
            new = name if new is ... else new
            if new is not None and not excluded(new, exclude):
                out[new] = jnp.asarray(value)
        return nest(out)
    source = {name: Leaf(v.shape, str(v.dtype)) for name, v in tensors.items()}
    return _fill(path, target, source, tensors, mapping, exclude)


def _fill(path, target, source, tensors, mapping, exclude, origin=None) -> Any:
    """``target`` with its leaves replaced by the matching saved values."""
    paths, leaves, treedef = paths_and_leaves("load_params", target)
    wanted = {p: describe(leaf) for p, leaf in zip(paths, leaves)}
    where = f"the file {path}"
    pairs = match(
        "load_params", where, wanted, source, mapping=mapping, exclude=exclude,
        same_dtype=False, origin=origin,
    )  # fmt: skip
    out = [
        _place(tensors[pairs[p]], leaf) if p in pairs else leaf
        for p, leaf in zip(paths, leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def _load_torch(path, tensors, target, mapping, exclude) -> Any:
    if target is None or not mapping:
        raise ValueError(
            f"load_params: layout='torch' needs target= (the fnn params to fill, "
            f"or (params, state)) and mapping= (PyTorch modules to fnn layer "
            f"paths) to read {path}."
        )
    pair = isinstance(target, tuple) and len(target) == 2
    params_target = target[0] if pair else target
    params_paths, _, _ = paths_and_leaves("load_params", params_target)
    params, state, origin = convert("load_params", path, tensors, mapping, params_paths)
    if state and not pair:
        raise ValueError(
            f"load_params: the PyTorch weights in {path} hold running statistics "
            f"({', '.join(sorted(state))}); pass target=(params, state) from "
            f"fnn.with_state(net).init to load them into the model state."
        )
    if not pair:
        source = {p: Leaf(np.shape(v), str(v.dtype)) for p, v in params.items()}
        shown = {p: origin[p] for p in params}
        return _fill(path, target, source, params, None, exclude, shown)
    # Params and state side by side, so one error lists what both lack.
    values = {f"params/{p}": v for p, v in params.items()}
    values |= {f"state/{p}": v for p, v in state.items()}
    shown = {f"params/{p}": origin[p] for p in params}
    shown |= {f"state/{p}": origin[f"state:{p}"] for p in state}
    source = {p: Leaf(np.shape(v), str(v.dtype)) for p, v in values.items()}
    both = {"params": target[0], "state": target[1]}
    out = _fill(path, both, source, values, None, _both_sides(exclude), shown)
    return out["params"], out["state"]


def _both_sides(exclude: Iterable[Rule]) -> list[Rule]:
    """Layer paths to leave out, in the params and in the state."""
    out: list[Rule] = []
    for rule in exclude:
        if isinstance(rule, re.Pattern):
            out.append(re.compile(f"(?:params|state)/(?:{rule.pattern})", rule.flags))
        else:
            out += [f"params/{rule}", f"state/{rule}"]
    return out


def _arg_spec(input_shape: Any, dtype: Any, scope: Any, which: int) -> Any:
    dims = []
    for i, d in enumerate(input_shape):
        dims.append(("b" if i == 0 else f"d{which}_{i}") if d == -1 else str(d))
    shape = jax.export.symbolic_shape(", ".join(dims), scope=scope)
    return jax.ShapeDtypeStruct(shape, dtype)


def export(
    model: Any,
    params: Any,
    input_shape: Any,
    *,
    state: Any = None,
    dtype: Any = jnp.float32,
    platforms: Iterable[str] | None = None,
    **kwargs: Any,
) -> bytes:
    """A network with its params, serialized as a ``jax.export`` artifact.

    The artifact computes ``model.apply(params, x, **kwargs)`` (for a model
    from :func:`fnn.with_state`, ``model.apply(params, state, x,
    **kwargs)[0]``, evaluation with the running statistics), with the params
    (and state) inside it as constants. A ``-1`` in ``input_shape`` becomes a
    symbolic dimension (``b`` for the batch), so one artifact serves every
    batch size. Load and call it anywhere JAX runs, without fnn::

        exported = jax.export.deserialize(blob)
        y = exported.call(x)

    Args:
      model: a layer (or network), or a model from :func:`fnn.with_state`.
      params: its params.
      input_shape: the input's shape with ``-1`` for sizes left open, e.g.
        ``(-1, 28, 28, 1)``; a tuple of shapes for a multi-input layer.
      state: the model state (required for, and only for, a model from
        :func:`fnn.with_state`).
      dtype: the input's dtype (``jnp.int32`` for token ids); a tuple for
        several inputs.
      platforms: the platforms to compile for (``("cpu", "cuda")``); the
        default backend's by default.
      **kwargs: passed to ``apply`` (e.g. ``train=False``).

    Returns:
      The serialized artifact (``bytes``; write it to a file as it is).

    Raises:
      ValueError: when ``state`` is missing for a stateful model or given for
        a stateless one.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> net = fnn.serial(fnn.Dense(8), fnn.Relu(), fnn.Dense(2))
      >>> _, params = net.init(jax.random.key(0), (-1, 3))
      >>> blob = fnn.training.export(net, params, (-1, 3))
      >>> exported = jax.export.deserialize(blob)
      >>> exported.in_avals[0].shape
      (b, 3)
      >>> exported.call(jnp.ones((5, 3))).shape
      (5, 2)
    """
    stateful = isinstance(model, StatefulModel)
    if stateful == (state is None):
        raise ValueError(
            "export: a model from fnn.with_state needs state= (its running "
            "statistics); a stateless one takes none."
            if stateful
            else "export: state= is for a model from fnn.with_state(net); this "
            "model is stateless."
        )
    scope = jax.export.SymbolicScope()
    several = bool(input_shape) and isinstance(input_shape[0], tuple | list)
    if several:
        dtypes = (
            dtype if isinstance(dtype, tuple | list) else (dtype,) * len(input_shape)
        )
        args = tuple(
            _arg_spec(s, d, scope, i)
            for i, (s, d) in enumerate(zip(input_shape, dtypes))
        )
    else:
        args = _arg_spec(input_shape, dtype, scope, 0)

    def run(x):
        if stateful:
            return model.apply(params, state, x, **kwargs)[0]
        return model.apply(params, x, **kwargs)

    platforms = tuple(platforms) if platforms is not None else None
    exported = jax.export.export(jax.jit(run), platforms=platforms)(args)
    return exported.serialize()
