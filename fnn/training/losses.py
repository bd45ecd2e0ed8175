"""Losses, their reductions, and prediction, built on ``optax.losses``.

Every loss is per example (or per element): it returns one value per example,
never a mean, so the caller chooses the reduction. Every loss and reduction
takes a ``mask`` for padding, of the loss's shape or a leading part of it (a
``(batch,)`` mask over ``(batch, features)`` values masks whole examples).
Masked entries give a loss of exactly 0 and a gradient of exactly 0, even when
the padded inputs hold garbage or NaN.

A mask holds booleans, or numbers that are 1 (valid) or 0 (padding). It is not
a weight: any other number (NaN, a negative or a fractional value) makes that
entry's loss NaN, and the weight of :func:`sum_and_weight` NaN, so the training
loop stops on the NaN loss instead of counting the entry as valid. To weight
examples, multiply the per-example losses by the weights and divide by their
sum.

Every loss computes in float32 (float64 for float64 inputs): bfloat16 and
float16 predictions and logits are upcast first, so the loss of a
low-precision network, and the gradient it sends back, start in float32.

The training loop reduces with :func:`sum_and_weight`: it adds sums and weights
(counts of valid entries) over microbatches and divides once, which gives
exactly the gradient of the whole batch, however the padding falls.

Examples:
  >>> import jax.numpy as jnp, fnn
  >>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, 0.0]])
  >>> labels = jnp.array([0, 1, 1])
  >>> mask = jnp.array([True, True, False])  # the last example is padding
  >>> loss = fnn.losses.softmax_cross_entropy(logits, labels, mask)
  >>> fnn.losses.sum_and_weight(loss, mask)
  (Array(0.2538..., dtype=float32), Array(2., dtype=float32))
  >>> fnn.losses.accuracy(logits, labels, mask)
  Array(1., dtype=float32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from fnn.model.options import number
from fnn.training import masks

# --- losses -----------------------------------------------------------------------


def squared_error(
    predictions: ArrayLike, targets: ArrayLike, mask: ArrayLike | None = None
) -> jax.Array:
    """``(predictions - targets) ** 2``, element-wise; ``optax.losses.squared_error``.

    Args:
      predictions: shape ``(batch, ...)``, floating.
      targets: the same shape.
      mask: ``True`` for valid entries; shape ``(batch, ...)`` or a leading part.

    Returns:
      Shape ``(batch, ...)``; 0 at masked entries.

    Raises:
      ValueError: if the shapes differ.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.losses.squared_error(jnp.array([1.0, 2.0]), jnp.array([0.0, 4.0]))
      Array([1., 4.], dtype=float32)
    """
    p, t = masks.float32(predictions), masks.float32(targets)
    masks.same_shape("squared_error", p, t, "predictions and targets")
    m = masks.full_mask("squared_error", mask, p.shape)
    return masks.finish(
        m, optax.losses.squared_error(masks.keep(m, p), masks.keep(m, t))
    )


def mean_squared_error(
    predictions: ArrayLike, targets: ArrayLike, mask: ArrayLike | None = None
) -> jax.Array:
    """The mean of :func:`squared_error` over the valid entries; a scalar.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> p, t = jnp.array([1.0, 2.0, 9.0]), jnp.array([0.0, 4.0, 0.0])
      >>> fnn.losses.mean_squared_error(p, t, mask=jnp.array([1, 1, 0]))
      Array(2.5, dtype=float32)
    """
    return mean(squared_error(predictions, targets, mask), mask)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Cross-entropy of ``softmax(logits)`` against class labels, per example.

    ``-sum(target * log_softmax(logits))`` over the last (class) axis, stable
    for large logits. Labels are either integer class ids of shape
    ``logits.shape[:-1]`` or probabilities (one-hot or soft) of shape
    ``logits.shape``; the shape decides. With ``label_smoothing`` ``a`` and
    ``K`` classes the target is ``(1 - a) * one_hot + a / K``, as
    ``optax.losses.smooth_labels``.

    Args:
      logits: shape ``(batch, ..., classes)``.
      labels: integer ids ``(batch, ...)`` or probabilities
        ``(batch, ..., classes)``. An id outside ``[0, classes)`` (unmasked, no
        smoothing) gives NaN, so a bad label is loud.
      mask: ``True`` for valid examples (or tokens); shape ``(batch, ...)`` or a
        leading part.
      label_smoothing: ``a`` in ``[0, 1]``; 0 (no smoothing) by default.

    Returns:
      Shape ``(batch, ...)``; 0 at masked entries.

    Raises:
      ValueError: if the labels' shape fits neither form, if probability labels
        are given with the shape of ids (cast ids to int), or if
        ``label_smoothing`` is outside ``[0, 1]``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> logits = jnp.array([[0.0, 0.0], [1e4, -1e4]])
      >>> fnn.losses.softmax_cross_entropy(logits, jnp.array([0, 0]))
      Array([0.6931472, 0.       ], dtype=float32)
      >>> fnn.losses.softmax_cross_entropy(logits, jnp.array([[1.0, 0.0], [0, 1]]))
      Array([6.931472e-01, 2.000000e+04], dtype=float32)
    """
    where = "softmax_cross_entropy"
    label_smoothing = number(where, "label_smoothing", label_smoothing, low=0, high=1)
    logits, labels = masks.float32(logits), jnp.asarray(labels)
    if logits.ndim < 1:
        raise ValueError(f"{where}: expected logits with a class axis, got shape ().")
    batch, classes = logits.shape[:-1], logits.shape[-1]
    m = masks.full_mask(where, mask, batch)
    logits = masks.keep(masks.per_class(m), logits)
    if labels.shape == batch:
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(
                f"{where}: labels of shape {labels.shape!r} must be integer class "
                f"ids, got dtype {labels.dtype}; cast them with .astype(int)."
            )
        labels = masks.keep(m, labels)
        # An id outside [0, classes) would silently read another class (-1
        # wraps to the last) or, smoothed, become a plausible target: its loss
        # is NaN instead, so a bad label is loud (fit stops on a NaN loss).
        bad = (labels < 0) | (labels >= classes)
        if label_smoothing == 0.0:
            loss = optax.losses.softmax_cross_entropy_with_integer_labels(
                logits, jnp.where(bad, 0, labels)
            )
        else:
            target = optax.losses.smooth_labels(
                jax.nn.one_hot(labels, classes, dtype=logits.dtype), label_smoothing
            )
            loss = optax.losses.softmax_cross_entropy(logits, target)
        return masks.finish(m, jnp.where(bad, jnp.nan, loss))
    elif labels.shape == logits.shape:
        labels = masks.keep(masks.per_class(m), labels.astype(logits.dtype))
    else:
        raise ValueError(
            f"{where}: expected labels of shape {batch!r} (integer ids) or "
            f"{logits.shape!r} (probabilities) for logits of shape {logits.shape!r}, "
            f"got {labels.shape!r}."
        )
    if label_smoothing:
        labels = optax.losses.smooth_labels(labels, label_smoothing)
    return masks.finish(m, optax.losses.softmax_cross_entropy(logits, labels))


