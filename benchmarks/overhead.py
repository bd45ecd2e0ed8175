"""Where does ``fnn.make_train_step``'s time go on a tiny step? One thing at a time.

The tiny MLP of ``steps.py`` (64-32-32-10, batch 32, Adam), whose compute is a
few microseconds, so what is left is the cost of a call (dispatch: one buffer
per pytree leaf in and out) and, inside a ``lax.scan`` of ``K`` steps, the cost
of each step's kernels. Variants of the same step written out with an unpacked
state (one buffer per leaf) and default compiler options, each dropping or
changing one thing relative to the full set (``step`` counter, typed key
folded in per step, metrics ``loss``/``weight``/``grad_norm`` as a dict,
donated state):

* ``- grad_norm``: no gradient norm metric;
* ``metrics stacked``: the metrics as one ``(3,)`` array instead of a dict;
* ``raw key``: the key held as ``uint32[2]`` key data, not a typed key;
* ``- step, - key``: neither counter nor key in the state;
* ``not donated``: no ``donate_argnums``;
* ``minimal``: all of the above dropped (the hand-written step's buffers, the
  loss still a sum divided by a weight).

and, as references, ``fnn.make_train_step`` with and without ``grad_norm``,
the hand-written JAX step of ``steps.py`` (``K = 1``, the ratio's
denominator) or a hand-written ``lax.scan`` of it (``K > 1``; then also the
scan with SGD instead of Adam, and of the forward pass only). Interleaved
rounds, rotating order, medians of per-round ratios; the machine is shared,
so read ratios, not single times.

Usage::

    python benchmarks/overhead.py                 # K = 1 and K = 100
    python benchmarks/overhead.py --k 1,10,100 --rounds 9
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import optax
from _workloads import (
    LR,
    WORKLOADS,
    Variant,
    batch,
    fnn_loss,
    fnn_params,
    hand_forward,
    hand_params,
    weights,
    xent,
)
from steps import calibrate, compiled_stats, fmt, interleave, machine

import fnn
from fnn.training.accumulate import accumulate_gradients, safe_divide

FULL = {"grad_norm": True, "stacked": False, "key": "typed", "donate": True}
DROPS = {
    "fnn-like step (all of fnn's parts)": {},
    "- grad_norm": {"grad_norm": False},
    "metrics stacked": {"stacked": True},
    "raw key": {"key": "raw"},
    "- step, - key": {"key": None},
    "not donated": {"donate": False},
    "minimal": {"grad_norm": False, "stacked": True, "key": None},
}


def fnn_like(loss_fn, tx, params, k, *, grad_norm, stacked, key, donate):
    """A step like ``fnn.make_train_step``'s, with parts switched off.

    State: ``(params, opt_state)``, plus ``(step, key)`` unless ``key`` is None.
    """

    def one(carry, data):
        if key is None:
            p, o = carry
            step_key = None
        else:
            p, o, t, kk = carry
            base = kk if key == "typed" else jax.random.wrap_key_data(kk)
            step_key = jax.random.fold_in(base, t)
        sums = accumulate_gradients(loss_fn, p, {}, data, step_key)
        w = sums.weight
        grads = jax.tree.map(lambda g: safe_divide(g, w), sums.grad_sum)
        updates, o = tx.update(grads, o, p)
        p = optax.apply_updates(p, updates)
        metrics = {"loss": safe_divide(sums.loss_sum, w), "weight": w}
        if grad_norm:
            metrics["grad_norm"] = optax.tree.norm(grads)
        if stacked:
            metrics = jnp.stack(list(metrics.values()))
        carry = (p, o) if key is None else (p, o, t + 1, kk)
        return carry, metrics

    def step(carry, data):
        return one(carry, data) if k == 1 else jax.lax.scan(one, carry, data)

    state = (params, tx.init(params))
    if key == "typed":
        state += (jnp.zeros((), jnp.int32), jax.random.key(0))
    elif key == "raw":
        state += (jnp.zeros((), jnp.int32), jax.random.key_data(jax.random.key(0)))
    return jax.jit(step, donate_argnums=(0,) if donate else ()), state


def first_loss(metrics) -> float:
    if isinstance(metrics, dict):
        metrics = metrics["loss"]
    return float(jnp.ravel(metrics)[0])


def state_variant(name, step, state, data, k) -> Variant:
    box = [state]

    def run(n):
        s = box[0]
        for _ in range(max(1, n // k)):
            s, metrics = step(s, data)
        box[0] = s
        return first_loss(metrics)

    return Variant(name, run, lambda: step.lower(box[0], data))


def hand_scan_variant(wl, ws, data, k, part: str = "adam") -> Variant:
    """The hand-written step of ``steps.py``, ``k`` of them in one ``lax.scan``
    when ``k > 1``; state ``(params, opt_state)``, output the losses. ``part``
    "sgd" updates with SGD instead of Adam, "forward" computes the loss only
    (the parts of the step's cost, for the scan)."""
    tx, forward = (optax.sgd if part == "sgd" else optax.adam)(LR), hand_forward(wl)

    def one(carry, xy):
        params, opt_state = carry
        x, y = xy
        if part == "forward":
            return carry, xent(forward(params, x), y)
        loss, grads = jax.value_and_grad(lambda p: xent(forward(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def step(carry, data):
        return one(carry, data) if k == 1 else jax.lax.scan(one, carry, data)

    params = hand_params(wl, ws)
    name = "JAX (hand-written)" + (f", lax.scan of {k}" if k > 1 else "")
    name += "" if part == "adam" else f", {part} only" if part == "forward" else ", SGD"
    step = jax.jit(step, donate_argnums=(0,))
    return state_variant(name, step, (params, tx.init(params)), data, k)


def variants(k: int) -> list[Variant]:
    wl = WORKLOADS["mlp-tiny"]
    ws = weights(wl)
    x, y = batch(wl)
    data = (jnp.asarray(x), jnp.asarray(y))
    if k > 1:
        data = jax.tree.map(lambda a: jnp.stack([a] * k), data)
    out = [hand_scan_variant(wl, ws, data, k)]
    model, params = fnn_params(wl, ws)
    tx, loss_fn = optax.adam(LR), fnn_loss(model)
    fresh = lambda: jax.tree.map(jnp.copy, params)  # noqa: E731
    for grad_norm in (True, False):
        step = fnn.make_train_step(loss_fn, tx, steps_per_call=k, grad_norm=grad_norm)
        ts = step.init(fresh(), key=jax.random.key(0))
        name = "fnn.make_train_step" + ("(grad_norm=True)" if grad_norm else "")
        out.append(state_variant(name, step, ts, data, k))
    for name, drop in DROPS.items():
        step, state = fnn_like(loss_fn, tx, fresh(), k, **{**FULL, **drop})
        out.append(state_variant(name, step, state, data, k))
    if k > 1:
        out += [hand_scan_variant(wl, ws, data, k, p) for p in ("sgd", "forward")]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", default="1,100", help="steps per call, e.g. 1,100")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-s", type=float, default=0.3)
    args = parser.parse_args(argv)
    print(f"Machine: {machine()}")
    print(f"Command: python benchmarks/overhead.py {' '.join(sys.argv[1:])}".rstrip())
    for k in (int(s) for s in args.k.split(",")):
        vs = variants(k)
        stats = [compiled_stats(v) for v in vs]
        losses = [v.run(k) for v in vs]
        n = calibrate(vs, args.round_s) * k  # run(1) is one call of k steps
        per_step, ratio, _ = interleave(vs, args.rounds, n)
        print(f"\n### steps per call K = {k}: {args.rounds} rounds x {n} steps\n")
        print("| variant | ratio | us/step | HLO instrs | first loss |")
        print("|---|---:|---:|---:|---:|")
        for v, s, loss in zip(vs, stats, losses):
            print(
                f"| {v.name} | {ratio[v.name]:.2f} | {per_step[v.name] * 1e6:,.1f} "
                f"| {fmt(s.get('hlo'), 'd')} | {loss:.6f} |"
            )


if __name__ == "__main__":
    main()
