"""Shared helpers: backends to test, module pairs with identical weights, a runner that
compares nn.LSTM and lstm_fused.LSTM on outputs and on every gradient, and the build and run
of the CUDA emulator programs of tests/emulation/."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# Inductor's on-disk cache keys a compiled graph by its FX code, which does not see the C++
# op schemas: a graph cached by an older build (another op signature) would be replayed
# against this one. The suite compiles into a cache of its own run (README: upgrading).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lstm_fused_inductor_"))
import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstm_fused
from lstm_fused import functional

TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
}


def _backend_params():
    params = []
    for name in functional.BACKENDS:
        reason = functional.backend_unavailable_reason(name)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


BACKEND_PARAMS = _backend_params()


def accepted_settings(setter, values):
    """The values of a run-time setting (lstm_fused.set_cpu_bf16_product,
    set_cpu_gemm_library, ...) that this machine accepts; the setting is left as it was."""
    found = []
    for value in values:
        try:
            previous = setter(value)
        except RuntimeError:
            continue
        setter(previous)
        found.append(value)
    return found


def cpu_gemm_libraries():
    """The libraries this machine runs a layer's large float32 GEMMs on
    (lstm_fused.set_cpu_gemm_library)."""
    return accepted_settings(lstm_fused.set_cpu_gemm_library, ("mkl", "onednn"))


def setting_for_a_test(value, setter, current, accepted, missing):
    """A fixture's body: the run-time setting at `value` for one test, then back (the test
    skipped with `missing` where this machine does not accept the value)."""
    if value not in accepted:
        pytest.skip(missing)
    previous = setter(value)
    assert current() == value
    yield value
    setter(previous)


@pytest.fixture(params=["mkl", "onednn"])
def cpu_gemm_library(request):
    """Each CPU GEMM library in turn (skipped where the machine lacks it)."""
    yield from setting_for_a_test(
        request.param, lstm_fused.set_cpu_gemm_library, torch.ops.lstm_fused.cpu_gemm_library,
        cpu_gemm_libraries(), f"this CPU or torch build does not run {request.param}'s GEMM")


def cpu_bf16_products():
    """The bfloat16 product kinds of the CPU sequence kernels and bf16_mm this machine runs
    (lstm_fused.set_cpu_bf16_product); "none" is MKL's GEMM."""
    return accepted_settings(lstm_fused.set_cpu_bf16_product, ("amx", "avx512", "none"))


@pytest.fixture(params=["amx", "avx512", "none"])
def cpu_bf16_product(request):
    """Each bfloat16 product kind in turn (skipped where the machine lacks it)."""
    yield from setting_for_a_test(
        request.param, lstm_fused.set_cpu_bf16_product, torch.ops.lstm_fused.cpu_bf16_product,
        cpu_bf16_products(), f"this CPU does not run the {request.param} bf16 product")


