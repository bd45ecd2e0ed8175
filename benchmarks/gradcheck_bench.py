"""fnn.check_grads against jax.test_util.check_grads (and torch.autograd.gradcheck).

Four tables, printed as markdown:

1. seconds per check of every layer of the library (``fnn.check_layer``), against
   ``jax.test_util.check_grads`` on the same scalar (the layer's float64 output
   dotted with a fixed random projection, as a function of params and input);
2. seconds per check of a 2-D convolution with plain autodiff (NCHW input
   2x3x8x8, OIHW kernel 4x3x3x3, VALID), against jax's checker and torch's;
3. run time on ``sum(tanh(x) ** 2)`` for a few input sizes;
4. which planted gradient bugs each checker catches, and whether it raises a false
   alarm on correct but ill-conditioned functions. jax's checker is run with
   float32 inputs (as a model holds them) and with float64 inputs; on a
   ``custom_vjp`` its default modes raise a ``TypeError``, so it is given
   ``modes=["rev"]`` there.

Times are seconds: "first" is the first check of that function in the process
(it includes compilation), "later" the median of three more checks. jax's
checker runs in float64, its default ``modes=["fwd", "rev"]``, ``order=1``.

torch is optional: its columns are skipped when it is not installed.

Run: ``python benchmarks/gradcheck_bench.py`` (``--tables layers,conv`` for some).
"""

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, test_util

import fnn
from fnn.gradcheck import GradientCheckError, check_grads, check_layer

try:
    import torch
except ImportError:  # torch is optional
    torch = None

SIZES = (10, 1000, 10_000)
REPEATS = 3
TABLES = ("layers", "conv", "tanh", "bugs")


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


# name -> (layer, input shape, check_layer keywords)
LAYERS = {
    "Dense(8)": (fnn.Dense(8), (-1, 4), {}),
    "Embed(10, 4) (params only)": (
        fnn.Embed(10, 4),
        (-1, 3),
        {"input_dtype": jnp.int32},
    ),
    "Conv(4, (3,)) 1-D": (fnn.Conv(4, (3,)), (-1, 8, 3), {}),
    "Conv(4, (3, 3)) 2-D": (fnn.Conv(4, (3, 3)), (-1, 6, 6, 3), {}),
    "ConvTranspose(4, (3, 3), strides=2)": (
        fnn.ConvTranspose(4, (3, 3), strides=2),
        (-1, 4, 4, 3),
        {},
    ),
    "MaxPool((2, 2))": (fnn.MaxPool((2, 2)), (-1, 6, 6, 3), {}),
    "AvgPool((2, 2))": (fnn.AvgPool((2, 2)), (-1, 6, 6, 3), {}),
    "LayerNorm()": (fnn.LayerNorm(), (-1, 8), {}),
    "RMSNorm()": (fnn.RMSNorm(), (-1, 8), {}),
    "BatchNorm() via with_state, train": (
        fnn.with_state(fnn.BatchNorm()),
        (-1, 8),
        {"apply_kwargs": {"train": True}},
    ),
    "MultiHeadAttention(2, qkv_features=8)": (
        fnn.MultiHeadAttention(num_heads=2, qkv_features=8),
        (-1, 4, 8),
        {},
    ),
    "RNN(GRUCell(4))": (fnn.RNN(fnn.GRUCell(4)), (-1, 5, 3), {}),
    "RNN(LSTMCell(4))": (fnn.RNN(fnn.LSTMCell(4)), (-1, 5, 3), {}),
    **{
        f"{name}()": (getattr(fnn, name)(), (-1, 6), {})
        for name in (
            "Relu",
            "LeakyRelu",
            "Elu",
            "Gelu",
            "Swish",
            "Sigmoid",
            "Tanh",
            "HardTanh",
            "Softplus",
            "Softmax",
            "LogSoftmax",
        )
    },
}


def _jax_layer_check(layer, shape, kw):
    """jax's checker on the scalar check_layer checks: a function to time."""
    init, apply = layer
    made = init(jax.random.key(0), shape)
    params, state = made[1], made[2] if len(made) == 3 else None
    concrete = tuple(2 if d == -1 else d for d in shape)
    rng = np.random.default_rng(0)
    integer = np.issubdtype(np.dtype(kw.get("input_dtype", np.float32)), np.integer)
    if integer:
        x = rng.integers(0, 2, size=concrete).astype(np.int32)
    else:
        x = rng.standard_normal(concrete)
    kwargs = kw.get("apply_kwargs", {})

    def output(p, v):
        if state is not None:
            return apply(p, state, v, **kwargs)[0]
        return apply(p, v, **kwargs)

    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        proj = jnp.asarray(rng.standard_normal(jax.eval_shape(output, p64, x).shape))

    def loss(p, v):
        return jnp.sum(output(p, v) * proj)

    def run():
        with jax.enable_x64(True):
            if integer:
                test_util.check_grads(lambda p: loss(p, x), (p64,), order=1)
            else:
                test_util.check_grads(loss, (p64, jnp.asarray(x)), order=1)

    return run


