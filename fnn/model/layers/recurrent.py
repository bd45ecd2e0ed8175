"""Recurrent layers: GRU and LSTM cells, and ``RNN``, which scans a cell over time.

A cell is not a layer: it maps one time step, and it has a carry. Its protocol is
the :class:`Cell` triple::

    init(key, in_features) -> params
    step(params, carry, x_t) -> (new_carry, y_t)     # x_t: (batch, in_features)
    initial_carry(batch, dtype) -> carry             # zeros

:func:`RNN` turns a cell into a layer over ``(batch, time, features)`` with
``lax.scan``, so the step is traced and compiled once whatever the length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.nn import initializers

from fnn.model.core import Layer, fail, library_layer, signature
from fnn.model.options import boolean, positive_int
from fnn.model.precision import init_param, layer_dtypes, shown_dtype, to_compute
from fnn.model.shapes import check_real, check_shape, expand_left


class Cell(NamedTuple):
    """One step of a recurrent network.

    Attributes:
      init: ``init(key, in_features) -> params``.
      step: ``step(params, carry, x_t) -> (new_carry, y_t)``, with ``x_t`` of
        shape ``(batch, in_features)`` and ``y_t`` of shape ``(batch,
        features)``.
      initial_carry: ``initial_carry(batch, dtype) -> carry``, all zeros.
      features: the size of ``y_t``.
      name: the short kind name, the key of the cell's params inside ``RNN``.
      desc: how errors print the cell, e.g. ``'GRUCell(features=8)'``.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> cell = fnn.GRUCell(4)
      >>> params = cell.init(jax.random.key(0), 3)
      >>> h = cell.initial_carry(2, jnp.float32)
      >>> h, y = cell.step(params, h, jnp.ones((2, 3)))
      >>> y.shape
      (2, 4)
    """

    init: Callable[[jax.Array, int], Any]
    step: Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]]
    initial_carry: Callable[[int, Any], Any]
    features: int
    name: str
    desc: str


def _gated_params(
    key: jax.Array,
    in_features: int,
    features: int,
    gates: int,
    w_init: initializers.Initializer,
    recurrent_init: initializers.Initializer,
    hidden_bias: bool,
    dtype: Any,
) -> dict:
    k_i, k_h = jax.random.split(key)
    width = gates * features
    params = {
        "input": {
            "w": init_param(w_init, k_i, (in_features, width), dtype),
            "b": jnp.zeros((width,), dtype),
        },
        "hidden": {"w": init_param(recurrent_init, k_h, (features, width), dtype)},
    }
    if hidden_bias:
        params["hidden"]["b"] = jnp.zeros((width,), dtype)
    return params


def _check_step_input(desc: str, params: dict, x: jax.Array) -> None:
    n_in = params["input"]["w"].shape[0]
    if x.ndim != 2 or x.shape[-1] != n_in:
        fail(
            desc,
            f"expected input with last dimension {n_in} at each step, got "
            f"{x.shape[-1]} (step shape {x.shape!r}).",
        )


def GRUCell(
    features: int,
    *,
    w_init: initializers.Initializer = initializers.lecun_normal(),
    recurrent_init: initializers.Initializer = initializers.orthogonal(),
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype | None = None,
) -> Cell:
    """A gated recurrent unit (Cho et al., 2014), in the layout of cuDNN and PyTorch.

    With gates in the order ``(r, z, n)`` along the last axis of every weight::

        r = sigmoid(x W_ir + b_ir + h W_hr + b_hr)
        z = sigmoid(x W_iz + b_iz + h W_hz + b_hz)
        n = tanh(x W_in + b_in + r * (h W_hn + b_hn))
        h' = (1 - z) * n + z * h          # the output is h'

    Args:
      features: the size of the hidden state (and of the output).
      w_init: initializer of the input weights; LeCun normal as Dense and Flax.
      recurrent_init: initializer of the hidden weights; orthogonal, as Flax,
        which keeps the hidden state's scale over many steps.
      param_dtype: the dtype the params are stored in. Biases start at zero.
      dtype: the computation dtype: each step casts its input, the carry and
        the params to it, so the carry and the output have it. ``None``
        promotes the dtypes of the input and the params, as :func:`fnn.Dense`.

    Returns:
      A :class:`Cell`. Params ``{'input': {'w': (in, 3 * features), 'b': (3 *
      features,)}, 'hidden': {'w': (features, 3 * features), 'b': (3 *
      features,)}}``; the carry is ``h``, shape ``(batch, features)``.

    Raises:
      ValueError: for a non-positive ``features``, or a dtype that is not
        floating.

    Examples:
      >>> import jax, fnn
      >>> params = fnn.GRUCell(4).init(jax.random.key(0), 3)
      >>> params["input"]["w"].shape, params["hidden"]["w"].shape
      ((3, 12), (4, 12))
    """
    f = features = positive_int("GRUCell", "features", features)
    param_dtype, dtype = layer_dtypes("GRUCell", param_dtype, dtype)
    desc = signature("GRUCell", features=f, **shown_dtype(dtype))

    def init(key, in_features):
        return _gated_params(
            key, in_features, f, 3, w_init, recurrent_init, True, param_dtype
        )

    def step(params, h, x):
        _check_step_input(desc, params, x)
        (h, x), params = to_compute(dtype, (h, x), params)
        gi = x @ params["input"]["w"] + expand_left(params["input"]["b"], 2)
        gh = h @ params["hidden"]["w"] + expand_left(params["hidden"]["b"], 2)
        r = jax.nn.sigmoid(gi[..., :f] + gh[..., :f])
        z = jax.nn.sigmoid(gi[..., f : 2 * f] + gh[..., f : 2 * f])
        n = jnp.tanh(gi[..., 2 * f :] + r * gh[..., 2 * f :])
        h = (1 - z) * n + z * h
        return h, h

    def initial_carry(batch, dtype_):
        return jnp.zeros((batch, f), dtype_)

    return Cell(init, step, initial_carry, f, "gru", desc)


def LSTMCell(
    features: int,
    *,
    w_init: initializers.Initializer = initializers.lecun_normal(),
    recurrent_init: initializers.Initializer = initializers.orthogonal(),
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype | None = None,
) -> Cell:
    """A long short-term memory cell (Hochreiter and Schmidhuber, 1997).

    With gates in the order ``(i, f, g, o)`` along the last axis of every
    weight (the order of PyTorch and Flax's ``OptimizedLSTMCell``)::

        i, f, o = sigmoid(x W_i* + h W_h* + b_*)
        g = tanh(x W_ig + h W_hg + b_g)
        c' = f * c + i * g
        h' = o * tanh(c')                 # the output is h'

    Args:
      features: the size of the hidden and cell states (and of the output).
      w_init: initializer of the input weights; LeCun normal.
      recurrent_init: initializer of the hidden weights; orthogonal, as Flax.
      param_dtype: the dtype the params are stored in. The bias starts at
        zero (forget gate included), as in Flax and PyTorch; set
        ``params['input']['b']`` to change it.
      dtype: the computation dtype, as in :func:`GRUCell`.

    Returns:
      A :class:`Cell`. Params ``{'input': {'w': (in, 4 * features), 'b': (4 *
      features,)}, 'hidden': {'w': (features, 4 * features)}}``; the carry is
      the pair ``(c, h)``, each of shape ``(batch, features)``.

    Raises:
      ValueError: for a non-positive ``features``, or a dtype that is not
        floating.

    Examples:
      >>> import jax, fnn
      >>> params = fnn.LSTMCell(4).init(jax.random.key(0), 3)
      >>> params["input"]["w"].shape, params["hidden"]["w"].shape
      ((3, 16), (4, 16))
    """
    f = features = positive_int("LSTMCell", "features", features)
    param_dtype, dtype = layer_dtypes("LSTMCell", param_dtype, dtype)
    desc = signature("LSTMCell", features=f, **shown_dtype(dtype))

    def init(key, in_features):
        return _gated_params(
            key, in_features, f, 4, w_init, recurrent_init, False, param_dtype
        )

    def step(params, carry, x):
        _check_step_input(desc, params, x)
        ((c, h), x), params = to_compute(dtype, (carry, x), params)
        b = expand_left(params["input"]["b"], 2)
        g = x @ params["input"]["w"] + b + h @ params["hidden"]["w"]
        i = jax.nn.sigmoid(g[..., :f])
        forget = jax.nn.sigmoid(g[..., f : 2 * f])
        cand = jnp.tanh(g[..., 2 * f : 3 * f])
        o = jax.nn.sigmoid(g[..., 3 * f :])
        c = forget * c + i * cand
        h = o * jnp.tanh(c)
        return (c, h), h

    def initial_carry(batch, dtype_):
        return (jnp.zeros((batch, f), dtype_), jnp.zeros((batch, f), dtype_))

    return Cell(init, step, initial_carry, f, "lstm", desc)


def _step_mask(desc: str, batch: int, time: int, lengths: Any, mask: Any):
    """The (batch, time) boolean mask of real steps, or None for all."""
    if lengths is not None and mask is not None:
        fail(desc, "give either lengths= or mask=, not both.")
    if lengths is not None:
        lengths = jnp.asarray(lengths)
        if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            fail(
                desc,
                f"expected integer lengths of shape (batch,) = ({batch},), got "
                f"{lengths.dtype} {lengths.shape!r}.",
            )
        return jnp.arange(time)[None, :] < lengths[:, None]
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != (batch, time):
            fail(
                desc,
                f"expected a mask of shape (batch, time) = {(batch, time)!r}, got "
                f"{mask.shape!r}.",
            )
        return mask.astype(jnp.bool_)
    return None


def _initial_state(cell: Cell, params: Any, batch: int, x: jax.Array):
    """Zero carry and last output, in the dtypes one step of ``cell`` returns.

    A cell computing in another dtype than the input's (its ``dtype``, or
    float32 params promoting a bfloat16 input) returns a carry of that dtype;
    the scan needs the carry it starts from to have it too.
    """
    carry = cell.initial_carry(batch, x.dtype)
    x_t = jax.ShapeDtypeStruct((batch, x.shape[-1]), x.dtype)
    new, y = jax.eval_shape(cell.step, params, carry, x_t)
    carry = jax.tree.map(lambda c, n: c.astype(n.dtype), carry, new)
    return carry, jnp.zeros((batch, cell.features), y.dtype)


def RNN(
    cell: Cell,
    *,
    reverse: bool = False,
    return_sequences: bool = True,
    return_carry: bool = False,
) -> Layer:
    """Runs ``cell`` over the time axis of a ``(batch, time, features)`` input.

    The loop is one ``lax.scan``. The carry starts at zeros. Padding is given
    at apply as ``lengths=`` (integers of shape ``(batch,)``: steps ``t >=
    lengths[b]`` are padding) or ``mask=`` (booleans of shape ``(batch,
    time)``, ``False`` at padding). A padded step leaves the carry unchanged
    and outputs zeros, so the final carry is the carry after each sequence's
    last real step, and a padded batch gives the results of running each
    sequence alone.

    Args:
      cell: a :class:`Cell`, e.g. ``fnn.GRUCell(32)``.
      reverse: scan from the last step to the first; outputs stay in input
        order. With padding at the end, each sequence starts at its true end.
      return_sequences: output every step, ``(batch, time, features)``;
        otherwise only the last output, ``(batch, features)`` (the final
        ``h``, at each sequence's true end when padded).
      return_carry: also return the final carry: the output becomes
        ``(outputs, carry)``.

    Returns:
      The layer; params ``{cell.name: cell_params}``, e.g. ``{'gru': {...}}``.

    Raises:
      TypeError: if ``cell`` is not a :class:`Cell`.
      ShapeError: at init or apply, for an input not of rank 3, unknown
        features, or lengths/mask of the wrong shape; at apply, for an input
        that is not real floating-point.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> rnn = fnn.RNN(fnn.LSTMCell(4))
      >>> shape, params = rnn.init(jax.random.key(0), (-1, 6, 3))
      >>> shape, list(params)
      ((-1, 6, 4), ['lstm'])
      >>> y = rnn.apply(params, jnp.ones((2, 6, 3)), lengths=jnp.array([6, 2]))
      >>> y.shape, bool((y[1, 2:] == 0).all())
      ((2, 6, 4), True)
    """
    if not isinstance(cell, Cell):
        raise TypeError(
            f"RNN: expected a cell such as fnn.GRUCell(8), got {type(cell).__name__}."
        )
    reverse = boolean("RNN", "reverse", reverse)
    return_sequences = boolean("RNN", "return_sequences", return_sequences)
    return_carry = boolean("RNN", "return_carry", return_carry)
    options = {}
    if reverse:
        options["reverse"] = True
    if not return_sequences:
        options["return_sequences"] = False
    if return_carry:
        options["return_carry"] = True
    desc = f"RNN({cell.desc}{''.join(f', {k}={v!r}' for k, v in options.items())})"

    def init_fn(key, input_shape):
        shape = check_shape(desc, input_shape, min_rank=3)
        if len(shape) != 3 or shape[-1] == -1:
            fail(
                desc,
                f"expected input of shape (batch, time, features) with known "
                f"features, got {shape!r}.",
            )
        if return_sequences:
            out = shape[:2] + (cell.features,)
        else:
            out = (shape[0], cell.features)
        if return_carry:
            carry = jax.eval_shape(lambda: cell.initial_carry(1, jnp.float32))
            out = (out, jax.tree.map(lambda s: shape[:1] + s.shape[1:], carry))
        return out, {cell.name: cell.init(key, shape[-1])}

    def apply_fn(params, x, *, lengths=None, mask=None, **kwargs):
        if getattr(x, "ndim", None) != 3:
            fail(
                desc,
                f"expected input of shape (batch, time, features), got "
                f"{getattr(x, 'shape', type(x).__name__)!r}.",
            )
        check_real(desc, x)
        p = params[cell.name]
        batch, time, _ = x.shape
        valid = _step_mask(desc, batch, time, lengths, mask)
        carry0, last0 = _initial_state(cell, p, batch, x)

        def body(state, inputs):
            carry, last = state
            x_t, m_t = inputs
            new, y = cell.step(p, carry, x_t)
            if m_t is not None:
                keep = m_t[:, None]
                new = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, carry)
                y = jnp.where(keep, y, 0)
                last = jnp.where(keep, y, last)
            else:
                last = y
            return (new, last), y

        ms = None if valid is None else jnp.swapaxes(valid, 0, 1)
        xs = jnp.swapaxes(x, 0, 1)  # (time, batch, features)
        (carry, last), ys = jax.lax.scan(
            body, (carry0, last0), (xs, ms), reverse=reverse
        )
        out = jnp.swapaxes(ys, 0, 1) if return_sequences else last
        return (out, carry) if return_carry else out

    return library_layer("rnn", desc, init_fn, apply_fn)
