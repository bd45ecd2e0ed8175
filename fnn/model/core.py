"""The layer contract: ``Layer``, how layers are made, and how children are run.

A layer is a pair of pure functions::

    init(key, input_shape) -> (output_shape, params)
    apply(params, x, *, key=None, **kwargs) -> y

Combinators run each child with :func:`init_child` and :func:`apply_child`,
inside :func:`fnn.model.place.child_scope`, so errors raised with :func:`fail`
name the child's place (``serial[2]``). The contract is checked where it can
go wrong: the outermost ``apply`` of a layer made with :func:`make_layer`
checks its ``key`` and compares its params with what ``init`` makes for the
input's shape; :func:`init_child` checks the output shape a layer that is not
fnn's own claims; :func:`apply_child` explains an ``apply`` that cannot take
keyword arguments. All of this is Python that runs while tracing; a jitted step
pays nothing for it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax

from fnn.model.compare import (
    apply_shape,
    concrete_shapes,
    input_spec,
    key_problem,
    mismatch,
    probe_input,
    shape_tree,
    shapes_agree,
    signature_of,
    tree_diff,
)
from fnn.model.place import (  # noqa: F401  (re-exported: fnn.model.core.fail)
    ShapeError,
    applying,
    aside,
    child_scope,
    current_keys,
    current_place,
    fail,
    is_applying,
    recorder,
    recording,
    watched,
    watching,
)

Shape = tuple[int, ...]
Params = Any


class InitFn(Protocol):
    """``init(key, input_shape) -> (output_shape, params)``."""

    def __call__(self, key: jax.Array, input_shape: Any) -> tuple[Any, Params]: ...


class ApplyFn(Protocol):
    """``apply(params, x, *, key=None, **kwargs) -> y``."""

    def __call__(
        self, params: Params, x: Any, *, key: jax.Array | None = None, **kwargs: Any
    ) -> Any: ...


class Layer(NamedTuple):
    """A layer: the pair of pure functions ``(init, apply)``.

    It unpacks like a stax pair, so ``init, apply = fnn.Dense(3)`` works.

    Attributes:
      init: ``init(key, input_shape) -> (output_shape, params)``. ``input_shape``
        is a tuple whose leading batch dimension may be ``-1``; multi-input layers
        take a tuple of shapes.
      apply: ``apply(params, x, *, key=None, **kwargs) -> y``. ``key=None`` means
        deterministic inference; unknown keyword arguments are ignored, so
        combinators can pass options (``mask=``, ``train=``) to every child.

    Examples:
      >>> import jax, jax.numpy as jnp, fnn
      >>> init, apply = fnn.Dense(3)
      >>> out_shape, params = init(jax.random.key(0), (-1, 4))
      >>> out_shape
      (-1, 3)
      >>> apply(params, jnp.ones((2, 4))).shape
      (2, 3)
    """

    init: InitFn
    apply: ApplyFn

    def __repr__(self) -> str:
        return describe(self)


def make_layer(name: str, desc: str, init_fn: InitFn, apply_fn: ApplyFn) -> Layer:
    """Builds a :class:`Layer` and tags it with a short name and a description.

    ``name`` becomes part of the params key chosen by combinators
    (``'0_dense'``); ``desc`` is how errors and :func:`fnn.summary` print the
    layer (``'Dense(features=10)'``).

    The layer's ``apply``, when called from outside any other layer (the
    network's outermost call, eagerly or while ``jit`` traces it), checks that
    ``key`` is a PRNG key and that ``params`` has the paths and leaf shapes
    ``init`` makes for the input's shape (by ``jax.eval_shape``, so ``init``
    must be traceable; dtypes and the batch size are free). A mismatch is a
    :class:`ShapeError` naming the first differing path, the two shapes, and
    the missing and extra keys. The check runs once per input and params
    signature, not on every call.

    Args:
      name: short lower-case kind name, e.g. ``"dense"``.
      desc: the constructor call as the user wrote it, e.g. ``"Dense(features=3)"``.
      init_fn: the layer's init function.
      apply_fn: the layer's apply function.

    Returns:
      The layer.

    Examples:
      >>> import jax.numpy as jnp, fnn
      >>> def init(key, shape):
      ...     return shape, {}
      >>> def apply(params, x, **kwargs):
      ...     return 2 * x
      >>> double = fnn.make_layer("double", "Double()", init, apply)
      >>> double
      Double()
      >>> fnn.serial(double).init(None, (-1, 2))[1]
      {'0_double': {}}
      >>> double.apply({"scale": jnp.ones(())}, jnp.ones(2))
      Traceback (most recent call last):
      ...
      fnn.ShapeError: Double(): the params do not fit this layer for an input
      of shape (2,): extra params['scale']; pass the params its init returned.
    """
    init_fn.fnn_name = name  # type: ignore[attr-defined]
    init_fn.fnn_desc = desc  # type: ignore[attr-defined]

    def apply(params: Params, x: Any, **kwargs: Any) -> Any:
        if is_applying():
            return apply_fn(params, x, **kwargs)
        with applying():
            check_key(desc, kwargs.get("key"))
            return checked(
                lambda: apply_fn(params, x, **kwargs),
                lambda cause: _check_params(apply, desc, init_fn, params, x, cause),
            )

    return Layer(init_fn, apply)


def library_layer(name: str, desc: str, init_fn: InitFn, apply_fn: ApplyFn) -> Layer:
    """:func:`make_layer` for fnn's own layers.

    Their ``init`` is tested to claim the output shape ``apply`` returns (the
    property suite), so combinators do not check it again with
    ``jax.eval_shape`` at init, as they do for other layers.
    """
    init_fn.fnn_library = True  # type: ignore[attr-defined]
    return make_layer(name, desc, init_fn, apply_fn)


def is_library(layer: Layer) -> bool:
    """Whether ``layer`` is one of fnn's own (made by :func:`library_layer`)."""
    return getattr(layer[0], "fnn_library", False)


