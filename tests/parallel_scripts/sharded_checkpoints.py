"""Checkpoints of sharded train states, restored onto other device counts.

    python sharded_checkpoints.py 1 DIR   # 1 CPU device
    python sharded_checkpoints.py 8 DIR   # 8 CPU devices

The first run with N devices trains one FSDP step on its devices and saves
the train state to DIR/saved_<N> with fnn.Checkpointer, and its values to
DIR/saved_<N>.npz. Every run restores the checkpoints in DIR onto its own
meshes: with 1 device a one-device mesh; with 8 the 8-device FSDP mesh (the
other runs' checkpoints) and a 2x4 mesh with FSDP x TP rules (all of them).
Each restore goes into a target from step.init (real arrays) and one from
step.init of abstract params (nothing allocated). Prints one JSON line: per
restore, whether the values equal the saved ones and the restored leaves have
the target's shardings. Run by tests/test_sharding.py: 1, then 8, then 1.
"""

import os
import sys

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[1]}"

import json
from pathlib import Path

import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import fnn
from fnn.training.rules import spec_text

DEVICES = int(sys.argv[1])
NET = fnn.serial(fnn.Dense(16), fnn.Relu(), fnn.Dense(8))
FSDP = {"*": P("data")}
FSDP_TP = {"0_dense/*": P("tp"), "2_dense/w": P("tp", "data"), "2_dense/b": P("data")}


def loss_fn(params, batch, key):
    return fnn.losses.sum_and_weight(
        fnn.losses.squared_error(NET.apply(params, batch["x"]), batch["y"])
    )


def make_step(mesh, rules):
    return fnn.make_train_step(loss_fn, optax.adam(1e-2), mesh=mesh, param_rules=rules)


def flat(tree):
    return {
        jax.tree_util.keystr(path): np.asarray(jax.device_get(x))
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    }


def restore(directory, step, params, saved):
    ts = step.init(params, key=jax.random.key(1))
    abstract = step.init(jax.eval_shape(lambda: params), key=jax.random.key(1))
    out = {}
    for name, target in (("real", ts), ("abstract", abstract)):
        with fnn.Checkpointer(directory) as ckpt:
            restored, _ = ckpt.restore(target)
        got = flat(restored)
        out[name] = {
            "equal": sorted(got) == sorted(saved)
            and all(np.array_equal(got[k], saved[k]) for k in saved),
            "shardings": all(
                r.sharding.is_equivalent_to(t.sharding, r.ndim)
                for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target))
            ),
            "key": bool(restored.key == ts.key),
        }
    return out


def main(directory):
    directory = Path(directory)
    _, params = NET.init(jax.random.key(0), (-1, 8))
    data_mesh = jax.make_mesh((DEVICES,), ("data",))
    step = make_step(data_mesh, FSDP)
    ts = step.init(params, key=jax.random.key(1))
    batch = {"x": np.ones((8, 8), np.float32), "y": np.zeros((8, 8), np.float32)}
    ts, _ = step(ts, batch)
    if not (directory / f"saved_{DEVICES}.npz").exists():  # the first run saves
        with fnn.Checkpointer(directory / f"saved_{DEVICES}", async_save=False) as c:
            c.save(1, ts)
        np.savez(directory / f"saved_{DEVICES}.npz", **flat(ts))
    targets = {"data": step}
    if DEVICES == 8:
        targets["2x4"] = make_step(jax.make_mesh((2, 4), ("data", "tp")), FSDP_TP)
    out = {
        "devices": jax.device_count(),
        "saved_specs": sorted(
            {spec_text(x.sharding.spec) for x in jax.tree.leaves(ts.params)}
        ),
    }
    for source in sorted(directory.glob("saved_*.npz")):
        saved = dict(np.load(source))
        for name, target_step in targets.items():
            if source.stem == f"saved_{DEVICES}" and name == "data":
                continue  # the mesh it was saved from
            key = f"{source.stem} -> {DEVICES} {name}"
            out[key] = restore(directory / source.stem, target_step, params, saved)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[2])
