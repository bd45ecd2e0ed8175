"""Every activation in fnn and its derivative, one panel each.

Each activation ``f`` is plotted on ``[-4, 4]`` with its derivative
``jax.vmap(jax.grad(f))`` (automatic differentiation, no formula written by
hand). Options are drawn dashed next to the default: leaky ReLU with slope 0.2
beside the default 0.01, swish with ``beta=4`` beside ``beta=1`` (SiLU), GELU's
tanh approximation beside the exact ``x * Phi(x)``. Softmax and log-softmax act
on a vector, so their panels show the first component of ``softmax([x, 0])``
(which is ``sigmoid(x)``) and of ``log_softmax([x, 0])``.

What the derivatives show: sigmoid and tanh saturate (the gradient vanishes for
large ``|x|``); ReLU's is a step (0 or 1: no saturation for ``x > 0``, no gradient
for ``x < 0``); leaky ReLU and ELU keep some gradient for ``x < 0``; GELU,
swish and softplus are smooth versions of ReLU; hard tanh passes gradient only
inside ``[-1, 1]``.

The script checks that it covers every activation function fnn exports, saves
the panels as a PNG and ends with ``plotted 11 activations`` (measured: 4 s,
``python examples/activations.py``).

Usage::

    python examples/activations.py                # writes activations.png here
    python examples/activations.py --out /tmp/plots/
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from _common import make_parser, output_path
from tqdm import tqdm

import fnn

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def first_of_pair(fn):
    """``x -> fn([x, 0])[0]``: a scalar view of a function on vectors."""
    return lambda x: fn(jnp.stack([x, jnp.zeros_like(x)]))[0]


# name -> (default, {label of an option: variant}); each a scalar function.
ACTIVATIONS = {
    "sigmoid": (jax.nn.sigmoid, {}),
    "tanh": (jnp.tanh, {}),
    "hard_tanh": (jax.nn.hard_tanh, {}),
    "relu": (jax.nn.relu, {}),
    "leaky_relu": (
        jax.nn.leaky_relu,
        {"slope 0.2": lambda x: jax.nn.leaky_relu(x, 0.2)},
    ),
    "elu": (jax.nn.elu, {}),
    "softplus": (jax.nn.softplus, {}),
    "gelu": (fnn.gelu, {"tanh approx.": lambda x: fnn.gelu(x, approximate=True)}),
    "swish": (fnn.swish, {"beta=4": lambda x: fnn.swish(x, beta=4.0)}),
    "softmax": (first_of_pair(jax.nn.softmax), {}),
    "log_softmax": (first_of_pair(jax.nn.log_softmax), {}),
}


def all_curves(x: jax.Array) -> dict:
    """``{name: {option label: (f(x), f'(x))}}``, the default under label ``""``."""
    return {
        name: {
            label: (jax.vmap(f)(x), jax.vmap(jax.grad(f))(x))
            for label, f in {"": fn, **options}.items()
        }
        for name, (fn, options) in ACTIVATIONS.items()
    }


def exported_activations() -> set[str]:
    """The activation functions of ``fnn`` (lower case, from fnn.model.activations)."""
    return {
        name
        for name in fnn.__all__
        if name.islower()
        and inspect.isfunction(getattr(fnn, name))
        and getattr(fnn, name).__module__ == "fnn.model.activations"
    }


def main(argv=None) -> int:
    parser = make_parser(__doc__, "accepted; already quick", seed=False)
    args = parser.parse_args(argv)

    missing = exported_activations() - set(ACTIVATIONS)
    if missing:
        raise SystemExit(f"activations.py does not plot {sorted(missing)}")

    x = jnp.linspace(-4.0, 4.0, 401)
    curves = jax.jit(all_curves)(x)  # one compiled program for every curve
    fig, axes = plt.subplots(3, 4, figsize=(12, 7.5), sharex=True)
    panels = tqdm(ACTIVATIONS.items(), desc="panels", total=len(ACTIVATIONS))
    for ax, (name, (_, options)) in zip(axes.flat, panels):
        for style, label in zip(("-", "--"), ("", *options)):
            y, dy = curves[name][label]
            suffix = f" ({label})" if label else ""
            ax.plot(x, y, "C0" + style, label="f" + suffix)
            ax.plot(x, dy, "C1" + style, label="f'" + suffix)
            if not np.all(np.isfinite(np.asarray(dy))):
                raise SystemExit(f"{name}{suffix}: non-finite derivative")
        ax.axhline(0, color="gray", lw=0.5)
        ax.axvline(0, color="gray", lw=0.5)
        ax.set_title(f"fnn.{name}")
        ax.set_ylim(*((-4.2, 1.6) if name == "log_softmax" else (-1.6, 4.2)))
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(ACTIVATIONS) :]:
        ax.set_visible(False)
    fig.suptitle("activations (blue) and their derivatives by jax.grad (orange)")
    fig.tight_layout()
    path = output_path(args.out, "activations.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"saved {path}")
    print(f"plotted {len(ACTIVATIONS)} activations")
    return len(ACTIVATIONS)


if __name__ == "__main__":
    main()
