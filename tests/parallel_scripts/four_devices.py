"""Data parallel on 4 CPU devices in one process, against the one-device step.

Run by tests/test_parallel.py in a subprocess: the device count must be set in
XLA_FLAGS before JAX is imported. Prints one JSON line of measurements; the
test makes the assertions.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fnn

jax.config.update("jax_enable_x64", True)
ACCUM = 2
BATCH = 16
STEPS = 3


def mlp_loss(params, batch, key):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    err = h @ params["w2"] - batch["y"]
    m = batch["mask"]
    return jnp.sum(m * err**2), jnp.sum(m), {"abs": jnp.sum(m * jnp.abs(err))}


def max_diff(a, b):
    return max(
        (
            float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        ),
        default=0.0,
    )


def run_pair(make_ref, make_par, params, state, batch, key):
    ref, par = make_ref(), make_par()
    r = ref.init(params, key=key, state=state)
    p = par.init(params, key=key, state=state)
    sb = par.shard(batch)
    hlo = par.lower(p, sb).compile().as_text()
    for _ in range(STEPS):
        r, mr = ref(r, batch)
        p, mp = par(p, sb)
    return {
        "params": max_diff(r.params, p.params),
        "opt_state": max_diff(r.opt_state, p.opt_state),
        "state": max_diff(r.state, p.state),
        "state_leaves": len(jax.tree.leaves(p.state)),
        "metrics": max_diff(mr, mp),
        "metric_names": sorted(mp),
        "dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(p.params)}),
        "all_reduce": hlo.count("all-reduce("),
        "replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(p)),
        "step": int(p.step),
    }


def main():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    out = {"devices": mesh.size}
    k = jax.random.split(jax.random.key(0), 5)
    params = {
        "w1": jax.random.normal(k[0], (3, 5)),
        "b1": jnp.zeros(5),
        "w2": jax.random.normal(k[1], (5,)),
    }
    mask = (jnp.arange(BATCH) % 5 != 3).astype(jnp.float64)  # uneven per device
    batch = {
        "x": jax.random.normal(k[2], (BATCH, 3)),
        "y": jax.random.normal(k[3], (BATCH,)),
        "mask": mask,
    }
    opt = optax.adam(0.05)
    out["mlp"] = run_pair(
        lambda: fnn.make_train_step(
            mlp_loss, opt, accum_steps=ACCUM, donate=False, grad_norm=True
        ),
        lambda: fnn.make_train_step(
            mlp_loss, opt, accum_steps=ACCUM, mesh=mesh, grad_norm=True
        ),
        params,
        None,
        batch,
        jax.random.key(1),
    )

    # BatchNorm synchronised over the mesh axis: the statistics of a device's
    # microbatch j, averaged over devices, are those of global microbatch j.
    def net(axis_name):
        return fnn.with_state(
            fnn.serial(fnn.Dense(4), fnn.BatchNorm(axis_name=axis_name), fnn.Dense(1))
        )

    model = net(None)
    _, p_bn, s_bn = model.init(jax.random.key(2), (-1, 3))
    p_bn = jax.tree.map(lambda a: a.astype(jnp.float64), p_bn)
    s_bn = jax.tree.map(lambda a: a.astype(jnp.float64), s_bn)

    def bn_loss(axis_name):
        m = net(axis_name)

        def loss(params, state, batch, key):
            y, state = m.apply(params, state, batch["x"], train=True)
            err = y[:, 0] - batch["y"]
            return (jnp.sum(err**2), err.shape[0]), state

        return loss

    # SGD, not Adam: the gradient of the bias before BatchNorm is zero up to
    # rounding, and Adam would turn that rounding noise into full-size steps.
    sgd = optax.sgd(0.1)
    out["batchnorm"] = run_pair(
        lambda: fnn.make_train_step(
            bn_loss(None), sgd, accum_steps=ACCUM, has_state=True, donate=False
        ),
        lambda: fnn.make_train_step(
            bn_loss("data"), sgd, accum_steps=ACCUM, has_state=True, mesh=mesh
        ),
        p_bn,
        s_bn,
        batch,
        jax.random.key(3),
    )

    # A batch that does not split over devices x microbatches is a clear error.
    step = fnn.make_train_step(mlp_loss, opt, accum_steps=3, mesh=mesh)
    try:  # 16 rows over 4 devices x 3 microbatches
        step(step.init(params, key=jax.random.key(1)), batch)
        out["bad_batch_error"] = None
    except ValueError as e:
        out["bad_batch_error"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
