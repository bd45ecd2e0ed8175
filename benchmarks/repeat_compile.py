"""Compile time of ``repeat(block, n)`` against ``serial(block, ..., block)``.

For n = 1, 8, 64 copies of a small MLP block, measures the wall time of
``jax.jit(apply).lower(params, x).compile()`` (tracing, lowering and XLA
compilation) after ``jax.clear_caches()``, best of ``--repeats`` runs, and
prints a markdown table. ``repeat`` traces the block once inside a
``lax.scan``; ``serial`` traces and compiles it n times.

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


def compile_seconds(layer: fnn.Layer, repeats: int) -> float:
    _, params = layer.init(jax.random.key(0), (-1, FEATURES))
    x = jnp.ones((BATCH, FEATURES))
    best = float("inf")
    for _ in range(repeats):
        jax.clear_caches()

        def f(p, v):
            return layer.apply(p, v)

        start = time.perf_counter()
        compiled = jax.jit(f).lower(params, x).compile()
        best = min(best, time.perf_counter() - start)
    compiled(params, x).block_until_ready()  # it runs
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
    print("| n | repeat (s) | serial (s) | serial / repeat |")
    print("|---:|---:|---:|---:|")
    for n in args.ns:
        t_repeat = compile_seconds(fnn.repeat(block(), n), args.repeats)
        t_serial = compile_seconds(fnn.serial(*[block()] * n), args.repeats)
        print(f"| {n} | {t_repeat:.3f} | {t_serial:.3f} | {t_serial / t_repeat:.1f} |")


if __name__ == "__main__":
    main()
