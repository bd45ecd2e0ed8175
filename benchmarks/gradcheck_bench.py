"""fnn.check_grads against jax.test_util.check_grads (and torch.autograd.gradcheck).

Two tables, printed as markdown:

1. run time on ``sum(tanh(x) ** 2)`` for a few input sizes (first call, which
   includes compilation, and the median of later calls);
2. which planted gradient bugs each checker catches, and whether it raises a false
   alarm on correct but ill-conditioned functions. jax's checker is run with
   float32 inputs (as a model holds them) and with float64 inputs; on a
   ``custom_vjp`` its default modes raise a ``TypeError``, so it is given
   ``modes=["rev"]`` there.

torch is optional: its columns are skipped when it is not installed.

Run: ``python benchmarks/gradcheck_bench.py``.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import test_util

from fnn.gradcheck import GradientCheckError, check_grads

try:
    import torch
except ImportError:  # torch is optional
    torch = None

SIZES = (10, 1000, 10_000)
REPEATS = 3


def vjp_fn(fun, rule):
    wrapped = jax.custom_vjp(fun)
    wrapped.defvjp(lambda x: (fun(x), x), lambda x, g: (rule(x, g),))
    return wrapped


def _centre(x):
    return x - jnp.mean(x, axis=1, keepdims=True)


def _layer_norm(x):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(jnp.var(x, axis=-1, keepdims=True) + 1e-5)


def _bf16_exp():
    exp = jax.custom_vjp(jnp.exp)
    exp.defvjp(
        lambda x: (jnp.exp(x), jnp.exp(x).astype(jnp.bfloat16)), lambda y, g: (g * y,)
    )
    return exp


M = np.random.default_rng(1).standard_normal((4, 4))
R = np.random.default_rng(2)

# name -> (function, input, has a bug)
CASES = {
    "wrong sign": (
        vjp_fn(jnp.sin, lambda x, g: -g * jnp.cos(x)),
        R.standard_normal(5),
        True,
    ),
    "0.1% scale": (
        vjp_fn(jnp.sin, lambda x, g: 1.001 * g * jnp.cos(x)),
        R.standard_normal(5),
        True,
    ),
    "one element of 1000": (
        vjp_fn(jnp.sin, lambda x, g: (g * jnp.cos(x)).at[417].multiply(1.01)),
        R.standard_normal(1000),
        True,
    ),
    "negative inputs only": (
        vjp_fn(jnp.sin, lambda x, g: g * jnp.cos(x) * jnp.where(x < 0, 1.001, 1.0)),
        R.standard_normal(6),
        True,
    ),
    "transposed Jacobian": (
        vjp_fn(lambda x: M @ x, lambda x, g: M @ g),
        R.standard_normal(4),
        True,
    ),
    "missing product-rule term": (
        vjp_fn(lambda x: x * jnp.sin(x), lambda x, g: g * x * jnp.cos(x)),
        R.standard_normal(5),
        True,
    ),
    "reduction over wrong axis": (
        vjp_fn(_centre, lambda x, g: g - jnp.mean(g, axis=0, keepdims=True)),
        R.standard_normal((3, 3)),
        True,
    ),
    "tiny gradient (softplus at -30)": (
        vjp_fn(jax.nn.softplus, lambda x, g: g * (1 - jax.nn.sigmoid(-x))),
        -30 + R.standard_normal(8),
        True,
    ),
    "bf16 residual": (_bf16_exp(), R.standard_normal(5), True),
    "ok: logsumexp near 50": (jax.nn.logsumexp, 50 + R.standard_normal(8), False),
    "ok: softmax": (jax.nn.softmax, 3 * R.standard_normal(6), False),
    "ok: layer norm, std 0.01": (
        _layer_norm,
        1 + 0.01 * R.standard_normal((2, 16)),
        False,
    ),
    "ok: exp near 10": (jnp.exp, 10 + R.standard_normal(5), False),
    "ok: 1/x near 1e-3": (
        lambda x: 1 / x,
        1e-3 * (1.5 + 0.3 * R.standard_normal(5)),
        False,
    ),
}


def fnn_check(f, x):
    try:
        check_grads(f, (x,))
        return False
    except GradientCheckError:
        return True


def jax_check(f, x, modes):
    try:
        test_util.check_grads(f, (x,), order=1, modes=modes)
        return False
    except AssertionError:
        return True
    except TypeError:
        return "TypeError"


def is_custom_vjp(f):
    return isinstance(f, jax.custom_vjp)


def detection_rows():
    rows = []
    for name, (f, x, has_bug) in CASES.items():
        modes = ["rev"] if is_custom_vjp(f) else ["fwd", "rev"]
        got = {
            "fnn (f32 in)": fnn_check(f, x.astype(np.float32)),
            "jax (f32)": jax_check(f, x.astype(np.float32), modes),
        }
        with jax.enable_x64(True):
            got["jax (f64)"] = jax_check(f, x, modes)
        rows.append((name, has_bug, got))
    return rows


def verdict(has_bug, flagged):
    if flagged == "TypeError":
        return "TypeError"
    if has_bug:
        return "caught" if flagged else "MISSED"
    return "FALSE ALARM" if flagged else "ok"


def timed(fn):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    later = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        later.append(time.perf_counter() - t0)
    return first, statistics.median(later)


def timing_rows(sizes):
    def f(x):
        return jnp.sum(jnp.tanh(x) ** 2)

    rows = []
    for n in sizes:
        x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        ours = timed(lambda x=x: check_grads(f, (x,)))
        # jax's checker is timed on float64 input: on float32 it raises false alarms
        # (see the second table), which would end the run.
        with jax.enable_x64(True):
            x64 = x.astype(np.float64)
            theirs = timed(
                lambda x=x64: test_util.check_grads(
                    f, (x,), order=1, modes=["fwd", "rev"]
                )
            )
        row = [n, *ours, *theirs]
        if torch is not None:
            xt = torch.tensor(x.astype(np.float64), requires_grad=True)
            row.extend(
                timed(
                    lambda xt=xt: torch.autograd.gradcheck(
                        lambda v: (torch.tanh(v) ** 2).sum(), (xt,)
                    )
                )
            )
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes only")
    args = parser.parse_args()
    sizes = SIZES[:2] if args.quick else SIZES

    print("## Run time, f(x) = sum(tanh(x)**2), float32 input, seconds\n")
    head = "| n | fnn first | fnn later | jax (f64) first | jax (f64) later |"
    if torch is not None:
        head += " torch first | torch later |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in timing_rows(sizes):
        print(f"| {row[0]} | " + " | ".join(f"{v:.3f}" for v in row[1:]) + " |")

    print("\n## Planted bugs caught, correct functions passed\n")
    rows = detection_rows()
    tools = list(rows[0][2])
    print("| case | " + " | ".join(tools) + " |")
    print("|---|" + "---|" * len(tools))
    for name, has_bug, got in rows:
        print(
            f"| {name} | " + " | ".join(verdict(has_bug, got[t]) for t in tools) + " |"
        )
    score = []
    for t in tools:
        right = sum(verdict(b, g[t]) in ("caught", "ok") for _, b, g in rows)
        score.append(f"{right}/{len(rows)}")
    print("| **right answers** | " + " | ".join(score) + " |")
    print(f"\nfnn right answers: {score[0]}")


if __name__ == "__main__":
    main()
