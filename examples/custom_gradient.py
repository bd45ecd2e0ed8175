"""Check a hand-written gradient with fnn.check_grads, and watch it catch a bug.

``softplus(x) = log(1 + exp(x))`` overflows if written as it reads. The stable form
``max(x, 0) + log1p(exp(-|x|))`` is given a ``jax.custom_vjp`` whose gradient is
``sigmoid(x)``. A second version saves ``y = softplus(x)`` and computes the
gradient as ``1 - exp(-y)``: the same function on paper, but for negative ``x`` it
subtracts two numbers close to 1 and keeps almost no correct digits, while the
gradient itself is tiny (``sigmoid(-30)`` is about ``1e-13``). Checks that use a
fixed absolute tolerance cannot see this; ``check_grads`` compares relative to
each element's own derivative and says which element is wrong.

Run: ``python examples/custom_gradient.py`` (a few seconds on a CPU).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from fnn.gradcheck import GradientCheckError, check_grads


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="accepted; already quick")
    parser.parse_args()

    # float32 inputs from -30 to 30, as a model would hold them.
    x = np.linspace(-30.0, 30.0, 25, dtype=np.float32)

    report = check_grads(softplus, (x,))
    print("correct custom_vjp:")
    print(report)

    print("\nplanted bug (gradient 1 - exp(-y)):")
    try:
        check_grads(softplus_buggy, (x,))
        caught = False
    except GradientCheckError as err:
        print(err)
        worst = err.report.failures[0]
        where = f"x = {x[worst.index]:.1f}"
        print(f"\nworst element: {where}, relative error {worst.rel_err:.2g}")
        caught = True
    print(f"planted bug caught: {caught}")


if __name__ == "__main__":
    main()
