"""Activations as layers, each over a ``jax.nn`` function.

The functions are ``jax.nn``'s (``jax.nn.relu``, ``jax.nn.sigmoid``, ...), so
they keep its custom gradients and numerics. fnn adds two functions where it
adds something: :func:`swish` with a ``beta`` argument, and :func:`gelu`,
exact by default. The layers (``fnn.Relu()``, ``fnn.Gelu()``, ...) are all
built by one template, ``_activation``: params ``{}``, output shape equal to
the input shape.

Examples:
  >>> import jax, fnn
  >>> net = fnn.serial(fnn.Dense(4), fnn.Gelu(), fnn.Dense(2), fnn.LogSoftmax())
  >>> net.init(jax.random.key(0), (-1, 3))[0]
  (-1, 2)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from fnn.model.core import Layer, fail, library_layer, signature
from fnn.model.options import boolean, integer, number
from fnn.model.precision import at_least_float32
from fnn.model.shapes import check_shape


def swish(x: ArrayLike, beta: float = 1.0) -> jax.Array:
    """``x * sigmoid(beta * x)``; ``beta = 1`` is SiLU (``jax.nn.silu``).

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.swish(jnp.array([0.0, 1.0]), beta=2.0)
      Array([0.       , 0.8807971], dtype=float32)
    """
    return x * jax.nn.sigmoid(beta * x)


def gelu(x: ArrayLike, approximate: bool = False) -> jax.Array:
    """GELU, ``x * Phi(x)``; exact (with ``erf``) unless ``approximate``.

    Unlike ``jax.nn.gelu``, whose default is the tanh approximation
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, the default here is
    the exact ``0.5 x (1 + erf(x / sqrt(2)))`` of the GELU paper and PyTorch.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.gelu(jnp.array([1.0]))
      Array([0.8413447], dtype=float32)
      >>> fnn.gelu(jnp.array([1.0]), approximate=True)
      Array([0.841192], dtype=float32)
    """
    return jax.nn.gelu(x, approximate=approximate)


def _activation(
    kind: str,
    desc: str,
    fn: Callable[[jax.Array], jax.Array],
    *,
    axis: int | None = None,
    check_fn: bool = False,
) -> Layer:
    """The one template of every activation layer: params ``{}``, shape unchanged.

    ``axis`` (Softmax, LogSoftmax) must name an axis of the input, checked at
    init and again at apply (trace time). ``check_fn`` (:func:`elementwise`)
    checks with ``jax.eval_shape`` that ``fn`` keeps the shape.
    """

    def check_axis(shape: tuple[int, ...]) -> None:
        if axis is not None and not -len(shape) <= axis < len(shape):
            fail(
                desc,
                f"axis {axis} is out of range for an input of rank {len(shape)} "
                f"(shape {shape!r}).",
            )

    def init_fn(key, input_shape):
        shape = check_shape(desc, input_shape, min_rank=0)
        check_axis(shape)
        if check_fn:
            probe = jax.ShapeDtypeStruct(tuple(abs(d) for d in shape), jnp.float32)
            out = jax.eval_shape(fn, probe)
            if getattr(out, "shape", None) != probe.shape:
                fail(
                    desc,
                    f"the function must keep the shape, but maps {probe.shape!r} "
                    f"to {getattr(out, 'shape', type(out).__name__)!r}.",
                )
        return shape, {}

    def apply_fn(params, x, **kwargs):
        x = jnp.asarray(x)
        check_axis(tuple(x.shape))
        return fn(x)

    return library_layer(kind, desc, init_fn, apply_fn)


def Sigmoid() -> Layer:
    """``jax.nn.sigmoid``, ``1 / (1 + exp(-x))``, as a layer; the head for two
    classes.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> fnn.Sigmoid().apply({}, jnp.array([0.0]))
      Array([0.5], dtype=float32)
    """
    return _activation("sigmoid", "Sigmoid()", jax.nn.sigmoid)


def Tanh() -> Layer:
    """``jnp.tanh`` as a layer.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.Tanh().apply({}, jnp.zeros((2, 3))).shape
      (2, 3)
    """
    return _activation("tanh", "Tanh()", jnp.tanh)


def HardTanh() -> Layer:
    """``jax.nn.hard_tanh`` as a layer: clips to ``[-1, 1]``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.HardTanh().apply({}, jnp.array([-5.0, 0.5, 5.0]))
      Array([-1. ,  0.5,  1. ], dtype=float32)
    """
    return _activation("hard_tanh", "HardTanh()", jax.nn.hard_tanh)


def Relu() -> Layer:
    """``jax.nn.relu``, ``max(x, 0)``, as a layer (its gradient at 0 is 0).

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> fnn.Relu().apply({}, jnp.array([-1.0, 2.0]))
      Array([0., 2.], dtype=float32)
    """
    return _activation("relu", "Relu()", jax.nn.relu)


def LeakyRelu(negative_slope: float = 0.01) -> Layer:
    """``jax.nn.leaky_relu`` as a layer: ``x`` for ``x >= 0``, else
    ``negative_slope * x``.

    Args:
      negative_slope: the slope for ``x < 0``. The default 0.01 is that of the
        leaky-ReLU paper, ``jax.nn``, PyTorch and Flax, so ported weights give
        the same outputs.

    Raises:
      ValueError: if ``negative_slope`` is not a finite number.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.LeakyRelu(0.2).apply({}, jnp.array([-1.0, 1.0]))
      Array([-0.2,  1. ], dtype=float32)
    """
    s = number("LeakyRelu", "negative_slope", negative_slope)
    desc = signature("LeakyRelu", negative_slope=s)
    return _activation("leaky_relu", desc, lambda x: jax.nn.leaky_relu(x, s))


def Swish(beta: float = 1.0) -> Layer:
    """:func:`fnn.swish`, ``x * sigmoid(beta * x)``, as a layer.

    Args:
      beta: the sharpness. The default 1 is SiLU, the form used in practice
        (and by ``jax.nn.swish``); large ``beta`` approaches ReLU, ``beta = 0``
        gives ``x / 2``.

    Raises:
      ValueError: if ``beta`` is not a finite number.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.Swish(beta=2.0).apply({}, jnp.array([0.0, 1.0]))
      Array([0.       , 0.8807971], dtype=float32)
    """
    b = number("Swish", "beta", beta)
    return _activation("swish", signature("Swish", beta=b), lambda x: swish(x, b))


def Gelu(approximate: bool = False) -> Layer:
    """:func:`fnn.gelu` as a layer.

    Args:
      approximate: use the tanh approximation. The default is the exact
        ``x * Phi(x)`` (with ``erf``): it is what the name means, it matches
        PyTorch's default and BERT-style checkpoints; the approximation, a
        speed trick for hardware without a fast ``erf``, saves little today.
        ``jax.nn.gelu`` (and so Flax and Equinox) defaults to the approximation.

    Raises:
      ValueError: if ``approximate`` is not a bool.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.Gelu().apply({}, jnp.array([1.0]))
      Array([0.8413447], dtype=float32)
    """
    boolean("Gelu", "approximate", approximate)
    desc = signature("Gelu", approximate=approximate)
    return _activation("gelu", desc, lambda x: gelu(x, approximate))


def _in_float32(fn: Callable[[jax.Array], jax.Array]) -> Callable:
    """``fn`` computed in float32 (at least), its result in the input's dtype.

    For the softmax layers: the exponentials and their sum, which lose the
    most in bfloat16 and overflow in float16, are float32; the result is cast
    back so that a layer keeps the dtype flowing through the network (its
    values, probabilities or log-probabilities, need no more range than the
    input's). A loss should take the logits: ``fnn.losses`` computes in
    float32 from them.
    """

    def run(x: jax.Array) -> jax.Array:
        y = fn(at_least_float32(x))
        return y.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else y

    return run


def Softmax(axis: int = -1) -> Layer:
    """``jax.nn.softmax`` as a layer (stable: the max is subtracted first); the
    head for many classes.

    It computes in float32 (float64 for float64 input) and returns the
    input's dtype, so a bfloat16 network gets bfloat16 probabilities whose
    sums and exponentials were float32.

    Args:
      axis: the axis that sums to one. The default, the last axis, is the
        class axis of a ``Dense`` head (which acts on the last axis).

    Raises:
      ValueError: if ``axis`` is not an int.
      ShapeError: at init or apply, if ``axis`` is out of range for the input.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> fnn.Softmax().apply({}, jnp.array([1e4, 1e4]))
      Array([0.5, 0.5], dtype=float32)
      >>> fnn.Softmax(axis=5).init(jax.random.key(0), (-1, 10))
      Traceback (most recent call last):
      ...
      fnn.ShapeError: Softmax(axis=5): axis 5 is out of range for an input of
      rank 2 (shape (-1, 10)).
    """
    a = integer("Softmax", "axis", axis)
    desc = signature("Softmax", axis=a)
    fn = _in_float32(lambda x: jax.nn.softmax(x, axis=a))
    return _activation("softmax", desc, fn, axis=a)


def LogSoftmax(axis: int = -1) -> Layer:
    """``jax.nn.log_softmax``, ``x - logsumexp(x)``, as a layer; pairs with a
    cross-entropy loss.

    Computed in float32 and returned in the input's dtype, as :func:`Softmax`.

    Args:
      axis: the axis normalised; the last (class) axis by default, as
        :func:`Softmax`.

    Raises:
      ValueError: if ``axis`` is not an int.
      ShapeError: at init or apply, if ``axis`` is out of range for the input.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.LogSoftmax().apply({}, jnp.array([0.0, 1e4]))
      Array([-10000.,      0.], dtype=float32)
    """
    a = integer("LogSoftmax", "axis", axis)
    desc = signature("LogSoftmax", axis=a)
    fn = _in_float32(lambda x: jax.nn.log_softmax(x, axis=a))
    return _activation("log_softmax", desc, fn, axis=a)


def Elu(alpha: float = 1.0) -> Layer:
    """``jax.nn.elu`` as a layer: ``x`` for ``x > 0``, else
    ``alpha * (exp(x) - 1)``.

    Args:
      alpha: the value approached as ``x -> -inf`` is ``-alpha``. The default 1
        is the ELU paper's, and makes the function smooth at 0.

    Raises:
      ValueError: if ``alpha`` is not a finite number.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.Elu(alpha=2.0).apply({}, jnp.array([-1e4, 2.0]))
      Array([-2.,  2.], dtype=float32)
    """
    a = number("Elu", "alpha", alpha)
    return _activation("elu", signature("Elu", alpha=a), lambda x: jax.nn.elu(x, a))


def Softplus() -> Layer:
    """``jax.nn.softplus``, ``log(1 + exp(x))``, as a layer (stable for large
    ``|x|``).

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.Softplus().apply({}, jnp.array([-1e4, 1e4]))
      Array([    0., 10000.], dtype=float32)
    """
    return _activation("softplus", "Softplus()", jax.nn.softplus)


def elementwise(fn: Callable[[jax.Array], jax.Array], name: str | None = None) -> Layer:
    """Makes a parameterless layer from any element-wise function.

    Args:
      fn: a function from an array to an array of the same shape, e.g.
        ``jnp.sin`` or ``lambda x: x ** 2``.
      name: the layer's kind name, used in params keys (``'0_square'``) and
        errors. Defaults to ``fn.__name__``, or ``'elementwise'`` for a lambda.

    Returns:
      The layer; params ``{}``, output shape equal to the input shape.

    Raises:
      ValueError: if ``fn`` is not callable or ``name`` is not a non-empty
        string.
      ShapeError: at init, if ``fn`` changes the shape (checked with
        ``jax.eval_shape``, without running it).

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> net = fnn.serial(fnn.Dense(2), fnn.model.elementwise(jnp.sin))
      >>> list(net.init(jax.random.key(0), (-1, 3))[1])
      ['0_dense', '1_sin']
    """
    if not callable(fn):
        raise ValueError(f"elementwise: expected a function, got {fn!r}.")
    if name is None:
        name = getattr(fn, "__name__", "")
        name = name if name.isidentifier() else "elementwise"
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"elementwise: expected a non-empty string name, got {name!r}."
        )
    return _activation(name, f"elementwise({name})", fn, check_fn=True)
