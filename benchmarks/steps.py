"""Times one training step of fnn, hand-written JAX and the peer libraries.

Same architecture, same initial weights, same batch, Adam at 1e-3, float32.
All variants run in ONE process, in interleaved rounds (the order rotates each
round); the table reports the median over rounds of each variant's time per
step divided by hand-written JAX's time in the same round (JAX = 1.00), so
load from other processes on the machine cancels out as far as it can.

Usage::

    python benchmarks/steps.py                      # everything, ~10 minutes
    python benchmarks/steps.py --quick              # fewer, shorter rounds
    python benchmarks/steps.py --workloads mlp-tiny,char --no-peers

Also reported: achieved GFLOP/s (FLOPs from ``compiled.cost_analysis()``)
against this machine's float32 matmul peak (a jitted 2048^3 ``jnp.matmul``,
timed once in every round so that it sees the same load as the steps);
compile time; peak memory from ``compiled.memory_analysis()``; fnn's eager
``apply`` and ``init`` cost against hand-written JAX; and microseconds per step
of ``fnn.make_train_step(..., steps_per_call=K)`` on the tiny MLP.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
from _peers import PEERS
from _workloads import (
    WORKLOADS,
    Variant,
    batch,
    fnn_params,
    fnn_variant,
    hand_forward,
    hand_params,
    hand_variant,
    input_shape,
    train_step_variant,
    weights,
)
from jax.nn import initializers

STEPS_PER_CALL = (10, 100)  # K for make_train_step(..., steps_per_call=K)
N_OURS = 4  # hand-written JAX, fnn (apply), make_train_step with/without grad_norm
LOSS_ATOL = 1e-4  # first-step losses of all variants must agree this closely
# one instruction of the optimized HLO text, e.g. "  %add.0 = f32[8,5]{1,0} add(..."
HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = .*?\s[a-z][\w\-]*\(", re.M)


def clock(fn, n: int = 1) -> float:
    """Seconds per call of ``fn`` (which must block), over ``n`` calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if "model name" in ln)
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {jax.devices()[0].platform}, "
        f"jax {jax.__version__}, Python {platform.python_version()}"
    )


MATMUL_N = 2048


def matmul_probe(n: int = MATMUL_N):
    """A blocking call of a jitted float32 ``n x n @ n x n`` matmul, and its FLOPs.

    It runs once in every round, so "% of peak" compares each step with the
    matmul under the same load from other processes.
    """
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, a).block_until_ready()
    return lambda: f(a, a).block_until_ready(), 2 * n**3


def compiled_stats(v: Variant) -> dict:
    """Compile time, FLOPs per step and peak memory, where ``v`` can be lowered."""
    if v.lower is None:
        return {}
    try:
        t0 = time.perf_counter()
        compiled = v.lower().compile()
        seconds = time.perf_counter() - t0
        compiled = getattr(compiled, "compiled", compiled)  # Equinox's wrapper
    except Exception as e:  # a peer's wrapper that cannot be lowered
        print(f"  ({v.name}: no compiled stats: {type(e).__name__})", file=sys.stderr)
        return {}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes
        )
    return {
        "compile_s": seconds,
        "flops": cost.get("flops"),
        "bytes": cost.get("bytes accessed"),
        "hlo": len(HLO_INSTRUCTION.findall(compiled.as_text())),
        "peak_bytes": peak,
    }


