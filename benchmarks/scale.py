"""Memory per device of a training step with params placed by rules.

An MLP 1024-1024-1024-1024-1024 (four 1024x1024 Dense layers with biases,
4.2 M float32 params, ReLU, squared error), Adam, a global batch of 64 rows,
on 8 simulated CPU devices (``--xla_force_host_platform_device_count``):

* ``replicated``: ``make_train_step(..., mesh=mesh)``, data parallel over 8;
* ``fsdp_rows``: ``param_rules={"*": P("data")}`` on the same mesh: params
  and Adam state split over the 8 devices along their first axis (a weight
  ``(in, out)`` by rows);
* ``fsdp_cols``: ``{"*/w": P(None, "data"), "*/b": P("data")}``: the weights
  split by columns instead;
* ``tp``: a 2x4 ``("data", "tp")`` mesh, the layers alternately split by
  columns and by rows over ``tp`` (Megatron's pairs), replicated over
  ``data``;
* ``fsdp_tp``: the same 2x4 mesh, the TP specs with ``data`` on the other
  axis of each weight.

For each, and for ``accum_steps`` 1 and 4, it prints the train state's bytes
per device (``step.sharding_table``'s total), the compiled step's
``memory_analysis()`` (arguments, outputs, aliased, temporaries; XLA reports
them per device for an SPMD program) and the collectives of the compiled HLO
inside the accumulation loop and outside it.

With ``--remat`` it measures rematerialisation instead, on one device: a
16-block residual MLP (each block ``x + Dense(256)(tanh(Dense(1024)(x)))``,
a Dense(1) head, squared error, batch 512 or ``--batch``) written five ways:
``repeat(block, 16)`` with ``remat=False``, ``True`` and the policy
``dots_with_no_batch_dims_saveable``, and ``serial`` of 16 blocks without and
with ``fnn.remat`` around each. For each it prints the temporary bytes of the
compiled gradient (``jax.jit(jax.grad(loss)).lower(...).compile()
.memory_analysis().temp_size_in_bytes``) and of the compiled training step
(``make_train_step``, Adam), and the largest absolute difference of the
gradients from those of the same network without remat.

Usage::

    python benchmarks/scale.py            # the sharding table, about 20 s on 2 cores
    python benchmarks/scale.py --remat    # the remat table, about 45 s
    python benchmarks/scale.py --remat --batch 2048
"""

from __future__ import annotations

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import datetime
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from steps import machine

import fnn

WIDTH, LAYERS, BATCH = 1024, 4, 64
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")


def model() -> fnn.Layer:
    layers = []
    for _ in range(LAYERS - 1):
        layers += [fnn.Dense(WIDTH), fnn.Relu()]
    return fnn.serial(*layers, fnn.Dense(WIDTH))


NET = model()


def loss_fn(params, batch, key):
    err = NET.apply(params, batch["x"]) - batch["y"]
    return jnp.sum(err**2), err.shape[0]


def variants() -> dict[str, tuple]:
    data = jax.make_mesh((8,), ("data",))
    mesh = jax.make_mesh((2, 4), ("data", "tp"))
    dense = [f"{2 * i}_dense" for i in range(LAYERS)]
    tp, fsdp_tp = {}, {}
    for i, name in enumerate(dense):
        if i % 2 == 0:  # columns: w (in, out) split on out, and its bias
            tp |= {f"{name}/w": P(None, "tp"), f"{name}/b": P("tp")}
            fsdp_tp |= {f"{name}/w": P("data", "tp"), f"{name}/b": P("tp")}
        else:  # rows: w split on in; the bias follows the output
            tp |= {f"{name}/w": P("tp", None)}
            fsdp_tp |= {f"{name}/w": P("tp", "data"), f"{name}/b": P("data")}
    return {
        "replicated": (data, None),
        "fsdp_rows": (data, {"*": P("data")}),
        "fsdp_cols": (data, {"*/w": P(None, "data"), "*/b": P("data")}),
        "tp": (mesh, tp),
        "fsdp_tp": (mesh, fsdp_tp),
    }


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Collectives of the HLO inside the while loops' bodies and outside."""
    comps, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(1)
            comps[current] = []
        elif current:
            comps[current].append(line)
    calls = {
        name: re.findall(r"(?:body|calls|to_apply)=%([\w.\-]+)", "\n".join(lines))
        for name, lines in comps.items()
    }
    loop, todo = set(), re.findall(r"while\(.*body=%([\w.\-]+)", hlo)
    while todo:
        name = todo.pop()
        if name not in loop:
            loop.add(name)
            todo += calls.get(name, [])
    counts = {"loop": {}, "outside": {}}
    for name, lines in comps.items():
        where = counts["loop" if name in loop else "outside"]
        for line in lines:
            for op in COLLECTIVES:
                if re.search(rf"= .+? {op}(-start)?\(", line):
                    where[op] = where.get(op, 0) + 1
    return counts


