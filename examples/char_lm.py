"""A character-level sliding-window language model on Python's own docstrings.

The model estimates ``P(c_t | c_{t-N+1} .. c_{t-1})``: the previous ``N - 1 =
CONTEXT`` characters are looked up in an embedding table (``fnn.Embed``), their
vectors are concatenated (``fnn.Flatten``), a ``Dense`` hidden layer with a
tanh non-linearity mixes them, and a ``Dense`` layer gives one logit per
character of the vocabulary; the loss is the softmax cross-entropy of the next
character. This is Bengio et al.'s (2003) neural probabilistic language model,
on characters instead of words.

With ``--tie`` the output layer shares the embedding table instead (tied input
and output embeddings, Press and Wolf 2017: one table, whose gradient sums both
uses): a ``Dense`` layer maps the hidden layer back to the embedding's width,
and the logits of the next character are its dot products with the *same*
table, plus a bias.

The text ships with Python: the docstrings of some forty standard-library
modules and of their public functions and classes (``inspect.getdoc``), about
270 KB of English about programming, made deterministic by a fixed module list
and sorted member names. Characters outside printable ASCII become ``?``. Every
tenth chunk of 2,048 characters is held out for validation (a split by chunks,
not a tail, so both halves cover the same modules).

The script prints the unigram baseline (a model that ignores the context and
predicts each character with its training-set frequency), trains with
``fnn.fit`` (progress bar, evaluation on the held-out text), samples about 200
characters with temperature sampling (``jax.random.categorical`` inside a
``lax.scan``), exports the trained model with ``fnn.training.export`` (a ``jax.export``
artifact with a symbolic batch size), reloads it in a fresh Python process that
knows nothing of the model and draws the same sample there, saves the loss
curves as a PNG and ends with ``validation perplexity: X.XX``.

Measured on two CPU cores shared with other work: ``python
examples/char_lm.py`` (untied, 76,384 params) prints a unigram baseline
perplexity of 26.50 and ``validation perplexity: 5.10`` after 5 epochs (4,825
steps; 16 s training, 32 s wall, 20 s of CPU time); ``python
examples/char_lm.py --tie`` (77,184 params) prints ``validation perplexity:
5.73`` (22 s training, 40 s wall, 23 s of CPU time). On 96 characters tying
saves no params and costs some accuracy; it pays on word vocabularies, where
the output layer is most of the params. Either way the artifact's logits equal
the model's on all 26,624 validation windows, and the fresh process draws the
same 200 characters.

Usage::

    python examples/char_lm.py                    # writes char_lm.png here
    python examples/char_lm.py --quick            # a few seconds, a smoke test
    python examples/char_lm.py --tie              # tied input and output tables
    python examples/char_lm.py --epochs 10 --out /tmp/plots/
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import string
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from _common import make_parser, output_path

import fnn

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CONTEXT = 8  # N - 1: characters the model sees before the one it predicts
EMBED = 24  # features per character
TIED_EMBED = 32  # with --tie: the table's width, also the network's output width
HIDDEN = 256
CHUNK = 2048  # every tenth chunk of the text is held out for validation
TEMPERATURE = 0.8
SAMPLE_LENGTH = 200
WEIGHT_DECAY = 1e-4
MODULES = (  # standard-library modules whose docstrings make the text
    *("argparse", "asyncio", "bisect", "calendar", "collections", "contextlib"),
    *("csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email"),
    *("enum", "fractions", "functools", "heapq", "http.client", "inspect"),
    *("itertools", "json", "logging", "os", "pathlib", "pickle", "pydoc"),
    *("random", "re", "shutil", "socket", "statistics", "string", "subprocess"),
    *("tarfile", "textwrap", "threading", "typing", "unittest", "urllib.request"),
    "zipfile",
)
ALPHABET = "\n" + "".join(c for c in string.printable if c.isprintable())


def load_text() -> str:
    """The docstrings of ``MODULES`` and their public members, in a fixed order."""
    parts = []
    for name in MODULES:
        module = importlib.import_module(name)
        members = [module] + [
            obj
            for member, obj in sorted(vars(module).items())
            if not member.startswith("_")
            and getattr(obj, "__module__", None) == module.__name__
        ]
        parts += [doc for doc in map(inspect.getdoc, members) if doc]
    known = set(ALPHABET)
    return "".join(c if c in known else "?" for c in "\n\n".join(parts))


def windows(ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every ``(context, next)`` pair: ``x`` (n, CONTEXT) and ``y`` (n,)."""
    x = np.lib.stride_tricks.sliding_window_view(ids[:-1], CONTEXT)
    return {"x": np.ascontiguousarray(x), "y": ids[CONTEXT:]}


