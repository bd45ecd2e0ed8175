"""Handwritten digits: an MLP on scikit-learn's 8x8 digits, trained with ``fnn.fit``.

The 1,797 images of scikit-learn's bundled digits data (no download) are split
75/25 with a fixed, stratified split and standardised with the training set's
statistics. A two-hidden-layer MLP with dropout is trained with AdamW and a
cosine learning-rate decay; ``fit`` shows a progress bar, evaluates on the test
set every epoch, keeps the history and, with ``--checkpoint-dir``, saves
checkpoints from which an interrupted run resumes exactly. The script saves the
loss and accuracy curves as a PNG and prints ``test accuracy: 0.xxxx`` as its
last line: measured 0.9778 with the defaults (seeds 1 to 3: 0.9800, 0.9800,
0.9778), the whole script taking 6 s on two quiet CPU cores.

Usage::

    python examples/digits.py                       # 30 epochs, writes digits.png
    python examples/digits.py --quick               # a few steps, a smoke test
    python examples/digits.py --epochs 60 --out /tmp/digits.png
    python examples/digits.py --checkpoint-dir /tmp/digits_ckpt   # resumable
"""

from __future__ import annotations

import time

import jax
import matplotlib
import numpy as np
import optax
from _common import digits_split, make_parser

import fnn

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CLASSES = 10
WEIGHT_DECAY = 1e-2
DROPOUT = 0.3


def load(dtype=np.float32):
    """Returns ``(train, test)`` dicts of ``x`` (n, 64) and integer ``y`` (n,)."""
    x_train, x_test, y_train, y_test = digits_split()
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # pixels that are always blank in the training set

    def prepare(x, y):
        return {"x": ((x - mean) / std).astype(dtype), "y": y}

    return prepare(x_train, y_train), prepare(x_test, y_test)


def make_model() -> fnn.Layer:
    return fnn.serial(
        fnn.Dense(256),
        fnn.Relu(),
        fnn.Dropout(DROPOUT),
        fnn.Dense(128),
        fnn.Relu(),
        fnn.Dropout(DROPOUT),
        fnn.Dense(CLASSES),
    )


def make_loss(model: fnn.Layer):
    """The loss protocol: ``(loss_sum, weight, {"accuracy": correct_sum})``."""

    def loss_fn(params, batch, key):
        logits = model.apply(params, batch["x"], key=key)  # key=None: no dropout
        mask = batch.get("mask")
        per_example = fnn.losses.softmax_cross_entropy(logits, batch["y"], mask)
        loss_sum, weight = fnn.losses.sum_and_weight(per_example, mask)
        hits, _ = fnn.losses.sum_and_weight(
            fnn.losses.correct(logits, batch["y"]), mask
        )
        return loss_sum, weight, {"accuracy": hits}

    return loss_fn


def plot(history, path: str) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot(epochs, [h[name] for h in history], label="train")
        evaluated = [h for h in history if f"eval_{name}" in h]
        ax.plot(
            [h["epoch"] for h in evaluated],
            [h[f"eval_{name}"] for h in evaluated],
            label="test",
        )
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_yscale("log")
    fig.suptitle("fnn MLP on the 8x8 digits")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> float:
    parser = make_parser(__doc__, "a few steps only", out="digits.png")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the data")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument(
        "--checkpoint-dir", default=None, help="save checkpoints here; resume from them"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the bar")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")

    train, test = load()
    model = make_model()
    loss_fn = make_loss(model)
    per_epoch = fnn.data.num_batches(len(train["y"]), args.batch_size)
    # Cosine decay to zero over the run: the test accuracy settles instead of
    # wandering with the last steps' noise.
    schedule = optax.cosine_decay_schedule(args.learning_rate, args.epochs * per_epoch)
    optimizer = optax.adamw(schedule, weight_decay=WEIGHT_DECAY)
    init_key, train_key, data_key = jax.random.split(jax.random.key(args.seed), 3)
    # One compiled init instead of one dispatch per initializer.
    params = jax.jit(lambda k: model.init(k, (-1, train["x"].shape[1]))[1])(init_key)
    step = fnn.make_train_step(loss_fn, optimizer)
    state = step.init(params, key=train_key)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    print(
        f"{len(train['y'])} training and {len(test['y'])} test images; "
        f"{n_params:,} params; {per_epoch} steps per epoch"
    )

    start = time.perf_counter()
    state, history = fnn.fit(
        step,
        state,
        train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps=8 if args.quick else None,
        key=data_key,
        eval_step=fnn.make_eval_step(loss_fn),
        eval_data=test,
        eval_every=per_epoch,
        eval_batch_size=512,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=5 * per_epoch,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    last = history[-1]
    print(
        f"trained {int(state.step)} steps in {seconds:.1f} s; "
        f"train loss {last['loss']:.4f}, test loss {last['eval_loss']:.4f}"
    )
    plot(history, args.out)
    print(f"saved the curves to {args.out}")
    print(f"test accuracy: {last['eval_accuracy']:.4f}")
    return last["eval_accuracy"]


if __name__ == "__main__":
    main()
