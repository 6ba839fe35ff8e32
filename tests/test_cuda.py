"""The CUDA step kernels (csrc/cuda/) through lstm_fused.LSTM and the ops, on the GPU.

Parity with nn.LSTM on CUDA (cuDNN) and with our CPU path, identical weights, outputs and
every gradient; gradcheck; the clipping / telemetry (single-block reduction) kernels against
the CPU twin; streams, a second GPU, CUDA-graph capture, determinism, device-mismatch errors.
The cell variants (layer norm, recurrent dropout, zoneout, residual) against the CPU kernels on
the same masks. All skipped without a GPU (or without the CUDA kernels in the build).

Sizes are chosen to hit both kernel shapes: hidden sizes that are a multiple of the 16-byte
vector width (4 floats / 2 doubles) take the vectorised path, odd ones the scalar path; a
step with more than 512 vectors makes every thread of the reduction block loop.

The `persistent` fixture runs a test twice: with the persistent sequence kernels off (the
per-step path) and on (lstm_fused::set_cuda_persistent; float32 layers without projection,
clipping or telemetry then run one cooperative launch per direction and pass); the launch
counters (lstm_fused::cuda_persistent_stats) show which path ran.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import lstm_fused
from lstm_fused import functional
from lstm_fused.options import LayerOptions
from conftest import assert_same_structure, make_input, make_pair, random_layer, run_and_grad


def _cuda_unavailable_reason():
    if not torch.cuda.is_available():
        return "needs CUDA"
    reason = functional.backend_unavailable_reason("fused")
    if reason is not None:
        return reason
    if not torch._C._dispatch_has_kernel_for_dispatch_key("lstm_fused::layer_forward", "CUDA"):
        return "lstm_fused was built without CUDA kernels"
    return None


_SKIP = _cuda_unavailable_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))]

CUDA = "cuda"
OPS = torch.ops.lstm_fused


# The CUDA paths a test runs on: the per-step path (at::addmm per step), the per-step path with
# its raw-pointer cuBLAS calls (lstm_fused::set_cuda_direct_gemm, opt-in until a GPU run has
# passed) and the persistent kernels (lstm_fused::set_cuda_persistent).
PATHS = ["steps", "direct", "persistent"]


@pytest.fixture(params=PATHS)
def persistent(request):
    """The test runs on each CUDA path; the value says whether the persistent kernels are on."""
    old_persistent = OPS.set_cuda_persistent(request.param == "persistent")
    old_direct = OPS.set_cuda_direct_gemm(request.param == "direct")
    yield request.param == "persistent"
    OPS.set_cuda_persistent(old_persistent)
    OPS.set_cuda_direct_gemm(old_direct)


def _persistent_launches(hidden, batch):
    """(forward, backward): whether each pass of this size launches on this GPU, decided the
    way the kernels' host code decides (plan, speed policy, occupancy)."""
    return tuple(OPS.cuda_persistent_would_launch(hidden, batch, backward)
                 for backward in (False, True))


def _persistent_fits(hidden, batch):
    """Whether both passes of this size launch on this GPU."""
    return all(_persistent_launches(hidden, batch))


class _Launches:
    """Counts persistent launches and declines over a block:
    `with _Launches() as n: ...; n.forward, n.backward, n.declined`."""

    def __enter__(self):
        self._before = OPS.cuda_persistent_stats()
        return self

    def __exit__(self, *exc):
        after = OPS.cuda_persistent_stats()
        self.forward, self.backward, fwd_declined, bwd_declined = (
            a - b for a, b in zip(after, self._before))
        self.declined = (fwd_declined, bwd_declined)
        return False


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full fp32 GEMMs (ours via cuBLAS, nn.LSTM via cuDNN) so fp32 parity can be tight."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# (vs cuDNN, vs our CPU path): cuDNN sums in another order; our CPU path runs the same gate
# math and the same GEMM shapes, only with another BLAS and libm.
TOL_CUDNN = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-4, atol=2e-4)}
TOL_CPU = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}

# name -> (make_input kind, batch_first, make_input kwargs)
KINDS = {
    "seq": ("seq", False, dict(T=6, B=5)),
    "seq_bf": ("seq", True, dict(T=6, B=5)),
    "unbatched": ("unbatched", False, dict(T=6)),
    "packed": ("packed_unsorted", False, dict(lengths=[3, 7, 1, 7, 5])),
}

# hidden 32: vector path; 17 / proj 5: scalar path; 8 with proj 4 mixes them
ARCHS = {
    "L1": dict(num_layers=1),
    "L1-odd": dict(num_layers=1, hidden_size=17),
    "L2-bi": dict(num_layers=2, bidirectional=True),
    "L1-proj": dict(num_layers=1, proj_size=5),
    "L2-bi-proj": dict(num_layers=2, bidirectional=True, hidden_size=8, proj_size=4),
    "L1-nobias": dict(num_layers=1, bias=False),
}


def _cfg(arch, batch_first=False):
    cfg = dict(input_size=12, hidden_size=32, batch_first=batch_first)
    cfg.update(ARCHS[arch])
    return cfg


