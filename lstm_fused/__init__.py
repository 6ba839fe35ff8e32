__version__ = "0.1.0"

from . import functional, reference
from .functional import BACKENDS, available_backends
from .module import LSTM, convert
from . import gradflow
from .gradflow import log_gradients, record_gradient_flow

__all__ = ["LSTM", "convert", "functional", "reference", "BACKENDS", "available_backends",
           "gradflow", "record_gradient_flow", "log_gradients", "__version__"]
