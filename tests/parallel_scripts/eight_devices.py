"""Params sharded by rules on 8 CPU devices, against the one-device step.

Run by tests/test_sharding.py in a subprocess: the device count must be set in
XLA_FLAGS before JAX is imported. Trains 5 float32 Adam steps with
accum_steps=2 and a padding mask under FSDP, tensor parallel and FSDP x TP
rules, and reports the largest difference from the one-device step relative
to each leaf's largest entry, the shardings the state ends with, and where the
compiled step's collectives are (inside the accumulation loop or outside).
Prints one JSON line; the test makes the assertions.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import fnn
from fnn.training.rules import spec_text

STEPS, BATCH, ACCUM = 5, 32, 2
NET = fnn.serial(fnn.Dense(16), fnn.Relu(), fnn.Dense(16), fnn.Relu(), fnn.Dense(8))
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")


def loss_fn(params, batch, key):
    err = jnp.sum((NET.apply(params, batch["x"]) - batch["y"]) ** 2, -1)
    return jnp.sum(batch["mask"] * err), jnp.sum(batch["mask"])


def batches():
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        yield {
            "x": rng.normal(size=(BATCH, 8)).astype(np.float32),
            "y": rng.normal(size=(BATCH, 8)).astype(np.float32),
            "mask": (np.arange(BATCH) % 5 != 3).astype(np.float32),  # uneven
        }


def rel_diff(a, b):
    """The largest difference of two trees, relative to each leaf's largest
    entry."""
    diffs = [
        float(np.max(np.abs(np.asarray(x) - y)) / np.max(np.abs(y)))
        for x, y in zip(jax.tree.leaves(a), map(np.asarray, jax.tree.leaves(b)))
        if np.any(y)
    ]
    return max(diffs, default=0.0)


def collectives(hlo):
    """Counts of collectives in the accumulation loop's body and outside."""
    comps, calls, current = {}, {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(1)
            comps[current] = []
        elif current:
            comps[current].append(line)
    for name, lines in comps.items():
        text = "\n".join(lines)
        calls[name] = set(re.findall(r"(?:body|calls|to_apply)=%([\w.\-]+)", text))
    loop, todo = set(), re.findall(r"while\(.*body=%([\w.\-]+)", hlo)
    while todo:
        name = todo.pop()
        if name not in loop:
            loop.add(name)
            todo += calls.get(name, ())
    counts = {"loop": {}, "outside": {}}
    for name, lines in comps.items():
        where = counts["loop" if name in loop else "outside"]
        for line in lines:
            for op in COLLECTIVES:
                if re.search(rf"= .+? {op}(-start)?\(", line):
                    where[op] = where.get(op, 0) + 1
    return counts


def bn_loss(params, state, batch, key):
    y, state = BN_NET.apply(params, state, batch["x"], train=True)
    return (jnp.sum((y[:, 0] - batch["y"][:, 0]) ** 2), BATCH // ACCUM), state


# No bias in front of BatchNorm: its gradient would be zero up to rounding.
BN_NET = fnn.with_state(
    fnn.serial(fnn.Dense(8, use_bias=False), fnn.BatchNorm(), fnn.Dense(1))
)


def one_device(params, *, state=None, loss=loss_fn, opt=None, **kw):
    """The train state and last metrics of the one-device step."""
    ref = fnn.make_train_step(loss, opt or optax.adam(1e-2), accum_steps=ACCUM, **kw)
    r = ref.init(params, key=jax.random.key(1), state=state)
    for b in batches():
        r, mr = ref(r, b)
    return r, mr


def run(
    reference,
    mesh,
    rules,
    params,
    *,
    state=None,
    loss=loss_fn,
    opt=None,
    per_call=1,
    **kw,
):
    r, mr = reference
    opt = opt or optax.adam(1e-2)
    step = fnn.make_train_step(
        loss,
        opt,
        accum_steps=ACCUM,
        mesh=mesh,
        param_rules=rules,
        steps_per_call=per_call,
        **kw,
    )
    s = step.init(params, key=jax.random.key(1), state=state)
    placed = [x.sharding for x in jax.tree.leaves(s)]
    data = list(batches())
    calls = list(fnn.data.stack(data, per_call)) if per_call > 1 else data
    hlo = step.lower(s, calls[0]).compile().as_text()
    for b in calls:
        s, ms = step(s, b)
    ms = jax.tree.map(lambda m: m[-1], ms) if per_call > 1 else ms
    names = ["/".join(str(k.key) for k in p) for p, _ in tree_paths(s.params)]
    result = {
        "params": rel_diff(s.params, r.params),
        "opt_state": rel_diff(s.opt_state, r.opt_state),
        "state": rel_diff(s.state, r.state) if state else 0.0,
        "metrics": rel_diff(ms, mr),
        "step": int(s.step),
        "specs": {n: spec_text(x.sharding.spec) for n, x in zip(names, tree_leaves(s))},
        "mu_follows_params": all(
            m.sharding.spec == p.sharding.spec
            for m, p in zip(
                jax.tree.leaves(s.opt_state[0]._asdict().get("mu", [])), tree_leaves(s)
            )
        ),
        "collectives": collectives(hlo),
        # equal shardings before and after: the step compiles once
        "shardings_kept": placed == [x.sharding for x in jax.tree.leaves(s)],
    }
    if per_call == 1 and state is None:
        result["table"] = step.sharding_table(s)
    return result


def skips_together(params, mesh, rules):
    """Loss scaling with an infinite loss on the last device's rows only: the
    update is skipped (params unchanged) and the scale halved everywhere."""
    step = fnn.make_train_step(
        loss_fn,
        optax.adam(1e-3),
        mesh=mesh,
        param_rules=rules,
        accum_steps=ACCUM,
        loss_scale="dynamic",
    )
    ts = step.init(params, key=jax.random.key(1))
    batch = next(batches())
    ts, first = step(ts, batch)
    before = jax.tree.map(np.asarray, ts.params)
    bad = dict(batch, y=batch["y"].copy())
    bad["y"][-1] = np.inf  # the last row is on the last device
    ts, second = step(ts, bad)
    kept = jax.tree.map(np.array_equal, before, jax.tree.map(np.asarray, ts.params))
    return {
        "skipped": [float(first["skipped"]), float(second["skipped"])],
        "scale": float(ts.opt_state.scale),
        "params_kept": all(jax.tree.leaves(kept)),
        "scale_replicated": ts.opt_state.scale.sharding.is_fully_replicated,
    }


def tree_paths(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def tree_leaves(ts):
    return jax.tree.leaves(ts.params)


def main():
    _, params = NET.init(jax.random.key(0), (-1, 8))
    data_mesh = jax.make_mesh((8,), ("data",))
    mesh = jax.make_mesh((2, 4), ("data", "tp"))
    fsdp = {"*": P("data")}
    megatron = {  # columns, then rows, of the first two layers
        "0_dense/w": P(None, "tp"),
        "0_dense/b": P("tp"),
        "2_dense/w": P("tp", None),
    }
    fsdp_tp = {
        "0_dense/w": P("data", "tp"),
        "0_dense/b": P("tp"),
        "2_dense/w": P("tp", "data"),
        "2_dense/b": P("data"),
        "4_dense/*": P("data"),
    }
    ref = one_device(params)
    out = {
        "devices": jax.device_count(),
        "fsdp": run(ref, data_mesh, fsdp, params),
        "tp": run(ref, mesh, megatron, params),
        "fsdp_tp": run(ref, mesh, fsdp_tp, params),
        "fsdp_5_per_call": run(ref, data_mesh, fsdp, params, per_call=STEPS),
    }
    # Plain BatchNorm sees the global microbatch, as on one device.
    _, bn_params, bn_state = BN_NET.init(jax.random.key(2), (-1, 8))
    kw = {"state": bn_state, "loss": bn_loss, "has_state": True}
    out["fsdp_batchnorm"] = run(
        one_device(bn_params, **kw), data_mesh, {"*/w": P("data")}, bn_params, **kw
    )
    out["loss_scale"] = {
        "replicated": skips_together(params, data_mesh, None),
        "fsdp": skips_together(params, data_mesh, fsdp),
    }
    # A dimension that does not divide over its mesh axis: 12 rows over 8.
    step = fnn.make_train_step(
        loss_fn, optax.sgd(0.1), mesh=data_mesh, param_rules=fsdp
    )
    try:
        step.init({"w": jnp.zeros((12, 8))}, key=jax.random.key(0))
        out["not_dividing_error"] = None
    except ValueError as e:
        out["not_dividing_error"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