def measure(mesh, rules, accum: int, params, batch) -> dict:
    step = fnn.make_train_step(
        loss_fn, optax.adam(1e-3), accum_steps=accum, mesh=mesh, param_rules=rules
    )
    abstract = step.init(jax.eval_shape(lambda: params), key=jax.random.key(1))
    table = step.sharding_table(abstract).splitlines()
    state = int(table[-1].split()[-2].replace(",", ""))
    ts = step.init(params, key=jax.random.key(1))
    compiled = step.lower(ts, batch).compile()
    mem = compiled.memory_analysis()
    return {
        "state": state,
        "args": mem.argument_size_in_bytes,
        "out": mem.output_size_in_bytes,
        "alias": mem.alias_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
        "collectives": collectives(compiled.as_text()),
    }


def fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"


REMAT_WIDTH, REMAT_HIDDEN, REMAT_BLOCKS = 256, 1024, 16


def remat_block() -> fnn.Layer:
    return fnn.residual(
        fnn.serial(fnn.Dense(REMAT_HIDDEN), fnn.Tanh(), fnn.Dense(REMAT_WIDTH))
    )


def remat_variants() -> dict[str, fnn.Layer]:
    n, block = REMAT_BLOCKS, remat_block()
    dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return {
        f"repeat(block, {n})": fnn.repeat(block, n),
        f"repeat(block, {n}, remat=True)": fnn.repeat(block, n, remat=True),
        f"repeat(block, {n}, remat=dots_with_no_batch_dims_saveable)": fnn.repeat(
            block, n, remat=dots
        ),
        f"serial({n} x block)": fnn.serial(*[block] * n),
        f"serial({n} x remat(block))": fnn.serial(*[fnn.remat(block)] * n),
    }


def remat_table(batch_size: int) -> None:
    """Temporaries of the gradient and of the step, with and without remat."""
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(batch_size, REMAT_WIDTH)).astype(np.float32),
        "y": rng.normal(size=(batch_size, 1)).astype(np.float32),
    }
    print(
        f"{REMAT_BLOCKS} blocks x + Dense({REMAT_WIDTH})(tanh(Dense({REMAT_HIDDEN})"
        f"(x))), Dense(1) head, batch {batch_size}, float32, one device\n"
    )
    print(
        "| network | grad temp (MiB) | grad: plain / this | step temp (MiB) "
        "| step: plain / this | max abs grad difference |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    reference = {}  # the gradients and temporaries of the network without remat
    for name, body in remat_variants().items():
        net = fnn.serial(body, fnn.Dense(1))
        _, params = net.init(jax.random.key(0), (-1, REMAT_WIDTH))

        def loss_fn(params, batch, key, net=net):
            err = net.apply(params, batch["x"]) - batch["y"]
            return jnp.sum(err**2), err.shape[0]

        grad_fn = jax.jit(jax.grad(lambda p, b, f=loss_fn: f(p, b, None)[0]))
        grad_temp = (
            grad_fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
        )
        grads = grad_fn(params, batch)
        step = fnn.make_train_step(loss_fn, optax.adam(1e-3))
        ts = step.init(params, key=jax.random.key(1))
        step_temp = step.lower(ts, batch).compile().memory_analysis().temp_size_in_bytes
        kind = "repeat" if name.startswith("repeat") else "serial"
        if kind not in reference:
            reference[kind] = (grads, grad_temp, step_temp)
        ref, ref_grad, ref_step = reference[kind]
        diff = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True)
        )
        mib = 2.0**20
        print(
            f"| `{name}` | {grad_temp / mib:.2f} | {ref_grad / grad_temp:.2f} "
            f"| {step_temp / mib:.2f} | {ref_step / step_temp:.2f} | {diff:.1e} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--remat", action="store_true", help="the remat table instead of sharding"
    )
    parser.add_argument(
        "--batch", type=int, default=512, help="the remat table's batch size"
    )
    args = parser.parse_args()
    print(f"{machine()}, {datetime.date.today()}")
    if args.remat:
        remat_table(args.batch)
        return
    assert jax.device_count() == 8, jax.devices()
    _, params = NET.init(jax.random.key(0), (-1, WIDTH))
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(BATCH, WIDTH)).astype(np.float32),
        "y": rng.normal(size=(BATCH, WIDTH)).astype(np.float32),
    }
    mib = 2.0**20
    print(f"MLP {LAYERS} x Dense({WIDTH}), Adam, batch {BATCH}, 8 CPU devices\n")
    print(
        "| variant | accum | state/device (MiB) | state vs replicated | args (MiB) "
        "| temp (MiB) | args + out - alias + temp (MiB) | vs replicated "
        "| collectives in the loop | outside |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for accum in (1, 4):
        base = None
        for name, (mesh, rules) in variants().items():
            r = measure(mesh, rules, accum, params, batch)
            peak = r["args"] + r["out"] - r["alias"] + r["temp"]
            base = base or (r["state"], peak)
            print(
                f"| {name} | {accum} | {r['state'] / mib:.2f} "
                f"| {r['state'] / base[0]:.3f} | {r['args'] / mib:.2f} "
                f"| {r['temp'] / mib:.2f} | {peak / mib:.2f} | {peak / base[1]:.3f} "
                f"| {fmt(r['collectives']['loop'])} "
                f"| {fmt(r['collectives']['outside'])} |"
            )


if __name__ == "__main__":
    main()