def _flat(vals, grads):
    return [t for t in list(vals) + list(grads)]


def _names(m, leaves):
    return ([f"leaf{i}" for i in range(len(leaves))] + ["output", "hy", "cy"]
            + [n for n, _ in m.named_parameters()])


def _assert_all_close(got, want, names, tol):
    assert len(got) == len(want) == len(names)
    for name, a, b in zip(names, got, want):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a.cpu(), b.cpu(), **tol, msg=lambda m, n=name: f"{n}: {m}")


def _run(m, kind, kw, device, dtype, hx=True):
    """Forward + gradients of a fixed random loss; returns (raw output, [vals], grads)."""
    inp, h, leaves = make_input(m, kind, dtype=dtype, device=device, hx=hx, **kw)
    out, vals, grads = run_and_grad(m, inp, h, leaves)
    return out, vals, list(grads), leaves


def _ordered(m, leaves, vals, grads):
    """Leaves' grads, then output/hy/cy, then parameter grads (same order as _names)."""
    n = len(leaves)
    return list(grads[:n]) + list(vals) + list(grads[n:])


# --- parity: nn.LSTM (cuDNN) and our CPU path ---------------------------------------------

# float64 never takes the persistent path: not generated (a skipped CUDA test fails the GPU run)
@pytest.mark.parametrize("dtype,persistent",
                         [(dt, path) for dt in (torch.float64, torch.float32) for path in PATHS
                          if not (dt == torch.float64 and path == "persistent")],
                         ids=lambda v: {torch.float64: "f64", torch.float32: "f32"}.get(v, v),
                         indirect=["persistent"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_parity_cudnn_and_cpu(arch, kind, dtype, persistent):
    ikind, batch_first, kw = KINDS[kind]
    ref, ours = make_pair("fused", dtype=dtype, device=CUDA, **_cfg(arch, batch_first))
    ours_cpu = copy.deepcopy(ours).cpu()

    out_ref, vals_ref, grads_ref, leaves = _run(ref, ikind, kw, CUDA, dtype)
    with _Launches() as launched:
        out_ours, vals_ours, grads_ours, _ = _run(ours, ikind, kw, CUDA, dtype)
    # every layer and direction of a layer without projection takes the persistent path
    want = persistent and not ours.proj_size
    assert (launched.forward > 0, launched.backward > 0) == (want, want)
    out_cpu, vals_cpu, grads_cpu, _ = _run(ours_cpu, ikind, kw, "cpu", dtype)
    assert_same_structure(out_ref, out_ours)
    for t in vals_ours + grads_ours:
        assert t.device.type == "cuda"
    names = _names(ours, leaves)
    got = _ordered(ours, leaves, vals_ours, grads_ours)
    _assert_all_close(got, _ordered(ref, leaves, vals_ref, grads_ref), names, TOL_CUDNN[dtype])
    _assert_all_close(got, _ordered(ours_cpu, leaves, vals_cpu, grads_cpu), names, TOL_CPU[dtype])


@pytest.mark.parametrize("hx", [True, False], ids=["hx", "nohx"])
def test_parity_larger_float32(hx, persistent):
    """Many vectors per step (B*H/4 > 512): every thread loops; longer recurrence."""
    cfg = dict(input_size=64, hidden_size=256, num_layers=2, bidirectional=True)
    ref, ours = make_pair("fused", dtype=torch.float32, device=CUDA, **cfg)
    kw = dict(T=25, B=24)
    _, vals_ref, grads_ref, leaves = _run(ref, "seq", kw, CUDA, torch.float32, hx=hx)
    _, vals_ours, grads_ours, _ = _run(ours, "seq", kw, CUDA, torch.float32, hx=hx)
    _assert_all_close(_ordered(ours, leaves, vals_ours, grads_ours),
                      _ordered(ref, leaves, vals_ref, grads_ref), _names(ours, leaves),
                      dict(rtol=5e-4, atol=5e-4))


def test_no_grad_forward_and_eval(persistent):
    ref, ours = make_pair("fused", dtype=torch.float32, device=CUDA, input_size=8,
                          hidden_size=20, num_layers=2)
    ref.eval()
    ours.eval()
    x = torch.randn(9, 3, 8, device=CUDA)
    with torch.no_grad():
        o_ref, (h_ref, c_ref) = ref(x)
        o, (h, c) = ours(x)
    for a, b in ((o, o_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b, **TOL_CUDNN[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("arch", ["L1", "L2-bi-proj"])
def test_16bit_against_float32(arch, dtype, persistent):
    """16-bit module vs a float32 copy fed the same (rounded) values and output gradients."""
    torch.manual_seed(0)
    m16 = lstm_fused.LSTM(**_cfg(arch), device=CUDA, dtype=dtype)
    m32 = copy.deepcopy(m16).float()
    T, B = 12, 6
    P = m16.proj_size or m16.hidden_size
    LD = m16.num_layers * (2 if m16.bidirectional else 1)
    x = torch.randn(T, B, m16.input_size, device=CUDA).to(dtype).requires_grad_()
    h0 = torch.randn(LD, B, P, device=CUDA).to(dtype).requires_grad_()
    c0 = torch.randn(LD, B, m16.hidden_size, device=CUDA).to(dtype).requires_grad_()
    x32, h32, c32 = (t.detach().float().requires_grad_() for t in (x, h0, c0))
    o16, (hy16, cy16) = m16(x, (h0, c0))
    o32, (hy32, cy32) = m32(x32, (h32, c32))
    outs16, outs32 = [o16, hy16, cy16], [o32, hy32, cy32]
    gouts = [torch.randn_like(t, dtype=torch.float32).to(dtype) for t in outs16]
    grads16 = torch.autograd.grad(outs16, [x, h0, c0, *m16.parameters()], gouts)
    grads32 = torch.autograd.grad(outs32, [x32, h32, c32, *m32.parameters()],
                                  [g.float() for g in gouts])
    # Values element-wise; gradients (sums over many steps, with cancellation) by the
    # relative error of the whole tensor.
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for a, b in zip(outs16, outs32):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol)
    for k, (a, b) in enumerate(zip(grads16, grads32)):
        assert a.dtype == dtype
        err = (a.float() - b).norm() / b.norm().clamp_min(1e-6)
        assert err < tol, f"gradient {k}: relative error {err:.3g} >= {tol}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("kind", ["seq", "packed"])
@pytest.mark.parametrize("path", ["direct", "persistent"])
def test_16bit_mode_on_tensor_cores_matches_the_cpu_replay(dtype, kind, path):
    """The direct path's 16-bit GEMM mode (cublasGemmEx on 16-bit operands, fp32 accumulation;
    h[t] and dG[t] rounded by the gate kernels) against the same computation replayed on
    the CPU (lstm_fused::set_cpu_device_call_replay): the same rounding points, so the results
    differ only by the order of the fp32 sums (a unit in the last 16-bit place, rarely). On the
    CPU, MKL's AMX product against the replay differed by 0.0025 eps (relative norm), the fp32
    GEMM mode against the 16-bit mode by 0.4 eps: 0.1 eps tells them apart. `persistent`: the
    same mode with the persistent kernels on, whose recurrent products run on mma.sync
    (h[t-1] rounded as it is staged, dG[t] as it is written): every pass launches them."""
    rule = OPS.gemm_operands_16bit
    options = LayerOptions(bidirectional=True).to_list()
    x_probe = torch.zeros(2, 1, 3, device=CUDA, dtype=dtype)
    old = (OPS.set_cuda_direct_gemm(False), OPS.set_cuda_persistent(False))
    try:
        assert not rule(x_probe, options)  # the per-step path keeps fp32 GEMMs
        OPS.set_cuda_direct_gemm(True)
        assert rule(x_probe, options)
        torch.manual_seed(0)
        m = lstm_fused.LSTM(12, 40, num_layers=2, bidirectional=True, device=CUDA, dtype=dtype)
        OPS.set_cuda_persistent(path == "persistent")
        with _Launches() as n:
            gpu = _run(m, KINDS[kind][0], KINDS[kind][2], CUDA, dtype)
        if path == "persistent":
            assert all(OPS.cuda_persistent_would_launch(40, 5, backward, True)
                       for backward in (False, True))
            assert (n.forward, n.backward, n.declined) == (4, 4, (0, 0))  # 2 layers x 2 dirs
        else:
            assert (n.forward, n.backward) == (0, 0)
        OPS.set_cuda_persistent(False)
        old_replay = OPS.set_cpu_device_call_replay(True)
        try:
            torch.manual_seed(0)
            m_cpu = copy.deepcopy(m).cpu()
            cpu = _run(m_cpu, KINDS[kind][0], KINDS[kind][2], "cpu", dtype)
        finally:
            OPS.set_cpu_device_call_replay(old_replay)
    finally:
        OPS.set_cuda_direct_gemm(old[0])
        OPS.set_cuda_persistent(old[1])
    eps = torch.finfo(dtype).eps
    for k, (a, b) in enumerate(zip(_ordered(m, gpu[3], gpu[1], gpu[2]),
                                   _ordered(m_cpu, cpu[3], cpu[1], cpu[2]))):
        assert a.dtype == dtype and a.is_cuda
        a, b = a.cpu().double(), b.double()
        err = ((a - b).norm() / b.norm().clamp_min(1e-6)).item()
        assert err < 0.1 * eps, f"result {k}: relative error {err:.3g} ({err / eps:.3g} eps)"


@pytest.mark.parametrize("kind", ["seq", "packed"])
def test_persistent_tf32_follows_allow_tf32(kind):
    """With torch.backends.cuda.matmul.allow_tf32 set, a float32 layer's persistent kernels
    multiply on the tensor cores in TF32 (mma.sync m16n8k8, operands rounded as cvt.rna
    does), as the per-step path's cuBLAS calls then do: every pass still launches them, and
    the results stay within TF32's error (10 mantissa bits) of the same layer on the CPU."""
    torch.manual_seed(0)
    m = lstm_fused.LSTM(12, 40, num_layers=2, bidirectional=True, device=CUDA)
    m_cpu = copy.deepcopy(m).cpu()
    old = OPS.set_cuda_persistent(True)
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert all(OPS.cuda_persistent_would_launch(40, 5, backward) for backward in (False, True))
        torch.manual_seed(1)
        with _Launches() as n:
            gpu = _run(m, KINDS[kind][0], KINDS[kind][2], CUDA, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        OPS.set_cuda_persistent(old)
    assert (n.forward, n.backward, n.declined) == (4, 4, (0, 0))  # 2 layers x 2 directions
    torch.manual_seed(1)
    cpu = _run(m_cpu, KINDS[kind][0], KINDS[kind][2], "cpu", torch.float32)
    for k, (a, b) in enumerate(zip(_ordered(m, gpu[3], gpu[1], gpu[2]),
                                   _ordered(m_cpu, cpu[3], cpu[1], cpu[2]))):
        a, b = a.cpu().double(), b.double()
        err = ((a - b).norm() / b.norm().clamp_min(1e-6)).item()
        assert err < 1e-2, f"result {k}: relative error {err:.3g}"


def test_gradcheck_module_float64():
    torch.manual_seed(0)
    m = lstm_fused.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, device=CUDA,
                        dtype=torch.float64)
    x = torch.randn(4, 2, 3, device=CUDA, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, device=CUDA, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 4, device=CUDA, dtype=torch.float64, requires_grad=True)
    params = list(m.parameters())
    names = [n for n, _ in m.named_parameters()]

    def fn(x, h0, c0, *ps):
        out, (hy, cy) = torch.func.functional_call(m, dict(zip(names, ps)), (x, (h0, c0)))
        return out, hy, cy

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params))


@pytest.mark.parametrize("lengths", [None, [4, 3, 3, 1]])
def test_gradcheck_op_float64(lengths):
    gen = torch.Generator().manual_seed(0)
    H, I, P = 3, 2, 2
    D = 2
    B = 4 if lengths is None else len(lengths)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.5).to(CUDA) \
            .requires_grad_()

    params = []
    for _ in range(D):
        params += [rand(4 * H, I), rand(4 * H, P), rand(4 * H), rand(4 * H), rand(P, H)]
    if lengths is None:
        batch_sizes = None
        x = rand(4, B, I)
    else:
        batch_sizes = torch.tensor([sum(1 for n in lengths if n > t) for t in range(max(lengths))])
        x = rand(int(batch_sizes.sum()), I)
    hx, cx = rand(D, B, P), rand(D, B, H)

    def fn(x, hx, cx, *ps):
        return functional.BACKENDS["fused"](x, hx, cx, list(ps), batch_sizes, None,
                                            LayerOptions(True, True, True))

    assert torch.autograd.gradcheck(fn, (x, hx, cx, *params))


# --- clipping and telemetry: the single-block reduction kernels ----------------------------

def _layer(device, dtype, T=7, B=5, I=6, H=32, **shape):
    return random_layer(dtype, device, T=T, B=B, I=I, H=H, **shape)


def _layer_grads(layer, clip, mode, probe=True, seed=1):
    probe_t = None
    if probe:
        probe_t = torch.zeros(layer["D"], len(layer["steps"]), 3, dtype=layer["input"].dtype,
                              device=layer["input"].device, requires_grad=True)
    outs = functional.BACKENDS["fused"](
        layer["input"], layer["hx"], layer["cx"], layer["params"], layer["batch_sizes"], probe_t,
        LayerOptions(has_proj=layer["proj"], bidirectional=layer["bidirectional"],
                     bptt_clip=clip, bptt_clip_mode=mode))
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    inputs = [layer["input"], layer["hx"], layer["cx"], *layer["params"]]
    if probe:
        inputs.append(probe_t)
    return list(outs) + list(torch.autograd.grad(loss, inputs))


CLIP_CFGS = {
    "vec": dict(),
    "odd": dict(H=17, I=5),
    "big": dict(B=40, H=64),  # 640 float4 / 1280 double2 vectors per step > 512 threads
    "bi-proj-packed": dict(bidirectional=True, proj=6, lengths=[7, 5, 5, 2, 1]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("clip,mode", [(0.0, 0), (0.05, 1), (0.3, 2), (1e6, 2)],
                         ids=["off", "value", "norm", "norm-loose"])
@pytest.mark.parametrize("cfg", list(CLIP_CFGS))
def test_clipping_and_flow_match_cpu(cfg, clip, mode, dtype):
    kw = CLIP_CFGS[cfg]
    got = _layer_grads(_layer(CUDA, dtype, **kw), clip, mode)
    want = _layer_grads(_layer("cpu", dtype, **kw), clip, mode)
    tol = TOL_CPU[dtype] if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.cpu(), b, **tol, msg=lambda m, k=k: f"result {k}: {m}")
    flow = got[-1]
    assert flow.shape == (want[-1].shape)
    assert torch.isfinite(flow).all()


@pytest.mark.parametrize("clip,mode", [(0.0, 0), (0.05, 1), (0.3, 2)])
def test_telemetry_does_not_change_gradients(clip, mode):
    """The reduction kernel (telemetry on) and the fast kernel (off) give the same values."""
    layer = _layer(CUDA, torch.float64, B=40, H=64)
    with_flow = _layer_grads(layer, clip, mode, probe=True)[:-1]
    without = _layer_grads(layer, clip, mode, probe=False)
    for a, b in zip(with_flow, without):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_norm_clip_bounds_the_step_norm():
    """With a tiny clip every step's ||dh|| and ||dc|| (after clipping) is at most clip."""
    layer = _layer(CUDA, torch.float64, B=40, H=64)
    clip = 1e-3
    flow = _layer_grads(layer, clip, 2)[-1]
    assert (flow[..., :2] <= clip * (1 + 1e-9)).all()
    assert (flow[..., :2] > 0).all()


# --- streams, devices, graphs, determinism ------------------------------------------------

def _fwd_bwd(m, x, h0, c0, gouts):
    out, (hy, cy) = m(x, (h0, c0))
    params = list(m.parameters())
    grads = torch.autograd.grad([out, hy, cy], [x, h0, c0, *params], gouts)
    return [out.detach(), hy.detach(), cy.detach(), *grads]


def _problem(device, dtype=torch.float32, T=16, B=8, I=24, H=48, layers=2, bidirectional=True,
             seed=0):
    torch.manual_seed(seed)  # initialised on the CPU, so every device gets the same weights
    m = lstm_fused.LSTM(I, H, layers, bidirectional=bidirectional, dtype=dtype).to(device)
    D = 2 if bidirectional else 1
    gen = torch.Generator().manual_seed(seed + 1)

    def rand(*shape, grad=True):
        t = torch.randn(*shape, generator=gen, dtype=dtype).to(device)
        return t.requires_grad_(grad)

    x, h0, c0 = rand(T, B, I), rand(layers * D, B, H), rand(layers * D, B, H)
    gouts = [rand(T, B, D * H, grad=False), rand(layers * D, B, H, grad=False),
             rand(layers * D, B, H, grad=False)]
    return m, x, h0, c0, gouts


# Between streams / graph replay and eager, our kernels are the same code on the same data;
# cuBLAS keeps a workspace per stream, so allow for (unlikely) last-bit GEMM differences.
TOL_SAME = dict(rtol=1e-6, atol=1e-6)


def test_non_default_stream(persistent):
    m, x, h0, c0, gouts = _problem(CUDA)
    want = _fwd_bwd(m, x, h0, c0, gouts)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _fwd_bwd(m, x, h0, c0, gouts)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL_SAME)


@pytest.mark.multi_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    """cuda:1 while the current device is cuda:0: the driver's device guard and streams."""
    m1, x1, h1, c1, g1 = _problem("cuda:1")
    m0, x0, h0, c0, g0 = _problem("cpu")
    assert torch.cuda.current_device() == 0
    got = _fwd_bwd(m1, x1, h1, c1, g1)
    want = _fwd_bwd(m0, x0, h0, c0, g0)
    for a, b in zip(got, want):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a.cpu(), b, **TOL_CPU[torch.float32])