def tied_embeddings(vocab: int, features: int, body: fnn.Layer) -> fnn.Layer:
    """``Embed``, then ``body``, then logits ``h @ table.T + b`` from the same table.

    The params hold the table once (``params["embed"]["table"]``); the
    gradient of the loss with respect to it is the sum of its two uses.
    """
    # Rows of norm about 1, so the first logits are small (a table of unit
    # normals would start them at a standard deviation of sqrt(features)).
    embed = fnn.Embed(vocab, features, init=jax.nn.initializers.normal(features**-0.5))

    def init(key, input_shape):
        k_embed, k_body = jax.random.split(key)
        shape, embed_params = embed.init(k_embed, input_shape)
        shape, body_params = body.init(k_body, shape)
        params = {"embed": embed_params, "body": body_params}
        params["bias"] = jnp.zeros((vocab,), jnp.float32)
        return shape[:-1] + (vocab,), params

    def apply(params, ids, **kwargs):
        h = body.apply(params["body"], embed.apply(params["embed"], ids), **kwargs)
        logits = h @ params["embed"]["table"].T
        return logits + jnp.broadcast_to(params["bias"], logits.shape)

    return fnn.make_layer("tied", f"tied_embeddings({vocab}, {features})", init, apply)


def make_model(vocab: int, tie: bool = False) -> fnn.Layer:
    if tie:
        body = fnn.serial(
            fnn.Flatten(),  # (batch, CONTEXT, TIED_EMBED) -> (batch, CONTEXT * ...)
            fnn.Dense(HIDDEN),
            fnn.Tanh(),
            fnn.Dense(TIED_EMBED),  # back to the embedding's width
        )
        return tied_embeddings(vocab, TIED_EMBED, body)
    return fnn.serial(
        fnn.Embed(vocab, EMBED),  # (batch, CONTEXT) -> (batch, CONTEXT, EMBED)
        fnn.Flatten(),  # -> (batch, CONTEXT * EMBED): the concatenation
        fnn.Dense(HIDDEN),
        fnn.Tanh(),
        fnn.Dense(vocab),  # logits of the next character
    )


def make_loss(model: fnn.Layer):
    def loss_fn(params, batch, key):
        logits = model.apply(params, batch["x"], key=key)
        mask = batch.get("mask")
        per_char = fnn.losses.softmax_cross_entropy(logits, batch["y"], mask)
        return fnn.losses.sum_and_weight(per_char, mask)  # nats, characters

    return loss_fn


def unigram_perplexity(train_ids: np.ndarray, valid_ids: np.ndarray, vocab: int):
    """``exp`` of the held-out cross-entropy of the (add-one) character counts."""
    counts = np.bincount(train_ids, minlength=vocab) + 1.0
    log_p = np.log(counts / counts.sum())
    return math.exp(-log_p[valid_ids].mean())


def sample(logits_fn, prompt: np.ndarray, key: jax.Array, length: int):
    """Draws ``length`` ids, each from ``softmax(logits / TEMPERATURE)``.

    ``logits_fn`` maps windows ``(batch, CONTEXT)`` to logits ``(batch,
    vocab)``: the model's apply, or an exported artifact's ``call``.
    """

    def step(window, k):
        logits = logits_fn(window[None])[0]
        c = jax.random.categorical(k, logits / TEMPERATURE)
        return jnp.concatenate([window[1:], c[None].astype(window.dtype)]), c

    keys = jax.random.split(key, length)
    _, ids = jax.lax.scan(step, jnp.asarray(prompt, jnp.int32), keys)
    return np.asarray(ids)


# The fresh process: only jax and this file's sample(), not the model.
RELOAD = """
import sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from char_lm import decode, sample
with open(sys.argv[2], "rb") as f:
    exported = jax.export.deserialize(f.read())
prompt = np.array(sys.argv[3].split(","), np.int32)
key = jax.random.wrap_key_data(np.array(sys.argv[4].split(","), np.uint32))
print(decode(sample(exported.call, prompt, key, int(sys.argv[5]))))
"""


