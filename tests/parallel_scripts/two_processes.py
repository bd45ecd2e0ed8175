"""One process of a data-parallel job on 127.0.0.1, or the one-process reference.

    python two_processes.py OUT_DIR                      # reference, 1 device
    python two_processes.py OUT_DIR COORD N ID CKPT_DIR  # process ID of N
    python two_processes.py OUT_DIR COORD N ID CKPT_DIR fsdp

Each process trains 3 steps on its own half of every global batch, saves the
train state with fnn.Checkpointer (every process takes part), restores it into
a fresh target from step.init, and writes its params and the restored params to
OUT_DIR/params_<ID>.npz. By default each process has 1 CPU device and the
params are replicated; with ``fsdp`` each has 2 and the params are sharded over
all 4 devices (both processes) by param_rules. With ``die`` as a sixth
argument, process 1 kills itself after start-up and process 0 waits in a
collective: the test checks that it fails instead of hanging. Run by
tests/test_parallel.py and tests/test_sharding.py.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + (
    "2" if sys.argv[-1] == "fsdp" else "1"
)

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

import fnn
from fnn.training.rules import spec_text

jax.config.update("jax_enable_x64", True)
STEPS, BATCH, ACCUM = 3, 8, 2
FSDP = {"w1": P(None, "data"), "w2": P("data")}  # over the 4 devices of 2 processes


def loss_fn(params, batch, key):
    err = jnp.tanh(batch["x"] @ params["w1"]) @ params["w2"] - batch["y"]
    return jnp.sum(err**2), err.shape[0]


def data(step):
    k1, k2 = jax.random.split(jax.random.key(100 + step))
    return {
        "x": np.asarray(jax.random.normal(k1, (BATCH, 3))),
        "y": np.asarray(jax.random.normal(k2, (BATCH,))),
    }


def initial_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w1": jax.random.normal(k1, (3, 4)), "w2": jax.random.normal(k2, (4,))}


def main(out_dir, coordinator=None, n=1, pid=0, ckpt_dir=None, mode=None):
    opt = optax.adam(0.05)
    if coordinator is None:  # the reference: one process, one device
        step = fnn.make_train_step(loss_fn, opt, accum_steps=ACCUM)
        ts = step.init(initial_params(), key=jax.random.key(1))
        for i in range(STEPS):
            ts, _ = step(ts, data(i))
        np.savez(os.path.join(out_dir, "reference.npz"), **ts.params)
        return
    fnn.initialize(
        coordinator,
        n,
        pid,
        initialization_timeout=30,
        heartbeat_timeout_seconds=int(os.environ.get("FNN_TEST_HEARTBEAT", "5")),
        shutdown_timeout_seconds=10,
    )
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    local = 2 if mode == "fsdp" else 1
    assert mesh.size == n * local and jax.process_count() == n, mesh
    rules = FSDP if mode == "fsdp" else None
    step = fnn.make_train_step(
        loss_fn, opt, accum_steps=ACCUM, mesh=mesh, param_rules=rules
    )
    ts = step.init(initial_params(), key=jax.random.key(1))
    rows = BATCH // n
    if mode == "die":
        if pid == 1:
            os._exit(17)  # as if killed: no shutdown, no goodbye
        while True:  # the survivor keeps stepping with a dead peer
            ts, _ = step(ts, data(0))
            jax.block_until_ready(ts)
    for i in range(STEPS):
        local = {k: v[pid * rows : (pid + 1) * rows] for k, v in data(i).items()}
        ts, _ = step(ts, local)  # this process's rows of the global batch
    with fnn.Checkpointer(ckpt_dir, async_save=False) as ckpt:
        ckpt.save(STEPS, ts)
        target = step.init(initial_params(), key=jax.random.key(1))
        restored, _ = ckpt.restore(target)
    # the global values, gathered from both processes' shards
    result = multihost_utils.process_allgather(ts.params, tiled=True)
    for k, v in multihost_utils.process_allgather(restored.params, tiled=True).items():
        result["restored_" + k] = v
    result["restored_step"] = np.asarray(restored.step.addressable_data(0))
    result["specs"] = np.array(
        [spec_text(ts.params[k].sharding.spec) for k in sorted(ts.params)]
    )
    result["restored_specs"] = np.array(
        [spec_text(restored.params[k].sharding.spec) for k in sorted(ts.params)]
    )
    np.savez(os.path.join(out_dir, f"params_{pid}.npz"), **result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) == 1:
        main(a[0])
    else:
        main(a[0], a[1], int(a[2]), int(a[3]), a[4], a[5] if len(a) > 5 else None)