def _flag(fn):
    """``fn`` that returns a mark instead of raising when the checker flags."""

    def run():
        try:
            fn()
        except AssertionError:
            return "alarm"
        return ""

    return run


def timed_marked(fn):
    marks = []

    def once():
        marks.append(fn())

    first, later = timed(once)
    return first, later, "; ".join(sorted({m for m in marks if m}))


def layer_rows():
    rows = []
    for name, (layer, shape, kw) in LAYERS.items():
        layer[0](jax.random.key(0), shape)  # compile init: "first" times the check
        ours = timed_marked(
            _flag(lambda layer=layer, s=shape, k=kw: check_layer(layer, s, **k))
        )
        theirs = timed_marked(_flag(_jax_layer_check(layer, shape, kw)))
        rows.append((name, ours, theirs))
    return rows


def conv_nchw(x, w):
    dims = ("NCHW", "OIHW", "NCHW")
    return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dims)


def conv_rows():
    r = np.random.default_rng(0)
    x, w = r.standard_normal((2, 3, 8, 8)), r.standard_normal((4, 3, 3, 3))
    rows = [
        (
            "fnn.check_grads",
            *timed_marked(_flag(lambda: check_grads(conv_nchw, (x, w)))),
        )
    ]

    def jax_check():
        with jax.enable_x64(True):
            test_util.check_grads(conv_nchw, (x, w), order=1, modes=["fwd", "rev"])

    rows.append(("jax.test_util.check_grads (f64)", *timed_marked(_flag(jax_check))))
    if torch is not None:
        xt = torch.tensor(x, requires_grad=True)
        wt = torch.tensor(w, requires_grad=True)

        def torch_check():
            torch.autograd.gradcheck(torch.nn.functional.conv2d, (xt, wt))

        rows.append(
            ("torch.autograd.gradcheck (f64)", *timed_marked(_flag(torch_check)))
        )
        rows.append(
            (
                "torch.autograd.gradcheck (f64, fast_mode)",
                *timed_marked(
                    _flag(
                        lambda: torch.autograd.gradcheck(
                            torch.nn.functional.conv2d, (xt, wt), fast_mode=True
                        )
                    )
                ),
            )
        )
    return rows


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if "model name" in ln)
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    torch_v = f", torch {torch.__version__}" if torch is not None else ", no torch"
    return (
        f"{os.cpu_count()} CPUs ({cpu}), jax {jax.__version__}{torch_v}, "
        f"load average {load:.2f} at the start"
    )


def _cell(first, later, mark):
    return f"{first:.3f} | {later:.3f}" + (f" ({mark})" if mark else "")


def print_layers():
    print("## Seconds per check of each layer (check_layer), against jax's checker\n")
    head = "| layer | fnn first | fnn later | jax (f64) first | jax (f64) later |"
    print(head + " fnn / jax, first | fnn / jax, later |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, ours, theirs in layer_rows():
        first, later = ours[0] / theirs[0], ours[1] / theirs[1]
        row = f"| {name} | {_cell(*ours)} | {_cell(*theirs)} |"
        print(f"{row} {first:.1f} | {later:.1f} |")


def print_conv():
    print(
        "\n## Seconds per check: 2-D convolution, NCHW 2x3x8x8, OIHW 4x3x3x3, VALID\n"
    )
    print("| checker | first | later |")
    print("|---|---:|---:|")
    for name, first, later, mark in conv_rows():
        print(f"| {name} | {_cell(first, later, mark)} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes only")
    parser.add_argument(
        "--tables", default=",".join(TABLES), help=f"some of {','.join(TABLES)}"
    )
    args = parser.parse_args()
    sizes = SIZES[:2] if args.quick else SIZES
    tables = args.tables.split(",")
    print(f"Machine: {machine()}.\n")
    # Warm up JAX itself, so "first" is the first check of each function.
    check_grads(jnp.sin, (np.ones(2),))
    with jax.enable_x64(True):
        test_util.check_grads(jnp.sin, (np.ones(2),), order=1)
    if "layers" in tables:
        print_layers()
    if "conv" in tables:
        print_conv()
    if "tanh" in tables:
        print_tanh(sizes)
    if "bugs" in tables:
        print_detection()


def print_tanh(sizes):
    print("\n## Run time, f(x) = sum(tanh(x)**2), float32 input, seconds\n")
    head = "| n | fnn first | fnn later | jax (f64) first | jax (f64) later |"
    if torch is not None:
        head += " torch first | torch later |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in timing_rows(sizes):
        print(f"| {row[0]} | " + " | ".join(f"{v:.3f}" for v in row[1:]) + " |")


def print_detection():
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