@pytest.mark.parametrize("packed", [False, True], ids=["seq", "packed"])
def test_cuda_graph_capture_fwd_bwd(packed, persistent):
    """Capture forward+backward in one CUDA graph; replays on new inputs match eager."""
    m, x, h0, c0, gouts = _problem(CUDA, T=10, B=6, I=16, H=32)
    lengths = torch.tensor([10, 9, 7, 7, 3, 1])

    def step():
        inp = x
        if packed:
            inp = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=True)
        out, (hy, cy) = m(inp, (h0, c0))
        data = out.data if packed else out
        loss = (data * gouts[0].reshape(-1)[:data.numel()].view_as(data)).sum() \
            + (hy * gouts[1]).sum() + (cy * gouts[2]).sum()
        loss.backward()
        return data, hy, cy

    def grads():
        return [t.grad for t in (x, h0, c0, *m.parameters())]

    def zero():
        for t in (x, h0, c0, *m.parameters()):
            t.grad = None

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (cuBLAS handles, workspaces)
        for _ in range(3):
            zero()
            step()
    torch.cuda.current_stream().wait_stream(side)
    zero()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outs = step()
    static_grads = grads()

    for trial in range(2):
        gen = torch.Generator().manual_seed(100 + trial)
        with torch.no_grad():
            for t in (x, h0, c0):
                t.copy_(torch.randn(t.shape, generator=gen).to(t))
        graph.replay()
        torch.cuda.synchronize()
        got = [t.clone() for t in static_outs] + [g.clone() for g in static_grads]
        zero()
        want_outs = [t.detach() for t in step()]
        want = want_outs + grads()
        for k, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, **TOL_SAME, msg=lambda s, k=k: f"{k}: {s}")


