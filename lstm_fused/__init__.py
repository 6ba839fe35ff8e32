"""lstm_fused: fused LSTM kernels (C++ on the CPU, CUDA on the GPU) behind `LSTM`, a drop-in
replacement for torch.nn.LSTM; `convert` swaps it into a model and `revert` back,
`record_gradient_flow` shows the gradient flowing back through time.
`python -m lstm_fused --help`: check, bench, demo.
"""

__version__ = "0.1.0"

from . import functional, reference
from .functional import (BACKENDS, available_backends, set_16bit_gemm, set_cpu_bf16_product,
                         set_cpu_gemm_library, set_flush_denormals)
from .module import LSTM, convert, revert
from . import gradflow
from .gradflow import log_gradients, record_gradient_flow

__all__ = ["LSTM", "convert", "revert", "functional", "reference", "BACKENDS", "available_backends",
           "gradflow", "record_gradient_flow", "log_gradients", "set_flush_denormals",
           "set_16bit_gemm",
           "set_cpu_bf16_product",
           "set_cpu_gemm_library",
           "__version__"]
