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

Usage::

    python benchmarks/scale.py            # about a minute on 2 cores
"""

from __future__ import annotations

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    _, params = NET.init(jax.random.key(0), (-1, WIDTH))
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(BATCH, WIDTH)).astype(np.float32),
        "y": rng.normal(size=(BATCH, WIDTH)).astype(np.float32),
    }
    mib = 2.0**20
    print(f"{machine()}, {datetime.date.today()}")
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
