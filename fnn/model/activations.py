"""Activations: each a plain function over ``jax.nn`` and a parameterless layer.

The functions (``fnn.relu``, ``fnn.gelu``, ...) are thin wrappers over
``jax.nn``, so they keep its custom gradients and numerics. The layers
(``fnn.Relu()``, ``fnn.Gelu()``, ...) are all built by one private template,
``_activation``: params ``{}``, output shape equal to the input shape.

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
from fnn.model.shapes import check_shape


def sigmoid(x: ArrayLike) -> jax.Array:
    """``1 / (1 + exp(-x))``, element-wise; ``jax.nn.sigmoid``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.sigmoid(jnp.array([0.0]))
      Array([0.5], dtype=float32)
    """
    return jax.nn.sigmoid(x)


def tanh(x: ArrayLike) -> jax.Array:
    """The hyperbolic tangent, element-wise; ``jnp.tanh``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.tanh(jnp.array([0.0]))
      Array([0.], dtype=float32)
    """
    return jnp.tanh(x)


def hard_tanh(x: ArrayLike) -> jax.Array:
    """``x`` clipped to ``[-1, 1]``; ``jax.nn.hard_tanh``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.hard_tanh(jnp.array([-3.0, 0.5, 3.0]))
      Array([-1. ,  0.5,  1. ], dtype=float32)
    """
    return jax.nn.hard_tanh(x)


def relu(x: ArrayLike) -> jax.Array:
    """``max(x, 0)``; ``jax.nn.relu`` (its gradient at 0 is 0).

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.relu(jnp.array([-1.0, 2.0]))
      Array([0., 2.], dtype=float32)
    """
    return jax.nn.relu(x)


def leaky_relu(x: ArrayLike, negative_slope: float = 0.01) -> jax.Array:
    """``x`` where ``x >= 0``, else ``negative_slope * x``; ``jax.nn.leaky_relu``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.leaky_relu(jnp.array([-1.0, 2.0]), negative_slope=0.1)
      Array([-0.1,  2. ], dtype=float32)
    """
    return jax.nn.leaky_relu(x, negative_slope)


def swish(x: ArrayLike, beta: float = 1.0) -> jax.Array:
    """``x * sigmoid(beta * x)``; ``beta = 1`` is SiLU (``jax.nn.silu``).

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.swish(jnp.array([0.0, 1.0]))
      Array([0.       , 0.7310586], dtype=float32)
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


def softmax(x: ArrayLike, axis: int = -1) -> jax.Array:
    """``exp(x) / sum(exp(x))`` along ``axis``, computed after subtracting the max.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.softmax(jnp.array([1e4, 1e4]))
      Array([0.5, 0.5], dtype=float32)
    """
    return jax.nn.softmax(x, axis=axis)


def log_softmax(x: ArrayLike, axis: int = -1) -> jax.Array:
    """``x - logsumexp(x)`` along ``axis``, stable for large ``|x|``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.log_softmax(jnp.array([0.0, 1e4]))
      Array([-10000.,      0.], dtype=float32)
    """
    return jax.nn.log_softmax(x, axis=axis)


def elu(x: ArrayLike, alpha: float = 1.0) -> jax.Array:
    """``x`` where ``x > 0``, else ``alpha * (exp(x) - 1)``; ``jax.nn.elu``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.elu(jnp.array([-1e4, 2.0]))
      Array([-1.,  2.], dtype=float32)
    """
    return jax.nn.elu(x, alpha)


def softplus(x: ArrayLike) -> jax.Array:
    """``log(1 + exp(x))``, stable for large ``|x|``; ``jax.nn.softplus``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.softplus(jnp.array([-1e4, 1e4]))
      Array([    0., 10000.], dtype=float32)
    """
    return jax.nn.softplus(x)


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
    """The layer of :func:`fnn.sigmoid`; the head for two classes.

    Examples:
      >>> import jax, fnn
      >>> fnn.Sigmoid().init(jax.random.key(0), (-1, 1))
      ((-1, 1), {})
    """
    return _activation("sigmoid", "Sigmoid()", sigmoid)


def Tanh() -> Layer:
    """The layer of :func:`fnn.tanh`.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> fnn.Tanh().apply({}, jnp.zeros((2, 3))).shape
      (2, 3)
    """
    return _activation("tanh", "Tanh()", tanh)


