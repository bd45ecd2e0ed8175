"""``summary``: a table of a network's layers, shapes and parameter counts."""

from __future__ import annotations

from typing import Any

import jax

from fnn.model.core import Layer, describe, init_child, recording


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


def summary(model: Layer, input_shape: Any, *, key: jax.Array | None = None) -> str:
    """A table of every layer's place, params path, output shape and size.

    The network is initialised under ``jax.eval_shape``, so no weights are
    made; the counts are the sizes of the real params leaves.

    Args:
      model: the network.
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
    """
    key = jax.random.key(0) if key is None else key
    with recording() as rows:
        out = jax.eval_shape(
            lambda k: init_child(model, "", "", k, input_shape)[1], key
        )
    # the root itself is the outermost row
    table = [("place", "params", "layer", "output", "params")]
    for place, keys, layer, out_shape, params in rows:
        if not keys or keys == ("",):
            continue
        path = "".join(f"[{k!r}]" for k in keys[1:])
        table.append(
            (
                place.lstrip("."),
                path,
                describe(layer),
                str(out_shape),
                str(count_params(params)),
            )
        )
    table.append(("total", "", "", "", str(count_params(out))))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    lines = [
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}} "
        f"{r[3]:<{widths[3]}} {r[4]:>{widths[4]}}"
        for r in table
    ]
    return "\n".join(line.rstrip() for line in lines)