def test_determinism_bitwise(persistent):
    m, x, h0, c0, gouts = _problem(CUDA, T=30, B=64, I=64, H=128)
    first = _fwd_bwd(m, x, h0, c0, gouts)
    second = _fwd_bwd(m, x, h0, c0, gouts)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    layer = _layer(CUDA, torch.float32, B=40, H=64, bidirectional=True)
    for clip, mode in ((0.3, 2), (0.05, 1)):
        r1 = _layer_grads(layer, clip, mode)
        r2 = _layer_grads(layer, clip, mode)
        for a, b in zip(r1, r2):
            assert torch.equal(a, b)


# --- persistent kernels: real sizes, declines ----------------------------------------------

PERSISTENT_SHAPES = {
    "headline": dict(T=64, B=16, I=64, H=768),        # the benchmark's T=1024 row, shorter
    "row-and-k-chunks": dict(T=6, B=40, I=32, H=1024),  # 3 row chunks, K in chunks (bwd)
    "near-smem-limit": dict(T=5, B=3, I=16, H=1280),  # fits an H100 (227 KB), not an A100
    "big-batch": dict(T=4, B=600, I=8, H=64),         # more rows than threads; the
                                                      # backward declines (speed policy)
    "bi-odd": dict(T=7, B=5, I=8, H=45, bidirectional=True),  # scalar staging, 2 directions
}