def sample_in_fresh_process(blob: bytes, prompt, key, length: int) -> str:
    """Writes the exported model to a temporary file and samples in a new
    Python process; returns the text it printed."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "char_lm.jax_export")
        with open(path, "wb") as f:
            f.write(blob)
        key_data = np.asarray(jax.random.key_data(key)).ravel()
        run = subprocess.run(
            [sys.executable, "-c", RELOAD, os.path.dirname(os.path.abspath(__file__)),
             path, ",".join(map(str, prompt)), ",".join(map(str, key_data)),
             str(length)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    return run.stdout.rstrip("\n")


def decode(ids) -> str:
    return "".join(ALPHABET[i] for i in ids)


def plot(history, baseline: float, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="training")
    evaluated = [h for h in history if "eval_loss" in h]
    ax.plot(
        [h["step"] for h in evaluated],
        [h["eval_loss"] for h in evaluated],
        "o-",
        label="validation",
    )
    ax.axhline(math.log(baseline), color="gray", ls="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.set_title(f"character model, context {CONTEXT}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> float:
    parser = make_parser(__doc__, "a few seconds only")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the text")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument(
        "--tie",
        action="store_true",
        help="share the embedding table with the output layer (default: untied)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")

    text = load_text()
    vocab = len(ALPHABET)
    index = {c: i for i, c in enumerate(ALPHABET)}
    ids = np.array([index[c] for c in text], dtype=np.int32)
    pairs = windows(ids)
    held_out = (np.arange(len(pairs["y"])) + CONTEXT) // CHUNK % 10 == 9
    train = {k: v[~held_out] for k, v in pairs.items()}
    valid = {k: v[held_out] for k, v in pairs.items()}
    if args.quick:  # a slice of the text, a few steps
        train = {k: v[:20_000] for k, v in train.items()}
        valid = {k: v[:4_000] for k, v in valid.items()}
    baseline = unigram_perplexity(train["y"], valid["y"], vocab)
    print(
        f"{len(text):,} characters from {len(MODULES)} modules' docstrings; "
        f"vocabulary {vocab}; {len(train['y']):,} training windows"
    )
    print(f"unigram baseline perplexity: {baseline:.2f}")

    model = make_model(vocab, tie=args.tie)
    loss_fn = make_loss(model)
    per_epoch = fnn.data.num_batches(len(train["y"]), args.batch_size)
    epochs = 1 if args.quick else args.epochs
    total = 40 if args.quick else epochs * per_epoch
    schedule = optax.cosine_decay_schedule(args.learning_rate, total)
    optimizer = optax.adamw(schedule, weight_decay=WEIGHT_DECAY)
    init_key, train_key, data_key, sample_key = jax.random.split(
        jax.random.key(args.seed), 4
    )
    _, params = model.init(init_key, (-1, CONTEXT))
    if args.tie:
        # The output bias starts at the unigram log-frequencies: the untrained
        # model predicts as the baseline does, and training learns what the
        # context adds.
        counts = np.bincount(train["y"], minlength=vocab) + 1.0
        params["bias"] = jnp.asarray(np.log(counts / counts.sum()), jnp.float32)
    step = fnn.make_train_step(loss_fn, optimizer)
    state = step.init(params, key=train_key)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    tying = "tied input and output embeddings" if args.tie else "untied"
    print(f"{n_params:,} params ({tying}); {per_epoch} steps per epoch")

    start = time.perf_counter()
    state, history = fnn.fit(
        step,
        state,
        train,
        batch_size=args.batch_size,
        epochs=epochs,
        steps=total,
        key=data_key,
        log_every=max(total // 30, 1),
        eval_every=None if args.quick else total // 8,
        eval_step=fnn.make_eval_step(loss_fn),
        eval_data=valid,
        eval_batch_size=4096,
    )
    print(f"trained {int(state.step)} steps in {time.perf_counter() - start:.1f} s")

    prompt = valid["x"][0]
    text = decode(
        sample(
            lambda w: model.apply(state.params, w), prompt, sample_key, SAMPLE_LENGTH
        )
    )
    print(f"sample (temperature {TEMPERATURE}), after the prompt:")
    print(decode(prompt) + "|" + text)

    blob = fnn.training.export(model, state.params, (-1, CONTEXT), dtype=jnp.int32)
    exported = jax.export.deserialize(blob)  # what the fresh process will load
    gap = jnp.max(
        jnp.abs(exported.call(valid["x"]) - model.apply(state.params, valid["x"]))
    )
    drawn = decode(sample(exported.call, prompt, sample_key, SAMPLE_LENGTH))
    reloaded = sample_in_fresh_process(blob, prompt, sample_key, SAMPLE_LENGTH)
    print(
        f"exported ({len(blob):,} bytes): max |logit difference| from the model "
        f"over {len(valid['x']):,} windows {float(gap):.1e}; reloaded in a fresh "
        f"process, it draws the same sample: {reloaded == drawn}"
    )

    path = output_path(args.out, "char_lm.png")
    plot(history, baseline, path)
    print(f"saved the loss curves to {path}")
    perplexity = math.exp(history[-1]["eval_loss"])
    print(f"validation perplexity: {perplexity:.2f}")
    return perplexity


if __name__ == "__main__":
    main()
