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

Every process reads the whole data set and feeds its own slice of each global
batch. The last line printed (by process 0) is ``test accuracy: 0.xxxx``.
"""

import argparse
import os
import socket
import subprocess
import sys


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, help="fake CPU devices per process")
    p.add_argument("--coordinator", help="host:port of process 0")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--launch", type=int, help="start this many local processes")
    p.add_argument("--quick", action="store_true", help="a few epochs only")
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
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fnn

# Options, or FNN_COORDINATOR / FNN_NUM_PROCESSES / FNN_PROCESS_ID.
distributed = bool(args.coordinator or os.environ.get("FNN_COORDINATOR"))
if distributed:
    fnn.initialize(args.coordinator, args.num_processes, args.process_id)

mesh = fnn.data_mesh()
rank, nproc = jax.process_index(), jax.process_count()
X, y = load_digits(return_X_y=True)
X = (X / 16.0).astype(np.float32)
x_train, x_test, y_train, y_test = train_test_split(
    X, y.astype(np.int32), test_size=0.25, random_state=0
)

net = fnn.serial(fnn.Dense(64), fnn.Relu(), fnn.Dense(10))
_, params = net.init(jax.random.key(0), (-1, 64))  # same seed in every process


def loss_fn(params, batch, key):
    logits = net.apply(params, batch["x"], key=key)
    losses = optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["y"])
    return jnp.sum(losses), batch["y"].shape[0], {"accuracy": correct}


opt = optax.adam(3e-3)
ts = fnn.replicate(fnn.TrainState.create(params, opt, key=jax.random.key(1)), mesh)
step = fnn.make_train_step(loss_fn, opt, accum_steps=args.accum_steps, mesh=mesh)
global_batch = args.batch_size  # a multiple of mesh.size * accum_steps
rows = global_batch // nproc  # this process's rows of each global batch

epochs = 3 if args.quick else args.epochs
for epoch in range(epochs):
    data = {"x": x_train, "y": y_train}
    key = jax.random.key(epoch)  # same order in every process
    for batch in fnn.data.batches(data, global_batch, key=key):
        local = {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}
        ts, metrics = step(ts, fnn.shard_batch(local, mesh))
    if rank == 0:
        print(f"epoch {epoch + 1}: loss {float(metrics['loss']):.4f}", flush=True)

params = (
    jax.device_get(ts.params)
    if nproc == 1
    else jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), ts.params)
)
accuracy = float(np.mean(np.argmax(net.apply(params, x_test), -1) == y_test))
if rank == 0:
    print(f"devices: {mesh.size}, processes: {nproc}")
    print(f"test accuracy: {accuracy:.4f}")
if distributed:
    jax.distributed.shutdown()