def sigmoid_binary_cross_entropy(
    logits: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None
) -> jax.Array:
    """Cross-entropy of ``sigmoid(logits)`` against 0/1 labels, element-wise.

    ``-y log sigmoid(z) - (1 - y) log sigmoid(-z)``, stable for large ``|z|``;
    ``optax.losses.sigmoid_binary_cross_entropy``.

    Args:
      logits: any shape, e.g. ``(batch, 1)`` from a ``Dense(1)`` head.
      labels: the same shape; 0/1 or probabilities of the positive class.
      mask: ``True`` for valid entries; shape of ``logits`` or a leading part.

    Returns:
      The shape of ``logits``; 0 at masked entries.

    Raises:
      ValueError: if the shapes differ (``(batch, 1)`` logits take ``(batch, 1)``
        labels: reshape them).

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> z = jnp.array([[0.0], [-1e4]])
      >>> fnn.losses.sigmoid_binary_cross_entropy(z, jnp.array([[1], [1]]))
      Array([[6.931472e-01],
             [1.000000e+04]], dtype=float32)
    """
    z, y = masks.float32(logits), jnp.asarray(labels)
    masks.same_shape("sigmoid_binary_cross_entropy", z, y, "logits and labels")
    m = masks.full_mask("sigmoid_binary_cross_entropy", mask, z.shape)
    y = masks.keep(m, y.astype(z.dtype))
    return masks.finish(
        m, optax.losses.sigmoid_binary_cross_entropy(masks.keep(m, z), y)
    )


# --- reductions -------------------------------------------------------------------


def sum_and_weight(
    per_example: ArrayLike, mask: ArrayLike | None = None
) -> tuple[jax.Array, jax.Array]:
    """The sum of the valid entries and their number: what a training step adds.

    Summing ``(sum, weight)`` over microbatches and dividing once gives the
    exact mean over the whole batch; a mean of per-microbatch means does not
    when microbatches hold different numbers of valid entries.

    Args:
      per_example: losses (or metrics) of any shape.
      mask: ``True`` (or 1) for valid entries, ``False`` (or 0) for padding;
        its shape or a leading part. Not a weight: any other value makes both
        results NaN.

    Returns:
      ``(sum, weight)``, two scalars of ``per_example``'s float dtype (float32
      for bfloat16 and float16 values, which are summed in float32). An
      all-masked batch gives ``(0, 0)``; a mask value other than 0 and 1 (NaN,
      negative, fractional) gives ``(nan, nan)``, so the training loop stops
      instead of counting the entry as valid.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.losses.sum_and_weight(jnp.array([1.0, 2.0, 7.0]), jnp.array([1, 1, 0]))
      (Array(3., dtype=float32), Array(2., dtype=float32))
      >>> fnn.losses.sum_and_weight(jnp.array([1.0, 2.0]), jnp.array([1.0, -1.0]))
      (Array(nan, dtype=float32), Array(nan, dtype=float32))
    """
    return _sum_and_weight("sum_and_weight", per_example, mask)


