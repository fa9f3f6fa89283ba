"""convq's compute core: ConvNet layers, a plain-loop reference and a Numba fast path.

Never imports flask, redis or rq.
"""

from .backward import (
    avg_pool2d_backward,
    conv2d_backward,
    local2d_backward,
    max_pool2d_backward,
    relu_backward,
)
from .backward_reference import (
    avg_pool2d_backward_reference,
    conv2d_backward_reference,
    local2d_backward_reference,
    max_pool2d_backward_reference,
    relu_backward_reference,
)
from .errors import EngineError, InputError, ModelError, ShapeError, WeightsError
from .geometry import Window, out_size
from .graph import IMAGE
from .layers import (
    add,
    batchnorm,
    clip,
    concat,
    global_avg_pool,
    global_max_pool,
    lrn,
    sigmoid,
    softmax,
    tanh,
)
from .layers_reference import (
    add_reference,
    batchnorm_reference,
    clip_reference,
    concat_reference,
    global_avg_pool_reference,
    global_max_pool_reference,
    lrn_reference,
    sigmoid_reference,
    softmax_reference,
    tanh_reference,
)
from .model import Model
from .ops import (
    ConvWeights,
    avg_pool2d,
    conv2d,
    get_threads,
    local2d,
    max_pool2d,
    relu,
    set_threads,
    warmup,
)
from .reference import (
    avg_pool2d_reference,
    conv2d_reference,
    local2d_reference,
    max_pool2d_reference,
    relu_reference,
)

__all__ = [
    "EngineError",
    "InputError",
    "ModelError",
    "ShapeError",
    "WeightsError",
    "Window",
    "out_size",
    "Model",
    "conv2d",
    "ConvWeights",
    "local2d",
    "max_pool2d",
    "avg_pool2d",
    "relu",
    "conv2d_reference",
    "local2d_reference",
    "max_pool2d_reference",
    "avg_pool2d_reference",
    "relu_reference",
    "set_threads",
    "get_threads",
    "warmup",
    "conv2d_backward",
    "local2d_backward",
    "max_pool2d_backward",
    "avg_pool2d_backward",
    "relu_backward",
    "conv2d_backward_reference",
    "local2d_backward_reference",
    "max_pool2d_backward_reference",
    "avg_pool2d_backward_reference",
    "relu_backward_reference",
    "IMAGE",
    "add",
    "concat",
    "batchnorm",
    "lrn",
    "global_avg_pool",
    "global_max_pool",
    "softmax",
    "sigmoid",
    "tanh",
    "clip",
    "add_reference",
    "concat_reference",
    "batchnorm_reference",
    "lrn_reference",
    "global_avg_pool_reference",
    "global_max_pool_reference",
    "softmax_reference",
    "sigmoid_reference",
    "tanh_reference",
    "clip_reference",
]