def interleave(variants, rounds: int, n: int, probe=None):
    """Runs ``rounds`` rounds of ``n`` steps of each variant, in rotating order.

    Returns three dicts over variant names: the median seconds per step, the
    median over rounds of the time per step divided by ``variants[0]``'s, and
    (with a ``probe``, timed once per round) the median of the per-round
    ratio ``time of probe / time per step``.
    """
    times = {v.name: [] for v in variants}
    ratios = {v.name: [] for v in variants}
    vs_probe = {v.name: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        this = {v.name: clock(lambda v=v: v.run(n)) / n for v in order}
        t_probe = clock(probe) if probe else None
        for name, t in this.items():
            times[name].append(t)
            ratios[name].append(t / this[variants[0].name])
            vs_probe[name].append(t_probe / t if probe else None)
    med = statistics.median
    return tuple(
        {k: med(v) if v and v[0] is not None else None for k, v in d.items()}
        for d in (times, ratios, vs_probe)
    )


def calibrate(variants, target_s: float) -> int:
    """Steps per round so that the slowest variant's round takes ~target_s."""
    worst = max(clock(lambda v=v: v.run(1)) for v in variants)
    return max(1, round(target_s / worst))


def fmt(x, spec: str, missing: str = "n/a") -> str:
    return missing if x is None else format(x, spec)


def bench_workload(wl, args, probe) -> None:
    ws = weights(wl)
    x, y = batch(wl)
    variants = [
        hand_variant(wl, ws, x, y),
        fnn_variant(wl, ws, x, y),
        train_step_variant(wl, ws, x, y),
        train_step_variant(wl, ws, x, y, grad_norm=True),
    ]
    if not args.no_peers:
        variants += [v for p in PEERS if (v := p(wl, ws, x, y)) is not None]
    multi = []  # make_train_step(steps_per_call=K), in the same rounds
    if wl.name == "mlp-tiny" and not args.no_dispatch:
        multi = [
            train_step_variant(wl, ws, x, y, k, grad_norm)
            for k in STEPS_PER_CALL
            for grad_norm in (True, False)
        ]
    stats = {v.name: compiled_stats(v) for v in variants}
    losses = {v.name: v.run(1) for v in variants + multi}  # also compiles
    ref = losses[variants[0].name]
    for name, loss in losses.items():
        if abs(loss - ref) > LOSS_ATOL:
            print(f"  WARNING: {name} first-step loss {loss} != {ref}", file=sys.stderr)
    n = calibrate(variants, args.round_s)
    if multi:  # each K-step call must be whole
        n = -(-n // max(STEPS_PER_CALL)) * max(STEPS_PER_CALL)
    per_step, ratio, vs_probe = interleave(variants + multi, args.rounds, n, probe[0])
    flops = stats[variants[0].name].get("flops")
    print(f"\n### {wl.name}: {wl.kind} {wl.sizes or ''} batch {wl.batch} {wl.note}")
    print(f"\n{args.rounds} rounds x {n} steps; first-step loss {ref:.6f}\n")
    print(
        "| variant | ratio to JAX | us/step | GFLOP/s | % of peak | compile s |"
        " MB accessed | peak MB | HLO instrs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        s, t = stats[v.name], per_step[v.name]
        gf = flops / t / 1e9 if flops else None
        of_peak = 100 * flops / probe[1] * vs_probe[v.name] if flops else None
        mb = s.get("peak_bytes")
        print(
            f"| {v.name} | {ratio[v.name]:.2f} | {t * 1e6:,.0f} | {fmt(gf, '.1f')} | "
            f"{fmt(of_peak, '.0f')} | "
            f"{fmt(s.get('compile_s'), '.2f')} | "
            f"{fmt(s.get('bytes') and s['bytes'] / 2**20, '.2f')} | "
            f"{fmt(mb and mb / 2**20, '.2f')} | {fmt(s.get('hlo'), 'd')} |"
        )
    if multi:
        dispatch(variants, multi, per_step, ratio)


def dispatch(variants, multi, per_step, ratio) -> None:
    """µs per step of make_train_step with steps_per_call=K, from the same rounds."""
    peers = [v.name for v in variants[N_OURS:]]
    fastest = min(peers, key=lambda k: ratio[k]) if peers else None
    print(f"\n#### steps per call (fastest peer by median ratio: {fastest})\n")
    print("| variant | ratio to JAX | us/step | fastest peer ratio / this ratio |")
    print("|---|---:|---:|---:|")
    for name in [v.name for v in variants[:N_OURS] + multi] + peers:
        speedup = fmt(fastest and ratio[fastest] / ratio[name], ".1f")
        print(
            f"| {name} | {ratio[name]:.2f} | {per_step[name] * 1e6:,.1f} | {speedup} |"
        )


def eager_costs(args) -> None:
    """fnn's eager ``apply`` and ``init`` against the same code written by hand."""
    wl = WORKLOADS["mlp-tiny"]
    ws = weights(wl)
    model, params = fnn_params(wl, ws)
    hparams = hand_params(wl, ws)
    forward = hand_forward(wl)
    x = jnp.asarray(batch(wl)[0])
    lecun = initializers.lecun_normal()

    def hand_init(key):
        keys = jax.random.split(key, len(wl.sizes) - 1)
        return [
            {"w": lecun(k, (a, b)), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, wl.sizes[:-1], wl.sizes[1:])
        ]

    key = jax.random.key(0)
    pairs = {
        "apply": (
            lambda: model.apply(params, x).block_until_ready(),
            lambda: forward(hparams, x).block_until_ready(),
        ),
        "init": (
            lambda: jax.block_until_ready(model.init(key, input_shape(wl))),
            lambda: jax.block_until_ready(hand_init(key)),
        ),
    }
    print("\n### Outside jit (eager), tiny MLP 64-32-32-10, batch 32\n")
    print("| call | fnn us | hand-written us | ratio |")
    print("|---|---:|---:|---:|")
    for what, (ours, theirs) in pairs.items():
        ours(), theirs()
        t_o, t_h, r = [], [], []
        for _ in range(args.rounds):
            a, b = clock(ours, 20), clock(theirs, 20)
            t_o.append(a), t_h.append(b), r.append(a / b)
        med = statistics.median
        print(
            f"| {what} | {med(t_o) * 1e6:,.0f} | {med(t_h) * 1e6:,.0f} | {med(r):.2f} |"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 short rounds")
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated names"
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-dispatch", action="store_true")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 9)
    args.round_s = 0.05 if args.quick else 0.25
    names = [n for n in args.workloads.split(",") if n]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {sorted(WORKLOADS)}")
    print(f"Machine: {machine()}")
    print(f"Command: python benchmarks/steps.py {' '.join(sys.argv[1:])}".rstrip())
    probe = matmul_probe()
    t = statistics.median(clock(probe[0]) for _ in range(3))
    print(
        f"float32 matmul (jitted {MATMUL_N}^3 jnp.matmul): {probe[1] / t / 1e9:.1f} "
        "GFLOP/s now; '% of peak' is against this matmul timed in every round"
    )
    np.set_printoptions(precision=4)
    for name in names:
        bench_workload(WORKLOADS[name], args, probe)
    eager_costs(args)


if __name__ == "__main__":
    main()
