"""Which way of writing a training step is fastest? Hand-written variants, timed.

Two groups of forms, each a hand-written JAX step on the workloads of
``steps.py`` (same weights, batch and Adam step):

* ``--group dense`` (the default): how a dense layer holds its weight and
  multiplies by it. The weight is ``(in, out)`` (fnn's, stax's and Flax's
  layout) or ``(out, in)`` (PyTorch's and Equinox's), the product ``x @ w``,
  ``x @ w.T``, a ``lax.dot_general``, a per-example ``w @ x`` under
  ``jax.vmap`` (how Equinox is used), or the output computed transposed.
  Three forms with a custom derivative rule show what it is worth to make
  XLA:CPU's YNNPACK take the weight-gradient matmuls too: a ``custom_vjp``
  (``jax.jvp`` refuses it, so ``Dense`` cannot use it) and two ``custom_jvp``
  forms that keep a transposed copy behind ``lax.optimization_barrier``. The
  step of fnn's ``Dense`` (``fnn (apply)``) and, with ``--equinox``,
  Equinox's run in the same rounds.
* ``--group step`` (MLPs only): donation, region-analysis copy insertion, the
  loss as a sum over the batch size, a typed key split and a ``lax.cond``
  around the update (the "Donation and copies" table).

Interleaved rounds (the order rotates each round); each form's ratio is the
median over rounds of its time per step divided by the first form's in the
same round, with the lowest and highest per-round ratio as its spread. On
shared cores two more columns are less biased by other processes: the
*quiet ratio*, the same median over the rounds in which every form ran within
25% of its own fastest time, and the *best ratio*, each form's fastest round
over the first form's fastest.

``--hlo`` prints instead, per form, the matmuls of the optimized HLO of the
step (``jax.jit(step).lower(...).compile().as_text()``): which became YNNPACK
fusions (``__ynn_fusion``) and which stayed XLA ``dot``\\ s, with their
contracting dimensions.

Usage::

    python benchmarks/forms.py --workloads mlp-big,mlp-tiny --rounds 11
    python benchmarks/forms.py --workloads mlp-big --hlo
    python benchmarks/forms.py --group step --workloads mlp-big,mlp-tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _hlo import programs, show_hlo, ynn_count
from _peers import equinox
from _workloads import (
    CONV_DN,
    LR,
    WORKLOADS,
    batch,
    fnn_model,
    input_shape,
    jax_step,
    loop_variant,
    weights,
    xent,
)
from jax import lax
from steps import calibrate, clock, compiled_stats, fmt, machine

import fnn

# --- dense forms: lin(x, w) multiplies x's last axis by the weight w ----------


def xw(x, w):  # w (in, out)
    return x @ w


def xwt(x, w):  # w (out, in)
    return x @ w.T


def dot_general_oi(x, w):  # w (out, in): contract x's last axis with w's axis 1
    return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def vmap_wx(x, w):  # w (out, in), per example, as Equinox's Linear
    return jax.vmap(lambda v: w @ v)(x)


def wx_transposed_io(x, w):  # w (in, out): y = (w^T x^T)^T, w first in the dot
    return lax.dot_general(w, x, (((0,), (x.ndim - 1,)), ((), ()))).T


def wx_transposed_oi(x, w):  # w (out, in): y = (w x^T)^T
    return (w @ x.T).T


@jax.custom_vjp
def xw_custom_vjp(x, w):
    return x @ w


def _xw_fwd(x, w):
    return x @ w, (x, w)


def _xw_bwd(res, g):
    x, w = res  # the weight gradient from a transposed copy of x (kept by the barrier)
    return g @ w.T, lax.optimization_barrier(x.T) @ g


xw_custom_vjp.defvjp(_xw_fwd, _xw_bwd)


@jax.custom_jvp
def xw_custom_jvp(x, w):
    return x @ w


@xw_custom_jvp.defjvp
def _xw_jvp(primals, tangents):
    """The tangent in ``w`` written as ``(dw^T x^T)^T`` with both transposes kept,
    so that its transpose, the weight gradient, is a dot whose left operand is
    contracted on its last (minor) axis: a form YNNPACK takes."""
    (x, w), (dx, dw) = primals, tangents
    barrier = lax.optimization_barrier
    return x @ w, dx @ w + barrier(barrier(dw.T) @ x.T).T


@jax.custom_jvp
def xwt_custom_jvp(x, w):
    return x @ w.T


@xwt_custom_jvp.defjvp
def _xwt_jvp(primals, tangents):
    """As ``xw_custom_jvp`` for a ``(out, in)`` weight: the tangent in ``w`` is
    ``(dw x^T)^T`` with the transpose kept, so the weight gradient is
    ``g^T x`` from a transposed copy of ``g``, already in ``w``'s layout."""
    (x, w), (dx, dw) = primals, tangents
    return x @ w.T, dx @ w.T + lax.optimization_barrier(dw @ x.T).T


class Form(NamedTuple):
    name: str
    layout: str  # "io": w is (in, out); "oi": w is (out, in)
    lin: object


