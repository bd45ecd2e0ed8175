"""Compile time of ``repeat(block, n)`` against ``serial(block, ..., block)``.

For n = 1, 8, 64 copies of a small MLP block, measures the wall time of
``jax.jit(f).lower(params, x).compile()`` (tracing, lowering and XLA
compilation) after ``jax.clear_caches()``, best of ``--repeats`` runs, and
prints a markdown table, for two functions ``f``:

* the forward pass, ``apply(params, x)``;
* the gradient, ``jax.grad(lambda p: sum(apply(p, x) ** 2))``, where remat
  matters: ``repeat(block, n)`` and ``repeat(block, n, remat=True)``, and
  for contrast ``serial`` of n blocks and of n ``fnn.remat(block)``.

``repeat`` traces the block once inside a ``lax.scan``; ``serial`` traces and
compiles it n times.

    PYTHONPATH=. python benchmarks/repeat_compile.py [--repeats 3] [--ns 1 8 64]

(or ``pip install -e .`` first).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import fnn

FEATURES = 64
BATCH = 32


def block() -> fnn.Layer:
    return fnn.residual(
        fnn.serial(fnn.Dense(FEATURES), fnn.Relu(), fnn.Dense(FEATURES))
    )


def compile_seconds(layer: fnn.Layer, repeats: int, *, grad: bool) -> float:
    _, params = layer.init(jax.random.key(0), (-1, FEATURES))
    x = jnp.ones((BATCH, FEATURES))
    best = float("inf")
    for _ in range(repeats):
        jax.clear_caches()

        def forward(p, v):
            return layer.apply(p, v)

        def loss(p, v):
            return jnp.sum(layer.apply(p, v) ** 2)

        f = jax.grad(loss) if grad else forward
        start = time.perf_counter()
        compiled = jax.jit(f).lower(params, x).compile()
        best = min(best, time.perf_counter() - start)
    jax.block_until_ready(compiled(params, x))  # it runs
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 8, 64])
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, block: "
        f"residual(Dense({FEATURES}), Relu, Dense({FEATURES})), batch {BATCH}"
    )
    print()
    print(
        "| n | forward: repeat (s) | forward: serial (s) | serial / repeat "
        "| grad: repeat (s) | grad: repeat, remat=True (s) | grad: serial (s) "
        "| grad: serial of remat (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.ns:
        fwd_repeat = compile_seconds(fnn.repeat(block(), n), args.repeats, grad=False)
        fwd_serial = compile_seconds(
            fnn.serial(*[block()] * n), args.repeats, grad=False
        )
        grads = [
            compile_seconds(layer, args.repeats, grad=True)
            for layer in (
                fnn.repeat(block(), n),
                fnn.repeat(block(), n, remat=True),
                fnn.serial(*[block()] * n),
                fnn.serial(*[fnn.remat(block())] * n),
            )
        ]
        print(
            f"| {n} | {fwd_repeat:.3f} | {fwd_serial:.3f} "
            f"| {fwd_serial / fwd_repeat:.1f} | "
            + " | ".join(f"{t:.3f}" for t in grads)
            + " |"
        )


if __name__ == "__main__":
    main()
