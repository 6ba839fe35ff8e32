"""Functional multi-layer LSTM over a registry of per-layer backends.

Every backend is a callable with the `lstm_fused::layer_forward` signature
(input, hx, cx, params, batch_sizes, flow_probe, options, masks), `options` a
lstm_fused.options.LayerOptions (the op takes it as `options.to_list()`), that returns a
differentiable (output, hy, cy); see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .options import CLIP_MODES, LayerOptions

__all__ = ["BACKENDS", "available_backends", "backend_unavailable_reason", "draw_masks", "lstm",
           "set_flush_denormals", "set_16bit_gemm", "set_cpu_bf16_product", "set_cpu_gemm_library"]

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
                 options: LayerOptions = LayerOptions(), masks=()):
    if _fused_ops is None:
        _load_fused()
    # gates and cells are dropped here: the op need not keep them (LayerOptions.inference),
    # unless its autograd kernel records the call for a backward
    values = options.to_list()
    values[_fused_ops.INFERENCE_SLOT] = 1.0
    out = torch.ops.lstm_fused.layer_forward(input, hx, cx, list(params), batch_sizes,
                                             flow_probe, values, list(masks))
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


def set_16bit_gemm(enabled: bool) -> bool:
    """Whether a bfloat16 layer on the CPU runs its GEMMs with bfloat16 operands (where the CPU
    has AMX-BF16 or AVX512_BF16: MKL's bf16 GEMM for the large ones, the recurrent product in
    the fused sequence kernels as `set_cpu_bf16_product` says; fp32 accumulation; the gates
    and the cell state stay fp32; h and the gate gradients are rounded to bf16 where they enter
    a product). On by default; off, every GEMM runs in fp32 on converted copies, as before.
    float16 layers, layers with proj_size or a cell variant, and devices other than the CPU
    always compute their GEMMs in fp32. Returns the previous setting. The environment variable
    LSTM_FUSED_16BIT_GEMM=0 turns it off at start-up."""
    _load_fused()
    return torch.ops.lstm_fused.set_16bit_gemm(bool(enabled))


def set_cpu_bf16_product(kind: str) -> str:
    """Which instructions run the recurrent product of a bfloat16 layer on the CPU, in the
    fused sequence kernels (the 16-bit GEMM mode; W_hh packed once per call, each thread
    multiplying its own slice): "auto" (the default: AMX tiles where the CPU and OS allow
    them, else AVX512_BF16 dot products on AMD CPUs, else MKL's bf16 GEMM step by step),
    "amx", "avx512" (also on Intel CPUs, where vdpbf16ps runs at half the fp32 FMA rate), or
    "none" (MKL step by step). All give the same numbers but for the order of fp32 sums.
    Returns the previous setting; the environment variable LSTM_FUSED_BF16_PRODUCT sets it at
    start-up. `torch.ops.lstm_fused.cpu_bf16_product()` says which one runs now."""
    _load_fused()
    return torch.ops.lstm_fused.set_cpu_bf16_product(str(kind))


def set_cpu_gemm_library(library: str) -> str:
    """Which library runs the large float32 GEMMs of a layer on the CPU (the input projection
    of all steps, and the backward's input and weight gradients): "auto" (the default: oneDNN
    on CPUs other than Intel's that have AVX-512, where MKL runs its AVX2 kernels at half the
    rate, else MKL), "mkl" or "onednn" (both from the running libtorch; "onednn" needs AVX-512
    F/BW/VL/DQ). Like torch.mm, both compute in float32 unless
    torch.set_float32_matmul_precision allows less. Returns the previous setting; the
    environment variable LSTM_FUSED_CPU_GEMM sets it at start-up.
    `torch.ops.lstm_fused.cpu_gemm_library()` says which one runs now."""
    _load_fused()
    return torch.ops.lstm_fused.set_cpu_gemm_library(str(library))


def available_backends() -> list[str]:
    """Names of the backends in BACKENDS that can run in this process."""
    return [name for name in BACKENDS if backend_unavailable_reason(name) is None]


def _zoneout_pair(zoneout) -> tuple[float, float]:
    """zoneout as (z_c, z_h): a number is both."""
    if isinstance(zoneout, (tuple, list)):
        if len(zoneout) != 2:
            raise ValueError(f"zoneout must be a number or a pair (z_c, z_h), got {zoneout!r}")
        return float(zoneout[0]), float(zoneout[1])
    return float(zoneout), float(zoneout)


def draw_masks(input: Tensor, batch: int, rows: int, hidden_size: int, proj_size: int,
               num_layers: int, bidirectional: bool, recurrent_dropout: float = 0.0,
               zoneout=0.0):
    """The random masks of one training forward, in the documented order (both backends get
    the same ones from torch's RNG):

    1. recurrent dropout (p > 0): one (L*D, B, P) tensor,
       torch.empty(L*D, B, P).bernoulli_(1 - p) / (1 - p);
    2. zoneout, layer after layer: for c when z_c > 0, (D, N, H) torch.rand(D, N, H).lt_(z_c)
       (1 with probability z_c: keep the previous state), then for h when z_h > 0,
       (D, N, P) torch.rand(D, N, P).lt_(z_h). (rand and a comparison: twice as fast as
       bernoulli_ on the CPU, and these masks are large.)

    All on the input's device and dtype, drawn before any dropout between layers. N is the
    number of rows of the sequence (T*B, or sum(batch_sizes) when packed); a mask's row n
    belongs to row n of the flattened (time-major) sequence. Returns (recurrent_dropout_masks
    or None, zoneout_masks: one (cell or None, hidden or None) pair per layer, or None).
    """
    D = 2 if bidirectional else 1
    P = proj_size if proj_size > 0 else hidden_size
    kw = dict(dtype=input.dtype, device=input.device)
    dropout_masks = None
    if recurrent_dropout > 0:
        keep = 1 - recurrent_dropout
        dropout_masks = torch.empty(num_layers * D, batch, P, **kw).bernoulli_(keep) / keep
    z_c, z_h = _zoneout_pair(zoneout)
    zoneout_masks = None
    if z_c > 0 or z_h > 0:
        zoneout_masks = [
            (torch.rand(D, rows, hidden_size, **kw).lt_(z_c) if z_c > 0 else None,
             torch.rand(D, rows, P, **kw).lt_(z_h) if z_h > 0 else None)
            for _ in range(num_layers)]
    return dropout_masks, zoneout_masks


def lstm(input: Tensor, hx: Tensor, cx: Tensor, flat_weights, has_biases: bool,
         proj_size: int, num_layers: int, dropout: float, training: bool,
         bidirectional: bool, batch_sizes: Tensor | None = None, backend: str = "fused",
         flow_probes=None, bptt_clip: float = 0.0, bptt_clip_mode: int = 0, *,
         layer_norm: bool = False, recurrent_dropout: float = 0.0, zoneout=0.0,
         residual: bool = False, recurrent_dropout_masks: Tensor | None = None,
         zoneout_masks=None):
    """Multi-layer LSTM, time-major: input (T, B, I) or packed data (N, I) with batch_sizes.

    hx (L*D, B, P), cx (L*D, B, H); flat_weights as RNNBase._flat_weights, with layer_norm
    the four layer-norm parameters of each direction after its usual ones (lstm_fused.LSTM's
    layout). Dropout with probability `dropout` is applied to the output of every layer but
    the last when `training`. flow_probes: None or one tensor (or None) per layer.

    Cell variants (docs/ARCHITECTURE.md has the formulas): layer_norm; recurrent_dropout p
    (training only); zoneout z or (z_c, z_h) (masks in training, the expectation in eval);
    residual (num_layers > 1): the input of layer k+1 is dropout(y_k + x_k) for k >= 1 and
    the output y_{L-1} + x_{L-1}. In training the masks are drawn by draw_masks unless given:
    recurrent_dropout_masks (L*D, B, P), zoneout_masks one (cell (D, N, H) or None,
    hidden (D, N, P) or None) pair per layer; given masks switch recurrent dropout on in
    training even with recurrent_dropout=0, and are not used in eval. Masks are constants: no
    gradient flows to them.
    Returns (output, hy (L*D, B, P), cy (L*D, B, H)).
    """
    try:
        layer_fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown LSTM backend {backend!r}; known: {sorted(BACKENDS)}") from None
    D = 2 if bidirectional else 1
    has_proj = proj_size > 0
    z_c, z_h = _zoneout_pair(zoneout)
    n = (2 + (2 if has_biases else 0) + (1 if has_proj else 0) + (4 if layer_norm else 0)) * D
    if len(flat_weights) != n * num_layers:
        raise ValueError(f"expected {n * num_layers} weights for {num_layers} layer(s), "
                         f"got {len(flat_weights)}")
    if flow_probes is not None and len(flow_probes) != num_layers:
        raise ValueError(f"flow_probes must have one entry per layer ({num_layers}), "
                         f"got {len(flow_probes)}")
    if residual and num_layers < 2:
        raise ValueError("residual=True adds each layer's input to its output from the second "
                         f"layer on, so it expects num_layers greater than 1, got num_layers="
                         f"{num_layers}")
    options = LayerOptions(has_biases=has_biases, has_proj=has_proj, bidirectional=bidirectional,
                           bptt_clip=float(bptt_clip), bptt_clip_mode=int(bptt_clip_mode),
                           layer_norm=bool(layer_norm),
                           recurrent_dropout=bool(training and (
                               recurrent_dropout > 0 or recurrent_dropout_masks is not None)),
                           zoneout_cell=z_c, zoneout_hidden=z_h, training=bool(training))
    if options.clip_mode == CLIP_MODES["norm"] and flow_probes is not None and any(
            p is not None and p.shape[-1] == reference.FLOW_CHANNELS_PER_SEQUENCE
            for p in flow_probes):
        # norm clipping couples the rows of a step; the fused op could not count each
        # sequence back from its own last step exactly
        raise ValueError("flow probes of 5 channels (norms from each sequence's last step) "
                         "cannot be used with norm clipping (bptt_clip_mode 2)")
    if not 0 <= recurrent_dropout < 1:
        raise ValueError(f"recurrent_dropout must be in [0, 1), got {recurrent_dropout!r}")
    if zoneout_masks is not None and options.zoneout_masks:
        if len(zoneout_masks) != num_layers:
            raise ValueError(f"zoneout_masks must have one (cell, hidden) pair per layer "
                             f"({num_layers}), got {len(zoneout_masks)}")
        for layer, pair in enumerate(zoneout_masks):
            for name, z, mask in zip(("cell", "hidden"), (z_c, z_h), pair):
                if (mask is not None) != (z > 0):
                    raise ValueError(f"zoneout_masks[{layer}]: a {name} mask must be given "
                                     f"exactly when its zoneout probability is > 0 (it is {z})")
    if training and (options.recurrent_dropout or options.zoneout_masks):
        batch = hx.shape[1]
        rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
        drawn_dropout, drawn_zoneout = draw_masks(
            input, batch, rows, cx.shape[-1], proj_size, num_layers, bidirectional,
            recurrent_dropout if recurrent_dropout_masks is None else 0.0,
            (z_c, z_h) if zoneout_masks is None else 0.0)
        if recurrent_dropout_masks is None:
            recurrent_dropout_masks = drawn_dropout
        if zoneout_masks is None:
            zoneout_masks = drawn_zoneout
    x = input
    hys, cys = [], []
    for layer in range(num_layers):
        if layer > 0 and dropout > 0 and training:
            x = F.dropout(x, p=dropout, training=True)
        probe = flow_probes[layer] if flow_probes is not None else None
        # one layer: hx/cx whole, not sliced (no slice nodes in exported graphs)
        layer_hx = hx if num_layers == 1 else hx[layer * D:(layer + 1) * D]
        layer_cx = cx if num_layers == 1 else cx[layer * D:(layer + 1) * D]
        masks = []
        if options.recurrent_dropout:
            masks.append(recurrent_dropout_masks[layer * D:(layer + 1) * D].detach())
        if options.zoneout_masks:
            for z, mask in zip((z_c, z_h), zoneout_masks[layer]):
                if z > 0:
                    masks.append(mask.detach())
        y, hy, cy = layer_fn(x, layer_hx, layer_cx, flat_weights[layer * n:(layer + 1) * n],
                             batch_sizes, probe, options, masks)
        x = y + x if residual and layer > 0 else y
        hys.append(hy)
        cys.append(cy)
    if num_layers == 1:
        return x, hys[0], cys[0]
    return x, torch.cat(hys, 0), torch.cat(cys, 0)
