"""The model half: the layer contract, combinators, layers and activations.

``import fnn`` gives the curated names. This package adds the few that only
layer authors need: :func:`elementwise` (a layer from any element-wise
function), :func:`Identity`, :class:`Cell` (the protocol of a recurrent cell),
and the running-state helpers of :mod:`fnn.model.state`.
"""

from fnn.model.activations import elementwise
from fnn.model.layers.recurrent import Cell
from fnn.model.layers.reshape import Identity
from fnn.model.state import StatefulModel, declare_state, read_state, write_state

__all__ = [
    "Cell",
    "Identity",
    "StatefulModel",
    "declare_state",
    "elementwise",
    "read_state",
    "write_state",
]
