"""Parity of lstm_fused.LSTM against torch.nn.LSTM on this machine: the engine of
`python -m lstm_fused check`.

Each case builds an nn.LSTM and an lstm_fused.LSTM with the same weights, runs both on the
same inputs (with initial states), back-propagates the same random gradient of (output, h_n,
c_n), and compares the outputs and the gradients of the input, h_0, c_0 and every parameter.
The error of a tensor is its norm-wise relative error max|ours - ref| / max|ref|; a case
passes when its largest error is within the tolerance of its dtype. 16-bit dtypes are
compared with an nn.LSTM in float32 on the same (rounded) weights and inputs.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from .reference import acc_dtype

__all__ = ["ParityCase", "CHECK_GRID", "TINY_CHECK_GRID", "TOLERANCES", "CaseResult",
           "run_case", "run_parity"]

# Norm-wise relative error allowed per dtype of lstm_fused. 16-bit: against float32.
TOLERANCES = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


@dataclass(frozen=True)
class ParityCase:
    """One module configuration and input kind; sizes are small so the grid runs in
    seconds."""

    layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    packed: bool = False
    T: int = 7
    B: int = 4
    input_size: int = 5
    hidden_size: int = 6

    @property
    def name(self) -> str:
        """Readable id such as "layers=2 bidirectional packed"."""
        parts = [f"layers={self.layers}"]
        if self.bidirectional:
            parts.append("bidirectional")
        if self.proj_size:
            parts.append(f"proj_size={self.proj_size}")
        if self.packed:
            parts.append("packed")
        return " ".join(parts)


CHECK_GRID = tuple(
    ParityCase(layers=layers, bidirectional=bidirectional, proj_size=proj_size, packed=packed)
    for layers, bidirectional, proj_size, packed
    in itertools.product((1, 2), (False, True), (0, 3), (False, True)))

TINY_CHECK_GRID = (ParityCase(), ParityCase(layers=2, bidirectional=True, proj_size=3,
                                            packed=True))


@dataclass
class CaseResult:
    """Outcome of one (case, dtype): the largest relative error and the tensor it was in,
    or the error message when the case raised."""

    case: ParityCase
    dtype: torch.dtype
    max_rel_error: float | None
    worst_tensor: str
    tolerance: float
    error: str | None = None

    @property
    def passed(self) -> bool:
        """No exception, and the error within the tolerance (NaN fails)."""
        return self.error is None and self.max_rel_error <= self.tolerance


@contextlib.contextmanager
def _tf32_disabled():
    # TF32 matmuls would put nn.LSTM's cuDNN reference ~1e-3 off in float32.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _run(module: nn.Module, case: ParityCase, inputs: dict, dtype: torch.dtype):
    """Forward and backward of `module` in `dtype`; returns {tensor name: value} for the
    outputs and every gradient, in float64 for comparison."""
    x = inputs["x"].to(dtype).requires_grad_()
    h0 = inputs["h0"].to(dtype).requires_grad_()
    c0 = inputs["c0"].to(dtype).requires_grad_()
    seq = pack_padded_sequence(x, inputs["lengths"], enforce_sorted=False) if case.packed else x
    output, (hy, cy) = module(seq, (h0, c0))
    data = output.data if isinstance(output, PackedSequence) else output
    loss = sum((t * inputs[f"grad_{name}"].to(dtype)).sum()
               for name, t in (("output", data), ("hy", hy), ("cy", cy)))
    names = ["input", "h_0", "c_0"] + [n for n, _ in module.named_parameters()]
    grads = torch.autograd.grad(loss, [x, h0, c0, *module.parameters()])
    values = {"output": data, "h_n": hy, "c_n": cy}
    values.update({f"grad {n}": g for n, g in zip(names, grads)})
    return {n: v.detach().double() for n, v in values.items()}


def _make_inputs(case: ParityCase, dtype: torch.dtype, device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    directions = 2 if case.bidirectional else 1
    out_size = case.proj_size or case.hidden_size
    state_rows = case.layers * directions
    # distinct lengths in no particular order: packing sorts and unsorts the batch
    lengths = torch.tensor([case.T - (3 * b) % case.T for b in range(case.B)])
    rows = int(lengths.sum()) if case.packed else case.T * case.B
    shapes = {
        "x": (case.T, case.B, case.input_size),
        "h0": (state_rows, case.B, out_size),
        "c0": (state_rows, case.B, case.hidden_size),
        "grad_output": (rows, directions * out_size) if case.packed
        else (case.T, case.B, directions * out_size),
        "grad_hy": (state_rows, case.B, out_size),
        "grad_cy": (state_rows, case.B, case.hidden_size),
    }
    # Drawn in float64 and rounded to `dtype`, so both modules see the same values.
    inputs = {name: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
              .to(device=device, dtype=acc_dtype(dtype))
              for name, shape in shapes.items()}
    inputs["lengths"] = lengths
    return inputs


def run_case(case: ParityCase, dtype: torch.dtype, device="cpu", seed: int = 0) -> CaseResult:
    """Compare lstm_fused.LSTM in `dtype` with nn.LSTM (float32 for 16-bit dtypes) on
    `case`; never raises for a failing kernel, the result carries the error."""
    from .module import LSTM

    tolerance = TOLERANCES[dtype]
    try:
        torch.manual_seed(seed)
        ref = nn.LSTM(case.input_size, case.hidden_size, num_layers=case.layers,
                      bidirectional=case.bidirectional, proj_size=case.proj_size,
                      device=device, dtype=acc_dtype(dtype))
        with torch.no_grad():
            for p in ref.parameters():  # the values the 16-bit module will hold
                p.copy_(p.to(dtype))
        ours = LSTM.from_torch(ref).to(dtype)
        inputs = _make_inputs(case, dtype, device, seed)
        with _tf32_disabled(), warnings.catch_warnings():
            # nn.LSTM's note that oneDNN does not do proj_size says nothing about parity
            warnings.filterwarnings("ignore", "LSTM with projections", UserWarning)
            expected = _run(ref, case, inputs, acc_dtype(dtype))
            actual = _run(ours, case, inputs, dtype)
    except Exception as e:  # noqa: BLE001 - reported as a failed case, with its message
        return CaseResult(case, dtype, None, "", tolerance, error=f"{type(e).__name__}: {e}")
    worst_name, worst = "", 0.0
    for name, ref_value in expected.items():
        error = float((actual[name] - ref_value).abs().max()
                      / ref_value.abs().max().clamp_min(torch.finfo(torch.float64).tiny))
        if not math.isnan(worst) and (math.isnan(error) or error > worst):
            worst_name, worst = name, error
    return CaseResult(case, dtype, worst, worst_name, tolerance)


def run_parity(dtypes, device="cpu", grid=CHECK_GRID, progress=None) -> list[CaseResult]:
    """run_case for every case of `grid` in every dtype; `progress(result)` after each."""
    results = []
    for dtype in dtypes:
        for case in grid:
            result = run_case(case, dtype, device)
            if progress:
                progress(result)
            results.append(result)
    return results
