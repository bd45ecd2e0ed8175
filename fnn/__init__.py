"""fnn: a functional neural-network library for JAX.

A layer is a pair of pure functions, ``init(key, input_shape) -> (output_shape,
params)`` and ``apply(params, x, *, key=None) -> y``; params are nested dicts of
arrays. ``import fnn`` is all a script needs. The package has three parts:
``fnn/model`` (the contract, combinators, layers), ``fnn/training`` (the step,
``fit``, data, checkpoints) and ``fnn/gradcheck`` (gradient checking).
"""

from fnn.gradcheck import (
    GradientCheckError,
    check_grads,
    check_layer,
    check_step,
    find_nonfinite,
)
from fnn.model.activations import (
    Elu,
    Gelu,
    HardTanh,
    LeakyRelu,
    LogSoftmax,
    Relu,
    Sigmoid,
    Softmax,
    Softplus,
    Swish,
    Tanh,
    gelu,
    swish,
)
from fnn.model.combinators import (
    fan_in_concat,
    fan_in_sum,
    fan_out,
    named,
    parallel,
    residual,
    serial,
)
from fnn.model.core import Layer, ShapeError, fail, make_layer
from fnn.model.layers.attention import MultiHeadAttention
from fnn.model.layers.conv import Conv, ConvTranspose
from fnn.model.layers.dense import Dense, Embed
from fnn.model.layers.dropout import Dropout
from fnn.model.layers.norm import BatchNorm, LayerNorm, RMSNorm
from fnn.model.layers.pool import AvgPool, GlobalMaxPool, GlobalMeanPool, MaxPool
from fnn.model.layers.positional import PositionalEmbedding
from fnn.model.layers.recurrent import RNN, GRUCell, LSTMCell
from fnn.model.layers.reshape import Flatten, Reshape
from fnn.model.precision import precision
from fnn.model.remat import remat
from fnn.model.repeat import repeat
from fnn.model.state import with_state
from fnn.model.summary import summary
from fnn.training import callbacks, data, losses
from fnn.training.checkpoint import Checkpointer
from fnn.training.distributed import initialize
from fnn.training.evaluate import evaluate, make_eval_step
from fnn.training.fit import fit
from fnn.training.step import make_train_step
from fnn.training.train_state import TrainState
from fnn.training.weights import load_params, save_params

__version__ = "0.2.0"

__all__ = [
    # the contract (fnn/model/core.py)
    "Layer",
    "ShapeError",
    "fail",
    "make_layer",
    "summary",
    "with_state",
    # combinators
    "fan_in_concat",
    "fan_in_sum",
    "fan_out",
    "named",
    "parallel",
    "precision",
    "remat",
    "repeat",
    "residual",
    "serial",
    # layers
    "AvgPool",
    "BatchNorm",
    "Conv",
    "ConvTranspose",
    "Dense",
    "Dropout",
    "Embed",
    "Flatten",
    "GRUCell",
    "GlobalMaxPool",
    "GlobalMeanPool",
    "LSTMCell",
    "LayerNorm",
    "MaxPool",
    "MultiHeadAttention",
    "PositionalEmbedding",
    "RMSNorm",
    "RNN",
    "Reshape",
    # activations (the functions are jax.nn's, but for these two)
    "Elu",
    "Gelu",
    "HardTanh",
    "LeakyRelu",
    "LogSoftmax",
    "Relu",
    "Sigmoid",
    "Softmax",
    "Softplus",
    "Swish",
    "Tanh",
    "gelu",
    "swish",
    # training
    "Checkpointer",
    "TrainState",
    "callbacks",
    "data",
    "evaluate",
    "fit",
    "initialize",
    "losses",
    "make_eval_step",
    "make_train_step",
    # weights (params files, PyTorch weights, export)
    "load_params",
    "save_params",
    # gradient checking
    "GradientCheckError",
    "check_grads",
    "check_layer",
    "check_step",
    "find_nonfinite",
]
