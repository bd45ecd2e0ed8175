"""The matmuls of each dense layer of the ``steps.py`` workloads, timed alone in
both weight layouts.

For a layer with input ``x`` of shape ``(batch, in)`` and output gradient
``g`` of shape ``(batch, out)``, a training step runs three matmuls: the
forward ``y = x W``, the input gradient ``g W^T`` and the weight gradient
``x^T g``. With ``W`` stored ``(in, out)`` XLA computes the weight gradient as
``dot(x, g)``, an ``(in, out)`` result; stored ``(out, in)``, as ``dot(g, x)``,
an ``(out, in)`` result. Both contract the batch axis, the leading axis of
both operands, which XLA:CPU leaves to its own dot (Eigen) rather than
YNNPACK. Each matmul is jitted alone and timed in both layouts, alternating,
and the table gives the medians and their ratio (``(out, in)`` over ``(in,
out)``). The input gradient of the first layer is not needed and not timed.

Usage::

    python benchmarks/dense_kernels.py --workloads mlp-big,mlp-mnist,char
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
from _workloads import (
    CHAR_CONTEXT,
    CHAR_EMBED,
    CHAR_HIDDEN,
    CHAR_VOCAB,
    CNN_CHANNELS,
    CNN_CLASSES,
    WORKLOADS,
)
from jax import lax


def dense_sizes(wl) -> list[tuple[int, int]]:
    """``(in, out)`` of each dense layer of the workload."""
    if wl.kind == "mlp":
        return list(zip(wl.sizes[:-1], wl.sizes[1:]))
    if wl.kind == "cnn":
        return [(CNN_CHANNELS[-1], CNN_CLASSES)]
    return [(CHAR_CONTEXT * CHAR_EMBED, CHAR_HIDDEN), (CHAR_HIDDEN, CHAR_VOCAB)]


def contract(a, b, axis_a: int, axis_b: int):
    return lax.dot_general(a, b, (((axis_a,), (axis_b,)), ((), ())))


def kernels(batch: int, n_in: int, n_out: int, first: bool):
    """Per matmul: ``(name, (io_fn, io_args), (oi_fn, oi_args))``."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, n_in)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(batch, n_out)), jnp.float32)
    w_io = jnp.asarray(rng.normal(size=(n_in, n_out)), jnp.float32)
    w_oi = jnp.asarray(np.ascontiguousarray(np.asarray(w_io).T))
    jit = jax.jit
    out = [
        (
            "forward x W",
            (jit(lambda x, w: contract(x, w, 1, 0)), (x, w_io)),
            (jit(lambda x, w: contract(x, w, 1, 1)), (x, w_oi)),
        ),
        (
            "input gradient g W^T",
            (jit(lambda g, w: contract(g, w, 1, 1)), (g, w_io)),
            (jit(lambda g, w: contract(g, w, 1, 0)), (g, w_oi)),
        ),
        (
            "weight gradient x^T g",
            (jit(lambda x, g: contract(x, g, 0, 0)), (x, g)),
            (jit(lambda x, g: contract(g, x, 0, 0)), (x, g)),
        ),
    ]
    return out[:1] + out[2:] if first else out


def timed(pair, rounds: int, calls: int) -> tuple[float, float, float]:
    """Median seconds per call of each of the two, and the median per-round
    ratio of the second to the first; the order alternates each round."""
    for f, args in pair:
        f(*args).block_until_ready()
    times = ([], [])
    for r in range(rounds):
        for k in (0, 1) if r % 2 == 0 else (1, 0):
            f, args = pair[k]
            t0 = time.perf_counter()
            for _ in range(calls):
                f(*args).block_until_ready()
            times[k].append((time.perf_counter() - t0) / calls)
    med = statistics.median
    return med(times[0]), med(times[1]), med(b / a for a, b in zip(*times))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="mlp-tiny,mlp-mnist,mlp-big,cnn,char")
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args(argv)
    print(f"Command: python benchmarks/dense_kernels.py {' '.join(sys.argv[1:])}")
    load = os.getloadavg()[0]
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load average {load:.2f}")
    print("\n| workload | layer | matmul | (in, out) us | (out, in) us | ratio |")
    print("|---|---|---|---:|---:|---:|")
    for name in args.workloads.split(","):
        wl = WORKLOADS[name]
        total = [0.0, 0.0]
        for i, (n_in, n_out) in enumerate(dense_sizes(wl)):
            for what, io, oi in kernels(wl.batch, n_in, n_out, first=i == 0):
                calls = max(1, round(2e7 / (2 * wl.batch * n_in * n_out)))
                t_io, t_oi, ratio = timed((io, oi), args.rounds, calls)
                total[0] += t_io
                total[1] += t_oi
                print(
                    f"| {name} | {n_in}->{n_out} | {what} | {t_io * 1e6:,.1f} "
                    f"| {t_oi * 1e6:,.1f} | {ratio:.2f} |"
                )
        print(
            f"| {name} | all | sum | {total[0] * 1e6:,.1f} | {total[1] * 1e6:,.1f} "
            f"| {total[1] / total[0]:.2f} |"
        )


if __name__ == "__main__":
    main()