def _fwd_bwd_switch(on, *args):
    old = OPS.set_cuda_persistent(on)
    try:
        with _Launches() as launched:
            result = _fwd_bwd(*args)
    finally:
        OPS.set_cuda_persistent(old)
    return result, launched


@pytest.mark.parametrize("name", list(PERSISTENT_SHAPES))
def test_persistent_matches_steps(name):
    """Persistent kernels vs the per-step path on sizes that fill the GPU (float32)."""
    cfg = dict(layers=1, bidirectional=False)
    cfg.update(PERSISTENT_SHAPES[name])
    m, x, h0, c0, gouts = _problem(CUDA, **cfg)
    want, _ = _fwd_bwd_switch(False, m, x, h0, c0, gouts)
    got, launched = _fwd_bwd_switch(True, m, x, h0, c0, gouts)
    D = 2 if cfg["bidirectional"] else 1
    expected = tuple(D if fits else 0 for fits in _persistent_launches(cfg["H"], cfg["B"]))
    assert (launched.forward, launched.backward) == expected
    assert launched.declined == tuple(D - n for n in expected)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL_CUDNN[torch.float32],
                                   msg=lambda s, k=k: f"result {k}: {s}")


def test_persistent_declines_too_large_for_shared_memory():
    """H = 2048: W_hh (16 MB per direction) does not fit on chip, so the kernels decline and
    the per-step path runs: no launch, the same bits as with the switch off."""
    assert not _persistent_fits(2048, 2)
    m, x, h0, c0, gouts = _problem(CUDA, T=3, B=2, I=8, H=2048, layers=1, bidirectional=False)
    want, _ = _fwd_bwd_switch(False, m, x, h0, c0, gouts)
    got, launched = _fwd_bwd_switch(True, m, x, h0, c0, gouts)
    assert (launched.forward, launched.backward) == (0, 0)
    assert launched.declined == (1, 1)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_persistent_backward_declines_large_batches():
    """The speed policy (persistent_plan.h, kBackwardMaxBatch): from B = 128 on, the backward
    runs the per-step path while the forward still launches."""
    assert _persistent_launches(256, 127) == (True, True)
    assert _persistent_launches(256, 128) == (True, False)
    m, x, h0, c0, gouts = _problem(CUDA, T=3, B=128, I=8, H=256, layers=1, bidirectional=False)
    want, _ = _fwd_bwd_switch(False, m, x, h0, c0, gouts)
    got, launched = _fwd_bwd_switch(True, m, x, h0, c0, gouts)
    assert (launched.forward, launched.backward, launched.declined) == (1, 0, (0, 1))
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL_CUDNN[torch.float32],
                                   msg=lambda s, k=k: f"result {k}: {s}")


