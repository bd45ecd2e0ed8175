"""Zero overhead: a jitted fnn step compiles to what hand-written JAX compiles to.

XLA's own accounting of the optimized program (``cost_analysis()``: FLOPs and
bytes accessed) and the optimized HLO itself (instructions, counted by opcode)
are compared for an fnn MLP and the same MLP written directly in jax.numpy,
for the forward pass alone and for a whole Adam training step. No timing.
"""

from __future__ import annotations

import collections
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn

SIZES = (12, 16, 16, 5)
BATCH = 8
LR = 1e-3
COST_RTOL = 0.0  # XLA's counts are exact; the programs must be the same
# fnn's whole step adds a key, a step counter and the weight division: its
# FLOPs, bytes and temporaries stay within this of the hand-written step.
STEP_COST_RTOL = 0.05
LOSS_RTOL = 1e-6  # the same float32 program gives the same loss


def fnn_mlp() -> fnn.Layer:
    layers = []
    for n in SIZES[1:-1]:
        layers += [fnn.Dense(n), fnn.Relu()]
    return fnn.serial(*layers, fnn.Dense(SIZES[-1]))


def hand_forward(params, x):
    # b[None]: the tests run with rank promotion as an error (conftest.py).
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"][None])
    return x @ params[-1]["w"] + params[-1]["b"][None]


def weights():
    rng = np.random.default_rng(0)
    return [
        (
            rng.normal(size=(a, b)).astype(np.float32),
            rng.normal(size=(b,)).astype(np.float32),
        )
        for a, b in zip(SIZES[:-1], SIZES[1:])
    ]


def both_params():
    """The same weights as fnn params and as a hand-written list of dicts."""
    ws = weights()
    _, params = fnn_mlp().init(jax.random.key(0), (-1, SIZES[0]))
    dense_keys = [k for k in params if params[k]]
    ours = dict(params)
    for k, (w, b) in zip(dense_keys, ws):
        ours[k] = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
    theirs = [{"w": jnp.asarray(w), "b": jnp.asarray(b)} for w, b in ws]
    return ours, theirs


def data():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(BATCH, SIZES[0])).astype(np.float32))
    return x, jnp.asarray(rng.integers(0, SIZES[-1], BATCH).astype(np.int32))


def train_step(forward, tx):
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = forward(p, x)
            return optax.losses.softmax_cross_entropy_with_integer_labels(
                logits, y
            ).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def cost(compiled) -> dict:
    c = compiled.cost_analysis()
    return c[0] if isinstance(c, (list, tuple)) else c


# "  ROOT %add.0 = f32[8,5]{1,0} add(%p0, %p1), metadata=..." -> "add"
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = .*?\s([a-z][\w\-]*)\(", re.M)


def opcodes(compiled) -> collections.Counter:
    """The optimized HLO's instructions, counted by opcode (names ignored)."""
    return collections.Counter(_INSTR.findall(compiled.as_text()))


_COPY = re.compile(r"= \w+\[([\d,]*)\]\S* copy\(")


def copied_sizes(compiled) -> list[int]:
    """The element counts of the arrays the program copies."""
    dims = _COPY.findall(compiled.as_text())
    return [int(np.prod([int(d) for d in ds.split(",") if d])) for ds in dims]


@functools.cache  # each program is compiled once for all the tests
def compiled_pair(kind: str):
    ours_p, theirs_p = both_params()
    x, y = data()
    model = fnn_mlp()
    if kind == "forward":
        ours = jax.jit(model.apply).lower(ours_p, x).compile()
        theirs = jax.jit(hand_forward).lower(theirs_p, x).compile()
        return ours, theirs
    tx = optax.adam(LR)
    ours = train_step(model.apply, tx).lower(ours_p, tx.init(ours_p), x, y)
    theirs = train_step(hand_forward, tx).lower(theirs_p, tx.init(theirs_p), x, y)
    return ours.compile(), theirs.compile()


@pytest.mark.parametrize("kind", ["forward", "train_step"])
def test_equal_flops_and_bytes(kind):
    ours, theirs = compiled_pair(kind)
    a, b = cost(ours), cost(theirs)
    assert a["flops"] > 0
    for name in ("flops", "bytes accessed", "transcendentals"):
        np.testing.assert_allclose(a.get(name, 0.0), b.get(name, 0.0), rtol=COST_RTOL)


@pytest.mark.parametrize("kind", ["forward", "train_step"])
def test_no_extra_instructions(kind):
    ours, theirs = compiled_pair(kind)
    ops_ours, ops_theirs = opcodes(ours), opcodes(theirs)
    assert sum(ops_theirs.values()) > 10  # the parser found the program
    assert ops_ours == ops_theirs


def test_equal_memory():
    ours, theirs = compiled_pair("train_step")
    m_ours, m_theirs = ours.memory_analysis(), theirs.memory_analysis()
    if m_ours is None:
        pytest.skip("this backend gives no memory analysis")
    for field in (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
    ):
        assert getattr(m_ours, field) == getattr(m_theirs, field), field


def test_same_training_trajectory():
    """Three steps from the same weights give the same losses and params."""
    ours_p, theirs_p = both_params()
    x, y = data()
    tx = optax.adam(LR)
    step_ours = train_step(fnn_mlp().apply, tx)
    step_theirs = train_step(hand_forward, tx)
    o_ours, o_theirs = tx.init(ours_p), tx.init(theirs_p)
    for _ in range(3):
        ours_p, o_ours, l_ours = step_ours(ours_p, o_ours, x, y)
        theirs_p, o_theirs, l_theirs = step_theirs(theirs_p, o_theirs, x, y)
        chex.assert_trees_all_close(l_ours, l_theirs, rtol=LOSS_RTOL)
    dense = [ours_p[k] for k in ours_p if ours_p[k]]
    chex.assert_trees_all_close(dense, theirs_p, rtol=LOSS_RTOL)


def test_make_train_step_costs_what_the_hand_written_step_costs():
    """fnn's whole step (key, accumulation protocol, donation) against the
    hand-written donating Adam step: the same FLOPs, bytes and temporary
    memory within a small bound, and no copy larger than the hand-written
    step's own (XLA:CPU copies donated weights that the backward pass reads,
    in both)."""
    ours_p, theirs_p = both_params()
    x, y = data()
    model, tx = fnn_mlp(), optax.adam(LR)

    def loss_fn(params, batch, key):
        logits = model.apply(params, batch[0])
        losses = optax.losses.softmax_cross_entropy_with_integer_labels(
            logits, batch[1]
        )
        return losses.sum(), batch[1].shape[0]

    step = fnn.make_train_step(loss_fn, tx, grad_norm=False)
    ours = step.lower(step.init(ours_p, key=jax.random.key(0)), (x, y)).compile()
    theirs = train_step(hand_forward, tx).lower(theirs_p, tx.init(theirs_p), x, y)
    theirs = theirs.compile()
    a, b = cost(ours), cost(theirs)
    np.testing.assert_allclose(a["flops"], b["flops"], rtol=STEP_COST_RTOL)
    np.testing.assert_allclose(
        a["bytes accessed"], b["bytes accessed"], rtol=STEP_COST_RTOL
    )
    m_ours, m_theirs = ours.memory_analysis(), theirs.memory_analysis()
    if m_ours is not None:
        assert m_ours.temp_size_in_bytes <= m_theirs.temp_size_in_bytes * (
            1 + STEP_COST_RTOL
        )
    assert max(copied_sizes(ours), default=0) <= max(copied_sizes(theirs), default=0)
