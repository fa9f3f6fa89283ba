"""convq's compute core: ConvNet layers, a plain-loop reference and a Numba fast path.

Never imports flask, redis or rq.
"""

from .errors import EngineError, InputError, ModelError, ShapeError, WeightsError
from .geometry import Window, out_size
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
]