def requires_cuda(f):
    """Marked `cuda` (bench/gpu_check.sh selects these with -m cuda) and skipped when no GPU
    is visible. Every test that needs a GPU carries the marker."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(),
                                               reason="needs CUDA")(f))


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """Each backend of lstm_fused.functional.BACKENDS that can run here."""
    return request.param


def random_layer(dtype=torch.float64, device="cpu", T=5, B=4, I=3, H=6, proj=0, bias=True,
                 bidirectional=False, lengths=None, seed=0, scale=0.5, requires_grad=True):
    """The raw arguments of one layer op, drawn from a seeded generator: input (padded, or
    packed by `lengths`), hx, cx and the flat parameters; `steps` holds the rows of each time
    step, `D` the directions. The same draws on every device."""
    gen = torch.Generator().manual_seed(seed)
    D = 2 if bidirectional else 1
    P = proj or H

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return t.to(dtype=dtype, device=device).requires_grad_(requires_grad)

    params = []
    for _ in range(D):
        params += [rand(4 * H, I, scale=scale), rand(4 * H, P, scale=scale)]
        if bias:
            params += [rand(4 * H), rand(4 * H)]
        if proj:
            params.append(rand(P, H, scale=scale))
    if lengths is None:
        batch_sizes, x, steps = None, rand(T, B, I), [B] * T
    else:
        B = len(lengths)
        steps = [sum(1 for n in lengths if n > t) for t in range(max(lengths))]
        batch_sizes, x = torch.tensor(steps), rand(sum(steps), I)
    return dict(input=x, hx=rand(D, B, P), cx=rand(D, B, H), params=params,
                batch_sizes=batch_sizes, steps=steps, D=D, proj=bool(proj), bias=bias,
                bidirectional=bidirectional)


def make_pair(backend="reference", dtype=torch.float64, device="cpu", seed=0, **cfg):
    """(nn.LSTM, lstm_fused.LSTM) with the same config and identical weights.

    cfg: nn.LSTM constructor arguments (input_size, hidden_size, num_layers, ...).
    The weights are loaded strictly in both directions, so the state_dicts agree on names.
    """
    torch.manual_seed(seed)
    ref = nn.LSTM(**cfg, device=device, dtype=dtype)
    ours = lstm_fused.LSTM(**cfg, device=device, dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict(), strict=True)
    # and back: proves the names match both ways; the values are already ref's
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref, ours


def make_input(m, kind="seq", T=5, B=3, lengths=None, dtype=torch.float64, device="cpu",
               hx=True, seed=1):
    """Inputs for module `m` (either class). Returns (input, hx or None, leaves).

    kind: "seq" (3-D, honours m.batch_first), "unbatched" (2-D), "packed_sorted",
    "packed_unsorted" (enforce_sorted=False). Packed inputs are packed from a padded leaf,
    so the gradient w.r.t. the leaf covers the packing too. leaves: tensors to take
    gradients for (input leaf, then h0, c0 when given).
    """
    g = torch.Generator().manual_seed(seed)
    D = 2 if m.bidirectional else 1
    P = m.proj_size or m.hidden_size
    LD = m.num_layers * D

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype,
                                                                         device=device)

    if kind == "unbatched":
        x = rnd(T, m.input_size).requires_grad_()
        inp = x
        hshape, cshape = (LD, P), (LD, m.hidden_size)
    elif kind == "seq":
        x = rnd(*((B, T) if m.batch_first else (T, B)), m.input_size).requires_grad_()
        inp = x
        hshape, cshape = (LD, B, P), (LD, B, m.hidden_size)
    elif kind in ("packed_sorted", "packed_unsorted"):
        if lengths is None:
            lengths = [T] + [max(1, T - 2 * i - 1) for i in range(1, B)]
            if kind == "packed_unsorted":
                lengths = lengths[1:] + lengths[:1]
        B, T = len(lengths), max(lengths)
        x = rnd(B, T, m.input_size).requires_grad_()
        inp = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True,
                                   enforce_sorted=(kind == "packed_sorted"))
        hshape, cshape = (LD, B, P), (LD, B, m.hidden_size)
    else:
        raise ValueError(kind)
    if not hx:
        return inp, None, [x]
    h0 = rnd(*hshape).requires_grad_()
    c0 = rnd(*cshape).requires_grad_()
    return inp, (h0, c0), [x, h0, c0]


def _flatten_result(out):
    output, (hy, cy) = out
    data = output.data if isinstance(output, PackedSequence) else output
    return data, hy, cy


def run_and_grad(m, inp, hx, leaves, seed=2, create_graph=False):
    """Forward m, then gradients of a random linear loss of (output, hy, cy) w.r.t.
    `leaves` and every parameter of m. Returns (raw forward result, [data, hy, cy], grads)."""
    out = m(inp) if hx is None else m(inp, hx)
    data, hy, cy = _flatten_result(out)
    g = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64)
                .to(t.dtype).to(t.device)).sum() for t in (data, hy, cy))
    params = [p for _, p in m.named_parameters()]
    # retain_graph: a packed input is built from its leaf once and reused by both modules
    grads = torch.autograd.grad(loss, list(leaves) + params, create_graph=create_graph,
                                retain_graph=True,
                                allow_unused=True)
    return out, [data, hy, cy], grads


def assert_same_structure(out_ref, out_ours):
    """Same output types, shapes, dtypes, packing metadata as nn.LSTM."""
    o1, h1 = out_ref
    o2, h2 = out_ours
    assert type(o1) is type(o2)
    assert isinstance(h2, tuple) and len(h2) == 2
    if isinstance(o1, PackedSequence):
        assert torch.equal(o1.batch_sizes, o2.batch_sizes)
        for a, b in ((o1.sorted_indices, o2.sorted_indices),
                     (o1.unsorted_indices, o2.unsorted_indices)):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b)
        o1, o2 = o1.data, o2.data
    for a, b in ((o1, o2), (h1[0], h2[0]), (h1[1], h2[1])):
        assert a.shape == b.shape
        assert a.dtype == b.dtype
        assert a.device == b.device


def compare_modules(ref, ours, inp, hx, leaves, tol=None, check_grads=True):
    """Run both modules on the same inputs; assert equal structure, outputs and the
    gradients for the input, h0, c0 and every parameter (matched by name)."""
    dtype = next(ref.parameters()).dtype
    tol = tol or TOL[dtype]
    out_ref, vals_ref, grads_ref = run_and_grad(ref, inp, hx, leaves)
    out_ours, vals_ours, grads_ours = run_and_grad(ours, inp, hx, leaves)
    assert_same_structure(out_ref, out_ours)
    for name, a, b in zip(("output", "hy", "cy"), vals_ref, vals_ours):
        torch.testing.assert_close(b, a, **tol, msg=lambda m, n=name: f"{n}: {m}")
    if not check_grads:
        return
    names = [f"leaf{i}" for i in range(len(leaves))] + [n for n, _ in ref.named_parameters()]
    assert names[len(leaves):] == [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, grads_ref, grads_ours):
        assert a is not None and b is not None, name
        torch.testing.assert_close(b, a, **tol, msg=lambda m, n=name: f"grad {n}: {m}")


# ---- CUDA kernels under the CPU emulation (tests/emulation/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATION = os.path.join(ROOT, "tests", "emulation")
EMULATION_HEADERS = [os.path.join(EMULATION, name)
                     for name in ("cuda_emulation.h", "emulator_harness.h")]


def _cxx_compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build_emulator(program, headers):
    """The binary of tests/emulation/<program>.cpp, compiled (C++20, -O2) into the temp folder
    once per content of its sources (the program, the emulation, `headers`: paths under csrc/)
    and compiler. Skips the calling test without Linux (ucontext fibers) or a C++ compiler."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the emulator uses ucontext fibers (Linux)")
    cxx = _cxx_compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    main = os.path.join(EMULATION, program + ".cpp")
    digest = hashlib.sha256(cxx.encode())
    for path in [main] + EMULATION_HEADERS + [os.path.join(ROOT, "csrc", h) for h in headers]:
        with open(path, "rb") as f:
            digest.update(f.read())
    exe = os.path.join(tempfile.gettempdir(), f"lstm_fused_{program}_{digest.hexdigest()[:16]}")
    if not os.path.exists(exe):
        tmp = exe + f".{os.getpid()}.tmp"
        cmd = [cxx, "-std=c++20", "-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas",
               "-I", os.path.join(ROOT, "csrc"), "-I", EMULATION, main, "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{program} does not compile:\n{res.stderr[-4000:]}"
        os.replace(tmp, exe)
    return exe


def emulator_cases(exe):
    """The case names the emulator binary runs (`--list`)."""
    out = subprocess.run([exe, "--list"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    return out.stdout.split()


def assert_emulated_case_passes(exe, case, timeout=300):
    res = subprocess.run([exe, case], capture_output=True, text=True, timeout=timeout)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0 and lines and lines[-1].startswith("PASS"), \
        res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture
def spy_backend(monkeypatch):
    """A backend "spy" that runs the reference layer and records (input, output) of each
    call, in the list this returns."""
    seen = []

    def spy(x, *args, **kw):
        out = functional.BACKENDS["reference"](x, *args, **kw)
        seen.append((x, out[0]))
        return out

    monkeypatch.setitem(functional.BACKENDS, "spy", spy)
    return seen
