"""The 16-bit GEMM mode of the CPU ops (csrc/mixed_gemm.h, gemm_operands_16bit in ops.cpp).

A bfloat16 layer runs its GEMMs on 16-bit operands with fp32 accumulation: x, the
weights and h[t] (rounded to 16 bits before it multiplies W_hh, as nn.LSTM's 16-bit h is) go
in as they are, the gates and the cell state stay fp32, and dG[t] is rounded to 16 bits before
the products that read it. The oracle here is that computation written out per sequence in
float64, the rounding of h in the forward included (straight through for autograd): the
forward equals it up to the last bit of a few values, the gradients up to the rounding of dG.
"""

import pytest
import torch

import lstm_fused
from conftest import cpu_bf16_products
from lstm_fused import functional
from lstm_fused.options import LayerOptions

pytestmark = pytest.mark.skipif(
    functional.backend_unavailable_reason("fused") is not None,
    reason=str(functional.backend_unavailable_reason("fused")),
)

# float16 stays on fp32 GEMMs (the rule's comment says why)
DTYPES = [torch.bfloat16]


def _mode_available(dtype):
    x = torch.zeros(1, 1, 1, dtype=dtype)
    return torch.ops.lstm_fused.gemm_operands_16bit(x, LayerOptions().to_list())


@pytest.fixture
def mode_16bit():
    previous = lstm_fused.set_16bit_gemm(True)
    if not all(_mode_available(d) for d in DTYPES):
        lstm_fused.set_16bit_gemm(previous)
        pytest.skip("no MKL bf16 GEMM in this torch build, or no AVX512_BF16/AMX-BF16 on "
                    "this CPU: bfloat16 keeps fp32 GEMMs")
    yield
    lstm_fused.set_16bit_gemm(previous)


@pytest.fixture
def bf16_product(mode_16bit, cpu_bf16_product):
    """Each bfloat16 product kind in turn, in the 16-bit mode ("none" is MKL's GEMM step by
    step)."""
    return cpu_bf16_product


def _round(v, dtype):
    """v rounded to dtype, with the gradient of the identity."""
    return v + (v.to(dtype).double() - v).detach()


def oracle_direction(x, h0, c0, w_ih, w_hh, b, dtype):
    """One sequence, one direction, in float64: x (T, I), h0 (P,) as 16-bit values."""
    H = w_hh.shape[1]
    gx = x @ w_ih.T + (b if b is not None else 0)
    h, c, outs = h0, c0, []
    for t in range(x.shape[0]):
        g = gx[t] + h @ w_hh.T
        i, f = torch.sigmoid(g[:H]), torch.sigmoid(g[H:2 * H])
        gg, o = torch.tanh(g[2 * H:3 * H]), torch.sigmoid(g[3 * H:])
        c = f * c + i * gg
        h = _round(o * torch.tanh(c), dtype)
        outs.append(h)
    return torch.stack(outs), h, c


def oracle(layer, dtype):
    """(output, hy, cy) of the layer in the op's layout, float64."""
    x, hx, cx, params = layer["x"], layer["hx"], layer["cx"], layer["params"]
    lengths = layer["lengths"]
    D = hx.shape[0]
    per = len(params) // D
    offsets = [0]
    batch_sizes = [sum(1 for n in lengths if n > t) for t in range(max(lengths))]
    for size in batch_sizes:
        offsets.append(offsets[-1] + size)
    rows = {b: [offsets[t] + b for t in range(n)] for b, n in enumerate(lengths)}
    x2d = x.double().reshape(-1, x.shape[-1])
    out = [[None] * D for _ in range(offsets[-1])]
    hy, cy = [[None] * len(lengths) for _ in range(D)], [[None] * len(lengths) for _ in range(D)]
    for d in range(D):
        w = [p.double() for p in params[d * per:(d + 1) * per]]
        bias = w[2] + w[3] if per == 4 else None
        for b, n in enumerate(lengths):
            idx = rows[b][::-1] if d == 1 else rows[b]
            ys, h, c = oracle_direction(x2d[idx], hx[d, b].double(), cx[d, b].double(), w[0],
                                        w[1], bias, dtype)
            for r, y in zip(idx, ys):
                out[r][d] = y
            hy[d][b], cy[d][b] = h, c
    output = torch.stack([torch.cat(parts) for parts in out])
    if layer["batch_sizes"] is None:
        output = output.reshape(x.shape[0], x.shape[1], -1)
    return output, torch.stack([torch.stack(h) for h in hy]), torch.stack([torch.stack(c) for c in cy])