DENSE_FORMS = (
    Form("x @ w, w (in, out) [fnn today]", "io", xw),
    Form("x @ w.T, w (out, in)", "oi", xwt),
    Form("dot_general(x, w) on w's axis 1, w (out, in)", "oi", dot_general_oi),
    Form("vmap(w @ x), w (out, in) [Equinox]", "oi", vmap_wx),
    Form("dot_general(w, x).T, w (in, out)", "io", wx_transposed_io),
    Form("(w @ x.T).T, w (out, in)", "oi", wx_transposed_oi),
    Form("custom_vjp, x.T kept for dw, w (in, out)", "io", xw_custom_vjp),
    Form("custom_jvp, transposes kept for dw, w (in, out)", "io", xw_custom_jvp),
    Form("custom_jvp, g.T kept for dw, w (out, in)", "oi", xwt_custom_jvp),
)


def dense_forward(wl, lin):
    """The workload's forward pass with every dense matmul written as ``lin``."""
    if wl.kind == "mlp":

        def forward(params, x):
            for layer in params[:-1]:
                x = jax.nn.relu(lin(x, layer["w"]) + layer["b"])
            return lin(x, params[-1]["w"]) + params[-1]["b"]

    elif wl.kind == "cnn":

        def forward(params, x):
            for layer in params[:-1]:
                x = lax.conv_general_dilated(
                    x, layer["w"], (1, 1), "SAME", dimension_numbers=CONV_DN
                )
                x = jax.nn.relu(x + layer["b"])
            return lin(x.mean(axis=(1, 2)), params[-1]["w"]) + params[-1]["b"]

    else:

        def forward(params, ids):
            e = params[0]["table"][ids].reshape(ids.shape[0], -1)
            h = jnp.tanh(lin(e, params[1]["w"]) + params[1]["b"])
            return lin(h, params[2]["w"]) + params[2]["b"]

    return forward


def dense_params(wl, ws, layout: str):
    """Hand-written params from the shared weights; dense ``w`` transposed for
    ``"oi"`` (conv kernels, HWIO, are not dense weights and stay as they are)."""
    out = []
    for t in ws:
        if len(t) == 1:
            out.append({"table": jnp.asarray(t[0])})
            continue
        w, b = t
        if layout == "oi" and w.ndim == 2:
            w = np.ascontiguousarray(w.T)
        out.append({"w": jnp.asarray(w), "b": jnp.asarray(b)})
    return out


def fnn_dense_layout() -> str:
    _, p = fnn.Dense(2).init(jax.random.key(0), (-1, 3))
    return "oi" if p["w"].shape == (2, 3) else "io"


def fnn_form(wl, ws, x, y):
    """fnn's network (``fnn.Dense`` in whatever layout it has) in the same step."""
    model = fnn_model(wl)
    _, params = model.init(jax.random.key(0), input_shape(wl))
    hand = dense_params(wl, ws, fnn_dense_layout())
    names = sorted((k for k in params if params[k]), key=lambda k: int(k.split("_")[0]))
    params = dict(params)
    for name, p in zip(names, hand, strict=True):
        for k in p:
            if p[k].shape != params[name][k].shape:
                raise ValueError(f"{name}/{k}: {p[k].shape} != {params[name][k].shape}")
        params[name] = p
    tx = optax.adam(LR)
    return loop_variant("fnn (apply)", jax_step(model.apply, tx), params, tx, x, y)


def dense_variants(wl, args):
    ws = weights(wl)
    x, y = batch(wl)
    tx = optax.adam(LR)
    chosen = [int(i) for i in args.forms.split(",")] if args.forms else None
    forms = [f for i, f in enumerate(DENSE_FORMS) if chosen is None or i in chosen]
    out = [
        loop_variant(
            f.name,
            jax_step(dense_forward(wl, f.lin), tx),
            dense_params(wl, ws, f.layout),
            tx,
            x,
            y,
        )
        for f in forms
    ]
    if not args.no_fnn:
        out.append(fnn_form(wl, ws, x, y))
    if args.equinox and (v := equinox(wl, ws, x, y)) is not None:
        out.append(v)
    return out


# --- step forms (MLPs): donation, loss, key, cond -----------------------------

REGION_ANALYSIS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def xent_sum(logits, y):
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(logits, y)
    return loss.sum() / y.shape[0]


