"""Inference calls (LayerOptions.inference): the forward keeps nothing for a backward.

functional.lstm marks every call `inference`; the op then returns gates, cells and products
empty and writes neither the activated gates nor c[t] (csrc/ops.cpp forward_direction). Its
autograd kernel clears the mark where it records the call for a backward, so training is
unchanged. Checked here: the same outputs, bit for bit, as a call that keeps them (every
path: the per-step and sequence kernels, bfloat16's 16-bit mode, the cell variants, the
device-call replay that stands in for CUDA), the empty outputs and their fake-kernel twins,
the gradient when a caller marks a training call, and the memory it saves.
"""

import dataclasses

import pytest
import torch

import lstm_fused
from lstm_fused import _ops
from lstm_fused.benchmarking import peak_memory_bytes
from lstm_fused.options import LayerOptions
from conftest import random_layer

OPS = torch.ops.lstm_fused


def _layer(dtype=torch.float32, **shape):
    layer = random_layer(dtype, scale=0.3, requires_grad=False, **shape)
    options = LayerOptions(has_biases=layer["bias"], has_proj=layer["proj"],
                           bidirectional=layer["bidirectional"])
    return ([layer[k] for k in ("input", "hx", "cx", "params", "batch_sizes")]), options


def _both(args, options):
    """The op's results when it keeps what the backward reads and when it does not."""
    x, hx, cx, params, batch_sizes = args
    with torch.no_grad():
        kept = _ops.layer_forward(x, hx, cx, params, batch_sizes, None, options.to_list(), [])
        unsaved = _ops.layer_forward(x, hx, cx, params, batch_sizes, None,
                                     dataclasses.replace(options, inference=True).to_list(), [])
    return kept, unsaved


# The input projection of an inference call on the CPU is computed a chunk of steps at a
# time (inside the sequence kernel, or per chunk in the step loop): the same sums in another
# order, so equal within the rounding of a GEMM; elsewhere the same kernels, fewer stores.
ROUNDING = {torch.float32: dict(atol=2e-6, rtol=1e-5),
            torch.float64: dict(atol=1e-14, rtol=1e-13),
            torch.bfloat16: dict(atol=0, rtol=0),
            # over 40 steps of H 512 the fp32 differences reach ~1e-5 (a few of float16's
            # steps near 1e-3)
            torch.float16: dict(atol=5e-5, rtol=1e-3)}


def _assert_inference_matches(args, options, exact=False):
    kept, unsaved = _both(args, options)
    D, N, H = kept[3].shape[0], kept[3].shape[1], kept[3].shape[2] // 4
    assert kept[4].shape == (D, N, H)
    for a, b in zip(kept[:3], unsaved[:3]):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, **ROUNDING[a.dtype])
    for t in unsaved[3:]:
        assert t.shape == (0,)