def make(dtype, T=7, B=4, I=12, H=20, bidirectional=False, bias=True, lengths=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    D = 2 if bidirectional else 1

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    params = []
    for _ in range(D):
        params += [rand(4 * H, I, scale=0.4), rand(4 * H, H, scale=0.4)]
        if bias:
            params += [rand(4 * H, scale=0.5), rand(4 * H, scale=0.5)]
    if lengths is None:
        lengths, batch_sizes, x = [T] * B, None, rand(T, B, I)
    else:
        B = len(lengths)
        batch_sizes = torch.tensor([sum(1 for n in lengths if n > t) for t in range(max(lengths))])
        x = rand(int(batch_sizes.sum()), I)
    layer = dict(x=x, hx=rand(D, B, H), cx=rand(D, B, H), params=params, lengths=lengths,
                 batch_sizes=batch_sizes)
    layer["options"] = LayerOptions(has_biases=bias, bidirectional=bidirectional)
    for key in ("x", "hx", "cx"):
        layer[key].requires_grad_()
    for p in params:
        p.requires_grad_()
    return layer


CASES = {
    "plain": dict(),
    "no-bias": dict(bias=False),
    "bidirectional": dict(bidirectional=True),
    "packed-bi": dict(bidirectional=True, lengths=[7, 5, 5, 2, 1]),
    "B1-long": dict(T=40, B=1),
    # the sequence kernels' tiles: 37 rows (2 + 1 blocks of 16), 4H = 160 columns, a depth
    # of 40 (padded to 64); two slices of 64 and 68 units, a backward depth of 528 (padded)
    "tails": dict(T=5, B=37, I=10, H=40),
    "two-slices": dict(T=4, B=16, I=6, H=132),
    "packed-tails": dict(bidirectional=True, I=9, H=36,
                         lengths=[6, 6, 5, 5, 5, 4, 3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1]),
    # a slice's [W_ih, W_hh] (2 MiB) over half an L2: the forward takes the input projection
    # as one GEMM instead of fusing it into the step's product
    "wide": dict(T=3, B=2, I=512, H=512),
}


def _assert_is_its_oracle(layer, dtype, counts=lambda: []):
    """The fused op on `layer` against the oracle, outputs and gradients; returns how much
    counts() (a list of counters) grew over the forward and over the backward."""
    inputs = [layer["x"], layer["hx"], layer["cx"], *layer["params"]]
    before = counts()
    ours = functional.BACKENDS["fused"](layer["x"], layer["hx"], layer["cx"], layer["params"],
                                        layer["batch_sizes"], None, layer["options"])
    forward_calls = [a - b for a, b in zip(counts(), before)]
    want = oracle(layer, dtype)
    eps = torch.finfo(dtype).eps
    for a, b in zip(ours, want):
        assert a.dtype == dtype
        # the same values but for the order of fp32 sums: one unit in the last place, rarely
        # (the products on fp32 copies of h, the mode off, differ in 15-30% of the values)
        torch.testing.assert_close(a.double(), b.to(dtype).double(), rtol=eps, atol=eps)
        assert (a != b.to(dtype)).double().mean() < 0.1
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in ours]
    before = counts()
    grads = torch.autograd.grad(ours, inputs, [w.to(dtype) for w in weights])
    backward_calls = [a - b for a, b in zip(counts(), before)]
    exact = torch.autograd.grad(want, inputs, [w.to(dtype).double() for w in weights])
    for k, (g, e) in enumerate(zip(grads, exact)):
        assert g.dtype == dtype
        err = ((g.double() - e).norm() / e.norm()).item()
        # dG rounded to 16 bits before its products: a few units of the 16-bit eps
        assert err < 4 * eps, (k, err)
    return forward_calls, backward_calls


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_16bit_mode_is_its_oracle(bf16_product, cpu_gemm_library, dtype, case):
    """Where MKL lacks the CPU's AVX-512 kernels ("onednn") the large GEMMs run on the
    sequence kernels' bf16 product (cpu::bf16_mm), else on MKL's bf16 GEMM."""
    _assert_is_its_oracle(make(dtype, **CASES[case]), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16"])
def test_the_rule(mode_16bit, dtype):
    """Plain bfloat16 CPU layers take the mode; float16/32/64, proj_size, the cell variants and
    the switch turned off do not."""
    rule = torch.ops.lstm_fused.gemm_operands_16bit
    x = torch.zeros(2, 1, 3, dtype=dtype)
    assert rule(x, LayerOptions(bidirectional=True, has_biases=False).to_list())
    assert not rule(x.half(), LayerOptions().to_list())
    assert not rule(x.float(), LayerOptions().to_list())
    assert not rule(x.double(), LayerOptions().to_list())
    assert not rule(x, LayerOptions(has_proj=True).to_list())
    assert not rule(x, LayerOptions(layer_norm=True).to_list())
    assert lstm_fused.set_16bit_gemm(False) is True
    assert not rule(x, LayerOptions().to_list())
    assert lstm_fused.set_16bit_gemm(True) is False


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16"])
def test_16bit_mode_close_to_fp32_mode(mode_16bit, dtype):
    """The module with the mode on and off: the same numbers within 16-bit precision (the
    difference is where h and dG are rounded), and nn.LSTM's in that dtype."""
    torch.manual_seed(0)
    m = lstm_fused.LSTM(12, 24, num_layers=2, bidirectional=True, dtype=dtype)
    x = torch.randn(9, 3, 12).to(dtype)
    results = []
    for on in (True, False):
        lstm_fused.set_16bit_gemm(on)
        m.zero_grad()
        xi = x.clone().requires_grad_()
        out, (h, c) = m(xi)
        (out.float().square().sum() + c.float().sum()).backward()
        results.append([out, h, c, xi.grad] + [p.grad for p in m.parameters()])
    lstm_fused.set_16bit_gemm(True)
    tol = 4 * torch.finfo(dtype).eps
    for a, b in zip(*results):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < tol, err
    ref_out, _ = m.to_torch()(x)
    torch.testing.assert_close(results[0][0].float(), ref_out.float(), atol=2e-2, rtol=2e-2)


def test_16bit_mode_takes_any_strides(mode_16bit):
    """Permuted (dense, non-contiguous) state and input: the same numbers as contiguous ones."""
    layer = make(torch.bfloat16, bidirectional=True)
    fused = functional.BACKENDS["fused"]

    def permuted(t):  # same values, strides of a transposed layout (each hx[d] too)
        return t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)

    want = fused(layer["x"], layer["hx"], layer["cx"], layer["params"], None, None,
                 layer["options"])
    got = fused(permuted(layer["x"]), permuted(layer["hx"]), permuted(layer["cx"]),
                [p.detach().t().contiguous().t() if p.dim() == 2 else p for p in layer["params"]],
                None, None, layer["options"])
    assert not permuted(layer["hx"]).is_contiguous()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_products_record_the_same_flow(mode_16bit):
    """Gradient-flow telemetry of a bfloat16 layer: each product kind's sequence backward
    records the sums the per-step path records (up to the order of fp32 sums)."""
    torch.manual_seed(0)
    m = lstm_fused.LSTM(10, 48, bidirectional=True, dtype=torch.bfloat16)
    x = torch.randn(12, 20, 10).to(torch.bfloat16)
    norms = {}
    for kind in cpu_bf16_products():
        previous = lstm_fused.set_cpu_bf16_product(kind)
        try:
            with lstm_fused.record_gradient_flow(m) as flow:
                out, _ = m(x)
                out.float().square().sum().backward()
        finally:
            lstm_fused.set_cpu_bf16_product(previous)
        norms[kind] = (flow[""].dc_norm.double(), flow[""].dh_norm.double())
    for kind, (dc, dh) in norms.items():
        torch.testing.assert_close(dc, norms["none"][0], rtol=2e-2, atol=0)
        torch.testing.assert_close(dh, norms["none"][1], rtol=2e-2, atol=0)


