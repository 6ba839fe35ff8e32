"""The library that runs a layer's large float32 GEMMs on the CPU (csrc/cpu/library_gemm_cpu.h):
MKL through ATen, or oneDNN's matmul, both from the running libtorch. Every library this
machine runs gives nn.LSTM's outputs and gradients on each GEMM of the driver: the input
projection with and without biases, proj_size (W_hr), packed rows (dW_hh from gathered rows),
bidirectional (dx accumulated over the directions), layer norm (the projection on its own)."""

import copy

import pytest
import torch
from torch import nn

import lstm_fused
from conftest import cpu_gemm_libraries
from lstm_fused import functional

pytestmark = pytest.mark.skipif(functional.backend_unavailable_reason("fused") is not None,
                                reason=str(functional.backend_unavailable_reason("fused")))


def _vendor():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":")[1].strip()
    except OSError:
        pass
    return None


def test_auto_takes_onednn_exactly_off_intel_cpus_with_its_avx512():
    previous = lstm_fused.set_cpu_gemm_library("auto")
    try:
        chosen = torch.ops.lstm_fused.cpu_gemm_library()
        assert chosen in ("mkl", "onednn")
        if "onednn" not in cpu_gemm_libraries() or _vendor() == "GenuineIntel":
            assert chosen == "mkl"
        elif _vendor() is not None:
            assert chosen == "onednn"
    finally:
        lstm_fused.set_cpu_gemm_library(previous)


def test_an_unknown_library_is_a_clear_error_and_changes_nothing():
    before = torch.ops.lstm_fused.cpu_gemm_library()
    with pytest.raises(RuntimeError, match="one of 'auto', 'mkl', 'onednn'; got 'blis'"):
        lstm_fused.set_cpu_gemm_library("blis")
    assert torch.ops.lstm_fused.cpu_gemm_library() == before


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(bias=False),
    dict(num_layers=2, bidirectional=True),
    dict(proj_size=5),
], ids=["plain", "no-bias", "L2-bi", "proj"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_each_library_gives_nn_lstm_outputs_and_gradients(cpu_gemm_library, kwargs, packed):
    torch.manual_seed(0)
    ref = nn.LSTM(11, 24, **kwargs)
    ours = lstm_fused.LSTM(11, 24, **kwargs)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(9, 6, 11)
    lengths = [9, 7, 7, 4, 2, 1]
    results = []
    for module in (ref, ours):
        leaf = x.clone().requires_grad_()
        inp = nn.utils.rnn.pack_padded_sequence(leaf, lengths) if packed else leaf
        out, (h, c) = module(inp)
        out = nn.utils.rnn.pad_packed_sequence(out)[0] if packed else out
        loss = out.square().sum() + h.sum() + c.sum()
        grads = torch.autograd.grad(loss, [leaf, *module.parameters()])
        results.append([out, h, c, *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_each_library_gives_nn_lstm_results_with_a_large_recurrent_weight(cpu_gemm_library):
    """H=600: W_hh is 5.5 MiB, above the limits of the small-GEMM loop (step_weight.h) where MKL
    has its AVX-512 kernels; without them a sequence kernel's slice keeps the loop."""
    torch.manual_seed(0)
    ref = nn.LSTM(8, 600)
    ours = lstm_fused.LSTM(8, 600)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 8)
    results = []
    for module in (ref, ours):
        leaf = x.clone().requires_grad_()
        out, (h, c) = module(leaf)
        grads = torch.autograd.grad(out.square().sum() + c.sum(), [leaf, *module.parameters()])
        results.append([out, h, c, *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_each_library_runs_the_layer_norm_variant(cpu_gemm_library):
    """The variant takes the driver's step loop; at H=192 its W_hh (576 KiB) is above that
    loop's small-GEMM limit, so the step product is BLAS's, or oneDNN's without MKL's AVX-512.
    Oracle: the same module in float64 (nn.LSTM has no layer norm)."""
    torch.manual_seed(0)
    module = lstm_fused.LSTM(7, 192, layer_norm=True)
    module64 = copy.deepcopy(module).double()
    x = torch.randn(5, 3, 7, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out, _ = module(x)
    grads = torch.autograd.grad(out.sum(), [x, *module.parameters()])
    out64, _ = module64(x64)
    grads64 = torch.autograd.grad(out64.sum(), [x64, *module64.parameters()])
    for value, exact in zip([out, *grads], [out64, *grads64]):
        # 1e-5 of the largest magnitude: the norm's backward cancels, so small entries carry
        # the rounding of large ones (both libraries measured ~1e-6 of it)
        torch.testing.assert_close(value.double(), exact, rtol=0,
                                   atol=1e-5 * exact.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_mm_is_the_product_of_each_library(cpu_gemm_library, dtype):
    """torch.ops.lstm_fused.cpu_mm (the bench's large-GEMM rate): the layers' GEMM, with a
    float32 result for bfloat16 operands."""
    torch.manual_seed(0)
    a, b = torch.randn(70, 33).to(dtype), torch.randn(33, 41).to(dtype)
    out = torch.ops.lstm_fused.cpu_mm(a, b)
    exact = a.double() @ b.double()
    assert out.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b_transposed", [False, True], ids=["b-packed", "a-packed"])
def test_bf16_mm_over_a_long_depth(cpu_gemm_library, b_transposed):
    """The weight gradients' shape: a depth of every step's rows (k = N) far beyond the
    outputs' rows, which bf16_mm takes in spans of about 1 MiB of packed operand each
    (with B's columns contiguous it packs A instead and writes out transposed, as for dW)."""
    torch.manual_seed(0)
    m, k, n = 100, 6001, 300  # spans: 4 of B (304 columns), or 2 of A (112)
    a = torch.randn(m, k).bfloat16()
    b = torch.randn(n, k).bfloat16().t() if b_transposed else torch.randn(k, n).bfloat16()
    out = torch.ops.lstm_fused.cpu_mm(a, b)
    torch.testing.assert_close(out.double(), a.double() @ b.double(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("m, k, n, a_transposed", [
    (130, 1001, 70, True),   # dW's layout (A = dG^T): pairs of A's columns, an odd depth
    (5, 64, 7, True),        # the same, one row block past the few-rows path
    (1, 3200, 512, False),   # the bias gradient, ones (1 x N) dG: the few-rows path
    (3, 77, 300, True),      # few rows of a transposed A
    (90, 301, 2, True),      # few columns: out^T on the few-rows path
], ids=["pairs", "pairs-small", "bias", "few-rows", "few-columns"])
def test_bf16_mm_layouts(cpu_gemm_library, cpu_bf16_product, m, k, n, a_transposed):
    """bf16_mm's paths for the backward's GEMMs: a transposed A read as pairs of its columns
    (no transposing copy), and a few rows or columns of out summed without packing."""
    torch.manual_seed(0)
    a = torch.randn(k, m).bfloat16().t() if a_transposed else torch.randn(m, k).bfloat16()
    b = torch.randn(k, n).bfloat16()
    if m == 1:
        a = torch.ones(1, k).bfloat16()
    out = torch.ops.lstm_fused.cpu_mm(a, b)
    exact = a.double() @ b.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5 * k ** 0.5)


def test_cpu_mm_of_mismatched_matrices_is_a_clear_error():
    with pytest.raises(RuntimeError, match="two CPU matrices of one dtype"):
        torch.ops.lstm_fused.cpu_mm(torch.randn(3, 4), torch.randn(5, 2))
