"""Regression: a linear-output network fits a 1-D curve; width, depth, activations.

The data are 256 noisy samples of ``f(x) = sin(3x) + 0.3 x^2`` on ``[-2, 2]``
(Gaussian noise of standard deviation ``NOISE = 0.1``, from a fixed seed), and a
separate noisy test set of 256 points. The noise puts a floor of
``NOISE^2 = 0.01`` under the test mean squared error.

The main model has two hidden layers of 64 tanh units and a *linear* output
(``Dense(1)`` with no activation: a regression head must be able to output any
real number). It is trained on the whole training set at every step with Adam
and the mean squared error, 50 steps per compiled call (``fnn.fit`` with
``steps_per_call``).

A grid of smaller models then shows the universal-approximation picture:

- width: one hidden layer of 2, 8 or 64 tanh units. Each unit adds one bent
  tanh "step" to a sum, so 2 units can draw only a rough outline and 64 follow
  the curve;
- depth: three hidden layers instead of one, at the same width;
- activations: two hidden layers of 32 units with sigmoid, tanh, ReLU, GELU and
  swish. ReLU networks are piecewise linear (visible kinks); the smooth ones are
  smooth.

Each panel's title holds its test MSE. The script saves ``regression.png`` (the
main fit) and ``regression_grid.png`` (the grid), and ends with
``test mse: X.XXXX`` for the main model.

Measured on two CPU cores (``python examples/regression.py``): test mse 0.0084
for the main model (the noise floor is 0.0100; a finite test set can land a
little below it), 44 s for all eleven models.

Usage::

    python examples/regression.py                 # writes the PNGs here
    python examples/regression.py --quick         # a smoke test: 2 grid panels
    python examples/regression.py --out /tmp/plots/
    python examples/regression.py --out /tmp/fit.png   # and /tmp/fit_grid.png
"""

from __future__ import annotations

import jax
import matplotlib
import numpy as np
import optax
from _common import make_parser, output_path

import fnn

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NOISE = 0.1
N_TRAIN, N_TEST = 256, 256
STEPS_PER_CALL = 50
ACTIVATIONS = {
    "sigmoid": fnn.Sigmoid,
    "tanh": fnn.Tanh,
    "ReLU": fnn.Relu,
    "GELU": fnn.Gelu,
    "swish": fnn.Swish,
}
SHAPES = ((1, 2), (1, 8), (1, 64), (3, 8), (3, 64))  # (hidden layers, width)


def target(x: np.ndarray) -> np.ndarray:
    return np.sin(3 * x) + 0.3 * x**2


