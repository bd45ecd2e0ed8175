"""Check a hand-written gradient with fnn.check_grads, and watch it catch a bug.

``softplus(x) = log(1 + exp(x))`` overflows if written as it reads. The stable form
``max(x, 0) + log1p(exp(-|x|))`` is given a ``jax.custom_vjp`` whose gradient is
``sigmoid(x)``. A second version saves ``y = softplus(x)`` and computes the
gradient as ``1 - exp(-y)``: the same function on paper, but for negative ``x`` it
subtracts two numbers close to 1 and keeps almost no correct digits, while the
gradient itself is tiny (``sigmoid(-30)`` is about ``1e-13``). In float32, as a
model holds it, the buggy gradient is exactly 0 left of ``x = -17``; even in
float64, where ``check_grads`` works, it is wrong in the fourth digit at
``x = -30``. Checks with a fixed absolute tolerance cannot see this.

The derivative spans 13 orders of magnitude over ``[-30, 30]``; each element is
held to its own derivative's scale, so one check over the whole range catches
the bug at ``x = -30``. To draw the relative error at every point, the script
also checks one point at a time, with a tqdm bar over the points; the failing
report names the worst point and both values.

The script prints the correct rule's report, the planted bug's worst failure,
saves a PNG (the function, both gradients and their relative errors, the worst
point marked; ``--out``: a ``.png`` file or a directory) and prints ``planted
bug caught: True`` as its last line.

Measured (``python examples/custom_gradient.py``, 25 points, two shared CPU
cores): ``planted bug caught: True``; the buggy rule fails at ``x = -30, -27.5,
-25``, the worst at ``x = -30.0`` (relative error 1.7e-04), and the correct
rule nowhere; 10 s of CPU time. ``--quick`` checks 7 points (5 s).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from _common import make_parser, output_path
from tqdm import tqdm

from fnn.gradcheck import GradientCheckError, check_grads

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LIMIT = 30.0  # the points checked span [-LIMIT, LIMIT]
RTOL = 1e-6  # check_grads' default relative tolerance, drawn on the plot


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


@jax.custom_vjp
def softplus(x):
    """Stable softplus with a hand-written gradient, ``sigmoid(x)``."""
    return _softplus(x)


softplus.defvjp(lambda x: (_softplus(x), x), lambda x, g: (g * jax.nn.sigmoid(x),))


@jax.custom_vjp
def softplus_buggy(x):
    """The same function; its gradient ``1 - exp(-y)`` loses precision for x < 0."""
    return _softplus(x)


def _buggy_fwd(x):
    y = _softplus(x)
    return y, y


softplus_buggy.defvjp(_buggy_fwd, lambda y, g: (g * (1.0 - jnp.exp(-y)),))


def check_points(fn, points, desc: str) -> list[tuple[float, GradientCheckError]]:
    """``check_grads(fn, (x,))`` at each point; ``(x, error)`` for each failure."""
    failures = []
    for x in tqdm(points, desc=desc, unit="point"):
        try:
            check_grads(fn, (x,))
        except GradientCheckError as err:
            failures.append((float(x), err))
    return failures


def rel_err(failure: tuple[float, GradientCheckError]) -> float:
    """The relative error of a failed point's worst comparison."""
    return failure[1].report.failures[0].rel_err


def plot(failures, path: str) -> None:
    """The function, both gradients (float32) and their relative errors
    (float64) against numpy's sigmoid; failed points and the worst marked."""
    xs = np.linspace(-LIMIT, LIMIT, 601)
    exact = 1.0 / (1.0 + np.exp(-xs))  # sigmoid in float64 numpy: the reference
    rules = {"sigmoid(x)": softplus, "1 - exp(-y)": softplus_buggy}
    fig, (ax_f, ax_g, ax_e) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_f.plot(xs, np.asarray(softplus(jnp.asarray(xs, jnp.float32))))
    ax_f.set(xlabel="x", title="softplus(x)")
    for name, fn in rules.items():
        g32 = np.asarray(jax.vmap(jax.grad(fn))(jnp.asarray(xs, jnp.float32)))
        with jax.enable_x64(True):
            g64 = np.asarray(jax.vmap(jax.grad(fn))(jnp.asarray(xs)))
        # log scales: zeros (the buggy rule in float32) are left out
        ax_g.plot(xs, np.where(g32 > 0, g32, np.nan), label=f"rule {name}")
        rel = np.abs(g64 - exact) / exact
        ax_e.plot(xs, np.maximum(rel, 1e-17), label=f"rule {name}")
    ax_g.set(
        xlabel="x", yscale="log", title="gradient in float32 (buggy: 0 left of -17)"
    )
    ax_e.axhline(RTOL, color="gray", linestyle=":", label="rtol")
    ax_e.set(xlabel="x", yscale="log", title="relative error in float64")
    if failures:
        ax_e.plot(
            [x for x, _ in failures],
            [rel_err(f) for f in failures],
            "rx",
            label="check failed",
        )
        worst = max(failures, key=rel_err)
        ax_e.annotate(
            f"worst: x = {worst[0]:.1f}",
            (worst[0], rel_err(worst)),
            xytext=(-15, 1e-4),
            arrowprops={"arrowstyle": "->"},
        )
    for ax in (ax_f, ax_g, ax_e):
        ax.grid(alpha=0.3)
    ax_g.legend()
    ax_e.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> bool:
    parser = make_parser(__doc__, "fewer points", seed=False)
    args = parser.parse_args(argv)

    # float32 inputs, as a model would hold them; check_grads works in float64.
    points = np.linspace(-LIMIT, LIMIT, 7 if args.quick else 25, dtype=np.float32)

    print("correct custom_vjp, all points in one check:")
    print(check_grads(softplus, (points,)))
    wrong = check_points(softplus, points, "correct rule")
    print(f"correct custom_vjp, point by point: {len(wrong)} points fail")

    failures = check_points(softplus_buggy, points, "planted bug")
    print(f"\nplanted bug (gradient 1 - exp(-y)): {len(failures)} points fail")
    if failures:
        x, err = max(failures, key=rel_err)
        print(err)
        print(f"\nworst point: x = {x:.1f}, relative error {rel_err((x, err)):.2g}")
    path = output_path(args.out, "custom_gradient.png")
    plot(failures, path)
    print(f"saved {path}")
    print(f"planted bug caught: {bool(failures) and not wrong}")
    return bool(failures) and not wrong


if __name__ == "__main__":
    main()
