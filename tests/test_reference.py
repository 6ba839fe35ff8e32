"""The pure-PyTorch reference layer against nn.LSTM, and its clipping / flow semantics
against an independent hook-based implementation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_sequence

from lstm_fused.options import LayerOptions
from lstm_fused.reference import lstm_layer

ALL = LayerOptions(has_biases=True, has_proj=True, bidirectional=True)

F64 = dict(dtype=torch.float64)


def _layer_pair(bidirectional, proj_size, bias, I=3, H=5, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = nn.LSTM(I, H, 1, bias=bias, bidirectional=bidirectional, proj_size=proj_size,
                dtype=dtype)
    return m, [p.detach().clone().requires_grad_() for p in m._flat_weights]


def _hx(m, B, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    D = 2 if m.bidirectional else 1
    P = m.proj_size or m.hidden_size
    h0 = torch.randn(D, B, P, generator=g, **F64).to(dtype).requires_grad_()
    c0 = torch.randn(D, B, m.hidden_size, generator=g, **F64).to(dtype).requires_grad_()
    return h0, c0


def _grads(outs, wrt, seed=4):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, **F64).to(o.dtype)).sum() for o in outs)
    return torch.autograd.grad(loss, wrt)


CASES = list(itertools.product([False, True], [0, 2], [True, False]))


@pytest.mark.parametrize("bidirectional,proj_size,bias", CASES)
@pytest.mark.parametrize("packed", [None, "varied", "equal"])
def test_layer_matches_nn_lstm_float64(bidirectional, proj_size, bias, packed):
    m, params = _layer_pair(bidirectional, proj_size, bias)
    g = torch.Generator().manual_seed(7)
    if packed is None:
        x = torch.randn(6, 4, 3, generator=g, **F64).requires_grad_()
        inp, data, batch_sizes = x, x, None
    else:
        lengths = [6, 4, 4, 1] if packed == "varied" else [5, 5, 5, 5]
        seqs = [torch.randn(L, 3, generator=g, **F64) for L in lengths]
        inp = pack_sequence(seqs)
        x = inp.data.detach().clone().requires_grad_()
        data, batch_sizes = x, inp.batch_sizes
        inp = inp._replace(data=x)
    h0, c0 = _hx(m, 4)
    o_ref, (h_ref, c_ref) = m(inp, (h0, c0))
    o_ref = o_ref.data if packed else o_ref
    o, h, c = lstm_layer(data, h0, c0, params, batch_sizes,
                         options=LayerOptions(bias, proj_size > 0, bidirectional))
    for a, b in ((o, o_ref), (h, h_ref), (c, c_ref)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    gr = _grads((o_ref, h_ref, c_ref), [x, h0, c0, *m._flat_weights])
    go = _grads((o, h, c), [x, h0, c0, *params])
    for a, b in zip(go, gr):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_computes_in_float32(dtype):
    m, _ = _layer_pair(True, 2, True, dtype=dtype)
    params = list(m._flat_weights)
    x = torch.randn(5, 3, 3).to(dtype)
    h0, c0 = _hx(m, 3, dtype=dtype)
    o, h, c = lstm_layer(x, h0, c0, params, options=ALL)
    assert o.dtype == h.dtype == c.dtype == dtype
    o32, h32, c32 = lstm_layer(x.float(), h0.float(), c0.float(), [p.float() for p in params],
                               options=ALL)
    # float32 math on the same values, rounded once at the end: bitwise equal
    assert torch.equal(o, o32.to(dtype))
    assert torch.equal(h, h32.to(dtype))
    assert torch.equal(c, c32.to(dtype))


def test_zero_batch_and_zero_steps():
    m, params = _layer_pair(True, 0, True)
    h0, c0 = _hx(m, 0)
    bidirectional = LayerOptions(bidirectional=True)
    o, h, c = lstm_layer(torch.zeros(4, 0, 3, **F64), h0, c0, params, options=bidirectional)
    assert o.shape == (4, 0, 10) and h.shape == (2, 0, 5) and c.shape == (2, 0, 5)
    h0, c0 = _hx(m, 2)
    o, h, c = lstm_layer(torch.zeros(0, 2, 3, **F64), h0, c0, params, options=bidirectional)
    assert o.shape == (0, 2, 10)
    assert torch.equal(h, h0) and torch.equal(c, c0)


def test_wrong_param_count():
    m, params = _layer_pair(False, 0, True)
    h0, c0 = _hx(m, 2)
    with pytest.raises(ValueError, match="expected 4 parameters"):
        lstm_layer(torch.zeros(3, 2, 3, **F64), h0, c0, params[:2])


# --- clipping and flow: an independent oracle built from tensor hooks -----------------------

def _hooked_layer(x_steps, h0, c0, w_ih, w_hh, b, w_hr, sizes, reverse, clip, mode, record):
    """One direction, step by step, clipping/recording through register_hook on h[t], c[t].
    x_steps[t]: (sizes[t], I). Returns (outs per step, hy, cy)."""
    H = w_hh.shape[0] // 4
    T = len(sizes)

    def clipper(kind, t):
        def hook(grad):
            if mode == 1 and clip > 0:
                grad = grad.clamp(-clip, clip)
            elif mode == 2 and clip > 0:
                n = grad.norm()
                if n > clip:
                    grad = grad * (clip / n)
            record[(kind, t)] = grad.norm().item()
            return grad
        return hook

    outs = [None] * T
    B = h0.shape[0]
    h = [h0[i] for i in range(B)]  # per row, so shrinking batches need no bookkeeping
    c = [c0[i] for i in range(B)]
    order = range(T - 1, -1, -1) if reverse else range(T)
    fmeans = {}
    for t in order:
        bs = sizes[t]
        hp = torch.stack(h[:bs])
        cp = torch.stack(c[:bs])
        gates = x_steps[t] @ w_ih.t() + hp @ w_hh.t() + (b if b is not None else 0)
        i, f, g, o = gates.split(H, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        cn = f * cp + i * g
        cn.register_hook(clipper("c", t))
        hn = o * cn.tanh()
        if w_hr is not None:
            hn = hn @ w_hr.t()
        hn.register_hook(clipper("h", t))
        fmeans[t] = f.detach().mean().item()
        outs[t] = hn
        for r in range(bs):
            h[r] = hn[r]
            c[r] = cn[r]
    return outs, torch.stack(h), torch.stack(c), fmeans


@pytest.mark.parametrize("mode,clip", [(0, 0.0), (1, 0.05), (2, 0.1), (2, 1e9), (1, 1e9)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("proj", [0, 2])
def test_clipping_and_flow_match_hook_oracle(mode, clip, packed, proj):
    torch.manual_seed(0)
    bidir = True
    m, params = _layer_pair(bidir, proj, True, I=3, H=4)
    sizes = [3, 3, 2, 1] if packed else [3, 3, 3, 3]
    T, B = len(sizes), sizes[0]
    N = sum(sizes)
    x = torch.randn(N, 3, **F64, requires_grad=True)
    h0, c0 = _hx(m, B)
    probe = torch.zeros(2, T, 3, **F64, requires_grad=True)
    bs_t = torch.tensor(sizes, dtype=torch.int64)
    o, h, c = lstm_layer(x, h0, c0, params, bs_t, probe,
                         LayerOptions(True, proj > 0, bidir, clip, mode))
    go = torch.randn(o.shape, **F64)
    gh = torch.randn(h.shape, **F64)
    gc = torch.randn(c.shape, **F64)
    loss = (o * go).sum() + (h * gh).sum() + (c * gc).sum()
    wrt = [x, h0, c0, *params, probe]
    grads = torch.autograd.grad(loss, wrt)

    # oracle
    offs = [sum(sizes[:t]) for t in range(T)]
    xs = [x[offs[t]:offs[t] + sizes[t]] for t in range(T)]
    n = len(params) // 2
    outs, hys, cys, flows = [], [], [], []
    for d in range(2):
        p = params[d * n:(d + 1) * n]
        w_ih, w_hh, b = p[0], p[1], p[2] + p[3]
        w_hr = p[4] if proj else None
        rec = {}
        od, hy, cy, fm = _hooked_layer(xs, h0[d], c0[d], w_ih, w_hh, b, w_hr, sizes, d == 1,
                                       clip, mode, rec)
        outs.append(torch.cat(od, 0))
        hys.append(hy)
        cys.append(cy)
        flows.append((rec, fm))
    o2 = torch.cat(outs, 1)
    h2, c2 = torch.stack(hys), torch.stack(cys)
    torch.testing.assert_close(o, o2, atol=1e-12, rtol=0)
    loss2 = (o2 * go).sum() + (h2 * gh).sum() + (c2 * gc).sum()
    grads2 = torch.autograd.grad(loss2, wrt[:-1])
    for a, b in zip(grads[:-1], grads2):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    flow = grads[-1]
    for d, (rec, fm) in enumerate(flows):
        for t in range(T):
            exp = torch.tensor([rec[("c", t)], rec[("h", t)], fm[t]], **F64)
            torch.testing.assert_close(flow[d, t], exp, atol=1e-12, rtol=1e-10)
    if mode == 2 and clip < 1:
        assert torch.all(flow[..., :2] <= clip * (1 + 1e-12))
        assert torch.any(flow[..., :2] >= clip * (1 - 1e-12))  # some step was rescaled
    if mode == 1 and clip < 1:
        # clipping really changed something (else the test would prove nothing)
        _, _, _, noclip = _grads_noclip(x, h0, c0, params, proj, bs_t, go, gh, gc)
        assert not torch.allclose(noclip, grads[0])


def _grads_noclip(x, h0, c0, params, proj, bs_t, go, gh, gc):
    o, h, c = lstm_layer(x, h0, c0, params, bs_t, options=LayerOptions(True, proj > 0, True))
    loss = (o * go).sum() + (h * gh).sum() + (c * gc).sum()
    gx, = torch.autograd.grad(loss, [x])
    return o, h, c, gx


def test_flow_without_clip_equals_retained_grads():
    """flow[d, t, 0:2] are the norms of dL/dc[t], dL/dh[t] as retain_grad shows them."""
    torch.manual_seed(1)
    m, params = _layer_pair(False, 0, True, I=2, H=3)
    x = torch.randn(4, 2, 2, **F64)
    h0, c0 = _hx(m, 2)
    probe = torch.zeros(1, 4, 3, **F64, requires_grad=True)
    o, h, c = lstm_layer(x, h0, c0, params, flow_probe=probe)
    (o.square().sum() + c.sum()).backward()
    # manual unroll with retain_grad
    w_ih, w_hh, b_ih, b_hh = params
    hs, cs, fs = [], [], []
    hp, cp = h0[0], c0[0]
    for t in range(4):
        i, f, g, oo = (x[t] @ w_ih.t() + hp @ w_hh.t() + b_ih + b_hh).chunk(4, 1)
        cp = f.sigmoid() * cp + i.sigmoid() * g.tanh()
        hp = oo.sigmoid() * cp.tanh()
        cp.retain_grad()
        hp.retain_grad()
        hs.append(hp)
        cs.append(cp)
        fs.append(f.sigmoid().mean().item())
    (torch.stack(hs).square().sum() + cp.sum()).backward()
    for t in range(4):
        exp = torch.tensor([cs[t].grad.norm(), hs[t].grad.norm(), fs[t]], **F64)
        torch.testing.assert_close(probe.grad[0, t], exp, atol=1e-12, rtol=1e-10)


def test_bad_clip_mode():
    m, params = _layer_pair(False, 0, True)
    h0, c0 = _hx(m, 2)
    with pytest.raises(ValueError, match="bptt_clip_mode"):
        lstm_layer(torch.zeros(3, 2, 3, **F64), h0, c0, params,
                   options=LayerOptions(bptt_clip=1.0, bptt_clip_mode=3))
