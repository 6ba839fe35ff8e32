"""Functional multi-layer LSTM over a registry of per-layer backends.

Every backend is a callable with the `lstm_fused::layer_forward` signature
(input, hx, cx, params, batch_sizes, flow_probe, options), `options` a
lstm_fused.options.LayerOptions (the op takes it as `options.to_list()`), that returns a
differentiable (output, hy, cy); see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .options import CLIP_MODES, LayerOptions

__all__ = ["BACKENDS", "available_backends", "backend_unavailable_reason", "lstm",
           "set_flush_denormals"]

# Set on the first successful load of the compiled ops; kept as a module global so that
# torch.compile sees a constant after the library has been loaded once (LSTM.__init__ with
# backend="fused" tries to load it).
_fused_ops = None


def _load_fused():
    global _fused_ops
    if _fused_ops is None:
        from . import _ops  # loads the library and registers fake kernels / autograd

        _fused_ops = _ops
    return _fused_ops


def _fused_layer(input, hx, cx, params, batch_sizes=None, flow_probe=None,
                 options: LayerOptions = LayerOptions()):
    if _fused_ops is None:
        _load_fused()
    out = torch.ops.lstm_fused.layer_forward(input, hx, cx, list(params), batch_sizes,
                                             flow_probe, options.to_list())
    return out[0], out[1], out[2]


BACKENDS = {
    "fused": _fused_layer,
    "reference": reference.lstm_layer,
}


def backend_unavailable_reason(name: str) -> str | None:
    """None when backend `name` can run here, else a one-line reason."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; known: {sorted(BACKENDS)}"
    if name == "fused":
        try:
            _load_fused()
            torch.ops.lstm_fused.layer_forward  # noqa: B018 - raises if not registered
        except (ImportError, OSError, RuntimeError, AttributeError) as e:
            return f"fused backend unavailable: {type(e).__name__}: {e}"
    return None


def set_flush_denormals(enabled: bool) -> bool:
    """Whether the fused CPU kernels flush subnormal floats to zero (FTZ/DAZ; on by default:
    a vanishing gradient runs into subnormals, which x86 cores compute on many times slower).
    Only the kernels' own threads change, for the duration of each call: the caller's floating
    point state (`torch.set_flush_denormal`) is left as it was. Returns the previous setting.
    The environment variable LSTM_FUSED_FLUSH_DENORMALS=0 turns it off at start-up."""
    _load_fused()
    return torch.ops.lstm_fused.set_flush_denormals(bool(enabled))


def available_backends() -> list[str]:
    """Names of the backends in BACKENDS that can run in this process."""
    return [name for name in BACKENDS if backend_unavailable_reason(name) is None]


def lstm(input: Tensor, hx: Tensor, cx: Tensor, flat_weights, has_biases: bool,
         proj_size: int, num_layers: int, dropout: float, training: bool,
         bidirectional: bool, batch_sizes: Tensor | None = None, backend: str = "fused",
         flow_probes=None, bptt_clip: float = 0.0, bptt_clip_mode: int = 0):
    """Multi-layer LSTM, time-major: input (T, B, I) or packed data (N, I) with batch_sizes.

    hx (L*D, B, P), cx (L*D, B, H); flat_weights as RNNBase._flat_weights. Dropout with
    probability `dropout` is applied to the output of every layer but the last when
    `training`. flow_probes: None or one tensor (or None) per layer.
    Returns (output, hy (L*D, B, P), cy (L*D, B, H)).
    """
    try:
        layer_fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown LSTM backend {backend!r}; known: {sorted(BACKENDS)}") from None
    D = 2 if bidirectional else 1
    has_proj = proj_size > 0
    n = (2 + (2 if has_biases else 0) + (1 if has_proj else 0)) * D
    if len(flat_weights) != n * num_layers:
        raise ValueError(f"expected {n * num_layers} weights for {num_layers} layer(s), "
                         f"got {len(flat_weights)}")
    if flow_probes is not None and len(flow_probes) != num_layers:
        raise ValueError(f"flow_probes must have one entry per layer ({num_layers}), "
                         f"got {len(flow_probes)}")
    options = LayerOptions(has_biases=has_biases, has_proj=has_proj, bidirectional=bidirectional,
                           bptt_clip=float(bptt_clip), bptt_clip_mode=int(bptt_clip_mode))
    if options.clip_mode == CLIP_MODES["norm"] and flow_probes is not None and any(
            p is not None and p.shape[-1] == reference.FLOW_CHANNELS_PER_SEQUENCE
            for p in flow_probes):
        # norm clipping couples the rows of a step; the fused op could not count each
        # sequence back from its own last step exactly
        raise ValueError("flow probes of 5 channels (norms from each sequence's last step) "
                         "cannot be used with norm clipping (bptt_clip_mode 2)")
    x = input
    hys, cys = [], []
    for layer in range(num_layers):
        if layer > 0 and dropout > 0 and training:
            x = F.dropout(x, p=dropout, training=True)
        probe = flow_probes[layer] if flow_probes is not None else None
        # one layer: hx/cx whole, not sliced (no slice nodes in exported graphs)
        layer_hx = hx if num_layers == 1 else hx[layer * D:(layer + 1) * D]
        layer_cx = cx if num_layers == 1 else cx[layer * D:(layer + 1) * D]
        x, hy, cy = layer_fn(x, layer_hx, layer_cx, flat_weights[layer * n:(layer + 1) * n],
                             batch_sizes, probe, options)
        hys.append(hy)
        cys.append(cy)
    if num_layers == 1:
        return x, hys[0], cys[0]
    return x, torch.cat(hys, 0), torch.cat(cys, 0)
