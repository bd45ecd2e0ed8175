"""Gradient accumulation: compile time, memory and step time against k.

An MLP 784-256-256-10 (ReLU, softmax cross-entropy, Adam), microbatch 32, for
k = 1, 2, 4, 8, 16, 32 microbatches per optimizer step. Variants:

* ``fnn scan``: ``fnn.make_train_step(loss, opt, accum_steps=k)``, one
  ``lax.scan`` over strided microbatches inside one jitted, donating step;
* ``unrolled``: the same sums in a Python loop inside ``jax.jit`` (k copies of
  the forward and backward pass in the program);
* ``MultiSteps``: ``optax.MultiSteps(opt, k)``, k jitted calls per optimizer
  step, each on one microbatch (the accumulator lives in the optimizer state);
* ``full batch``: one ``fnn.make_train_step`` step on the whole batch of
  ``32 k`` rows, the reference for step time.

Compile time is ``lower(...).compile()``; memory is the compiled program's
``memory_analysis().temp_size_in_bytes``; step time is the median over rounds of
the time per optimizer step (after warm-up, ``block_until_ready``), and the
ratio to the full-batch step is the median over rounds of the ratio within a
round. The variants run interleaved in rounds, the order rotating each round,
so load from other processes on the machine hits them alike.

Usage::

    python benchmarks/accumulation.py            # about two minutes on 2 cores
    python benchmarks/accumulation.py --quick    # k = 1, 8 and fewer rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from steps import machine

import fnn

MICRO = 32
SIZES = (784, 256, 256, 10)


def model() -> fnn.Layer:
    return fnn.serial(
        fnn.Dense(SIZES[1]), fnn.Relu(), fnn.Dense(SIZES[2]), fnn.Relu(), fnn.Dense(10)
    )


def make_loss(apply):
    def loss_fn(params, batch, key):
        logits = apply(params, batch["x"])
        ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return jnp.sum(ce), batch["y"].shape[0]

    return loss_fn


def data(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "x": jnp.asarray(rng.normal(size=(n, SIZES[0])), jnp.float32),
        "y": jnp.asarray(rng.integers(0, 10, size=n), jnp.int32),
    }


def compiled_stats(jitted, *args):
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - t0
    return compiled, seconds, compiled.memory_analysis().temp_size_in_bytes


def fnn_variant(loss_fn, params, opt, batch, k):
    """One fnn step of ``accum_steps=k`` (k=1 with the full batch is 'full batch')."""
    step = fnn.make_train_step(loss_fn, opt, accum_steps=k)
    ts = step.init(params, key=jax.random.key(0))
    compiled, secs, temp = compiled_stats(step, ts, batch)
    box = [ts]

    def run():
        box[0], metrics = compiled(box[0], batch)
        metrics["loss"].block_until_ready()

    return run, secs, temp


def unrolled_variant(loss_fn, params, opt, batch, k):
    b = batch["y"].shape[0]

    def step(params, opt_state, batch):
        grads = jax.tree.map(jnp.zeros_like, params)
        weight = 0.0
        for j in range(k):  # microbatch j = rows j::k, as fnn takes them
            mb = jax.tree.map(
                lambda x, j=j: x.reshape(b // k, k, *x.shape[1:])[:, j], batch
            )
            g, w = jax.grad(lambda p, mb=mb: loss_fn(p, mb, None), has_aux=True)(params)
            grads = jax.tree.map(jnp.add, grads, g)
            weight = weight + w
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    state = [jax.tree.map(jnp.copy, params), opt.init(params)]
    compiled, secs, temp = compiled_stats(
        jax.jit(step, donate_argnums=(0, 1)), *state, batch
    )

    def run():
        state[0], state[1] = compiled(state[0], state[1], batch)
        jax.block_until_ready(state[0])

    return run, secs, temp


def multisteps_variant(loss_fn, params, opt, batch, k):
    b = batch["y"].shape[0]
    multi = optax.MultiSteps(opt, every_k_schedule=k)
    micro = [
        jax.tree.map(lambda x, j=j: x.reshape(b // k, k, *x.shape[1:])[:, j], batch)
        for j in range(k)
    ]

    def step(params, opt_state, mb):
        def mean_loss(p):
            loss_sum, w = loss_fn(p, mb, None)
            return loss_sum / w

        grads = jax.grad(mean_loss)(params)
        updates, opt_state = multi.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    state = [jax.tree.map(jnp.copy, params), multi.init(params)]
    compiled, secs, temp = compiled_stats(
        jax.jit(step, donate_argnums=(0, 1)), *state, micro[0]
    )

    def run():
        for mb in micro:
            state[0], state[1] = compiled(state[0], state[1], mb)
        jax.block_until_ready(state[0])

    return run, secs, temp


VARIANTS = {
    "fnn scan": lambda loss, p, opt, batch, k: fnn_variant(loss, p, opt, batch, k),
    "unrolled": unrolled_variant,
    "MultiSteps": multisteps_variant,
    "full batch": lambda loss, p, opt, batch, k: fnn_variant(loss, p, opt, batch, 1),
}


def measure(ks, rounds: int, reps: int) -> list[dict]:
    net = model()
    _, params = net.init(jax.random.key(0), (-1, SIZES[0]))
    loss_fn = make_loss(net.apply)
    opt = optax.adam(1e-3)
    rows = []
    for k in ks:
        batch = data(MICRO * k)
        built = {
            name: make(loss_fn, params, opt, batch, k)
            for name, make in VARIANTS.items()
        }
        times = {name: [] for name in built}
        for run, _, _ in built.values():
            run()  # warm-up
        names = list(built)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                run = built[name][0]
                t0 = time.perf_counter()
                for _ in range(reps):
                    run()
                times[name].append((time.perf_counter() - t0) / reps)
        full = times["full batch"]
        for name, (_, secs, temp) in built.items():
            ratios = [t / f for t, f in zip(times[name], full)]  # same round
            rows.append(
                {
                    "k": k,
                    "variant": name,
                    "compile_s": secs,
                    "temp_bytes": temp,
                    "step_ms": 1e3 * statistics.median(times[name]),
                    "ratio": statistics.median(ratios),
                }
            )
        print(f"k={k} done", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| k | variant | compile (s) | temp (KiB) | step (ms) | step / full batch |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['variant']} | {r['compile_s']:.2f} | "
            f"{r['temp_bytes'] / 1024:.0f} | {r['step_ms']:.2f} | "
            f"{r['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k = 1, 8; 3 rounds")
    args = parser.parse_args()
    ks = (1, 8) if args.quick else (1, 2, 4, 8, 16, 32)
    rounds, reps = (3, 2) if args.quick else (11, 3)
    rows = measure(ks, rounds, reps)
    print(f"Machine: {machine()}; microbatch {MICRO}, MLP {SIZES}, Adam.")
    print(f"Median of {rounds} interleaved rounds of {reps} optimizer steps each.\n")
    print(table(rows))


if __name__ == "__main__":
    main()