CASES = {
    "per-step": dict(T=5, B=3, I=3, H=6),
    "sequence": dict(T=12, B=16, I=32, H=64),
    "sequence-bi-packed": dict(I=16, H=64, bidirectional=True, lengths=[9, 9, 7, 4, 4, 1] * 3),
    "no-bias": dict(T=7, B=8, I=8, H=32, bias=False),
    "proj": dict(T=6, B=4, I=5, H=8, proj=3, bidirectional=True),
    # several chunks of the projection (the sequence kernel's: about a quarter of L2 per
    # slice; the step loop's: 1 MiB), across steps of unequal rows
    "sequence-chunks": dict(T=80, B=16, I=24, H=64),
    "sequence-chunks-bi-packed": dict(I=16, H=64, bidirectional=True,
                                      lengths=[150, 140, 99, 60, 41, 30, 30, 12, 3, 1] * 2),
    "steps-chunks-bi-proj": dict(T=40, B=16, I=16, H=128, proj=32, bidirectional=True),
    "steps-chunks-packed-proj": dict(I=16, H=128, proj=16,
                                     lengths=[200, 180, 120, 60, 60, 33, 7, 1] * 2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_call_gives_the_same_outputs(case, dtype):
    _assert_inference_matches(*_layer(dtype=dtype, **CASES[case]))


@pytest.mark.parametrize("case", ["sequence-chunks", "sequence-chunks-bi-packed"])
def test_inference_projection_pipelined_beside_one_slice(case):
    """These layers are small enough that one thread computes every unit of a step (one
    slice); with a second thread the sequence kernel pipelines the projection: that thread
    projects chunk c + 1 while the first runs chunk c's steps. The same bits as one thread
    doing both (the small GEMM's sums do not depend on its rows' split), and the same outputs
    as the call that keeps everything."""
    args, options = _layer(**CASES[case])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, alone = _both(args, options)
        torch.set_num_threads(2)
        kept, pipelined = _both(args, options)
    finally:
        torch.set_num_threads(previous)
    for a, b, c in zip(alone[:3], pipelined[:3], kept[:3]):
        assert torch.equal(a, b)
        torch.testing.assert_close(b, c, **ROUNDING[c.dtype])


@pytest.mark.parametrize("case", ["per-step", "sequence", "proj"])
def test_inference_on_the_device_call_replay(case):
    """The replay stands in for CUDA, whose kernels write c[t] always: the driver gives them
    scratch (StepKernels::forward_unsaved false)."""
    previous = OPS.set_cpu_device_call_replay(True)
    try:
        _assert_inference_matches(*_layer(**CASES[case]), exact=True)
    finally:
        OPS.set_cpu_device_call_replay(previous)


@pytest.mark.parametrize("shape", [dict(T=10, B=8, I=24, H=32),
                                   # [W_ih, W_hh] of a slice beyond half the L2: the sequence
                                   # kernel declines the fused projection, the driver makes the
                                   # gates buffer after all
                                   dict(T=3, B=2, I=512, H=512),
                                   # the same slices over more rows than a chunk (about 256
                                   # with I 512): bfloat16's kernel projects a chunk at a time
                                   dict(T=40, B=16, I=512, H=512),
                                   # an odd input size (the padded depth), packed rows of
                                   # unequal lengths in both directions, several chunks
                                   dict(I=301, H=384, bidirectional=True,
                                        lengths=[120, 110, 90, 60, 33, 7, 1])],
                         ids=["fused", "one-chunk", "chunks", "chunks-bi-packed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inference_in_16_bits(shape, dtype):
    previous = lstm_fused.set_16bit_gemm(True)
    try:
        _assert_inference_matches(*_layer(dtype=dtype, **shape))
    finally:
        lstm_fused.set_16bit_gemm(previous)


@pytest.mark.parametrize("variants", [dict(layer_norm=True), dict(zoneout=(0.2, 0.1)),
                                      dict(layer_norm=True, zoneout=0.3)])
def test_inference_with_cell_variants(variants):
    """Eval-mode variants under no_grad (the op marked inference, with work buffers for the
    variant kernels) against the same module recording a graph."""
    torch.manual_seed(0)
    m = lstm_fused.LSTM(5, 8, num_layers=2, bidirectional=True, **variants).eval()
    x = torch.randn(6, 3, 5)
    with torch.no_grad():
        out, (h, c) = m(x)
    out_g, (h_g, c_g) = m(x.requires_grad_())
    for a, b in ((out, out_g), (h, h_g), (c, c_g)):
        assert torch.equal(a, b.detach())


def test_fake_kernel_agrees():
    args, options = _layer(T=3, B=2, I=3, H=4, lengths=[3, 2, 2], bidirectional=True)
    x, hx, cx, params, batch_sizes = args
    torch.library.opcheck(OPS.layer_forward.default,
                          (x, hx, cx, params, batch_sizes, None,
                           dataclasses.replace(options, inference=True).to_list(), []))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (x, hx, cx)]
        fake_params = [mode.from_tensor(p) for p in params]
        result = OPS.layer_forward(*fake, fake_params, mode.from_tensor(batch_sizes), None,
                                   dataclasses.replace(options, inference=True).to_list(), [])
    assert [tuple(t.shape) for t in result[3:]] == [(0,), (0,), (0,)]


def test_a_training_call_marked_inference_still_has_its_backward():
    """The autograd kernel clears the mark where it records the call: the gradient is the
    one of an unmarked call."""
    args, options = _layer(dtype=torch.float64, T=4, B=3, I=3, H=5, bidirectional=True)
    x, hx, cx, params, batch_sizes = args
    leaves = [t.clone().requires_grad_() for t in (x, hx, cx, *params)]
    grads = []
    for opts in (options, dataclasses.replace(options, inference=True)):
        out = _ops.layer_forward(leaves[0], leaves[1], leaves[2], leaves[3:], None, None,
                                 opts.to_list(), [])
        assert out[3].shape != (0,)
        grads.append(torch.autograd.grad(out[0].sum() + out[2].sum(), leaves))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert torch.autograd.gradcheck(
        lambda *t: lstm_fused.functional.BACKENDS["fused"](t[0], t[1], t[2], list(t[3:]), None,
                                                           None, options)[0],
        [t.detach().requires_grad_() for t in leaves])


def test_backward_refuses_what_an_inference_call_returned():
    args, options = _layer()
    x, hx, cx, params, batch_sizes = args
    _, unsaved = _both(args, options)
    out, hy, cy, gates, cells, products = unsaved
    with pytest.raises(RuntimeError, match="gates must have shape"):
        _ops.layer_backward(out, None, None, x, hx, cx, params, out, gates, cells, products,
                            batch_sizes, False, options.to_list(), [])


def _fused_16bit():
    """Whether bfloat16 layers run the CPU sequence kernel of the 16-bit mode here."""
    return (OPS.gemm_operands_16bit(torch.zeros(1, 1, 1, dtype=torch.bfloat16),
                                    LayerOptions().to_list())
            and OPS.cpu_bf16_product() != "none")


@pytest.mark.parametrize("dtype, proj", [(torch.float32, 0), (torch.float32, 16),
                                         (torch.bfloat16, 0)], ids=["sequence", "steps", "bf16"])
def test_inference_keeps_no_per_step_state(dtype, proj):
    """Under no_grad the layer allocates no (N, H) cells and no (N, 4H) gates: the input
    projection goes through a buffer of a chunk of steps (at most 1 MiB: the sequence kernel's
    per slice about a quarter of L2, the step loop's StepKernels::inference_chunk_bytes), or
    none (bfloat16's 16-bit mode, whose kernel computes it step by step). Its peak is at
    least their size, less the chunk, below that of a call that keeps them."""
    torch.manual_seed(0)
    T, B, H = 200, 16, 64
    m = lstm_fused.LSTM(H, H, proj_size=proj).to(dtype)
    x = torch.randn(T, B, H, dtype=dtype)
    previous = lstm_fused.set_16bit_gemm(True)
    try:
        def inference():
            with torch.no_grad():
                m(x)

        def kept():
            with torch.no_grad():
                m.flatten_parameters()
                OPS.layer_forward(x, torch.zeros(1, B, proj or H, dtype=dtype),
                                  torch.zeros(1, B, H, dtype=dtype),
                                  [p for p in m._flat_weights], None, None,
                                  LayerOptions(has_proj=bool(proj)).to_list(), [])

        fused = dtype == torch.bfloat16 and _fused_16bit()
        chunk = 0 if fused else 2**20
        module_own = 2**16  # the module's h_n/c_n and its zero initial states
        saved_bytes = (T * B * H * 4 * (5 if fused or dtype == torch.float32 else 1)
                       - chunk - module_own)
        assert peak_memory_bytes(inference) <= peak_memory_bytes(kept) - saved_bytes
    finally:
        lstm_fused.set_16bit_gemm(previous)
