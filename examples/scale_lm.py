"""A character transformer: bf16 compute, remat, FSDP x tensor parallel, 8 devices.

The same text as ``char_lm.py`` (the docstrings of some forty standard-library
modules, shipped with Python; every tenth chunk of 2,048 characters held out),
cut into sequences of ``--seq-len + 1`` characters. The model is a decoder-only
transformer (docs/transformer.md): ``Embed`` and a learned
``PositionalEmbedding``, ``--layers`` pre-norm blocks (causal
``MultiHeadAttention``, then a GELU MLP, each residual) under
``fnn.repeat(block, n, remat=True)``, so the backward pass keeps one input per
block and recomputes the rest, then ``LayerNorm`` and a ``Dense`` to the
logits; the loss is the softmax cross-entropy of the next character. The
whole network computes in bfloat16 under ``fnn.precision`` (``--float32`` to
compare); params, gradients and Adam's state stay float32, and LayerNorm's
statistics, the attention softmax and the loss are computed in float32.

It runs on 8 CPU devices simulated with
``--xla_force_host_platform_device_count=8`` (set below, before jax is
imported) arranged as a 2 x 4 mesh ``("data", "tp")``. The batch is split over
``data``; ``param_rules`` place the params: the attention projections and the
MLP's weights Megatron-style over ``tp`` (query, key, value and the first MLP
layer by columns, the attention output and the second MLP layer by rows) with
their other axis over ``data`` (FSDP), and the embeddings, the norms and the
output layer over ``data`` alone. Adam's state follows the params.

The script prints the sharding table (``step.sharding_table``), the train
state's bytes per device against a replicated copy, the compiled step's
``memory_analysis()`` (per device), trains with ``fnn.fit`` (a tqdm bar),
saves the training loss as a PNG (``--out``: a ``.png`` file or a folder),
and ends with ``validation loss: X.XXXX`` (nats per character; the unigram
baseline, character frequencies without context, is printed first).

Measured on two CPU cores shared with other work (load average 8 to 11;
``python examples/scale_lm.py``, 2026-11-30): 826,208 params; params and Adam
state 1,407,560 bytes per device against 9,914,504 replicated (0.142); the
compiled step's temporaries 8,139,056 bytes per device with remat and
27,055,768 without (``--no-remat``); unigram baseline 3.2772, validation loss
1.9000 (perplexity 6.69) after 600 steps, 348 s of training. With
``--float32``: temporaries 9,181,488 (26,657,312 without remat), validation
loss 1.8990. (On the CPU bfloat16 saves little here; the example shows the
three tools working together, and their speed is an accelerator's.)

Usage::

    python examples/scale_lm.py             # 600 steps, about 5 minutes on 2 cores
    python examples/scale_lm.py --quick     # a smoke test, seconds
    python examples/scale_lm.py --no-remat  # to compare the step's memory
    python examples/scale_lm.py --float32   # to compare with float32 compute
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import math
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from _common import make_parser, output_path
from char_lm import ALPHABET, CHUNK, load_text
from jax.sharding import PartitionSpec as P

import fnn

MESH_SHAPE = (2, 4)  # ("data", "tp"): FSDP and the batch over 2, tensor parallel 4


def transformer_block(features: int, heads: int, hidden: int) -> fnn.Layer:
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x)); shape is kept."""
    attention = fnn.serial(fnn.LayerNorm(), fnn.MultiHeadAttention(heads, causal=True))
    mlp = fnn.serial(
        fnn.LayerNorm(), fnn.Dense(hidden), fnn.Gelu(), fnn.Dense(features)
    )
    return fnn.serial(
        fnn.named("attention", fnn.residual(attention)),
        fnn.named("mlp", fnn.residual(mlp)),
    )


def make_network(args, vocab: int) -> fnn.Layer:
    """The transformer; ``remat`` recomputes each block in the backward pass."""
    block = transformer_block(args.features, args.heads, 4 * args.features)
    return fnn.serial(
        fnn.named("embed", fnn.Embed(vocab, args.features)),
        fnn.named("position", fnn.PositionalEmbedding(args.seq_len, learned=True)),
        fnn.named("blocks", fnn.repeat(block, args.layers, remat=args.remat)),
        fnn.named("final_norm", fnn.LayerNorm()),
        fnn.named("logits", fnn.Dense(vocab)),
    )


def param_rules() -> dict[str, P]:
    """Where each params leaf lives on the ("data", "tp") mesh.

    Inside ``repeat`` every leaf has a leading axis of size ``layers`` (the
    stacked copies), hence the leading ``None``. A Dense weight is ``(in,
    out)``: ``P(None, "data", "tp")`` splits its columns over ``tp`` and its
    rows over ``data``.
    """
    columns, rows = P(None, "data", "tp"), P(None, "tp", "data")
    rules = {}
    for name in ("query", "key", "value"):  # by columns: heads over tp
        rules |= {f"blocks/*/{name}/w": columns, f"blocks/*/{name}/b": P(None, "tp")}
    rules |= {"blocks/*/out/w": rows, "blocks/*/out/b": P(None, "data")}
    rules |= {"blocks/*/1_dense/w": columns, "blocks/*/1_dense/b": P(None, "tp")}
    rules |= {"blocks/*/3_dense/w": rows, "blocks/*/3_dense/b": P(None, "data")}
    rules |= {"blocks/*layernorm/*": P(None, "data")}
    rules |= {"embed/table": P(None, "data"), "position/table": P(None, "data")}
    rules |= {"final_norm/*": P("data"), "logits/*": P("data")}
    return rules