def layer_name(layer: Layer) -> str:
    """The short kind name of ``layer`` (``'layer'`` for an untagged pair)."""
    return getattr(layer[0], "fnn_name", "layer")


def describe(layer: Layer) -> str:
    """How ``layer`` is printed in errors (``'Dense(features=3)'``)."""
    return getattr(layer[0], "fnn_desc", f"{layer_name(layer)}(...)")


def signature(name: str, *args: Any, **kwargs: Any) -> str:
    """Formats a constructor call, e.g. ``signature('Dense', 3)`` -> ``'Dense(3)'``."""
    parts = [repr(a) for a in args]
    parts += [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def init_child(
    child: Layer, name: str, place: str, rng: jax.Array, input_shape: Any
) -> tuple[Any, Params]:
    """Initialises ``child`` at params key ``name`` and place ``place``.

    Combinators call this for each child; :func:`fnn.summary` reads what it
    records. For a layer that is not fnn's own, the output shape its ``init``
    claims is compared with what its ``apply`` returns (``jax.eval_shape`` on a
    float32 input), so a wrong claim is blamed on that layer rather than on the
    next one.
    """
    with child_scope(name, place):
        record = recorder()
        if record is not None:
            slot = len(record)
            record.append(None)  # parents are listed before their children
        out_shape, params = child.init(rng, input_shape)
        if not is_library(child):
            _check_claim(child, params, input_shape, out_shape)
        if record is not None:
            record[slot] = (current_place(), current_keys(), child, out_shape, params)
    return out_shape, params


def _check_claim(child: Layer, params: Params, input_shape: Any, claimed: Any) -> None:
    try:
        x = probe_input(input_shape)
        with aside():
            real = shape_tree(jax.eval_shape(child.apply, params, x))
    except Exception:  # e.g. a layer that takes integer ids: checked at apply
        return
    check_output_shape(describe(child), claimed, real, shape_tree(x))


def check_output_shape(desc: str, claimed: Any, real: Any, input_shape: Any) -> None:
    """Fails unless init's ``claimed`` output shape is ``real`` (-1 matches any).

    Raises:
      ShapeError: naming ``desc``, its place, the claimed and the real shape.
    """
    if not shapes_agree(claimed, real):
        fail(
            desc,
            f"init claims the output shape {claimed!r} but apply returns {real!r} "
            f"for an input of shape {input_shape!r}; init must return the shape "
            "apply gives (with -1 for an unknown batch).",
        )


def apply_child(
    child: Layer, name: str, place: str, params: Params, x: Any, **kwargs: Any
) -> Any:
    """Applies ``child`` at params key ``name`` and place ``place``.

    Inside :func:`watching`, the watcher runs the child instead.
    """
    with child_scope(name, place):
        try:
            watch = watched()
            if watch is None:
                return child.apply(params, x, **kwargs)
            return watch(child, params, x, lambda p, v: child.apply(p, v, **kwargs))
        except TypeError as e:
            _explain_signature(child, params, x, kwargs, e)
            raise


def _explain_signature(child: Layer, params, x, kwargs, error: TypeError) -> None:
    """Re-raises ``error`` in the contract's words when apply's signature is why."""
    try:
        inspect.signature(child.apply).bind(params, x, **kwargs)
    except TypeError as why:
        shown = ", ".join(["params", "x", *(f"{k}=..." for k in kwargs)])
        raise TypeError(
            f"{describe(child)} at {current_place()}: its apply cannot be called as "
            f"apply({shown}) ({why}); a layer's apply must take (params, x, *, "
            "key=None, **kwargs), since combinators pass every keyword argument "
            "(key=, mask=, train=, ...) to every child."
        ) from error
    except ValueError:  # no signature to inspect
        pass


# --- checks at the outermost apply ----------------------------------------------


def check_key(desc: str, key: Any) -> None:
    """Fails unless ``key`` is ``None``, a ``jax.random.key`` or a raw ``PRNGKey``.

    Raises:
      ShapeError: naming ``desc`` and its place, and what was given.

    Examples:
      >>> import fnn
      >>> from fnn.model.core import check_key
      >>> check_key("Dropout(0.5)", 0)
      Traceback (most recent call last):
      ...
      fnn.ShapeError: Dropout(0.5): expected key to be a jax.random.key(seed)
      (or a raw jax.random.PRNGKey(seed)), got the int 0; pass
      key=jax.random.key(0) to train, or no key for inference.
    """
    problem = key_problem(key)
    if problem is not None:
        fail(
            desc,
            "expected key to be a jax.random.key(seed) (or a raw "
            f"jax.random.PRNGKey(seed)), got {problem}; pass key=jax.random.key(0) "
            "to train, or no key for inference.",
        )


def checked(run: Callable[[], Any], check: Callable[[Any], None]) -> Any:
    """``run()``, then ``check(None)``; ``check(error)`` when ``run`` fails.

    The outermost apply runs the network before comparing its params with
    init's: an input that does not fit gets the layer's own error (which names
    the layer and the input), to which ``check`` adds a note when the params do
    not fit either; params that do not fit, whether they broke the run (a
    missing key, ``None``) or not (another network's), get the comparison's
    error.
    """
    try:
        y = run()
    except Exception as e:
        try:
            check(e)
        except ShapeError:
            raise  # the params do not fit: that is why run failed
        except Exception:
            pass  # the check could not run either: run's error stands
        raise
    check(None)
    return y


def fit_error(desc: str, detail: str, cause: Exception | None) -> None:
    """Raises the mismatch ``detail`` (from ``cause``), or notes it on a ShapeError.

    Raises:
      ShapeError: unless ``cause`` is a ShapeError, which gets the note instead.
    """
    if isinstance(cause, ShapeError):
        cause.add_note(f"fnn: {desc}: {detail}")
        return
    try:
        fail(desc, detail)
    except ShapeError as e:
        raise e from cause


def expected_trees(fn: Callable[[], Any]) -> tuple[Any, dict]:
    """``jax.eval_shape(fn)`` aside from the network being run, and who owns what.

    ``fn`` calls some ``init``. Returns its result as ``jax.ShapeDtypeStruct``
    leaves, and a dict from params key paths to the layer there, e.g.
    ``{('0_dense',): 'Dense(features=4) at serial[0]'}``.
    """
    with aside(applying=False), recording() as rows:
        out = jax.eval_shape(fn)
    owners = {keys: f"{describe(layer)} at {place}" for place, keys, layer, *_ in rows}
    return out, owners


def init_aside(
    desc: str, spec: Any, fn: Callable[[], Any], cause: Exception | None
) -> tuple[Any, dict] | None:
    """:func:`expected_trees` of ``fn`` (which runs an init for input ``spec``).

    Returns ``None`` when it fails after apply failed (``cause``): apply's error
    stands. Otherwise init's error propagates, with a note unless it is a
    :class:`ShapeError` (which already says why the input does not fit).
    """
    try:
        return expected_trees(fn)
    except Exception as e:
        if cause is not None:
            return None
        if not isinstance(e, ShapeError):
            e.add_note(
                f"fnn: raised by the init of {desc} under jax.eval_shape for the "
                f"input shape {spec!r}, to check what its apply was given."
            )
        raise


def _check_params(
    owner: Callable, desc: str, init: InitFn, params: Params, x: Any, cause: Any
) -> None:
    if not concrete_shapes(x):
        return  # symbolic dimensions (jax.export): no init to compare with
    spec = input_spec(x)
    sig = (spec, signature_of(params))
    if getattr(owner, "fnn_verified", None) == sig:
        return
    found = init_aside(desc, spec, lambda: init(jax.random.key(0), spec)[1], cause)
    if found is None:
        return  # the error of apply stands
    expected, owners = found
    diff = tree_diff(expected, params)
    if diff:
        detail = mismatch("params", diff, owners, apply_shape(x))
        fit_error(desc, detail, cause)
    elif cause is None:
        owner.fnn_verified = sig  # type: ignore[attr-defined]
