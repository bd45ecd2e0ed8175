"""XOR: one layer cannot learn it, two layers can.

The four points of {0, 1}^2, labelled x1 XOR x2, are not linearly separable, so
a single unit (``Dense(1)`` with a sigmoid head) is stuck at the symmetric
optimum of the cross-entropy; one hidden layer (``Dense(8)``, ``Tanh``,
``Dense(1)``) separates them. Both are trained with Adam in a jitted step; the
script prints both accuracies (the last line is the two-layer one) and saves
the two decision boundaries as a PNG.

Usage::

    python examples/xor.py                # 500 steps, writes xor.png
    python examples/xor.py --quick        # 200 steps
    python examples/xor.py --steps 1000 --out /tmp/xor.png --seed 1
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from _common import make_parser
from tqdm import tqdm

import fnn

matplotlib.use("Agg")
import matplotlib.pyplot as plt

X = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
Y = jnp.array([[0.0], [1.0], [1.0], [0.0]])  # x1 XOR x2, shape (4, 1)


def train(model: fnn.Layer, steps: int, key: jax.Array, desc: str):
    """Trains ``model`` (logits out) on XOR; returns its params."""
    _, params = model.init(key, (-1, 2))
    optimizer = optax.adam(0.05)
    opt_state = optimizer.init(params)

    def loss_fn(params):
        # the sigmoid head lives in the loss: stable for any logit
        logits = model.apply(params, X)
        return fnn.losses.mean(fnn.losses.sigmoid_binary_cross_entropy(logits, Y))

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    bar = tqdm(range(steps), desc=desc, leave=False)
    for i in bar:
        params, opt_state, loss = step(params, opt_state)
        if i % 50 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.4f}")  # the only host sync
    return params


def plot(models, path: str) -> None:
    """Draws each model's P(y = 1) (red = 1) and the points (triangles = 1)."""
    g = np.linspace(-0.5, 1.5, 101)
    grid = jnp.asarray(np.stack(np.meshgrid(g, g), -1).reshape(-1, 2))
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 4))
    for ax, (title, model, params, acc) in zip(axes, models):
        p = jax.nn.sigmoid(model.apply(params, grid)).reshape(len(g), len(g))
        ax.contourf(g, g, np.asarray(p), levels=20, cmap="RdBu_r", vmin=0, vmax=1)
        ax.contour(g, g, np.asarray(p), levels=[0.5], colors="k")
        for label, marker in ((0, "o"), (1, "^")):
            pts = np.asarray(X)[np.asarray(Y[:, 0]) == label]
            ax.scatter(*pts.T, marker=marker, c="w", edgecolors="k", s=120)
        ax.set_title(f"{title}: accuracy {acc:.2f}")
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = make_parser(__doc__, "200 steps", out="xor.png")
    parser.add_argument("--steps", type=int, default=500, help="training steps")
    args = parser.parse_args()
    steps = min(args.steps, 200) if args.quick else args.steps

    k1, k2 = jax.random.split(jax.random.key(args.seed))
    one = fnn.serial(fnn.Dense(1))
    two = fnn.serial(fnn.Dense(8), fnn.Tanh(), fnn.Dense(1))
    rows = []
    for title, model, key in (("one layer", one, k1), ("two layers", two, k2)):
        params = train(model, steps, key, title)
        acc = float(fnn.losses.accuracy(model.apply(params, X), Y))
        rows.append((title, model, params, acc))
        print(f"{title} accuracy: {acc:.2f}")
    plot(rows, args.out)
    print(f"saved {args.out}")
    print(f"accuracy: {rows[-1][3]:.2f}")


if __name__ == "__main__":
    main()
