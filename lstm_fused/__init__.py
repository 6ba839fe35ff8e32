"""lstm_fused: fused LSTM kernels (C++ on the CPU, CUDA on the GPU) behind `LSTM`, a drop-in
replacement for torch.nn.LSTM; `convert` swaps it into a model, `record_gradient_flow` shows
the gradient flowing back through time. `python -m lstm_fused --help`: check, bench, demo.
"""

__version__ = "0.1.0"

from . import functional, reference
from .functional import BACKENDS, available_backends
from .module import LSTM, convert
from . import gradflow
from .gradflow import log_gradients, record_gradient_flow

__all__ = ["LSTM", "convert", "functional", "reference", "BACKENDS", "available_backends",
           "gradflow", "record_gradient_flow", "log_gradients", "__version__"]