def test_persistent_declines_what_it_does_not_cover():
    """float64, projection: never; clipping / telemetry: the forward only."""
    old = OPS.set_cuda_persistent(True)
    try:
        for dtype, proj in ((torch.float64, 0), (torch.float32, 3)):
            m = lstm_fused.LSTM(6, 8, proj_size=proj, device=CUDA, dtype=dtype)
            x = torch.randn(4, 2, 6, device=CUDA, dtype=dtype, requires_grad=True)
            with _Launches() as launched:
                m(x)[0].sum().backward()
            assert (launched.forward, launched.backward) == (0, 0), (dtype, proj)
        layer = _layer(CUDA, torch.float32, B=4, H=16)
        for clip, mode, probe in ((0.05, 1, False), (0.0, 0, True)):
            with _Launches() as launched:
                _layer_grads(layer, clip, mode, probe=probe)
            assert (launched.forward, launched.backward) == (1, 0), (clip, mode, probe)
    finally:
        OPS.set_cuda_persistent(old)


# --- errors --------------------------------------------------------------------------------

def _raises_like(ref_call, ours_call):
    with pytest.raises(Exception) as e_ref:
        ref_call()
    with pytest.raises(Exception) as e_ours:
        ours_call()
    assert type(e_ours.value) is type(e_ref.value)
    assert str(e_ours.value).splitlines()[0] == str(e_ref.value).splitlines()[0]
    return e_ours.value


