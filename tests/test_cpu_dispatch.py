"""Portable binaries: one library per SIMD level (setup.py), the best one the running CPU has
loaded at run time (lstm_fused/_loader.py, from torch.backends.cpu.get_cpu_capability(), as
ATen picks its kernels), LSTM_FUSED_CPU_CAPABILITY to force a lower one. Every built level the
CPU supports is run here against the reference backend, so CI tests the fallbacks, and the
fallback libraries are checked to hold no instruction of the levels above them."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lstm_fused import _loader, functional

pytestmark = pytest.mark.skipif(functional.backend_unavailable_reason("fused") is not None,
                                reason=str(functional.backend_unavailable_reason("fused")))

BUILT = list(getattr(_loader.build_info(), "CPU_SIMD", None) or ())
SUPPORTED = {"AVX512": ["avx512", "avx2", "default"], "AVX2": ["avx2", "default"]}.get(
    torch.backends.cpu.get_cpu_capability(), ["default"])

# A layer through every CPU path (sequence kernels, step kernels with projection and clipping,
# the small GEMM), fused against the reference, in a fresh process at the forced level.
CHECK = """
import sys, torch, lstm_fused
from lstm_fused import functional
from lstm_fused.options import LayerOptions
torch.manual_seed(0)
# (the last: the small GEMM's row blocks 8 + 8 + 2 + 1 and whole and partial panels)
for dtype, opts, P, (H, I, T, B) in (
        (torch.float64, LayerOptions(bidirectional=True), 0, (19, 5, 6, 7)),
        (torch.float32, LayerOptions(has_proj=True, bptt_clip=0.1, bptt_clip_mode=2), 3,
         (19, 5, 6, 7)),
        (torch.float32, LayerOptions(), 0, (33, 4, 5, 19))):
    D = opts.directions
    params = []
    for _ in range(D):
        params += [torch.randn(4 * H, I, dtype=dtype), torch.randn(4 * H, P or H, dtype=dtype),
                   torch.randn(4 * H, dtype=dtype), torch.randn(4 * H, dtype=dtype)]
        if P:
            params.append(torch.randn(P, H, dtype=dtype))
    params = [p.mul(0.3).requires_grad_() for p in params]
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    hx = torch.randn(D, B, P or H, dtype=dtype)
    cx = torch.randn(D, B, H, dtype=dtype)
    results = []
    for backend in ("fused", "reference"):
        out = functional.BACKENDS[backend](x, hx, cx, params, None, None, opts)
        grads = torch.autograd.grad(sum(o.sum() for o in out), [x, *params])
        results.append(list(out) + list(grads))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
# bfloat16 (the 16-bit GEMM mode and its conversions of h and dG) against float32
params = [torch.randn(s, dtype=torch.float64).mul(0.3) for s in ((76, 5), (76, 19), (76,), (76,))]
x, hx, cx = torch.randn(6, 7, 5), torch.randn(1, 7, 19), torch.randn(1, 7, 19)
results = []
for dtype in (torch.bfloat16, torch.float32):
    leaves = [t.to(dtype).requires_grad_() for t in [x, *params]]
    out = functional.BACKENDS["fused"](leaves[0], hx.to(dtype), cx.to(dtype), leaves[1:], None,
                                       None, LayerOptions())
    grads = torch.autograd.grad(sum(o.float().sum() for o in out), leaves)
    results.append([t.float() for t in list(out) + list(grads)])
for a, b in zip(*results):
    assert ((a - b).norm() / b.norm()) < 2e-2, ((a - b).norm() / b.norm())
print("level", torch.ops.lstm_fused.cpu_simd())
"""


def _run(level, code=CHECK):
    env = dict(os.environ, LSTM_FUSED_CPU_CAPABILITY=level)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_best_supported_level_is_loaded():
    from lstm_fused import _ops  # noqa: F401 - loads the library

    want = next(level for level in ("avx512", "avx2", "default")
                if level in BUILT and level in SUPPORTED)
    if os.environ.get("LSTM_FUSED_CPU_CAPABILITY"):
        want = os.environ["LSTM_FUSED_CPU_CAPABILITY"]
    assert torch.ops.lstm_fused.cpu_simd() == want
    assert os.path.basename(_loader.load_library()).startswith(f"_C_{want}")


@pytest.mark.parametrize("level", ["avx512", "avx2", "default"])
def test_each_level_runs_and_matches_the_reference(level):
    if level not in BUILT:
        pytest.skip(f"not built (LSTM_FUSED_CPU_SIMD={os.environ.get('LSTM_FUSED_CPU_SIMD')})")
    if level not in SUPPORTED:
        pytest.skip(f"this CPU lacks {level}")
    out = _run(level)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"level {level}"


def test_forcing_a_level_the_cpu_lacks_or_an_unknown_one_is_a_clear_error():
    code = "import lstm_fused.functional as f; print(f.backend_unavailable_reason('fused'))"
    out = _run("sse9", code)
    assert "LSTM_FUSED_CPU_CAPABILITY must be one of avx512, avx2, default" in out.stdout
    missing = [level for level in BUILT if level not in SUPPORTED]
    if missing:
        out = _run(missing[0], code)
        assert "this CPU does not support it" in out.stdout


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_the_fallback_libraries_hold_no_instructions_above_their_level():
    """The point of the fallbacks: an AVX2-only CPU must never meet an AVX-512 instruction in
    the library it loads (zmm registers), a CPU without AVX none of AVX's (ymm)."""
    forbidden = {"avx2": ("zmm",), "default": ("zmm", "ymm")}
    for level, registers in forbidden.items():
        if level not in BUILT:
            continue
        (path,) = glob.glob(os.path.join(os.path.dirname(_loader.__file__), f"_C_{level}*.so"))
        text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path],
                              capture_output=True, text=True, timeout=300).stdout
        for register in registers:
            assert f"%{register}" not in text, (level, register)
