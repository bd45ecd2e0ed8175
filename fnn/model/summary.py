"""``summary``: a table of a network's layers, shapes and parameter counts."""

from __future__ import annotations

from typing import Any

import jax

from fnn.model.core import Layer, describe, recording
from fnn.model.state import StatefulModel, run_init


def count_params(params: Any) -> int:
    """The number of scalars in a params tree.

    Examples:
      >>> import jax, fnn
      >>> from fnn.model.summary import count_params
      >>> _, params = fnn.Dense(3).init(jax.random.key(0), (-1, 4))
      >>> count_params(params)
      15
    """
    return sum(int(leaf.size) for leaf in jax.tree.leaves(params))


def summary(
    model: Layer | StatefulModel, input_shape: Any, *, key: jax.Array | None = None
) -> str:
    """A table of every layer's place, params path, output shape and size.

    The network is initialised under ``jax.eval_shape``, so no weights are
    made; the counts are the sizes of the real params leaves. A model from
    :func:`fnn.with_state` gets a last column with the size of each layer's
    running state.

    Args:
      model: the network, or a :class:`fnn.model.StatefulModel`.
      input_shape: its input shape (the batch may be ``-1``).
      key: the key passed to init; ``jax.random.key(0)`` by default.

    Returns:
      The table as a string; its last line is the total parameter count.

    Examples:
      >>> import fnn
      >>> net = fnn.serial(fnn.Dense(8), fnn.Relu(), fnn.Dense(2))
      >>> print(fnn.summary(net, (-1, 3)))
      place      params         layer             output   params
      serial[0]  ['0_dense']    Dense(features=8) (-1, 8)      32
      serial[1]  ['1_relu']     Relu()            (-1, 8)       0
      serial[2]  ['2_dense']    Dense(features=2) (-1, 2)      18
      total                                                    50
      >>> model = fnn.with_state(fnn.serial(fnn.Dense(2), fnn.BatchNorm()))
      >>> print(fnn.summary(model, (-1, 3)))
      place      params           layer             output  params  state
      serial[0]  ['0_dense']      Dense(features=2) (-1, 2)      8      0
      serial[1]  ['1_batchnorm']  BatchNorm()       (-1, 2)      4      4
      total                                                     12      4
    """
    key = jax.random.key(0) if key is None else key
    stateful = isinstance(model, StatefulModel)
    layer = getattr(model.init, "fnn_layer", None) if stateful else model
    if layer is None:
        raise TypeError(
            "summary: expected a layer or a model from fnn.with_state, got a "
            f"{type(model).__name__} whose init is not with_state's."
        )

    def init(k):
        (_, params), state = run_init(lambda: layer.init(k, input_shape))
        return params, state

    with recording() as rows:
        params, state = jax.eval_shape(init, key)
    header = ("place", "params", "layer", "output", "params", "state")
    table = [header if stateful else header[:5]]
    for place, keys, child, out_shape, child_params in rows:
        row = (
            place,
            "".join(f"[{k!r}]" for k in keys),
            describe(child),
            str(out_shape),
            str(count_params(child_params)),
            str(count_params(_subtree(state, keys))),
        )
        table.append(row if stateful else row[:5])
    total = ("total", "", "", "", str(count_params(params)), str(count_params(state)))
    table.append(total if stateful else total[:5])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}} "
        f"{r[3]:<{widths[3]}} "
        + "  ".join(f"{v:>{w}}" for v, w in zip(r[4:], widths[4:]))
        for r in table
    ]
    return "\n".join(line.rstrip() for line in lines)


def _subtree(tree: Any, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return {}
        tree = tree[k]
    return tree
