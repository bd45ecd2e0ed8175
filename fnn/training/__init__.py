"""The training half: the step, ``fit``, data, evaluation, checkpoints, weights.

``import fnn`` gives the curated names. This package adds
:class:`NonFiniteLossError` (what :func:`fnn.fit` raises on a NaN loss, a
``FloatingPointError``), :class:`TrainStep` (what :func:`fnn.make_train_step`
returns), :func:`export` (a model as a serialized ``jax.export`` artifact),
and :class:`DynamicLossScale` with :class:`LossScaleState` (the options and the
``opt_state`` of ``make_train_step(..., loss_scale=...)``).
"""

from fnn.training.history import NonFiniteLossError
from fnn.training.loss_scale import DynamicLossScale, LossScaleState
from fnn.training.step import TrainStep
from fnn.training.weights import export

__all__ = [
    "DynamicLossScale",
    "LossScaleState",
    "NonFiniteLossError",
    "TrainStep",
    "export",
]
