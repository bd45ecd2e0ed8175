"""Workloads, shared initial weights and batches, and the two reference steps.

Every variant of a workload starts from the same numpy weights and trains on
the same batch with Adam at 1e-3 in float32, so the first-step losses agree
and the timings compare like with like. Weights are stored the way fnn and
hand-written JAX hold them: ``w`` as ``(in, out)``, conv kernels as HWIO.

A variant is a :class:`Variant`: ``run(n)`` runs ``n`` steps, blocks, and
returns the last loss; ``lower()`` gives a ``jax.stages.Lowered`` for compile
time, FLOPs and memory (or None where a library hides it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fnn

LR = 1e-3
CONV_DN = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "mlp", "cnn" or "char"
    batch: int
    sizes: tuple[int, ...] = ()  # MLP: in, hidden..., out
    note: str = ""


WORKLOADS = {
    w.name: w
    for w in (
        Workload("mlp-tiny", "mlp", 32, (64, 32, 32, 10), "overhead bound"),
        Workload("mlp-mnist", "mlp", 128, (784, 512, 512, 10)),
        Workload("mlp-big", "mlp", 512, (1024, 2048, 2048, 10), "compute bound"),
        Workload("cnn", "cnn", 128, note="8x8x1, conv 16, conv 32, mean, dense 10"),
        Workload("char", "char", 256, note="8 tokens, embed 32, 256 tanh, 96"),
    )
}
CNN_CHANNELS = (1, 16, 32)
CNN_CLASSES = 10
CHAR_CONTEXT, CHAR_VOCAB, CHAR_EMBED, CHAR_HIDDEN = 8, 96, 32, 256


@dataclasses.dataclass
class Variant:
    name: str
    run: Callable[[int], float]
    lower: Callable[[], Any] | None = None


def weights(wl: Workload, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    """The initial weights: one tuple per layer with params (``w`` then ``b``)."""
    rng = np.random.default_rng(seed)

    def dense(n_in, n_out):
        w = rng.normal(0.0, n_in**-0.5, (n_in, n_out)).astype(np.float32)
        return w, rng.normal(0.0, 0.1, (n_out,)).astype(np.float32)

    if wl.kind == "mlp":
        return [dense(a, b) for a, b in zip(wl.sizes[:-1], wl.sizes[1:])]
    if wl.kind == "cnn":
        out = []
        for c_in, c_out in zip(CNN_CHANNELS[:-1], CNN_CHANNELS[1:]):
            k = rng.normal(0.0, (9 * c_in) ** -0.5, (3, 3, c_in, c_out))
            out.append((k.astype(np.float32), np.zeros(c_out, np.float32)))
        return out + [dense(CNN_CHANNELS[-1], CNN_CLASSES)]
    table = rng.normal(0.0, 1.0, (CHAR_VOCAB, CHAR_EMBED)).astype(np.float32)
    return [
        (table,),
        dense(CHAR_CONTEXT * CHAR_EMBED, CHAR_HIDDEN),
        dense(CHAR_HIDDEN, CHAR_VOCAB),
    ]


def batch(wl: Workload, seed: int = 1, lead: tuple[int, ...] = ()):
    """``(x, y)`` as numpy arrays; ``lead`` stacks several batches in front."""
    rng = np.random.default_rng(seed)
    b = lead + (wl.batch,)
    if wl.kind == "mlp":
        x = rng.normal(size=b + (wl.sizes[0],)).astype(np.float32)
        return x, rng.integers(0, wl.sizes[-1], b).astype(np.int32)
    if wl.kind == "cnn":
        x = rng.normal(size=b + (8, 8, 1)).astype(np.float32)
        return x, rng.integers(0, CNN_CLASSES, b).astype(np.int32)
    x = rng.integers(0, CHAR_VOCAB, b + (CHAR_CONTEXT,)).astype(np.int32)
    return x, rng.integers(0, CHAR_VOCAB, b).astype(np.int32)


def xent(logits, y):
    """Mean softmax cross-entropy with integer labels (optax's, as every peer)."""
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def jax_step(forward: Callable, tx: optax.GradientTransformation) -> Callable:
    """The jitted, donating step a JAX programmer writes around ``forward``."""

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: xent(forward(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def loop_variant(name: str, step: Callable, params: Any, tx, x, y) -> Variant:
    """A :class:`Variant` over ``step(params, opt_state, x, y)``."""
    state = [params, tx.init(params)]
    x, y = jnp.asarray(x), jnp.asarray(y)

    def run(n):
        p, o = state
        loss = None
        for _ in range(n):
            p, o, loss = step(p, o, x, y)
        state[:] = [p, o]
        return float(loss)

    return Variant(name, run, lambda: step.lower(*state, x, y))


# --- hand-written JAX ---------------------------------------------------------


def hand_params(wl: Workload, ws) -> Any:
    """Params as a good JAX programmer holds them: a list of dicts."""
    return [
        dict(zip(("w", "b") if len(t) == 2 else ("table",), map(jnp.asarray, t)))
        for t in ws
    ]


def hand_forward(wl: Workload) -> Callable:
    """The forward pass written directly in jax.numpy / lax."""
    if wl.kind == "mlp":

        def forward(params, x):
            for layer in params[:-1]:
                x = jax.nn.relu(x @ layer["w"] + layer["b"])
            return x @ params[-1]["w"] + params[-1]["b"]

    elif wl.kind == "cnn":

        def forward(params, x):
            for layer in params[:-1]:
                x = jax.lax.conv_general_dilated(
                    x, layer["w"], (1, 1), "SAME", dimension_numbers=CONV_DN
                )
                x = jax.nn.relu(x + layer["b"])
            x = x.mean(axis=(1, 2))
            return x @ params[-1]["w"] + params[-1]["b"]

    else:

        def forward(params, ids):
            e = params[0]["table"][ids].reshape(ids.shape[0], -1)
            h = jnp.tanh(e @ params[1]["w"] + params[1]["b"])
            return h @ params[2]["w"] + params[2]["b"]

    return forward


def hand_variant(wl: Workload, ws, x, y) -> Variant:
    tx = optax.adam(LR)
    step = jax_step(hand_forward(wl), tx)
    return loop_variant("JAX (hand-written)", step, hand_params(wl, ws), tx, x, y)


# --- fnn ------------------------------------------------------------------


def _act(name: str, fn: Callable) -> fnn.Layer:
    """``fnn.<name>()`` or, until that layer exists, the same thing by hand."""
    ctor = getattr(fnn, name, None)
    if ctor is not None:
        return ctor()
    return fnn.make_layer(
        name.lower(), f"{name}()", lambda k, s: (s, {}), lambda p, x, **kw: fn(x)
    )


def fnn_model(wl: Workload) -> fnn.Layer:
    """The workload's network built from fnn layers."""
    relu = _act("Relu", jax.nn.relu)
    if wl.kind == "mlp":
        layers = []
        for n in wl.sizes[1:-1]:
            layers += [fnn.Dense(n), relu]
        return fnn.serial(*layers, fnn.Dense(wl.sizes[-1]))
    if wl.kind == "cnn":
        conv = [fnn.Conv(c, (3, 3), padding="SAME") for c in CNN_CHANNELS[1:]]
        pool = fnn.GlobalMeanPool(axis=(1, 2))
        return fnn.serial(conv[0], relu, conv[1], relu, pool, fnn.Dense(CNN_CLASSES))
    return fnn.serial(
        fnn.Embed(CHAR_VOCAB, CHAR_EMBED),
        fnn.Flatten(),
        fnn.Dense(CHAR_HIDDEN),
        _act("Tanh", jnp.tanh),
        fnn.Dense(CHAR_VOCAB),
    )


def input_shape(wl: Workload) -> tuple[int, ...]:
    if wl.kind == "mlp":
        return (-1, wl.sizes[0])
    return (-1, 8, 8, 1) if wl.kind == "cnn" else (-1, CHAR_CONTEXT)


def load_fnn(params: dict, ws) -> dict:
    """fnn params from ``init`` with their leaves replaced by ``ws``, in order."""
    children = sorted((k for k in params if params[k]), key=lambda k: int(k[0]))
    if len(children) != len(ws):
        raise ValueError(f"{len(children)} fnn layers with params, {len(ws)} given")
    out = dict(params)
    for k, t in zip(children, ws):
        names = [n for n in ("w", "kernel", "table") if n in params[k]]
        names += [n for n in ("b", "bias") if n in params[k]]
        new = dict(zip(names, map(jnp.asarray, t)))
        for n in names:
            if new[n].shape != params[k][n].shape:
                raise ValueError(f"{k}/{n}: {new[n].shape} != {params[k][n].shape}")
        out[k] = new
    return out


def fnn_params(wl: Workload, ws) -> tuple[fnn.Layer, dict]:
    model = fnn_model(wl)
    _, params = model.init(jax.random.key(0), input_shape(wl))
    return model, load_fnn(params, ws)


def fnn_variant(wl: Workload, ws, x, y) -> Variant:
    """fnn's ``apply`` inside the same step as hand-written JAX."""
    model, params = fnn_params(wl, ws)
    tx = optax.adam(LR)
    step = jax_step(model.apply, tx)
    return loop_variant("fnn (apply)", step, params, tx, x, y)


def fnn_loss(model: fnn.Layer) -> Callable:
    """The loss for ``fnn.make_train_step``: a sum and a weight."""

    def loss_fn(params, batch, key):
        x, y = batch
        logits = model.apply(params, x)
        loss = optax.losses.softmax_cross_entropy_with_integer_labels(logits, y)
        return loss.sum(), y.shape[0]

    return loss_fn


def train_step_variant(
    wl: Workload, ws, x, y, k: int = 1, grad_norm: bool = False
) -> Variant:
    """``fnn.make_train_step``; with ``k > 1`` the batch is repeated ``k`` times
    along a new leading axis, each call takes ``k`` steps and ``run(n)`` makes
    ``n // k`` calls (at least one); it returns the first loss of the last call."""
    model, params = fnn_params(wl, ws)
    tx = optax.adam(LR)
    step = fnn.make_train_step(
        fnn_loss(model), tx, steps_per_call=k, grad_norm=grad_norm
    )
    box = [step.init(params, key=jax.random.key(0))]
    data = (jnp.asarray(x), jnp.asarray(y))
    if k > 1:
        data = jax.tree.map(lambda a: jnp.stack([a] * k), data)

    def run(n):
        ts = box[0]
        for _ in range(max(1, n // k)):
            ts, metrics = step(ts, data)
        box[0] = ts
        return float(metrics["loss"].reshape(-1)[0])

    opts = ([f"steps_per_call={k}"] if k > 1 else []) + (
        ["grad_norm=True"] if grad_norm else []
    )
    name = "fnn.make_train_step" + (f" ({', '.join(opts)})" if opts else "")
    return Variant(name, run, lambda: step.lower(box[0], data))
