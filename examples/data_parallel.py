"""Data-parallel training of an MLP on sklearn's digits, on 1 or N devices.

The same code runs on one device, on N devices of one process, and on N
processes (one per host, or several on one machine):

    python examples/data_parallel.py --quick                 # every local device
    python examples/data_parallel.py --devices 4 --quick     # 4 fake CPU devices
    python examples/data_parallel.py --launch 2 --quick      # 2 processes here

``--launch N`` starts N processes of this script on 127.0.0.1; each one can
also be started by hand (one shell each, same port):

    python examples/data_parallel.py --coordinator 127.0.0.1:12345 \\
        --num-processes 2 --process-id 0
    python examples/data_parallel.py --coordinator 127.0.0.1:12345 \\
        --num-processes 2 --process-id 1

Training runs in ``fnn.fit`` (a tqdm progress bar on process 0) with the step
from ``fnn.make_train_step(..., mesh=mesh)``. Each process holds its own share
of the training examples and ``fit`` batches it; the step assembles the global
batch from the rows of every process and splits it over the mesh. Process 0
saves the training loss and accuracy per epoch as a PNG (``--out``: a ``.png``
file or a directory) and prints ``test accuracy: 0.xxxx`` as the last line.
"""

import os
import socket
import subprocess
import sys

from _common import digits_split, make_parser, output_path  # no jax: see below


def parse_args():
    p = make_parser(__doc__, "a few epochs only", seed=False)
    p.add_argument("--devices", type=int, help="fake CPU devices per process")
    p.add_argument("--coordinator", help="host:port of process 0")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--launch", type=int, help="start this many local processes")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--accum-steps", type=int, default=2)
    return p.parse_args()


def launch(n: int) -> int:
    """Starts n processes of this script on 127.0.0.1 and waits for them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = sys.argv[1:]
    i = argv.index("--launch")
    rest = argv[:i] + argv[i + 2 :]  # the same options, without --launch N
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *rest, "--coordinator", f"127.0.0.1:{port}"]
            + ["--num-processes", str(n), "--process-id", str(i)]
        )
        for i in range(n)
    ]
    codes = [p.wait() for p in procs]
    return max(codes, key=abs)


args = parse_args()
if args.launch:
    sys.exit(launch(args.launch))
if args.devices:  # must precede the first import of jax
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import fnn

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(history, accuracy: float, title: str, path: str) -> None:
    """Training loss and accuracy per epoch, with the final test accuracy."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["loss"] for h in history], "o-")
    ax_loss.set(xlabel="epoch", title="training loss", yscale="log")
    ax_acc.plot(epochs, [h["accuracy"] for h in history], "o-", label="train")
    ax_acc.axhline(accuracy, color="C1", linestyle="--", label="test, at the end")
    ax_acc.set(xlabel="epoch", title="accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# Options, or FNN_COORDINATOR / FNN_NUM_PROCESSES / FNN_PROCESS_ID.
distributed = bool(args.coordinator or os.environ.get("FNN_COORDINATOR"))
if distributed:
    fnn.initialize(args.coordinator, args.num_processes, args.process_id)

mesh = jax.make_mesh((jax.device_count(),), ("data",))
rank, nproc = jax.process_index(), jax.process_count()
x_train, x_test, y_train, y_test = digits_split(stratify=False)
x_train, x_test = ((x / 16.0).astype(np.float32) for x in (x_train, x_test))

net = fnn.serial(fnn.Dense(64), fnn.Relu(), fnn.Dense(10))
_, params = net.init(jax.random.key(0), (-1, 64))  # same seed in every process


def loss_fn(params, batch, key):
    logits = net.apply(params, batch["x"], key=key)
    losses = optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["y"])
    return jnp.sum(losses), batch["y"].shape[0], {"accuracy": correct}


opt = optax.adam(3e-3)
step = fnn.make_train_step(loss_fn, opt, accum_steps=args.accum_steps, mesh=mesh)
ts = step.init(params, key=jax.random.key(1))  # replicated on every device
global_batch = args.batch_size  # a multiple of mesh.size * accum_steps
rows = global_batch // nproc  # this process's rows of each global batch
# Each process trains on its own share of the examples; the step assembles
# the global batch from every process's rows.
n = len(y_train) // nproc * nproc
local = {k: v[rank:n:nproc] for k, v in {"x": x_train, "y": y_train}.items()}

ts, history = fnn.fit(
    step,
    ts,
    local,
    batch_size=rows,
    epochs=3 if args.quick else args.epochs,
    key=jax.random.key(2),  # the same data order in every process
)

params = (
    jax.device_get(ts.params)
    if nproc == 1
    else jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), ts.params)
)
accuracy = float(np.mean(np.argmax(net.apply(params, x_test), -1) == y_test))


if rank == 0:
    path = output_path(args.out, "data_parallel.png")
    processes = f"{nproc} process" + ("es" if nproc > 1 else "")
    title = f"data parallel MLP: {mesh.size} devices, {processes}"
    plot(history, accuracy, title, path)
    print(f"saved {path}")
    print(f"train loss: {history[-1]['loss']:.4f}")
    print(f"devices: {mesh.size}, processes: {nproc}")
    print(f"test accuracy: {accuracy:.4f}")
if distributed:
    jax.distributed.shutdown()
