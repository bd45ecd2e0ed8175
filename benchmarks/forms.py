"""Which way of writing the MLP step is fastest? Hand-written variants, timed.

The same weights, batch and Adam step as ``steps.py``, written several ways:
weights as ``(in, out)`` with ``x @ w`` (fnn's and stax's layout) or
``(out, in)`` with ``x @ w.T`` (PyTorch's and Equinox's), a per-example
function under ``jax.vmap`` (how Equinox is used), with and without buffer
donation (and donation compiled with XLA:CPU's region-analysis copy
insertion, as ``fnn.make_train_step`` compiles), and the loss as a mean or as
a sum divided by the batch size (as ``fnn.make_train_step`` does).
Interleaved rounds, medians of per-round ratios to the first variant.

Usage::

    python benchmarks/forms.py --workloads mlp-big,mlp-tiny --rounds 7
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import optax
from _peers import equinox
from _workloads import (
    LR,
    WORKLOADS,
    batch,
    fnn_variant,
    hand_params,
    loop_variant,
    weights,
    xent,
)
from steps import calibrate, compiled_stats, fmt, interleave, machine


def mlp_in_out(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def mlp_out_in(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"].T + layer["b"])
    return x @ params[-1]["w"].T + params[-1]["b"]


def mlp_vmap(params, x):
    def one(x):
        for layer in params[:-1]:
            x = jax.nn.relu(layer["w"] @ x + layer["b"])
        return params[-1]["w"] @ x + params[-1]["b"]

    return jax.vmap(one)(x)


def xent_sum(logits, y):
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(logits, y)
    return loss.sum() / y.shape[0]


# XLA:CPU's region analysis in copy insertion: it drops the copies of donated
# weights that the backward pass reads. fnn passes no backend options; a user
# may, with make_train_step(..., jit_kwargs={"compiler_options": REGION}).
REGION = {"xla_cpu_copy_insertion_use_region_analysis": True}


def make_step(forward, loss, tx, donate=True, region=False):
    """The step; ``region``: compiled with ``REGION`` (CPU only)."""

    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(lambda p: loss(forward(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    cpu = jax.default_backend() == "cpu"
    options = {"compiler_options": REGION} if region and donate and cpu else {}
    return jax.jit(step, donate_argnums=(0, 1) if donate else (), **options)


def make_step_extra(forward, tx, *, key: bool, cond: bool):
    """The donated step plus what ``fnn.make_train_step`` adds: a typed PRNG key
    split every step (the key rides in the optimizer-state slot) and/or the
    update under ``lax.cond`` (fnn skips a batch whose weight is zero)."""

    def step(params, state, x, y):
        opt_state, k = state
        if key:
            k, _ = jax.random.split(k)
        value, grads = jax.value_and_grad(lambda p: xent(forward(p, x), y))(params)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if cond:
            new_params, new_opt = jax.lax.cond(
                value > 0, lambda: (new_params, new_opt), lambda: (params, opt_state)
            )
        return new_params, (new_opt, k), value

    return jax.jit(step, donate_argnums=(0, 1))


class WithKey(NamedTuple):
    """Stands in for the optimizer in ``loop_variant``: state ``(adam, key)``."""

    tx: optax.GradientTransformation

    def init(self, params):
        return self.tx.init(params), jax.random.key(0)


def transposed(params):
    return [{"w": p["w"].T.copy(), "b": p["b"].copy()} for p in params]


def fresh(params):
    return [{k: a.copy() for k, a in p.items()} for p in params]


def variants(wl):
    ws = weights(wl)
    x, y = batch(wl)
    tx = optax.adam(LR)
    p = hand_params(wl, ws)
    forms = [
        ("x @ w, w (in, out), donated", mlp_in_out, xent, True, fresh, False),
        ("x @ w, not donated", mlp_in_out, xent, False, fresh, False),
        ("x @ w, donated, region analysis", mlp_in_out, xent, True, fresh, True),
        ("x @ w, loss sum / batch", mlp_in_out, xent_sum, True, fresh, False),
        ("x @ w.T, w (out, in)", mlp_out_in, xent, True, transposed, False),
        ("vmap(w @ x), w (out, in)", mlp_vmap, xent, True, transposed, False),
    ]
    out = [
        loop_variant(name, make_step(f, loss, tx, donate, region), prep(p), tx, x, y)
        for name, f, loss, donate, prep, region in forms
    ]
    for name, key, cond in (
        ("x @ w, + typed key split", True, False),
        ("x @ w, + lax.cond update", False, True),
    ):
        step = make_step_extra(mlp_in_out, tx, key=key, cond=cond)
        out.append(loop_variant(name, step, fresh(p), WithKey(tx), x, y))
    out.append(fnn_variant(wl, ws, x, y))
    eqx_variant = equinox(wl, ws, x, y)
    return out + ([eqx_variant] if eqx_variant else [])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="mlp-big")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-s", type=float, default=0.5)
    args = parser.parse_args(argv)
    print(f"Machine: {machine()}")
    print(f"Command: python benchmarks/forms.py {' '.join(sys.argv[1:])}".rstrip())
    for name in args.workloads.split(","):
        wl = WORKLOADS[name]
        if wl.kind != "mlp":
            raise SystemExit(f"forms.py compares MLP forms; {name} is a {wl.kind}")
        vs = variants(wl)
        stats = [compiled_stats(v) for v in vs]
        losses = [v.run(1) for v in vs]
        n = calibrate(vs, args.round_s)
        per_step, ratio, _ = interleave(vs, args.rounds, n)
        print(f"\n### {name}, batch {wl.batch}: {args.rounds} rounds x {n} steps\n")
        print("| form | ratio | us/step | GFLOP | MB accessed | peak MB | loss |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for v, s, loss in zip(vs, stats, losses):
            gflop, mb = s.get("flops"), s.get("bytes")
            peak = s.get("peak_bytes")
            print(
                f"| {v.name} | {ratio[v.name]:.3f} | {per_step[v.name] * 1e6:,.0f} "
                f"| {fmt(gflop and gflop / 1e9, '.3f')} "
                f"| {fmt(mb and mb / 2**20, '.1f')} "
                f"| {fmt(peak and peak / 2**20, '.1f')} | {loss:.6f} |"
            )


if __name__ == "__main__":
    main()