def test_device_mismatch_errors_like_nn_lstm():
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, 1, device=CUDA)
    ours = lstm_fused.LSTM(3, 5, 1, device=CUDA)
    ref_cpu = nn.LSTM(3, 5, 1)
    ours_cpu = lstm_fused.LSTM(3, 5, 1)
    x_cuda = torch.randn(4, 2, 3, device=CUDA)
    x_cpu = x_cuda.cpu()
    h_cpu, c_cpu = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    # CUDA input, CPU hidden state
    _raises_like(lambda: ref(x_cuda, (h_cpu, c_cpu.to(CUDA))),
                 lambda: ours(x_cuda, (h_cpu, c_cpu.to(CUDA))))
    _raises_like(lambda: ref(x_cuda, (h_cpu.to(CUDA), c_cpu)),
                 lambda: ours(x_cuda, (h_cpu.to(CUDA), c_cpu)))
    # CPU input, CUDA parameters; and the reverse
    e = _raises_like(lambda: ref(x_cpu), lambda: ours(x_cpu))
    assert "Input and parameter tensors are not at the same device" in str(e)
    _raises_like(lambda: ref_cpu(x_cuda), lambda: ours_cpu(x_cuda))


def test_batch_size_zero():
    """No active rows: no kernel is launched, gradients are zeros of the right shapes."""
    torch.manual_seed(0)
    m = lstm_fused.LSTM(4, 8, 2, bidirectional=True).to(CUDA)
    m_cpu = copy.deepcopy(m).cpu()
    x = torch.randn(5, 0, 4, device=CUDA, requires_grad=True)
    out, (hy, cy) = m(x)
    out_cpu, (hy_cpu, cy_cpu) = m_cpu(x.detach().cpu())
    assert out.shape == out_cpu.shape and hy.shape == hy_cpu.shape and cy.shape == cy_cpu.shape
    (out.sum() + hy.sum() + cy.sum()).backward()
    assert x.grad.shape == x.shape
    for p in m.parameters():
        assert p.grad is not None and not p.grad.any()


# --- cell variants: layer norm, recurrent dropout, zoneout, residual ----------------------
# The CUDA variant kernels (one block per row) against the CPU kernels on the same masks
# (drawn on the CPU, moved to the GPU), and against the reference backend on the GPU under
# one seed. Hidden sizes: 32, 17 (odd), 300 (more units than a block has threads).

VARIANTS = {
    "layer_norm": dict(layer_norm=True),
    "recurrent_dropout": dict(recurrent_dropout=0.3),
    "zoneout": dict(zoneout=(0.2, 0.3)),
    "residual": dict(residual=True),
    "all": dict(layer_norm=True, recurrent_dropout=0.25, zoneout=(0.15, 0.25), residual=True),
}
VARIANT_ARCHS = {
    "L2": dict(num_layers=2),
    "L2-odd-bi": dict(num_layers=2, hidden_size=17, bidirectional=True),
    "L2-proj": dict(num_layers=2, proj_size=5),
    "L2-wide": dict(num_layers=2, hidden_size=300, input_size=7),
}


def _variant_module(variant, arch, dtype, batch_first=False, seed=0):
    torch.manual_seed(seed)
    cfg = dict(input_size=12, hidden_size=32, batch_first=batch_first)
    cfg.update(VARIANT_ARCHS[arch])
    m = lstm_fused.LSTM(**cfg, dtype=dtype, **VARIANTS[variant])
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("layer_norm_"):  # away from the init (1, 0)
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return m


def _variant_masks(m, input, batch_sizes, device, seed=3):
    """functional.draw_masks' masks, drawn on the CPU (the same for both devices)."""
    batch = int(batch_sizes[0]) if batch_sizes is not None else input.shape[1]
    rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
    torch.manual_seed(seed)
    dropout_masks, zoneout_masks = functional.draw_masks(
        input.cpu(), batch, rows, m.hidden_size, m.proj_size, m.num_layers, m.bidirectional,
        m.recurrent_dropout, m.zoneout)
    move = (lambda t: None if t is None else t.to(device))
    return move(dropout_masks), (None if zoneout_masks is None
                                 else [tuple(move(t) for t in pair) for pair in zoneout_masks])