def make_step(forward, loss, tx, donate=True, region=False):
    """The step; ``region``: compiled with XLA:CPU's region-analysis copy
    insertion (``fnn`` compiles its donating steps with it)."""

    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(lambda p: loss(forward(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    options = {"compiler_options": REGION_ANALYSIS} if region else {}
    return jax.jit(step, donate_argnums=(0, 1) if donate else (), **options)


def make_step_extra(forward, tx, *, key: bool, cond: bool):
    """The donated step plus a typed PRNG key split every step (the key rides
    in the optimizer-state slot) and/or the update under ``lax.cond``."""

    def step(params, state, x, y):
        opt_state, k = state
        if key:
            k, _ = jax.random.split(k)
        value, grads = jax.value_and_grad(lambda p: xent(forward(p, x), y))(params)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if cond:
            new_params, new_opt = lax.cond(
                value > 0, lambda: (new_params, new_opt), lambda: (params, opt_state)
            )
        return new_params, (new_opt, k), value

    return jax.jit(step, donate_argnums=(0, 1))


class WithKey(NamedTuple):
    """Stands in for the optimizer in ``loop_variant``: state ``(adam, key)``."""

    tx: optax.GradientTransformation

    def init(self, params):
        return self.tx.init(params), jax.random.key(0)


def step_variants(wl, args):
    if wl.kind != "mlp":
        raise SystemExit(f"--group step compares MLP steps; {wl.name} is a {wl.kind}")
    ws = weights(wl)
    x, y = batch(wl)
    tx = optax.adam(LR)
    forward = dense_forward(wl, xw)
    forms = [
        ("x @ w, w (in, out), donated", xent, True, False),
        ("x @ w, not donated", xent, False, False),
        ("x @ w, donated, region analysis", xent, True, True),
        ("x @ w, loss sum / batch", xent_sum, True, False),
    ]
    out = [
        loop_variant(
            name,
            make_step(forward, loss, tx, donate, region),
            dense_params(wl, ws, "io"),
            tx,
            x,
            y,
        )
        for name, loss, donate, region in forms
    ]
    for name, key, cond in (
        ("x @ w, + typed key split", True, False),
        ("x @ w, + lax.cond update", False, True),
    ):
        step = make_step_extra(forward, tx, key=key, cond=cond)
        out.append(
            loop_variant(name, step, dense_params(wl, ws, "io"), WithKey(tx), x, y)
        )
    out.append(fnn_form(wl, ws, x, y))
    if args.equinox and (v := equinox(wl, ws, x, y)) is not None:
        out.append(v)
    return out


# --- timing -------------------------------------------------------------------


def rounds_of(variants, rounds: int, n: int):
    """Per variant: seconds per step in each round and the ratio to variants[0]."""
    times = {v.name: [] for v in variants}
    ratios = {v.name: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        this = {v.name: clock(lambda v=v: v.run(n)) / n for v in order}
        for name, t in this.items():
            times[name].append(t)
            ratios[name].append(t / this[variants[0].name])
    return times, ratios


QUIET = 1.25  # a round is quiet if every form ran within 25% of its best


def report(wl, variants, args) -> None:
    dots, letter = programs(variants)
    stats = {v.name: compiled_stats(v) for v in variants}
    losses = {v.name: v.run(1) for v in variants}
    n = calibrate(variants, args.round_s)
    times, ratios = rounds_of(variants, args.rounds, n)
    med = statistics.median
    best = {k: min(t) for k, t in times.items()}
    quiet = [
        i
        for i in range(args.rounds)
        if all(t[i] <= QUIET * best[k] for k, t in times.items())
    ]
    print(
        f"\n### {wl.name}, batch {wl.batch}: {args.rounds} rounds x {n} steps, "
        f"{len(quiet)} quiet\n"
    )
    print(
        "| form | program | ratio | spread | quiet ratio | best ratio | us/step "
        "| best us/step | YNNPACK matmuls | MB accessed | loss |"
    )
    print("|---|:-:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for v in variants:
        r, mb, t = ratios[v.name], stats[v.name].get("bytes"), times[v.name]
        q = med([r[i] for i in quiet]) if quiet else None
        print(
            f"| {v.name} | {fmt(letter[v.name], 's')} | {med(r):.3f} "
            f"| {min(r):.2f}-{max(r):.2f} | {fmt(q, '.3f')} "
            f"| {best[v.name] / best[variants[0].name]:.3f} | {med(t) * 1e6:,.0f} "
            f"| {best[v.name] * 1e6:,.0f} "
            f"| {fmt(dots[v.name] and ynn_count(dots[v.name]), 's')} "
            f"| {fmt(mb and mb / 2**20, '.1f')} | {losses[v.name]:.6f} |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", choices=("dense", "step"), default="dense")
    parser.add_argument("--workloads", default="mlp-big")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--round-s", type=float, default=0.5)
    parser.add_argument("--equinox", action="store_true", help="add Equinox's step")
    parser.add_argument(
        "--hlo", action="store_true", help="list each form's matmuls; no timing"
    )
    parser.add_argument(
        "--forms", default="", help="dense forms to run, by index, e.g. 0,1,3"
    )
    parser.add_argument("--no-fnn", action="store_true", help="leave out fnn's step")
    args = parser.parse_args(argv)
    print(f"Machine: {machine()}")
    print(f"Command: python benchmarks/forms.py {' '.join(sys.argv[1:])}".rstrip())
    build = dense_variants if args.group == "dense" else step_variants
    for name in args.workloads.split(","):
        wl = WORKLOADS[name]
        (show_hlo if args.hlo else report)(wl, build(wl, args), args)


if __name__ == "__main__":
    main()