def test_set_cpu_bf16_product():
    previous = lstm_fused.set_cpu_bf16_product("none")
    try:
        assert torch.ops.lstm_fused.cpu_bf16_product() == "none"
        assert lstm_fused.set_cpu_bf16_product("auto") == "none"
        assert torch.ops.lstm_fused.cpu_bf16_product() in ("amx", "avx512", "none")
        with pytest.raises(RuntimeError, match="must be one of 'auto', 'amx', 'avx512', 'none'"):
            lstm_fused.set_cpu_bf16_product("tiles")
        for kind in ("amx", "avx512"):
            if kind not in cpu_bf16_products():
                with pytest.raises(RuntimeError, match="this CPU"):
                    lstm_fused.set_cpu_bf16_product(kind)
    finally:
        lstm_fused.set_cpu_bf16_product(previous)


@pytest.fixture
def device_replay():
    """The 16-bit mode as a device runs it (CUDA: cuBLAS on tensor cores), replayed on the CPU
    (lstm_fused::set_cpu_device_call_replay; tests/test_device_call_replay.py): every product
    through StepKernels::gemm_16bit in cuBLAS's column-major convention, a reference loop with
    cuBLAS's argument rules, and h[t], dG[t] rounded by the step kernels
    (ForwardStepArgs::hidden_16bit, BackwardStepArgs::dgates_16bit). It does not depend on the
    CPU's instructions, so bfloat16 and float16 run it on every machine."""
    ops = torch.ops.lstm_fused
    old_replay, old_mode = ops.set_cpu_device_call_replay(True), lstm_fused.set_16bit_gemm(True)
    yield ops
    ops.set_cpu_device_call_replay(old_replay)
    lstm_fused.set_16bit_gemm(old_mode)


