"""Long sequences and memory: what a forward saves for the backward, T = 100,000 steps at
B = 1 (time, peak memory), and 64-bit element offsets (T*B*4H > 2^31)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
import torch

import lstm_fused
from lstm_fused import functional
from conftest import requires_cuda

pytestmark = pytest.mark.skipif(functional.backend_unavailable_reason("fused") is not None,
                                reason=str(functional.backend_unavailable_reason("fused")))

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"


# --- saved activations -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["seq", "packed"])
@pytest.mark.parametrize("proj", [0, 3])
def test_saved_activations_are_gates_and_cells(kind, proj):
    """Besides tensors that exist anyway (input, h0/c0, weights, each layer's output, which is
    the next layer's input or the result), a forward keeps exactly the activated gates
    (D, N, 4H) and the cell states (D, N, H) of every layer for the backward."""
    L, D, I, H, T, B = 2, 2, 4, 6, 7, 3
    P = proj or H
    m = lstm_fused.LSTM(I, H, L, bidirectional=True, proj_size=proj)
    x = torch.randn(T, B, I, requires_grad=True)
    inp = x
    if kind == "packed":
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([7, 5, 2]))
    N = inp.data.shape[0] if kind == "packed" else T * B
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, _ = m(inp)
    out = out.data if kind == "packed" else out

    def storage(t):
        return t.untyped_storage().data_ptr()

    existing = {storage(t) for t in (x, inp.data if kind == "packed" else x, out,
                                     *m.parameters())}
    extra = {storage(t): t.untyped_storage().nbytes() for t in saved
             if t.is_floating_point() and storage(t) not in existing}
    layer_outputs = (L - 1) * N * D * P * 4           # layer 1's output feeds layer 2
    h0_c0 = L * D * B * (P + H) * 4                   # the zero initial states
    gates_cells = L * D * N * (4 * H + H) * 4
    assert sum(extra.values()) == gates_cells + layer_outputs + h0_c0


# --- T = 100,000 ------------------------------------------------------------------------------

T_LONG, I_LONG, H_LONG = 100_000, 64, 64


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def long_sequence_run():
    """Forward+backward at T_LONG, B=1 in this (fresh) process: prints timings and the peak
    resident memory above what the process held before the forward (as JSON)."""
    torch.set_num_threads(1)  # timings without thread-pool noise on a shared CI machine
    torch.manual_seed(0)
    m = lstm_fused.LSTM(I_LONG, H_LONG)
    x = torch.randn(T_LONG, 1, I_LONG, requires_grad=True)
    prefix, _ = m(x[:1000])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current resident size
    base = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    out, (hy, cy) = m(x)
    t1 = time.perf_counter()
    (out.sum() + cy.sum()).backward()
    t2 = time.perf_counter()
    peak = _status_bytes("VmHWM") - base
    assert torch.equal(out[:1000], prefix)  # the same steps, as a short run computes them
    assert torch.equal(hy[0], out[-1])
    assert torch.isfinite(x.grad).all() and x.grad[0].abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    print(json.dumps(dict(forward_s=t1 - t0, backward_s=t2 - t1, peak_bytes=peak)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_100k_steps_forward_backward(record_property):
    """No recursion and no per-step autograd graph: one node per layer. Peak memory stays
    within the saved activations plus the backward's (N, ...) buffers. Runs in a fresh process
    whose allocator returns every freed buffer over 64 KiB to the OS, so that resident memory
    follows the live tensors."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parent),
                                           os.environ.get("PYTHONPATH", "")]))
    code = "import test_long_sequences as t; t.long_sequence_run()"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for key, value in result.items():
        record_property(key, value)
    N, H, I, f32 = T_LONG, H_LONG, I_LONG, 4
    activations = N * (4 * H + H + H) * f32   # gates, cells, output
    backward = N * 4 * H * f32 + N * (H + H + I) * f32  # dgates; h_prev, grad_output, dx
    allowance = 16 * 2**20                    # weights, packed GEMM operands, the allocator
    assert result["peak_bytes"] <= activations + backward + allowance, result
    print(f"T={T_LONG} B=1 H={H_LONG}: forward {result['forward_s']:.2f} s, backward "
          f"{result['backward_s']:.2f} s, peak {result['peak_bytes'] / 2**20:.0f} MiB above the "
          f"inputs (saved activations {activations / 2**20:.0f} MiB)")