def _sum_and_weight(where: str, per_example, mask):
    x = masks.float32(per_example)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    m = masks.full_mask(where, mask, x.shape)
    if m is None:
        return jnp.sum(x), jnp.asarray(x.size, x.dtype)
    weight = jnp.where(m.valid, jnp.ones((), x.dtype), jnp.zeros((), x.dtype))
    return jnp.sum(masks.finish(m, x)), jnp.sum(masks.finish(m, weight))


def mean(per_example: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
    """The mean of the valid entries; 0 (not NaN) when none is valid.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.losses.mean(jnp.array([1.0, 2.0, 7.0]), jnp.array([1, 1, 0]))
      Array(1.5, dtype=float32)
      >>> fnn.losses.mean(jnp.array([1.0]), jnp.array([False]))
      Array(0., dtype=float32)
    """
    total, weight = _sum_and_weight("mean", per_example, mask)
    return total / jnp.where(weight > 0, weight, jnp.ones((), weight.dtype))


# --- prediction -------------------------------------------------------------------


def one_hot(labels: ArrayLike, num_classes: int, *, dtype=jnp.float32) -> jax.Array:
    """Integer ids ``(...)`` to one-hot vectors ``(..., num_classes)``.

    ``jax.nn.one_hot``: an id outside ``[0, num_classes)`` gives a row of zeros.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.losses.one_hot(jnp.array([0, 2]), 3)
      Array([[1., 0., 0.],
             [0., 0., 1.]], dtype=float32)
    """
    return jax.nn.one_hot(labels, num_classes, dtype=dtype)


def argmax(logits: ArrayLike, axis: int = -1) -> jax.Array:
    """The index of the largest entry along ``axis`` (the first, on ties).

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.losses.argmax(jnp.array([[0.1, 0.7, 0.2]]))
      Array([1], dtype=int32)
    """
    return jnp.argmax(logits, axis=axis).astype(jnp.int32)


def predict(logits: ArrayLike) -> jax.Array:
    """The predicted class ids, ``(batch, ..., classes) -> (batch, ...)``.

    With more than one class this is :func:`argmax` over the last axis; with a
    single logit (a sigmoid head) it is ``logits[..., 0] > 0``, i.e.
    ``sigmoid(logits) > 1/2``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.losses.predict(jnp.array([[0.1, 0.7, 0.2]]))
      Array([1], dtype=int32)
      >>> fnn.losses.predict(jnp.array([[-2.0], [3.0]]))
      Array([0, 1], dtype=int32)
    """
    logits = jnp.asarray(logits)
    if logits.ndim < 1:
        raise ValueError("predict: expected logits with a class axis, got shape ().")
    if logits.shape[-1] == 1:
        return (logits[..., 0] > 0).astype(jnp.int32)
    return argmax(logits)


def correct(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    """1.0 where :func:`predict` matches the label, else 0.0; per example.

    Labels are integer ids of shape ``logits.shape[:-1]`` or probabilities (or
    one-hot rows) of ``logits.shape``, as in :func:`softmax_cross_entropy`;
    with a single logit, a probability label counts as class 1 above 1/2.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.losses.correct(jnp.array([[0.1, 0.7], [0.9, 0.2]]), jnp.array([1, 1]))
      Array([1., 0.], dtype=float32)
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.ndim < 1:
        raise ValueError("correct: expected logits with a class axis, got shape ().")
    if labels.shape == logits.shape:
        labels = labels[..., 0] > 0.5 if logits.shape[-1] == 1 else argmax(labels)
    elif labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"correct: expected labels of shape {logits.shape[:-1]!r} (integer ids) "
            f"or {logits.shape!r} (probabilities) for logits of shape "
            f"{logits.shape!r}, got {labels.shape!r}."
        )
    return (predict(logits) == labels).astype(jnp.float32)


def accuracy(
    logits: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None
) -> jax.Array:
    """The fraction of valid examples whose prediction matches the label.

    The mean of :func:`correct` over the examples the mask keeps; 0 when none
    is kept. For accumulation use ``sum_and_weight(correct(logits, labels),
    mask)``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> logits = jnp.array([[0.1, 0.7], [0.9, 0.2], [0.0, 1.0]])
      >>> fnn.losses.accuracy(logits, jnp.array([1, 1, 1]))
      Array(0.6666667, dtype=float32)
      >>> fnn.losses.accuracy(logits, jnp.array([1, 1, 1]), mask=jnp.array([1, 0, 1]))
      Array(1., dtype=float32)
    """
    return mean(correct(logits, labels), mask)
