"""The same training step in the peer libraries, each written as its docs show.

Flax linen: a module, ``TrainState``, a ``jax.jit`` step. Flax NNX: a module,
``nnx.Optimizer``, an ``nnx.jit`` step. Equinox: a module called per example
under ``jax.vmap``, ``eqx.filter_jit`` and ``eqx.filter_value_and_grad``.
Haiku: ``hk.transform`` and a ``jax.jit`` step. stax: ``stax.serial`` with
``jax.example_libraries.optimizers.adam``. Each starts from the shared numpy
weights of ``_workloads.weights`` and reports its own loss, so a wrong port
shows up as a first-step loss that differs from hand-written JAX. A builder
returns None when its library is not installed.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _workloads import (
    CHAR_CONTEXT,
    CHAR_EMBED,
    CHAR_HIDDEN,
    CHAR_VOCAB,
    CNN_CHANNELS,
    CNN_CLASSES,
    LR,
    Variant,
    Workload,
    xent,
)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _mean_pool(x):
    return x.mean(axis=(-3, -2))


# --- Flax linen -----------------------------------------------------------


def linen(wl: Workload, ws, x, y) -> Variant | None:
    if not installed("flax"):
        return None
    import flax.linen as nn
    from flax.training import train_state

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            if wl.kind == "mlp":
                for n in wl.sizes[1:-1]:
                    x = nn.relu(nn.Dense(n)(x))
                return nn.Dense(wl.sizes[-1])(x)
            if wl.kind == "cnn":
                for c in CNN_CHANNELS[1:]:
                    x = nn.relu(nn.Conv(c, (3, 3), padding="SAME")(x))
                return nn.Dense(CNN_CLASSES)(_mean_pool(x))
            x = nn.Embed(CHAR_VOCAB, CHAR_EMBED)(x).reshape(x.shape[0], -1)
            x = jnp.tanh(nn.Dense(CHAR_HIDDEN)(x))
            return nn.Dense(CHAR_VOCAB)(x)

    names = [f"{'Conv' if wl.kind == 'cnn' else 'Dense'}_{i}" for i in range(len(ws))]
    if wl.kind == "cnn":
        names[-1] = "Dense_0"
    if wl.kind == "char":
        names = ["Embed_0", "Dense_0", "Dense_1"]
    params = {}
    for n, t in zip(names, ws):
        keys = ("embedding",) if len(t) == 1 else ("kernel", "bias")
        params[n] = dict(zip(keys, map(jnp.asarray, t)))
    model = Net()
    state = train_state.TrainState.create(
        apply_fn=model.apply, params={"params": params}, tx=optax.adam(LR)
    )

    @jax.jit
    def train_step(state, x, y):
        def loss_fn(params):
            return xent(state.apply_fn(params, x), y)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    box = [state]
    x, y = jnp.asarray(x), jnp.asarray(y)

    def run(n):
        s = box[0]
        for _ in range(n):
            s, loss = train_step(s, x, y)
        box[0] = s
        return float(loss)

    return Variant("Flax linen", run, lambda: train_step.lower(box[0], x, y))


# --- Flax NNX -------------------------------------------------------------


def nnx_(wl: Workload, ws, x, y) -> Variant | None:
    if not installed("flax"):
        return None
    from flax import nnx

    rngs = nnx.Rngs(0)

    def set_(layer, t, names=("kernel", "bias")):
        for n, a in zip(names, t):
            getattr(layer, n).value = jnp.asarray(a)
        return layer

    class Net(nnx.Module):
        def __init__(self):
            if wl.kind == "mlp":
                s = wl.sizes
                self.layers = nnx.List(
                    [
                        set_(nnx.Linear(a, b, rngs=rngs), t)
                        for a, b, t in zip(s[:-1], s[1:], ws)
                    ]
                )
            elif wl.kind == "cnn":
                c = CNN_CHANNELS
                self.convs = nnx.List(
                    [
                        set_(nnx.Conv(a, b, (3, 3), padding="SAME", rngs=rngs), t)
                        for a, b, t in zip(c[:-1], c[1:], ws)
                    ]
                )
                self.out = set_(nnx.Linear(c[-1], CNN_CLASSES, rngs=rngs), ws[-1])
            else:
                self.embed = set_(
                    nnx.Embed(CHAR_VOCAB, CHAR_EMBED, rngs=rngs), ws[0], ("embedding",)
                )
                self.hidden = set_(
                    nnx.Linear(CHAR_CONTEXT * CHAR_EMBED, CHAR_HIDDEN, rngs=rngs), ws[1]
                )
                self.out = set_(nnx.Linear(CHAR_HIDDEN, CHAR_VOCAB, rngs=rngs), ws[2])

        def __call__(self, x):
            if wl.kind == "mlp":
                for layer in self.layers[:-1]:
                    x = nnx.relu(layer(x))
                return self.layers[-1](x)
            if wl.kind == "cnn":
                for conv in self.convs:
                    x = nnx.relu(conv(x))
                return self.out(_mean_pool(x))
            e = self.embed(x).reshape(x.shape[0], -1)
            return self.out(jnp.tanh(self.hidden(e)))

    model = Net()
    optimizer = nnx.Optimizer(model, optax.adam(LR), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return xent(model(x), y)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    x, y = jnp.asarray(x), jnp.asarray(y)

    def run(n):
        for _ in range(n):
            loss = train_step(model, optimizer, x, y)
        return float(loss)

    return Variant("Flax NNX", run, None)


# --- Equinox --------------------------------------------------------------


def equinox(wl: Workload, ws, x, y) -> Variant | None:
    if not installed("equinox"):
        return None
    import equinox as eqx

    key = jax.random.key(0)

    def linear(t):
        w, b = t
        lin = eqx.nn.Linear(w.shape[0], w.shape[1], key=key)
        return eqx.tree_at(
            lambda m: (m.weight, m.bias), lin, (jnp.asarray(w.T), jnp.asarray(b))
        )

    if wl.kind == "mlp":
        s = wl.sizes
        model = eqx.nn.MLP(
            s[0], s[-1], s[1], len(s) - 2, activation=jax.nn.relu, key=key
        )
        model = eqx.tree_at(lambda m: m.layers, model, tuple(map(linear, ws)))
    elif wl.kind == "cnn":

        class CNN(eqx.Module):
            convs: tuple
            out: eqx.nn.Linear

            def __call__(self, x):  # one example, (channels, 8, 8)
                for conv in self.convs:
                    x = jax.nn.relu(conv(x))
                return self.out(x.mean(axis=(1, 2)))

        def conv(t):
            k, b = t
            c = eqx.nn.Conv2d(k.shape[2], k.shape[3], 3, padding=1, key=key)
            k_oihw = jnp.asarray(np.transpose(k, (3, 2, 0, 1)))
            return eqx.tree_at(
                lambda m: (m.weight, m.bias), c, (k_oihw, jnp.asarray(b)[:, None, None])
            )

        model = CNN(tuple(map(conv, ws[:-1])), linear(ws[-1]))
        x = np.transpose(x, (0, 3, 1, 2))  # Equinox convolutions are channels first
    else:

        class Char(eqx.Module):
            embed: eqx.nn.Embedding
            hidden: eqx.nn.Linear
            out: eqx.nn.Linear

            def __call__(self, ids):  # one example, (context,)
                e = jax.vmap(self.embed)(ids).reshape(-1)
                return self.out(jnp.tanh(self.hidden(e)))

        embed = eqx.nn.Embedding(weight=jnp.asarray(ws[0][0]))
        model = Char(embed, linear(ws[1]), linear(ws[2]))

    optim = optax.adam(LR)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_value_and_grad
    def loss(model, x, y):
        return xent(jax.vmap(model)(x), y)

    @eqx.filter_jit
    def make_step(model, opt_state, x, y):
        value, grads = loss(model, x, y)
        updates, opt_state = optim.update(
            grads, opt_state, eqx.filter(model, eqx.is_array)
        )
        return eqx.apply_updates(model, updates), opt_state, value

    box = [model, opt_state]
    x, y = jnp.asarray(x), jnp.asarray(y)

    def run(n):
        m, o = box
        for _ in range(n):
            m, o, value = make_step(m, o, x, y)
        box[:] = [m, o]
        return float(value)

    return Variant("Equinox", run, lambda: make_step.lower(*box, x, y))


# --- Haiku ----------------------------------------------------------------


def haiku(wl: Workload, ws, x, y) -> Variant | None:
    if not installed("haiku"):
        return None
    import haiku as hk

    def forward(x):
        if wl.kind == "mlp":
            return hk.nets.MLP(wl.sizes[1:])(x)
        if wl.kind == "cnn":
            for c in CNN_CHANNELS[1:]:
                x = jax.nn.relu(hk.Conv2D(c, 3, padding="SAME")(x))
            return hk.Linear(CNN_CLASSES)(_mean_pool(x))
        e = hk.Embed(CHAR_VOCAB, CHAR_EMBED)(x).reshape(x.shape[0], -1)
        h = jnp.tanh(hk.Linear(CHAR_HIDDEN)(e))
        return hk.Linear(CHAR_VOCAB)(h)

    net = hk.without_apply_rng(hk.transform(forward))
    params = net.init(jax.random.key(0), jnp.asarray(x))
    order = list(params)  # Haiku lists modules in the order they were created
    new = {}
    for name, t in zip(order, ws):
        keys = ("embeddings",) if len(t) == 1 else ("w", "b")
        new[name] = dict(zip(keys, map(jnp.asarray, t)))
        for k in keys:
            assert new[name][k].shape == params[name][k].shape, (name, k)
    optimiser = optax.adam(LR)

    def loss_fn(params, x, y):
        return xent(net.apply(params, x), y)

    @jax.jit
    def update(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimiser.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    box = [new, optimiser.init(new)]
    x, y = jnp.asarray(x), jnp.asarray(y)

    def run(n):
        p, o = box
        for _ in range(n):
            p, o, loss = update(p, o, x, y)
        box[:] = [p, o]
        return float(loss)

    return Variant("Haiku", run, lambda: update.lower(*box, x, y))


# --- stax -----------------------------------------------------------------


def stax(wl: Workload, ws, x, y) -> Variant:
    from jax.example_libraries import optimizers
    from jax.example_libraries import stax as st

    pool = (lambda rng, s: (s[:1] + s[-1:], ()), lambda p, x, **kw: _mean_pool(x))
    if wl.kind == "mlp":
        layers = []
        for n in wl.sizes[1:-1]:
            layers += [st.Dense(n), st.Relu]
        layers.append(st.Dense(wl.sizes[-1]))
    elif wl.kind == "cnn":
        layers = [st.Conv(16, (3, 3), padding="SAME"), st.Relu]
        layers += [st.Conv(32, (3, 3), padding="SAME"), st.Relu]
        layers += [pool, st.Dense(CNN_CLASSES)]
    else:  # stax has no embedding layer; a table lookup is one line
        embed = (
            lambda rng, s: (s + (CHAR_EMBED,), jnp.zeros((CHAR_VOCAB, CHAR_EMBED))),
            lambda table, ids, **kw: table[ids],
        )
        layers = [embed, st.Flatten, st.Dense(CHAR_HIDDEN), st.Tanh]
        layers.append(st.Dense(CHAR_VOCAB))
    _, apply = st.serial(*layers)
    it, params = iter(ws), []
    for layer in layers:
        if layer[0] in (st.Relu[0], st.Tanh[0], st.Flatten[0], pool[0]):
            params.append(())
        else:  # (W, b) as stax holds them, or the bare embedding table
            t = tuple(map(jnp.asarray, next(it)))
            params.append(t[0] if len(t) == 1 else t)
    opt_init, opt_update, get_params = optimizers.adam(LR)

    def loss(params, x, y):
        return xent(apply(params, x), y)

    @jax.jit
    def update(i, opt_state, x, y):
        value, g = jax.value_and_grad(loss)(get_params(opt_state), x, y)
        return opt_update(i, g, opt_state), value

    box = [opt_init(params), 0]
    x, y = jnp.asarray(x), jnp.asarray(y)

    def run(n):
        o, i = box
        for _ in range(n):
            o, value = update(i, o, x, y)
            i += 1
        box[:] = [o, i]
        return float(value)

    return Variant("stax", run, lambda: update.lower(box[1], box[0], x, y))


def torch_(wl: Workload, ws, x, y) -> Variant | None:
    """PyTorch, eager, for the MLPs, when installed (fnn does not depend on it)."""
    if wl.kind != "mlp" or not installed("torch"):
        return None
    import torch

    mods = []
    for i, (w, b) in enumerate(ws):
        lin = torch.nn.Linear(*w.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        mods += [lin] + ([torch.nn.ReLU()] if i < len(ws) - 1 else [])
    model = torch.nn.Sequential(*mods)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt), yt)
            loss.backward()
            opt.step()
        return float(loss)

    return Variant("PyTorch (eager)", run, None)


PEERS = (linen, nnx_, equinox, haiku, stax, torch_)