def _variant_grads(m, device, dtype, kind, training, clip=0.0, mode=0, probe=True):
    """functional.lstm with the module's weights and explicit masks: outputs, then the
    gradients of input, h0, c0, every weight and (probe) the telemetry of every layer."""
    m = copy.deepcopy(m).to(device)
    kw = dict(lengths=[3, 7, 1, 7, 5]) if kind == "packed" else dict(T=6, B=5)
    inp, hx, leaves = make_input(m, "packed_unsorted" if kind == "packed" else "seq",
                                 dtype=dtype, device=device, **kw)
    data, batch_sizes = (inp.data, inp.batch_sizes) if kind == "packed" else (inp, None)
    h0, c0 = hx
    if kind == "packed":
        h0, c0 = h0[:, inp.sorted_indices], c0[:, inp.sorted_indices]
    D = 2 if m.bidirectional else 1
    steps = len(batch_sizes) if batch_sizes is not None else data.shape[0]
    probes = ([torch.zeros(D, steps, 3, dtype=dtype, device=device, requires_grad=True)
               for _ in range(m.num_layers)] if probe else None)
    dropout_masks, zoneout_masks = _variant_masks(m, data, batch_sizes, device)
    out, hy, cy = functional.lstm(
        data, h0, c0, m._flat_weights, m.bias, m.proj_size, m.num_layers, 0.0, training,
        m.bidirectional, batch_sizes, flow_probes=probes, bptt_clip=clip, bptt_clip_mode=mode,
        layer_norm=m.layer_norm, recurrent_dropout=m.recurrent_dropout, zoneout=m.zoneout,
        residual=m.residual, recurrent_dropout_masks=dropout_masks,
        zoneout_masks=zoneout_masks)
    gen = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)).sum()
               for t in (out, hy, cy))
    inputs = list(leaves) + list(m._flat_weights) + (probes or [])
    return [out, hy, cy] + list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["seq", "packed"])
@pytest.mark.parametrize("arch", list(VARIANT_ARCHS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_match_cpu(variant, arch, kind, training, dtype):
    """Outputs, every gradient and the telemetry of the CUDA kernels equal the CPU kernels'
    on the same masks."""
    m = _variant_module(variant, arch, dtype)
    got = _variant_grads(m, CUDA, dtype, kind, training)
    want = _variant_grads(m, "cpu", dtype, kind, training)
    tol = TOL_CPU[dtype] if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.cpu(), b, **tol, msg=lambda msg, k=k: f"result {k}: {msg}")


@pytest.mark.parametrize("clip,mode", [(0.05, 1), (0.3, 2), (1e6, 2)],
                         ids=["value", "norm", "norm-loose"])
@pytest.mark.parametrize("arch", ["L2", "L2-odd-bi", "L2-wide"])
@pytest.mark.parametrize("variant", ["layer_norm", "zoneout", "all"])
def test_variants_clipping_and_flow_match_cpu(variant, arch, clip, mode):
    """bptt_clip (the variant kernels' two-pass norm clipping, reduction partials) and the
    telemetry with the variants, CUDA against CPU, float64."""
    m = _variant_module(variant, arch, torch.float64)
    got = _variant_grads(m, CUDA, torch.float64, "packed", True, clip, mode)
    want = _variant_grads(m, "cpu", torch.float64, "packed", True, clip, mode)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.cpu(), b, **TOL_CPU[torch.float64],
                                   msg=lambda msg, k=k: f"result {k}: {msg}")
    assert got[-1].abs().sum() > 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_match_reference_on_gpu(variant):
    """The module on the GPU, fused against backend="reference" under one seed (the same
    masks from the CUDA generator), training, batch_first."""
    m = _variant_module(variant, "L2-odd-bi", torch.float64, batch_first=True).to(CUDA)
    oracle = copy.deepcopy(m)
    oracle.backend = "reference"
    results = []
    for module in (m, oracle):
        inp, h, leaves = make_input(module, "seq", T=6, B=5, device=CUDA)
        torch.manual_seed(4)
        results.append(run_and_grad(module, inp, h, leaves))
    for a, b in zip(results[0][1] + list(results[0][2]), results[1][1] + list(results[1][2])):
        torch.testing.assert_close(a, b, **TOL_CPU[torch.float64])


@pytest.mark.parametrize("variant", ["layer_norm", "all"])
def test_variants_compile_fullgraph(variant):
    """torch.compile(fullgraph=True) (inductor) with the variants on the GPU gives what
    eager gives, the masks drawn inside the graph from the same seed."""
    torch._dynamo.reset()
    m = _variant_module(variant, "L2", torch.float32).to(CUDA)
    compiled = torch.compile(copy.deepcopy(m), fullgraph=True)
    results = []
    for module in (m, compiled):
        inp, h, leaves = make_input(m, "seq", T=5, B=4, dtype=torch.float32, device=CUDA)
        torch.manual_seed(6)
        results.append(run_and_grad(module, inp, h, leaves))
    for a, b in zip(results[0][1] + list(results[0][2]), results[1][1] + list(results[1][2])):
        torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_variants_16bit_match_cpu(dtype):
    m = _variant_module("all", "L2-proj", torch.float32).to(dtype)
    got = _variant_grads(m, CUDA, dtype, "seq", True, probe=False)
    want = _variant_grads(m, "cpu", dtype, "seq", True, probe=False)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.cpu().float(), b.float(), rtol=2e-2, atol=2e-2,
                                   msg=lambda msg, k=k: f"result {k}: {msg}")
