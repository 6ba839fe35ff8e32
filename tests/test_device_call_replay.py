"""The driver's raw-pointer device calls, replayed on the CPU.

On CUDA the layer driver (csrc/ops.cpp) runs each step's products as one cuBLAS call with raw
pointers and leading dimensions (StepKernels::gemm: column-major, cuBLAS's convention) and its
row copies as cudaMemcpy2DAsync (StepKernels::copy_rows), with no tensor views per step. That
code has not run on a GPU yet, so its call sequence is checked here: with
lstm_fused::set_cpu_device_call_replay on, the CPU op drives the same calls into reference
loops that follow cuBLAS's and cudaMemcpy2D's argument rules (leading dimensions, pitches,
C unread when beta is 0). Results must equal the reference backend's, and the number of calls
must be the driver's (one product per active step and direction and weight, one copy per
projected step), so a wrong pointer, transpose, leading dimension or batch offset fails here
(and reads out of bounds under ./dev sanitize)."""

from __future__ import annotations

import pytest
import torch

from lstm_fused import functional
from lstm_fused.options import LayerOptions
from conftest import random_layer

pytestmark = pytest.mark.skipif(functional.backend_unavailable_reason("fused") is not None,
                                reason=str(functional.backend_unavailable_reason("fused")))

OPS = torch.ops.lstm_fused


@pytest.fixture
def replay():
    old = OPS.set_cpu_device_call_replay(True)
    yield
    OPS.set_cpu_device_call_replay(old)


CASES = {
    "plain": dict(),
    "proj": dict(proj=2),
    "bi-packed": dict(bidirectional=True, lengths=[5, 3, 3, 1]),
    "bi-proj-packed-nobias": dict(bidirectional=True, proj=3, bias=False, lengths=[4, 4, 2]),
    "odd": dict(T=3, B=5, I=7, H=9),
}
CLIPS = {"off": (0.0, 0), "value": (0.05, 1), "norm": (0.3, 2)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("case", list(CASES))
def test_replayed_device_calls_match_the_reference(replay, dtype, case, clip):
    layer = random_layer(dtype, **CASES[case])
    bptt_clip, mode = CLIPS[clip]
    options = LayerOptions(has_biases=layer["bias"], has_proj=layer["proj"],
                           bidirectional=layer["bidirectional"], bptt_clip=bptt_clip,
                           bptt_clip_mode=mode)
    probe_shape = (layer["D"], len(layer["steps"]), 3)
    leaves = [layer["input"], layer["hx"], layer["cx"], *layer["params"]]
    results = {}
    for backend in ("fused", "reference"):
        probe = torch.zeros(probe_shape, dtype=dtype, requires_grad=True)
        before = OPS.cpu_device_call_replay_counts()
        outs = functional.BACKENDS[backend](layer["input"], layer["hx"], layer["cx"],
                                            layer["params"], layer["batch_sizes"], probe, options)
        gen = torch.Generator().manual_seed(1)
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dtype)
                   for o in outs]
        grads = torch.autograd.grad(outs, leaves + [probe], weights)
        after = OPS.cpu_device_call_replay_counts()
        results[backend] = (outs, grads, [a - b for a, b in zip(after, before)])
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    (outs, grads, calls), (ref_outs, ref_grads, _) = results["fused"], results["reference"]
    for k, (a, b) in enumerate(zip(list(outs) + list(grads), list(ref_outs) + list(ref_grads))):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, k=k: f"result {k}: {m}")
    active = sum(1 for rows in layer["steps"] if rows > 0) * layer["D"]
    products = 2 if layer["proj"] else 1  # W_hh, and W_hr with a projection
    assert calls == [2 * active * products, 2 * active * int(layer["proj"]), 0], calls


def test_replay_is_off_by_default_and_restores():
    assert OPS.set_cpu_device_call_replay(False) is False
    layer = random_layer(torch.float64)
    before = OPS.cpu_device_call_replay_counts()
    functional.BACKENDS["fused"](layer["input"], layer["hx"], layer["cx"], layer["params"])
    assert OPS.cpu_device_call_replay_counts() == before