REPLAY_CASES = ["plain", "no-bias", "packed-bi", "tails"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", REPLAY_CASES)
def test_device_16bit_mode_replayed_is_its_oracle(device_replay, dtype, case):
    layer = make(dtype, **CASES[case])
    assert _mode_available(dtype)
    forward_calls, backward_calls = _assert_is_its_oracle(
        layer, dtype, counts=device_replay.cpu_device_call_replay_counts)
    # The driver's calls: no fp32 products or row copies; per direction, the forward's input
    # projection and one product per step; the backward's one product (dh) per step, then
    # dW_ih, dW_hh (two GEMMs on views with equal batch sizes), the bias as a product with
    # ones, dx. (The gate kernels write h[t] and dG[t] in 16 bits: no rounding passes.)
    D = 2 if layer["options"].bidirectional else 1
    steps = max(layer["lengths"])
    w_hh_gemms = 2 if layer["batch_sizes"] is None else 1
    bias = int(layer["options"].has_biases)
    assert forward_calls == [0, 0, D * (1 + steps)], forward_calls
    assert backward_calls == [0, 0, D * (steps + 1 + w_hh_gemms + bias + 1)], backward_calls


def test_device_16bit_rule(device_replay):
    """With a device's 16-bit GEMMs, float16 takes the mode too; the rest as on the CPU."""
    rule = torch.ops.lstm_fused.gemm_operands_16bit
    x = torch.zeros(2, 1, 3)
    for dtype in (torch.bfloat16, torch.float16):
        assert rule(x.to(dtype), LayerOptions(bidirectional=True).to_list())
        assert not rule(x.to(dtype), LayerOptions(has_proj=True).to_list())
        assert not rule(x.to(dtype), LayerOptions(zoneout_cell=0.1).to_list())
    assert not rule(x, LayerOptions().to_list())
    assert not rule(x.double(), LayerOptions().to_list())
    lstm_fused.set_16bit_gemm(False)
    assert not rule(x.half(), LayerOptions().to_list())