# --- 64-bit offsets ---------------------------------------------------------------------------

_FIELD = re.compile(r"^\s*(?:const\s+)?([\w:<>]+\s*\**)\s*(\w+)(?:\s*=\s*[^;]+)?;", re.M)
_STRUCT = re.compile(r"struct (\w+) \{(.*?)\n\};", re.S)


def _struct_fields(path, names):
    bodies = {name: body for name, body in _STRUCT.findall(path.read_text()) if name in names}
    assert set(bodies) == set(names), f"{path.name}: missing {set(names) - set(bodies)}"
    return {(name, field): typ.replace(" ", "")
            for name, body in bodies.items()
            for typ, field in _FIELD.findall(re.sub(r"//[^\n]*", "", body))}


def test_sizes_offsets_and_strides_are_64_bit():
    """Element offsets reach T*B*4H, which passes 2^31 for long sequences (T=100k, B=64,
    H=512: 1.3e10). The driver computes every offset from the Steps layout (csrc/ops.cpp)
    and passes sizes, row counts and strides to the step kernels in the Args structs
    (csrc/lstm_steps.h); the kernels index from those. This checks that all of them are
    declared int64_t, so that products such as offset * 4 * H are 64-bit. (A CPU run that
    crosses 2^31 elements needs > 8 GiB per buffer; the CUDA test below runs one.)"""
    # (uint16_t*: the 16-bit mode's copies, pointers like T*)
    allowed = {"int64_t", "T", "T*", "uint16_t*", "std::vector<int64_t>", "StepVariants<T>"}
    fields = _struct_fields(CSRC / "lstm_steps.h",
                            ["ForwardStepArgs", "HiddenGradStepArgs", "BackwardStepArgs",
                             "RecurrentGradStepArgs", "StepVariants"])
    fields.update(_struct_fields(CSRC / "ops.cpp", ["Steps"]))
    assert len(fields) > 25
    # flags, not sizes
    flags = {("StepVariants", "variants"): "unsigned", ("RecurrentGradStepArgs", "zoneout"): "bool",
             ("ForwardStepArgs", "format_16bit"): "Bits16",
             ("BackwardStepArgs", "format_16bit"): "Bits16",
             ("BackwardStepArgs", "fold_hidden_grad"): "bool"}
    wrong = {key: typ for key, typ in fields.items()
             if typ not in allowed and flags.get(key) != typ}
    assert not wrong, f"not 64-bit: {wrong}"


@requires_cuda
@pytest.mark.slow
def test_offsets_past_2_31_elements_cuda():
    """T*B*4H = 8200*256*1024 > 2^31: the last steps' rows of the gates and of their
    gradients lie past element 2^31. Their outputs and input gradients must equal a short run
    of those steps started from the long run's state (about 25 GB of GPU memory)."""
    T, B, I, H, tail = 8200, 256, 8, 256, 6
    assert T * B * 4 * H > 2**31
    torch.manual_seed(0)
    m = lstm_fused.LSTM(I, H, device="cuda")
    x = torch.randn(T, B, I, device="cuda", requires_grad=True)
    g = torch.randn(tail, B, H, device="cuda")
    with torch.no_grad():
        _, state = m(x[:T - tail])
    x_tail = x[T - tail:].detach().requires_grad_()
    out_tail, _ = m(x_tail, state)
    (grad_tail,) = torch.autograd.grad((out_tail * g).sum(), x_tail)
    del state
    out, _ = m(x)
    ((out[T - tail:] * g).sum()).backward()
    torch.testing.assert_close(out[T - tail:], out_tail, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad[T - tail:], grad_tail, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(x.grad).all()
