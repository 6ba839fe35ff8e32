"""Subnormal floats in the fused CPU kernels: flushed to zero inside the kernels (FTZ/DAZ), the
caller's floating-point state (MXCSR) unchanged afterwards on every thread, and an opt-out
(lstm_fused.set_flush_denormals, LSTM_FUSED_FLUSH_DENORMALS=0). csrc/cpu/flush_denormals.h."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import lstm_fused
from lstm_fused import functional

pytestmark = [
    pytest.mark.skipif(functional.backend_unavailable_reason("fused") is not None,
                       reason=str(functional.backend_unavailable_reason("fused"))),
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"),
                       reason="MXCSR (FTZ/DAZ) is x86's"),
]

OPS = torch.ops.lstm_fused
FTZ_DAZ = 0x8040
SUBNORMAL = 1e-39  # float32: smallest normal is 1.18e-38


@pytest.fixture
def flush():
    """Restores the switch after the test."""
    old = lstm_fused.set_flush_denormals(True)
    yield
    lstm_fused.set_flush_denormals(old)


def _carry_cell(backend="fused", **kw):
    """A layer whose c[t] is exactly f * c[t-1] with f = 1 (i * g = 0): c0 reaches c_n through
    the cell-state arithmetic. Returns c_n for c0 = SUBNORMAL."""
    H = 4
    m = lstm_fused.LSTM(2, H, backend=backend, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.zero_()
            if name.startswith("bias_ih"):
                p[H:2 * H] = 100.0   # f = sigmoid(100) = 1; g = tanh(0) = 0
    x = torch.zeros(3, 2, 2)
    h0 = torch.zeros(1, 2, kw.get("proj_size") or H)
    c0 = torch.full((1, 2, H), SUBNORMAL)
    _, (_, cn) = m(x, (h0, c0))
    return cn


def test_on_by_default_and_the_switch_returns_the_previous_state(flush):
    assert OPS.flush_denormals_enabled()
    assert lstm_fused.set_flush_denormals(False) is True
    assert not OPS.flush_denormals_enabled()
    assert lstm_fused.set_flush_denormals(True) is False


@pytest.mark.parametrize("proj_size", [0, 2], ids=["sequence-kernel", "step-kernels"])
def test_subnormals_are_flushed_inside_the_kernels(flush, proj_size):
    assert torch.tensor(SUBNORMAL).item() != 0  # a float32 subnormal, not already zero
    assert torch.equal(_carry_cell(proj_size=proj_size), torch.zeros(1, 2, 4))
    lstm_fused.set_flush_denormals(False)
    kept = _carry_cell(proj_size=proj_size)
    assert torch.equal(kept, torch.full((1, 2, 4), SUBNORMAL))
    assert torch.equal(kept, _carry_cell("reference", proj_size=proj_size))


def _every_path():
    """Forward and backward through the sequence kernels, the step kernels (projection,
    clipping) and telemetry, float32 and float64."""
    torch.manual_seed(0)
    for dtype, kw in ((torch.float32, {}), (torch.float64, dict(proj_size=2)),
                      (torch.float32, dict(bptt_clip=0.1, bptt_clip_mode="norm"))):
        m = lstm_fused.LSTM(3, 8, num_layers=2, bidirectional=True, dtype=dtype, **kw)
        x = torch.randn(6, 33, 3, dtype=dtype, requires_grad=True)
        with lstm_fused.record_gradient_flow(m):
            out, _ = m(x)
            out.sum().backward()


@pytest.mark.parametrize("caller_flushes", [False, True], ids=["caller-default", "caller-ftz"])
def test_the_callers_mxcsr_is_unchanged_on_every_thread(flush, caller_flushes):
    previous = torch.set_flush_denormal(caller_flushes)
    try:
        before = OPS.cpu_mxcsr_per_thread()
        assert all(((v & FTZ_DAZ) == FTZ_DAZ) == caller_flushes for v in before[:1])
        _every_path()
        assert OPS.cpu_mxcsr_per_thread() == before
    finally:
        torch.set_flush_denormal(previous)


def test_environment_opt_out():
    code = ("import torch, lstm_fused; from lstm_fused import _ops; "
            "print(torch.ops.lstm_fused.flush_denormals_enabled())")
    env = dict(os.environ, LSTM_FUSED_FLUSH_DENORMALS="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