def HardTanh() -> Layer:
    """The layer of :func:`fnn.hard_tanh`: clips to ``[-1, 1]``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.HardTanh().apply({}, jnp.array([-5.0, 5.0]))
      Array([-1.,  1.], dtype=float32)
    """
    return _activation("hard_tanh", "HardTanh()", hard_tanh)


def Relu() -> Layer:
    """The layer of :func:`fnn.relu`, ``max(x, 0)``.

    Examples:
      >>> import jax, fnn
      >>> fnn.Relu().init(jax.random.key(0), (-1, 8))
      ((-1, 8), {})
    """
    return _activation("relu", "Relu()", relu)


def LeakyRelu(negative_slope: float = 0.01) -> Layer:
    """The layer of :func:`fnn.leaky_relu`.

    Args:
      negative_slope: the slope for ``x < 0``. The default 0.01 is that of the
        leaky-ReLU paper, ``jax.nn``, PyTorch and Flax, so ported weights give the
        same outputs.

    Raises:
      ValueError: if ``negative_slope`` is not a finite number.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.LeakyRelu(0.2).apply({}, jnp.array([-1.0, 1.0]))
      Array([-0.2,  1. ], dtype=float32)
    """
    s = number("LeakyRelu", "negative_slope", negative_slope)
    desc = signature("LeakyRelu", negative_slope=s)
    return _activation("leaky_relu", desc, lambda x: leaky_relu(x, s))


def Swish(beta: float = 1.0) -> Layer:
    """The layer of :func:`fnn.swish`, ``x * sigmoid(beta * x)``.

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
    """The layer of :func:`fnn.gelu`.

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


def Softmax(axis: int = -1) -> Layer:
    """The layer of :func:`fnn.softmax`; the head for many classes.

    Args:
      axis: the axis that sums to one. The default, the last axis, is the
        class axis of a ``Dense`` head (which acts on the last axis).

    Raises:
      ValueError: if ``axis`` is not an int.
      ShapeError: at init or apply, if ``axis`` is out of range for the input.

    Examples:
      >>> import jax, fnn
      >>> fnn.Softmax().init(jax.random.key(0), (-1, 10))
      ((-1, 10), {})
      >>> fnn.Softmax(axis=5).init(jax.random.key(0), (-1, 10))
      Traceback (most recent call last):
      ...
      fnn.ShapeError: Softmax(axis=5): axis 5 is out of range for an input of
      rank 2 (shape (-1, 10)).
    """
    a = integer("Softmax", "axis", axis)
    desc = signature("Softmax", axis=a)
    return _activation("softmax", desc, lambda x: softmax(x, a), axis=a)


def LogSoftmax(axis: int = -1) -> Layer:
    """The layer of :func:`fnn.log_softmax`; pairs with a cross-entropy loss.

    Args:
      axis: the axis normalised; the last (class) axis by default, as
        :class:`Softmax`.

    Raises:
      ValueError: if ``axis`` is not an int.
      ShapeError: at init or apply, if ``axis`` is out of range for the input.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.LogSoftmax().apply({}, jnp.zeros((1, 2)))
      Array([[-0.6931472, -0.6931472]], dtype=float32)
    """
    a = integer("LogSoftmax", "axis", axis)
    desc = signature("LogSoftmax", axis=a)
    return _activation("log_softmax", desc, lambda x: log_softmax(x, a), axis=a)


def Elu(alpha: float = 1.0) -> Layer:
    """The layer of :func:`fnn.elu`.

    Args:
      alpha: the value approached as ``x -> -inf`` is ``-alpha``. The default 1
        is the ELU paper's, and makes the function smooth at 0.

    Raises:
      ValueError: if ``alpha`` is not a finite number.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.Elu(alpha=2.0).apply({}, jnp.array([-1e4]))
      Array([-2.], dtype=float32)
    """
    a = number("Elu", "alpha", alpha)
    return _activation("elu", signature("Elu", alpha=a), lambda x: elu(x, a))


def Softplus() -> Layer:
    """The layer of :func:`fnn.softplus`, ``log(1 + exp(x))``.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> fnn.Softplus().apply({}, jnp.array([0.0]))
      Array([0.6931472], dtype=float32)
    """
    return _activation("softplus", "Softplus()", softplus)


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
      >>> net = fnn.serial(fnn.Dense(2), fnn.elementwise(jnp.sin))
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
