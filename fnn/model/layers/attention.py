"""MultiHeadAttention: self-attention and cross-attention with masks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.nn import initializers

from fnn.model.core import Layer, fail, library_layer, signature
from fnn.model.layers.dense import Dense
from fnn.model.options import boolean, positive_int
from fnn.model.precision import layer_dtypes, shown_dtype
from fnn.model.shapes import check_real, check_shape, check_shapes, is_shape


def _known_features(desc: str, shape: tuple[int, ...], what: str) -> int:
    if len(shape) != 3:
        fail(desc, f"expected {what} of shape (batch, time, features), got {shape!r}.")
    if shape[-1] == -1:
        fail(desc, f"the features of the {what} must be known, got {shape!r}.")
    return shape[-1]


def _check_array(desc: str, x: Any, features: int, what: str) -> None:
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 3 or shape[-1] != features:
        fail(
            desc,
            f"expected {what} of shape (batch, time, {features}), got "
            f"{shape if hasattr(x, 'shape') else type(x).__name__!r}.",
        )
    check_real(desc, x)


def _as_bool(desc: str, m: Any, what: str) -> jax.Array:
    m = jnp.asarray(m)
    if not (m.dtype == jnp.bool_ or jnp.issubdtype(m.dtype, jnp.integer)):
        fail(
            desc,
            f"expected a boolean {what} (True = attend), got dtype {m.dtype}; "
            "an additive float mask is not supported.",
        )
    return m.astype(jnp.bool_)


def _combined_mask(
    desc: str,
    batch: int,
    heads: int,
    q_len: int,
    k_len: int,
    causal: bool,
    mask: Any,
    attention_mask: Any,
) -> jax.Array | None:
    """The boolean mask of shape (batch|1, heads|1, q_len, k_len), or None."""
    masks = []
    if causal:
        masks.append(jnp.tril(jnp.ones((q_len, k_len), jnp.bool_))[None, None])
    if mask is not None:
        m = _as_bool(desc, mask, "mask")
        if m.ndim == 4:
            attention_mask = m if attention_mask is None else (m, attention_mask)
        elif m.shape != (batch, k_len):
            fail(
                desc,
                f"expected a key padding mask of shape (batch, key_time) = "
                f"{(batch, k_len)!r} or an attention mask of rank 4, got "
                f"{m.shape!r}.",
            )
        else:
            masks.append(m[:, None, None, :])
    extra = attention_mask if isinstance(attention_mask, tuple) else (attention_mask,)
    for a in extra:
        if a is None:
            continue
        a = _as_bool(desc, a, "attention mask")
        want = ((batch, 1), (heads, 1), (q_len,), (k_len,))
        if a.ndim != 4 or any(d not in w for d, w in zip(a.shape, want)):
            fail(
                desc,
                f"expected an attention mask of shape (batch|1, heads|1, "
                f"query_time, key_time) = ({batch}|1, {heads}|1, {q_len}, "
                f"{k_len}), got {a.shape!r}.",
            )
        masks.append(a)
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = out & m
    return out


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, m: jax.Array | None):
    """softmax(q k^T / sqrt(d)) v on (batch, time, heads, head_dim) arrays.

    ``jax.nn.dot_product_attention`` computes the logits and the softmax in
    float32 for bfloat16 and float16 inputs (its logits take
    ``promote_types(q.dtype, float32)``) and returns the input's dtype: the
    softmax of a low-precision network stays float32. float64 inputs take the
    same formula written out with ``jax.nn.softmax`` in float64, for the
    float64 gradient checks.
    """
    if q.dtype != jnp.float64:
        return jax.nn.dot_product_attention(q, k, v, mask=m)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * (1.0 / q.shape[-1] ** 0.5)
    if m is not None:
        logits = jnp.where(m, logits, jnp.finfo(logits.dtype).min)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)


def MultiHeadAttention(
    num_heads: int,
    *,
    qkv_features: int | None = None,
    out_features: int | None = None,
    causal: bool = False,
    use_bias: bool = True,
    w_init: initializers.Initializer = initializers.lecun_normal(),
    b_init: initializers.Initializer = initializers.zeros,
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype | None = None,
) -> Layer:
    """Multi-head dot-product attention, ``softmax(q k^T / sqrt(d)) v`` per head.

    Self-attention takes one input ``x`` of shape ``(batch, time, features)``;
    queries, keys and values are all projections of ``x``. Cross-attention
    takes a pair ``(queries, keys_values)`` of shapes ``(batch, q_time,
    q_features)`` and ``(batch, k_time, kv_features)``; the layer decides which
    one from the input shape given to ``init``. The attention itself is
    :func:`jax.nn.dot_product_attention` (in float64, the same formula with a
    float64 softmax, since that function's softmax is always float32).

    Masks (``True`` = may attend), given as apply keyword arguments and
    combined with logical and:

    * ``mask``: a key padding mask of shape ``(batch, k_time)``, ``False`` at
      padded keys. It has the shape of the padding mask other layers take, so
      ``serial(..., mask=m)`` reaches every layer. A rank-4 ``mask`` is taken as
      an ``attention_mask``.
    * ``attention_mask``: a full mask of shape ``(batch|1, heads|1, q_time,
      k_time)``.
    * ``causal=True`` (constructor): query ``i`` sees keys ``j <= i``.

    A query that may attend to no key at all (a fully masked row) gives a
    zero attention result, so the layer outputs just the output bias there:
    finite, with zero gradient, where a plain softmax would give NaN or an
    arbitrary average.

    Args:
      num_heads: the number of heads; it must divide ``qkv_features``.
      qkv_features: the total size of the query, key and value projections
        (``num_heads * head_dim``); the query's feature size by default.
      out_features: the output's last dimension; the query's feature size by
        default, so the layer fits in a residual block.
      causal: whether to mask future keys.
      use_bias: whether the projections add a bias.
      w_init: initializer of every projection's ``w``; LeCun normal, as Dense.
      b_init: initializer of every projection's ``b``; zeros.
      param_dtype: the dtype the params are stored in.
      dtype: the computation dtype of the projections and the attention
        (input and params are cast to it); ``None`` promotes the input's and
        the params' dtypes, as :func:`fnn.Dense`. The softmax runs in float32
        (at least) whatever it is.

    Returns:
      The layer. Params ``{'query': {'w', 'b'}, 'key': {'w', 'b'}, 'value':
      {'w', 'b'}, 'out': {'w', 'b'}}`` with ``query.w`` of shape
      ``(q_features, qkv_features)``, ``key.w`` and ``value.w`` of shape
      ``(kv_features, qkv_features)`` and ``out.w`` of shape ``(qkv_features,
      out_features)``; head ``h`` uses columns ``h * head_dim`` to ``(h + 1) *
      head_dim``. Output shape ``(batch, q_time, out_features)``.

    Raises:
      ValueError: for a non-positive ``num_heads`` or feature size.
      ShapeError: at init or apply, for inputs not of rank 3, unknown feature
        sizes, ``qkv_features`` not divisible by ``num_heads``, inputs whose
        batch sizes differ, inputs that are not real floating-point, or masks
        of the wrong shape or dtype.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> attn = fnn.MultiHeadAttention(2, causal=True)
      >>> shape, params = attn.init(jax.random.key(0), (-1, 5, 8))
      >>> shape, sorted(params), params["query"]["w"].shape
      ((-1, 5, 8), ['key', 'out', 'query', 'value'], (8, 8))
      >>> x = jnp.ones((3, 5, 8))
      >>> pad = jnp.arange(5)[None, :] < jnp.array([[5], [3], [1]])  # (batch, time)
      >>> attn.apply(params, x, mask=pad).shape
      (3, 5, 8)

      Cross-attention from 4 queries to 6 memory vectors:

      >>> cross = fnn.MultiHeadAttention(2, out_features=3)
      >>> cross.init(jax.random.key(0), ((-1, 4, 8), (-1, 6, 5)))[0]
      (-1, 4, 3)
    """
    owner = "MultiHeadAttention"
    num_heads = positive_int(owner, "num_heads", num_heads)
    qkv_features = positive_int(owner, "qkv_features", qkv_features, optional=True)
    out_features = positive_int(owner, "out_features", out_features, optional=True)
    causal = boolean(owner, "causal", causal)
    use_bias = boolean(owner, "use_bias", use_bias)
    param_dtype, dtype = layer_dtypes(owner, param_dtype, dtype)
    options = {"qkv_features": qkv_features, "out_features": out_features}
    options = {k: v for k, v in options.items() if v is not None}
    if causal:
        options["causal"] = True
    options |= shown_dtype(dtype)
    desc = signature("MultiHeadAttention", num_heads, **options)

    def proj(features: int) -> Layer:
        return Dense(
            features,
            w_init=w_init,
            b_init=b_init,
            use_bias=use_bias,
            param_dtype=param_dtype,
            dtype=dtype,
        )

    def init_fn(key, input_shape):
        if isinstance(input_shape, list):
            input_shape = tuple(input_shape)
        if is_shape(input_shape):
            q_shape = kv_shape = check_shape(desc, input_shape, min_rank=3)
        else:
            q_shape, kv_shape = check_shapes(desc, input_shape, 2)
            if not (q_shape[0] == kv_shape[0] or -1 in (q_shape[0], kv_shape[0])):
                fail(
                    desc,
                    f"queries and keys_values must have one batch size, got "
                    f"{q_shape!r} and {kv_shape!r}.",
                )
        q_in = _known_features(desc, q_shape, "queries")
        kv_in = _known_features(desc, kv_shape, "keys_values")
        qkv = qkv_features or q_in
        if qkv % num_heads:
            fail(desc, f"qkv_features {qkv} is not divisible by num_heads {num_heads}.")
        out = out_features or q_in
        keys = jax.random.split(key, 4)
        params = {}
        for k, name, n_in, n_out in zip(
            keys,
            ("query", "key", "value", "out"),
            (q_in, kv_in, kv_in, qkv),
            (qkv, qkv, qkv, out),
        ):
            params[name] = proj(n_out).init(k, (n_in,))[1]
        return q_shape[:-1] + (out,), params

    def apply_fn(params, x, *, mask=None, attention_mask=None, **kwargs):
        q_in, qkv = params["query"]["w"].shape
        kv_in = params["key"]["w"].shape[0]
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                fail(desc, f"expected a pair (queries, keys_values), got {len(x)}.")
            xq, xkv = x
        else:
            xq = xkv = x
        _check_array(desc, xq, q_in, "queries")
        _check_array(desc, xkv, kv_in, "keys_values")
        (batch, q_len, _), (kv_batch, k_len, _) = xq.shape, xkv.shape
        if batch != kv_batch:
            fail(
                desc,
                f"queries and keys_values must have one batch size, got "
                f"{xq.shape!r} and {xkv.shape!r}.",
            )
        head_dim = qkv // num_heads

        def heads(name, v):
            y = proj(qkv).apply(params[name], v)
            return y.reshape(y.shape[:2] + (num_heads, head_dim))

        q, k, v = heads("query", xq), heads("key", xkv), heads("value", xkv)
        m = _combined_mask(
            desc, batch, num_heads, q_len, k_len, causal, mask, attention_mask
        )
        y = _attend(q, k, v, m)  # (batch, q_len, heads, head_dim)
        if m is not None:
            any_key = jnp.any(m, axis=-1)  # (batch|1, heads|1, q_len)
            y = jnp.where(jnp.swapaxes(any_key, 1, 2)[..., None], y, 0)
        y = y.reshape((batch, q_len, qkv))
        return proj(params["out"]["w"].shape[1]).apply(params["out"], y)

    return library_layer("attention", desc, init_fn, apply_fn)
