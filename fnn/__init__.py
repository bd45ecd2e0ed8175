"""fnn: a functional neural-network library for JAX.

A layer is a pair of pure functions, ``init(key, input_shape) -> (output_shape,
params)`` and ``apply(params, x, *, key=None) -> y``; params are nested dicts of
arrays. ``import fnn`` is all a script needs.
"""

from fnn.gradcheck import (
    GradCheckEntry,
    GradCheckReport,
    GradientCheckError,
    check_grads,
    check_layer,
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
    elementwise,
    elu,
    gelu,
    hard_tanh,
    leaky_relu,
    log_softmax,
    relu,
    sigmoid,
    softmax,
    softplus,
    swish,
    tanh,
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
from fnn.model.core import Layer, ShapeError, describe, fail, make_layer
from fnn.model.layers.attention import MultiHeadAttention
from fnn.model.layers.conv import Conv, ConvTranspose
from fnn.model.layers.dense import Dense, Embed
from fnn.model.layers.dropout import Dropout
from fnn.model.layers.norm import BatchNorm, LayerNorm, RMSNorm
from fnn.model.layers.pool import (
    AvgPool,
    GlobalMaxPool,
    GlobalMeanPool,
    MaxPool,
    masked_max,
    masked_mean,
)
from fnn.model.layers.positional import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEmbedding,
)
from fnn.model.layers.recurrent import RNN, Cell, GRUCell, LSTMCell
from fnn.model.layers.reshape import Flatten, Identity, Reshape
from fnn.model.repeat import repeat
from fnn.model.state import StatefulModel, with_state
from fnn.model.summary import count_params, summary
from fnn.training import data, losses
from fnn.training.checkpoint import Checkpointer
from fnn.training.distributed import initialize
from fnn.training.evaluate import evaluate, make_eval_step
from fnn.training.fit import fit
from fnn.training.history import NonFiniteLossError, write_history
from fnn.training.losses import accuracy, argmax, correct, one_hot, predict
from fnn.training.parallel import (
    data_mesh,
    make_parallel_train_step,
    psum_fused,
    replicate,
    shard_batch,
)
from fnn.training.step import (
    GradSums,
    TrainState,
    accumulate_gradients,
    apply_gradients,
    make_train_step,
    step_key,
)

__version__ = "0.1.0"

__all__ = [
    # gradient checking
    "GradCheckEntry",
    "GradCheckReport",
    "GradientCheckError",
    "check_grads",
    "check_layer",
    # fit
    "NonFiniteLossError",
    "fit",
    "write_history",
    # checkpoint
    "Checkpointer",
    # data parallel
    "data_mesh",
    "initialize",
    "make_parallel_train_step",
    "psum_fused",
    "replicate",
    "shard_batch",
    # core
    "Layer",
    "ShapeError",
    "describe",
    "fail",
    "make_layer",
    # combinators
    "fan_in_concat",
    "fan_in_sum",
    "fan_out",
    "named",
    "parallel",
    "residual",
    "serial",
    # state
    "StatefulModel",
    "with_state",
    # layers
    "Dense",
    "Embed",
    "Flatten",
    "Identity",
    "Reshape",
    # conv, pool, dropout, norm
    "AvgPool",
    "BatchNorm",
    "Conv",
    "ConvTranspose",
    "Dropout",
    "GlobalMaxPool",
    "GlobalMeanPool",
    "LayerNorm",
    "MaxPool",
    "RMSNorm",
    "masked_max",
    "masked_mean",
    # summary
    "count_params",
    "summary",
    # train and data
    "GradSums",
    "TrainState",
    "accumulate_gradients",
    "apply_gradients",
    "data",
    "evaluate",
    "make_eval_step",
    "make_train_step",
    "step_key",
    # activations
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
    "elementwise",
    "elu",
    "gelu",
    "hard_tanh",
    "leaky_relu",
    "log_softmax",
    "relu",
    "sigmoid",
    "softmax",
    "softplus",
    "swish",
    "tanh",
    # losses and prediction
    "losses",
    "accuracy",
    "argmax",
    "correct",
    "one_hot",
    "predict",
    # attention, recurrent, positional, repeat
    "Cell",
    "GRUCell",
    "LSTMCell",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "RNN",
    "SinusoidalPositionalEmbedding",
    "repeat",
]
