"""From gradient sums to the next train state: the checks, the update, the metrics.

The training step (:mod:`fnn.training.step`) computes the gradient sums of a
batch; :func:`apply_gradients` divides them once and applies the optimizer,
:func:`metrics_from_sums` reports them, and the two checks refuse a loss
function or a train state that does not fit the step, in the step's words.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fnn.training.accumulate import GradSums, LossFn, safe_divide
from fnn.training.train_state import TrainState

Metrics = dict[str, jax.Array]


def global_norm(tree: Any) -> jax.Array:
    """The 2-norm of all of ``tree``'s leaves (``optax.tree.norm``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from fnn.training.update import global_norm
      >>> float(global_norm({"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}))
      5.0
    """
    return optax.tree.norm(tree)


def metrics_from_sums(sums: GradSums, *, grad_norm: bool = True) -> Metrics:
    """``{"loss", "weight", **aux, "grad_norm"}`` from the (cross-device) sums:
    sums divided by the weight (0 for a zero weight), the weight itself and,
    unless ``grad_norm`` is False, the norm of the gradient ``grad_sum /
    weight``."""
    w = sums.weight
    aux = {k: safe_divide(v, w) for k, v in sums.aux_sum.items()}
    metrics = {"loss": safe_divide(sums.loss_sum, w), "weight": w, **aux}
    if grad_norm:
        metrics["grad_norm"] = safe_divide(global_norm(sums.grad_sum), w)
    return metrics


def apply_gradients(
    optimizer: optax.GradientTransformation,
    ts: TrainState,
    sums: GradSums,
    *,
    grad_norm: bool = True,
) -> tuple[TrainState, Metrics]:
    """Divides the gradient sums by the weight once and takes an optimizer step.

    A step whose total weight is 0 (an all-padding batch) has a zero gradient,
    never NaN; the optimizer takes its step with it (plain SGD leaves params
    as they were; Adam's moments decay). The divided gradient is cast to the
    params' dtype, so the optimizer state keeps its dtypes.
    """
    grads = jax.tree.map(
        lambda g, p: safe_divide(g, sums.weight).astype(p.dtype),
        sums.grad_sum,
        ts.params,
    )
    updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
    params = optax.apply_updates(ts.params, updates)
    new_ts = ts._replace(
        step=ts.step + 1, params=params, opt_state=opt_state, state=sums.state
    )
    return new_ts, metrics_from_sums(sums, grad_norm=grad_norm)


def check_loss_arity(loss_fn: LossFn, has_state: bool) -> None:
    """Refuses a loss function whose arguments contradict ``has_state``."""
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p for p in sig.parameters.values() if p.kind in kinds]
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()):
        return
    required = [p for p in params if p.default is inspect.Parameter.empty]
    want = 4 if has_state else 3
    if len(required) <= want <= len(params):
        return
    names = ", ".join(p.name for p in params)
    if has_state:
        fix = (
            "with has_state=True it is called as loss_fn(params, state, batch, key) "
            "and returns (out, new_state); pass has_state=False for a stateless model"
        )
    else:
        fix = (
            "it is called as loss_fn(params, batch, key); for a model with running "
            "state (BatchNorm) write loss_fn(params, state, batch, key) returning "
            "(out, new_state) and pass has_state=True"
        )
    raise TypeError(f"make_train_step: loss_fn takes ({names}), but {fix}.")


def check_train_state(ts: Any, optimizer: optax.GradientTransformation) -> None:
    """Trace-time check that ``ts`` is a train state made for ``optimizer``."""
    if not isinstance(ts, TrainState):
        raise TypeError(
            f"train step: expected a fnn.TrainState from step.init(params, "
            f"key=...), got {type(ts).__name__}."
        )
    want = jax.eval_shape(optimizer.init, ts.params)
    got_paths = jax.tree_util.tree_flatten_with_path(ts.opt_state)[0]
    want_paths = jax.tree_util.tree_flatten_with_path(want)[0]
    problem = None
    if jax.tree.structure(ts.opt_state) != jax.tree.structure(want):
        problem = (
            f"its structure is {jax.tree.structure(ts.opt_state)}, the optimizer's "
            f"is {jax.tree.structure(want)}"
        )
    else:
        for (path, g), (_, w) in zip(got_paths, want_paths):
            if jnp.shape(g) != w.shape:
                problem = (
                    f"opt_state{jax.tree_util.keystr(path)} has shape "
                    f"{jnp.shape(g)!r}, the optimizer makes {w.shape!r}"
                )
                break
    if problem is not None:
        raise ValueError(
            f"train step: the train state's opt_state was not made by this step's "
            f"optimizer for these params ({problem}); make the state with "
            f"step.init(params, key=...) of the step that updates it."
        )