def make_data(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``x`` and noisy ``y``, both of shape ``(n, 1)``."""
    x = rng.uniform(-2, 2, (n, 1)).astype(np.float32)
    y = target(x) + NOISE * rng.standard_normal((n, 1))
    return {"x": x, "y": y.astype(np.float32)}


def mlp(layers: int, width: int, activation=fnn.Tanh) -> fnn.Layer:
    """``layers`` hidden layers of ``width`` units, then a linear ``Dense(1)``."""
    hidden = [[fnn.Dense(width), activation()] for _ in range(layers)]
    return fnn.serial(*sum(hidden, []), fnn.Dense(1))


def fit_model(model: fnn.Layer, data, steps: int, key, lr: float, desc: str):
    """Full-batch Adam on the mean squared error; returns the params."""

    def loss_fn(params, batch, key):
        errors = fnn.losses.squared_error(model.apply(params, batch["x"]), batch["y"])
        return fnn.losses.sum_and_weight(errors)

    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
    init_key, train_key, data_key = jax.random.split(key, 3)

    step = fnn.make_train_step(loss_fn, optimizer, steps_per_call=STEPS_PER_CALL)

    @jax.jit  # one compiled program instead of one per initializer
    def start(init_key, train_key):
        _, params = model.init(init_key, (-1, 1))
        return step.init(params, key=train_key)

    state = start(init_key, train_key)
    print(desc, flush=True)  # the bar below has no room for a long name
    state, _ = fnn.fit(
        step,
        state,
        data,
        batch_size=N_TRAIN,  # the whole training set at every step
        steps=steps,
        key=data_key,
        log_every=steps,
        progress_every=STEPS_PER_CALL,
    )
    return state.params


def test_mse(model: fnn.Layer, params, data) -> float:
    pred = jax.jit(model.apply)(params, data["x"])
    return float(fnn.losses.mean_squared_error(pred, data["y"]))


def output_paths(out: str) -> tuple[str, str]:
    """``(fit, grid)`` PNG paths: ``out`` and ``out_grid``, or in directory ``out``."""
    fit = output_path(out, "regression.png")
    return fit, fit.removesuffix(".png") + "_grid.png"


def draw(ax, train, model, params, title: str) -> None:
    grid = np.linspace(-2.2, 2.2, 300, dtype=np.float32)[:, None]
    ax.scatter(train["x"], train["y"], s=6, c="lightgray", label="training data")
    ax.plot(grid, target(grid), "k--", lw=1, label="f(x)")
    ax.plot(grid, np.asarray(jax.jit(model.apply)(params, grid)), "C3", lw=2)
    ax.set_title(title, fontsize=9)
    ax.set_ylim(-1.3, 2.6)


def main(argv=None) -> float:
    parser = make_parser(__doc__, "a few seconds only")
    parser.add_argument("--steps", type=int, default=3000, help="main model's steps")
    parser.add_argument("--grid-steps", type=int, default=2000, help="each grid model")
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    args = parser.parse_args(argv)
    for name in ("steps", "grid_steps"):
        if getattr(args, name) < STEPS_PER_CALL:
            parser.error(f"--{name.replace('_', '-')} must be >= {STEPS_PER_CALL}")
    steps, grid_steps = (100, 50) if args.quick else (args.steps, args.grid_steps)

    rng = np.random.default_rng(args.seed)
    train, test = make_data(N_TRAIN, rng), make_data(N_TEST, rng)
    keys = iter(jax.random.split(jax.random.key(args.seed), 1 + len(SHAPES) + 5))
    fit_path, grid_path = output_paths(args.out)

    main_model = mlp(2, 64)
    main_params = fit_model(
        main_model, train, steps, next(keys), args.learning_rate, "main: 2 x 64 tanh"
    )
    mse = test_mse(main_model, main_params, test)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    draw(
        ax, train, main_model, main_params, f"2 hidden layers of 64 tanh: mse {mse:.4f}"
    )
    ax.legend(loc="upper center", fontsize=8)
    fig.tight_layout()
    fig.savefig(fit_path, dpi=80)
    plt.close(fig)

    runs = []
    for layers, width in SHAPES:
        name = f"{layers} x {width} tanh"
        runs.append((name, mlp(layers, width)))
    for name, activation in ACTIVATIONS.items():
        runs.append((f"2 x 32 {name}", mlp(2, 32, activation)))
    if args.quick:  # a smoke test: one panel of each row
        runs = runs[::5]
    fig, axes = plt.subplots(2, 5, figsize=(14, 5.2), sharex=True, sharey=True)
    for ax, (name, model) in zip(axes.flat, runs):
        params = fit_model(
            model, train, grid_steps, next(keys), args.learning_rate, name
        )
        run_mse = test_mse(model, params, test)
        print(f"{name}: test mse {run_mse:.4f}")
        draw(ax, train, model, params, f"{name}: mse {run_mse:.4f}")
    axes[0, 0].set_ylabel("width and depth")
    axes[1, 0].set_ylabel("activations")
    fig.tight_layout()
    fig.savefig(grid_path, dpi=80)
    plt.close(fig)
    print(f"saved {fit_path} and {grid_path}")
    print(f"noise floor: {NOISE**2:.4f}")
    print(f"test mse: {mse:.4f}")
    return mse


if __name__ == "__main__":
    main()