def sequences(ids: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """Consecutive, non-overlapping ``(x, y)`` pairs, ``y`` shifted by one."""
    n = (len(ids) - 1) // length
    x = ids[: n * length].reshape(n, length)
    y = ids[1 : n * length + 1].reshape(n, length)
    return {"x": x, "y": y}


def make_loss(network: fnn.Layer):
    def loss_fn(params, batch, key):
        logits = network.apply(params, batch["x"], key=key)
        mask = batch.get("mask")
        per_char = fnn.losses.softmax_cross_entropy(logits, batch["y"])
        if mask is not None:  # padding rows of an evaluation batch
            mask = jnp.broadcast_to(mask[:, None], per_char.shape)
        return fnn.losses.sum_and_weight(per_char, mask)  # nats, characters

    return loss_fn


def bytes_per_device(tree) -> tuple[int, int]:
    """(bytes on device 0, bytes of one whole copy) of a pytree of arrays."""
    leaves = jax.tree.leaves(tree)
    local = sum(a.addressable_shards[0].data.nbytes for a in leaves)
    return local, sum(a.nbytes for a in leaves)


def plot(history, unigram: float, title: str, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.axhline(unigram, color="gray", ls="--", label="unigram baseline")
    ax.set(xlabel="step", ylabel="nats per character", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> float:
    parser = make_parser(__doc__, "a tiny model, 30 steps")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--accum-steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--no-remat", dest="remat", action="store_false")
    parser.add_argument(
        "--float32", dest="bf16", action="store_false", help="compute in float32"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seq_len, args.features, args.layers = 30, 32, 64, 2
        args.batch_size = 16

    text = load_text()
    index = {c: i for i, c in enumerate(ALPHABET)}
    ids = np.array([index[c] for c in text], dtype=np.int32)
    chunk = np.arange(len(ids)) // CHUNK % 10
    train = sequences(ids[chunk != 9], args.seq_len)
    valid = sequences(ids[chunk == 9], args.seq_len)
    if args.quick:
        valid = {k: v[:64] for k, v in valid.items()}
    vocab = len(ALPHABET)
    counts = np.bincount(train["y"].ravel(), minlength=vocab) + 1.0
    log_freq = np.log(counts / counts.sum())
    unigram = -log_freq[valid["y"]].mean()
    print(
        f"{len(text):,} characters, vocabulary {vocab}; {len(train['x']):,} "
        f"training sequences of {args.seq_len}; {jax.device_count()} devices"
    )
    print(f"unigram baseline: {unigram:.4f} nats per character")

    # The network computes in bfloat16; its params, gradients and Adam state
    # stay float32, and the logits come out float32 for the loss.
    network = make_network(args, vocab)
    if args.bf16:
        network = fnn.precision(network, compute=jnp.bfloat16, output=jnp.float32)

    key_init, key_train, key_data = jax.random.split(jax.random.key(args.seed), 3)
    _, params = network.init(key_init, (-1, args.seq_len))
    params["logits"]["b"] = jnp.asarray(log_freq, jnp.float32)  # start at unigram
    loss_fn = make_loss(network)
    mesh = jax.make_mesh(MESH_SHAPE, ("data", "tp"))
    optimizer = optax.adam(optax.cosine_decay_schedule(args.learning_rate, args.steps))
    step = fnn.make_train_step(
        loss_fn,
        optimizer,
        accum_steps=args.accum_steps,
        mesh=mesh,
        param_rules=param_rules(),
    )
    state = step.init(params, key=key_train)
    compute = "bfloat16" if args.bf16 else "float32"
    print(f"\n{sum(p.size for p in jax.tree.leaves(params)):,} params; remat "
          f"{'on' if args.remat else 'off'}; compute {compute}; "
          f"mesh {dict(mesh.shape)}")  # fmt: skip
    print(step.sharding_table(state))
    local, whole = bytes_per_device((state.params, state.opt_state))
    print(
        f"params and Adam state: {local:,} bytes per device of {whole:,} "
        f"replicated ({local / whole:.3f})"
    )
    sample = {k: v[: args.batch_size] for k, v in train.items()}
    memory = step.lower(state, sample).compile().memory_analysis()
    if memory is not None:  # XLA reports an SPMD program's sizes per device
        print(
            f"compiled step per device: arguments {memory.argument_size_in_bytes:,}"
            f", temporaries {memory.temp_size_in_bytes:,}, outputs "
            f"{memory.output_size_in_bytes:,} (aliased {memory.alias_size_in_bytes:,})"
            " bytes"
        )

    start = time.perf_counter()
    state, history = fnn.fit(
        step,
        state,
        train,
        batch_size=args.batch_size,
        steps=args.steps,
        key=key_data,
        log_every=max(args.steps // 20, 1),
    )
    print(
        f"trained {int(state.step)} steps in {time.perf_counter() - start:.1f} s; "
        f"training loss {history[-1]['loss']:.4f}"
    )
    eval_step = fnn.make_eval_step(loss_fn)
    batches = fnn.data.batches(valid, 64, shuffle=False, remainder="pad")
    loss = fnn.evaluate(eval_step, state, batches)["loss"]
    path = output_path(args.out, "scale_lm.png")
    title = f"{args.layers} blocks, remat {'on' if args.remat else 'off'}, mesh 2 x 4"
    plot(history, unigram, title, path)
    print(f"saved the training loss to {path}")
    print(f"validation perplexity: {math.exp(loss):.2f}")
    print(f"validation loss: {loss:.4f}")
    return loss


if __name__ == "__main__":
    main()
