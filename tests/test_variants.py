"""The cell variants of lstm_fused.LSTM: layer_norm, recurrent_dropout, zoneout, residual.

The reference backend against formulas written out here step by step (the issue's, with no
code shared with lstm_fused.reference); the module's parameters, state_dict keys, masks and
errors; off equals nn.LSTM; and every backend against the reference: the fused op equals it
in training under the same seed (so with the same masks) and in eval, with packed input,
bidirectional, batch_first, projection, clipping and gradient-flow telemetry; gradcheck and
gradgradcheck in float64; torch.compile(fullgraph=True).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn

import lstm_fused
from lstm_fused import functional
from conftest import (BACKEND_PARAMS, TOL, compare_modules, make_input, make_pair,
                      run_and_grad)

F64 = torch.float64
EPS = 1e-5


# --- the formulas, written out ------------------------------------------------------------

def _ln(v, gain, bias=None):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)  # biased
    out = (v - mean) / torch.sqrt(var + EPS) * gain
    return out if bias is None else out + bias


def formula_layer(x, h, c, w, layer_norm=False, dropout_mask=None, zone_c=None, zone_h=None):
    """One unidirectional layer over x (T, B, I), written as the issue states it.

    w: dict of weight_ih, weight_hh, bias_ih, bias_hh, [weight_hr], [layer_norm_*].
    dropout_mask (B, P); zone_c (T, B, H) / zone_h (T, B, P): masks, or floats (eval).
    """
    H = w["weight_hh"].shape[0] // 4
    ys = []
    for t in range(x.shape[0]):
        h_in = h * dropout_mask if dropout_mask is not None else h
        a = x[t] @ w["weight_ih"].T
        r = h_in @ w["weight_hh"].T
        if layer_norm:
            g = (_ln(a, w["layer_norm_ih"]) + _ln(r, w["layer_norm_hh"]) + w["bias_ih"]
                 + w["bias_hh"])
        else:
            g = a + r + w["bias_ih"] + w["bias_hh"]
        i, f = torch.sigmoid(g[:, :H]), torch.sigmoid(g[:, H:2 * H])
        gg, o = torch.tanh(g[:, 2 * H:3 * H]), torch.sigmoid(g[:, 3 * H:])
        c_new = f * c + i * gg
        cell_out = (_ln(c_new, w["layer_norm_cell_weight"], w["layer_norm_cell_bias"])
                    if layer_norm else c_new)
        h_new = o * torch.tanh(cell_out)
        if "weight_hr" in w:
            h_new = h_new @ w["weight_hr"].T
        if zone_c is not None:
            d = zone_c[t] if torch.is_tensor(zone_c) else zone_c
            c_new = d * c + (1 - d) * c_new
        if zone_h is not None:
            d = zone_h[t] if torch.is_tensor(zone_h) else zone_h
            h_new = d * h + (1 - d) * h_new
        h, c = h_new, c_new
        ys.append(h)
    return torch.stack(ys), h, c


def _weights(m, layer=0):
    return {name[:-len(f"_l{layer}")]: p for name, p in m.named_parameters()
            if name.endswith(f"_l{layer}")}


def _randomise_layer_norm(m, seed=5):
    """Gains and biases away from their init (1, 0), so that the tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("layer_norm_"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype))


def _module(backend="reference", I=3, H=5, seed=0, **kw):
    torch.manual_seed(seed)
    m = lstm_fused.LSTM(I, H, dtype=F64, backend=backend, **kw)
    if m.layer_norm:
        _randomise_layer_norm(m)
    return m


def _inputs(m, T=6, B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    D = 2 if m.bidirectional else 1
    P = m.proj_size or m.hidden_size
    L = m.num_layers * D
    x = torch.randn(T, B, m.input_size, generator=g, dtype=F64)
    return x, (torch.randn(L, B, P, generator=g, dtype=F64),
               torch.randn(L, B, m.hidden_size, generator=g, dtype=F64))


@pytest.mark.parametrize("proj_size", [0, 2])
def test_reference_layer_norm_is_the_formula(proj_size):
    m = _module(layer_norm=True, proj_size=proj_size)
    x, (h0, c0) = _inputs(m)
    y, (hy, cy) = m(x, (h0, c0))
    want = formula_layer(x, h0[0], c0[0], _weights(m), layer_norm=True)
    for a, b in zip((y, hy[0], cy[0]), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_reference_recurrent_dropout_is_the_formula():
    p = 0.4
    m = _module(recurrent_dropout=p, proj_size=2)
    x, (h0, c0) = _inputs(m)
    torch.manual_seed(11)
    y, (hy, cy) = m(x, (h0, c0))
    torch.manual_seed(11)
    mask = torch.empty(1, 4, 2, dtype=F64).bernoulli_(1 - p) / (1 - p)  # the documented draw
    assert (mask == 0).any() and (mask != 0).any()
    want = formula_layer(x, h0[0], c0[0], _weights(m), dropout_mask=mask[0])
    for a, b in zip((y, hy[0], cy[0]), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    m.eval()  # off in eval mode
    y_eval, _ = m(x, (h0, c0))
    torch.testing.assert_close(y_eval, formula_layer(x, h0[0], c0[0], _weights(m))[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("zoneout", [0.3, (0.2, 0.0), (0.0, 0.5)])
def test_reference_zoneout_is_the_formula(zoneout):
    z_c, z_h = zoneout if isinstance(zoneout, tuple) else (zoneout, zoneout)
    m = _module(zoneout=zoneout)
    x, (h0, c0) = _inputs(m)
    torch.manual_seed(12)
    y, (hy, cy) = m(x, (h0, c0))
    torch.manual_seed(12)
    T, B, H = 6, 4, 5
    # the documented draw: c's mask, then h's, each (D, N, .) over the time-major rows
    mask_c = torch.rand(1, T * B, H, dtype=F64).lt_(z_c) if z_c else None
    mask_h = torch.rand(1, T * B, H, dtype=F64).lt_(z_h) if z_h else None
    assert z_c == 0 or 0 < mask_c.mean() < 1
    want = formula_layer(x, h0[0], c0[0], _weights(m),
                         zone_c=mask_c[0].view(T, B, H) if z_c else None,
                         zone_h=mask_h[0].view(T, B, H) if z_h else None)
    for a, b in zip((y, hy[0], cy[0]), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    m.eval()  # the expectation
    y, (hy, cy) = m(x, (h0, c0))
    want = formula_layer(x, h0[0], c0[0], _weights(m), zone_c=z_c or None, zone_h=z_h or None)
    for a, b in zip((y, hy[0], cy[0]), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_reference_residual_is_the_formula():
    """x_{k+1} = dropout(y_k + x_k) for k >= 1, output y_{L-1} + x_{L-1}; h_n, c_n as they
    are. Dropout between layers as nn.LSTM's (checked with p = 0 here and by its masks in
    test_residual_dropout_acts_like_nn_lstm)."""
    m = _module(num_layers=3, residual=True, H=4, I=3)
    x, (h0, c0) = _inputs(m)
    y, (hy, cy) = m(x, (h0, c0))
    inp, hs, cs = x, [], []
    for k in range(3):
        out, h, c = formula_layer(inp, h0[k], c0[k], _weights(m, k))
        inp = out + inp if k >= 1 else out
        hs.append(h)
        cs.append(c)
    torch.testing.assert_close(y, inp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hy, torch.stack(hs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cy, torch.stack(cs), rtol=1e-12, atol=1e-12)


def test_residual_dropout_acts_like_nn_lstm(spy_backend):
    """A spy backend sees each layer's input: dropout(y_k + x_k) with nn.LSTM's dropout, not
    after the last layer."""
    seen = spy_backend
    m = _module(num_layers=3, residual=True, dropout=0.5, H=16, backend="spy")
    x, hx = _inputs(m, T=10)
    torch.manual_seed(3)
    y, _ = m(x, hx)
    (x0, y0), (x1, y1), (x2, y2) = seen
    torch.manual_seed(3)  # the same masks: dropout on y0, then on y1 + x1
    assert torch.equal(x1, nn.functional.dropout(y0, 0.5))
    assert torch.equal(x2, nn.functional.dropout(y1 + x1, 0.5))
    assert torch.equal(y, y2 + x2)


def test_masks_are_reproducible_and_drawn_in_the_documented_order():
    """Under torch.manual_seed both backends draw the same masks, in the order of
    functional.draw_masks: recurrent dropout (L*D, B, P) by bernoulli_, then per layer
    zoneout c (D, N, H) and h (D, N, P) by rand().lt_(z), then the dropout between layers."""
    x = torch.randn(5, 3, 4, dtype=F64)
    torch.manual_seed(0)
    dropout_masks, zoneout_masks = functional.draw_masks(
        x, 3, 15, 6, 2, 2, True, recurrent_dropout=0.25, zoneout=(0.1, 0.2))
    torch.manual_seed(0)
    expect = torch.empty(4, 3, 2, dtype=F64).bernoulli_(0.75) / 0.75
    assert torch.equal(dropout_masks, expect)
    for cell, hidden in zoneout_masks:
        assert torch.equal(cell, torch.rand(2, 15, 6, dtype=F64).lt_(0.1))
        assert torch.equal(hidden, torch.rand(2, 15, 2, dtype=F64).lt_(0.2))
    # given masks give what the drawn ones gave
    m = _module(num_layers=2, bidirectional=True, proj_size=2, H=6, I=4,
                recurrent_dropout=0.25, zoneout=(0.1, 0.2), dropout=0.3)
    hx = (torch.randn(4, 3, 2, dtype=F64), torch.randn(4, 3, 6, dtype=F64))
    torch.manual_seed(0)
    y, _ = m(x, hx)
    torch.manual_seed(0)
    drawn = functional.draw_masks(x, 3, 15, 6, 2, 2, True, 0.25, (0.1, 0.2))
    y2, _, _ = functional.lstm(x, *hx, m._flat_weights, True, 2, 2, 0.3, True, True,
                               backend="reference", recurrent_dropout=0.25,
                               zoneout=(0.1, 0.2), recurrent_dropout_masks=drawn[0],
                               zoneout_masks=drawn[1])
    assert torch.equal(y, y2)


# --- the module: parameters, state_dict, off equals nn.LSTM, errors ------------------------

def test_layer_norm_parameters_names_and_init():
    m = lstm_fused.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, layer_norm=True)
    names = [n for n, _ in m.named_parameters()]
    for k, sfx in itertools.product(range(2), ("", "_reverse")):
        for name, size, value in (("layer_norm_ih", 20, 1.0), ("layer_norm_hh", 20, 1.0),
                                  ("layer_norm_cell_weight", 5, 1.0),
                                  ("layer_norm_cell_bias", 5, 0.0)):
            p = getattr(m, f"{name}_l{k}{sfx}")
            assert p.shape == (size,) and bool((p == value).all())
            assert f"{name}_l{k}{sfx}" in names
    # nn.LSTM's parameters come first in the state_dict, initialised as nn.LSTM does
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    torch.manual_seed(0)
    ours = lstm_fused.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2,
                           layer_norm=True)
    assert list(ours.state_dict())[:len(ref.state_dict())] == list(ref.state_dict())
    for name, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value)
    # the flat weights the kernels get: each direction's usual ones, then its four
    assert ours._flat_weights_names[:9] == [
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_hr_l0",
        "layer_norm_ih_l0", "layer_norm_hh_l0", "layer_norm_cell_weight_l0",
        "layer_norm_cell_bias_l0"]
    ours.reset_parameters()
    assert bool((ours.layer_norm_ih_l1 == 1).all())
    assert bool((ours.layer_norm_cell_bias_l0_reverse == 0).all())
    clone = lstm_fused.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2,
                            layer_norm=True)
    clone.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("kw", [dict(layer_norm=False), dict(recurrent_dropout=0.0),
                                dict(zoneout=0.0), dict(zoneout=(0.0, 0.0)),
                                dict(residual=False)])
def test_off_is_nn_lstm(backend, kw):
    """Off is exactly nn.LSTM: state_dict keys, outputs and every gradient, in training."""
    cfg = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    torch.manual_seed(0)
    ref = nn.LSTM(**cfg, dtype=F64)
    ours = lstm_fused.LSTM(**cfg, dtype=F64, backend=backend, **kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert not ours.has_variants
    inp, h, leaves = make_input(ref, "packed_unsorted", lengths=[2, 5, 1, 4])
    compare_modules(ref, ours, inp, h, leaves)


@pytest.mark.parametrize("kw,error,words", [
    (dict(recurrent_dropout=1.0), ValueError, r"recurrent_dropout should be a number in range "
                                              r"\[0, 1\)"),
    (dict(recurrent_dropout=-0.1), ValueError, "recurrent_dropout should be"),
    (dict(recurrent_dropout=True), ValueError, "recurrent_dropout should be"),
    (dict(zoneout=1.0), ValueError, r"zoneout should be a number in range \[0, 1\), or a pair"),
    (dict(zoneout=(0.1, 1.5)), ValueError, "zoneout should be"),
    (dict(zoneout=(0.1, 0.2, 0.3)), ValueError, "zoneout should be"),
    (dict(zoneout="0.1"), ValueError, "zoneout should be"),
    (dict(residual=True), ValueError, "residual=True expects num_layers greater than 1, but "
                                      "got num_layers=1"),
    (dict(layer_norm=1), TypeError, "layer_norm should be of type bool, got: int"),
    (dict(residual=1, num_layers=2), TypeError, "residual should be of type bool, got: int"),
])
def test_constructor_errors(kw, error, words):
    with pytest.raises(error, match=words):
        lstm_fused.LSTM(3, 4, **kw)


def test_repr_and_what_nn_lstm_cannot_express():
    m = lstm_fused.LSTM(3, 4, num_layers=2, layer_norm=True, recurrent_dropout=0.1,
                        zoneout=(0.1, 0.2), residual=True)
    assert repr(m) == ("LSTM(3, 4, num_layers=2, layer_norm=True, recurrent_dropout=0.1, "
                       "zoneout=(0.1, 0.2), residual=True)")
    assert "zoneout=0.3)" in repr(lstm_fused.LSTM(3, 4, zoneout=0.3))
    for kw in (dict(layer_norm=True), dict(recurrent_dropout=0.1), dict(zoneout=0.1),
               dict(residual=True, num_layers=2)):
        with pytest.raises(ValueError, match="nn.LSTM cannot express"):
            lstm_fused.LSTM(3, 4, **kw).to_torch()
        with pytest.raises(ValueError, match="nn.LSTM cannot express"):
            lstm_fused.revert(nn.Sequential(lstm_fused.LSTM(3, 4, **kw)))


# --- every backend against the reference ---------------------------------------------------

NON_REFERENCE = [p for p in BACKEND_PARAMS if p.values[0] != "reference"]

VARIANTS = {
    "layer_norm": dict(layer_norm=True),
    "recurrent_dropout": dict(recurrent_dropout=0.3),
    "zoneout": dict(zoneout=(0.2, 0.3)),
    "zoneout_c": dict(zoneout=(0.4, 0.0)),
    "zoneout_h": dict(zoneout=(0.0, 0.4)),
    "residual": dict(residual=True),
    "all": dict(layer_norm=True, recurrent_dropout=0.25, zoneout=(0.15, 0.25), residual=True),
}

ARCHS = {
    "plain": dict(),
    "bi-proj": dict(bidirectional=True, proj_size=2),
    "nobias": dict(bias=False),
}


def _pair(backend, variant, arch, dtype=F64, num_layers=2, dropout=0.0, batch_first=False,
          I=3, H=5):
    """(reference module, `backend` module) with identical weights, layer-norm parameters away
    from their init."""
    torch.manual_seed(0)
    oracle = lstm_fused.LSTM(I, H, num_layers=num_layers, dtype=dtype, dropout=dropout,
                             batch_first=batch_first, backend="reference",
                             **VARIANTS[variant], **ARCHS[arch])
    if oracle.layer_norm:
        _randomise_layer_norm(oracle)
    ours = copy.deepcopy(oracle)
    ours.backend = backend
    return oracle, ours


def _run(m, inp, hx, leaves, seed):
    torch.manual_seed(seed)  # the same masks for both
    return run_and_grad(m, inp, hx, leaves)


def _compare(oracle, ours, inp, hx, leaves, tol, seed=7, extra=(), atol_of_max=0.0):
    """atol_of_max: an absolute tolerance of that fraction of each tensor's largest entry, on
    top of `tol`: a float32 gradient is a sum over steps and batch whose rounding error scales
    with its terms, not with its (possibly cancelled) value."""
    _, vals_a, grads_a = _run(oracle, inp, hx, list(leaves) + list(extra), seed)
    _, vals_b, grads_b = _run(ours, inp, hx, list(leaves) + list(extra), seed)
    names = (["output", "hy", "cy"] + [f"leaf{i}" for i in range(len(leaves) + len(extra))]
             + [n for n, _ in oracle.named_parameters()])
    for name, a, b in zip(names, vals_a + list(grads_a), vals_b + list(grads_b)):
        assert a is not None and b is not None, name
        atol = tol["atol"] + atol_of_max * a.abs().max().item()
        torch.testing.assert_close(b, a, rtol=tol["rtol"], atol=atol,
                                   msg=lambda msg, n=name: f"{n}: {msg}")


KINDS = ["seq", "packed_unsorted", "seq_bf", "unbatched"]
# each variant alone over three layouts, all of them together over every layout
GRID = ([(v, a, k) for v in VARIANTS if v != "all"
         for a, k in (("plain", "seq"), ("bi-proj", "packed_unsorted"), ("nobias", "seq_bf"))]
        + [("all", a, k) for a in ARCHS for k in KINDS])


@pytest.mark.parametrize("backend", NON_REFERENCE)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant,arch,kind", GRID, ids=["-".join(c) for c in GRID])
def test_fused_equals_reference_float64(backend, variant, arch, kind, training):
    """Outputs and every gradient, in training under the same seed (the same masks) and in
    eval; packed, batch_first and unbatched input; projection, bidirectional, no bias."""
    oracle, ours = _pair(backend, variant, arch, batch_first=kind == "seq_bf",
                         dropout=0.2 if training else 0.0)
    oracle.train(training)
    ours.train(training)
    input_kind = "seq" if kind == "seq_bf" else kind
    kw = dict(lengths=[3, 6, 1, 4]) if kind.startswith("packed") else dict(T=6, B=3)
    if kind == "unbatched":
        kw = dict(T=6)
    inp, hx, leaves = make_input(oracle, input_kind, **kw)
    _compare(oracle, ours, inp, hx, leaves, TOL[F64])


@pytest.mark.parametrize("backend", NON_REFERENCE)
@pytest.mark.parametrize("variant", ["layer_norm", "zoneout", "recurrent_dropout", "all"])
def test_fused_equals_reference_float32(backend, variant):
    oracle, ours = _pair(backend, variant, "plain", dtype=torch.float32, I=16, H=32)
    inp, hx, leaves = make_input(oracle, "seq", T=20, B=8, dtype=torch.float32)
    _compare(oracle, ours, inp, hx, leaves, dict(rtol=2e-4, atol=2e-5), atol_of_max=1e-4)


# probe channels: 3 = the flow per step t, 5 = also per step before each sequence's last one
@pytest.mark.parametrize("backend", NON_REFERENCE)
@pytest.mark.parametrize("mode,clip,channels", [(0, 0.0, 3), (1, 0.05, 3), (2, 0.1, 3),
                                                (1, 0.05, 5), (0, 0.0, 5)])
@pytest.mark.parametrize("kind", ["seq", "packed_unsorted"])
@pytest.mark.parametrize("variant", ["layer_norm", "zoneout", "recurrent_dropout", "all"])
def test_clip_and_flow_match_reference(backend, variant, kind, mode, clip, channels):
    """bptt_clip and the gradient-flow telemetry with every variant: the fused backward's
    clipping and norms equal the reference's (its taps: dL/dc~[t] and dL/dh[t])."""
    oracle, ours = _pair(backend, variant, "bi-proj")
    kw = dict(lengths=[3, 5, 2]) if kind.startswith("packed") else dict(T=5)
    inp, hx, leaves = make_input(ours, kind, **kw)
    results = []
    for m in (oracle, ours):
        probes = [torch.zeros(2, 5, channels, dtype=F64, requires_grad=True) for _ in range(2)]
        m.flow_recorder = lambda mod, x, bs, probes=probes: probes
        m.bptt_clip, m.bptt_clip_mode = clip, mode
        torch.manual_seed(7)
        _, vals, grads = run_and_grad(m, inp, hx, leaves + probes)
        results.append(vals + list(grads))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **TOL[F64])
    assert results[1][-1].abs().sum() > 0  # the last probe got its telemetry


@pytest.mark.parametrize("backend", NON_REFERENCE)
def test_record_gradient_flow_with_every_variant(backend):
    """record_gradient_flow on a module with all variants: the fused telemetry is the
    reference's."""
    flows = []
    for name in ("reference", backend):
        oracle, _ = _pair(name, "all", "plain")
        oracle.backend = name
        inp, hx, _ = make_input(oracle, "packed_unsorted", lengths=[3, 6, 1, 4])
        with lstm_fused.record_gradient_flow(oracle) as flow:
            torch.manual_seed(3)
            out, _ = oracle(inp, hx)
            out.data.pow(2).sum().backward()
        flows.append(flow[""])
    torch.testing.assert_close(flows[1].dh_norm, flows[0].dh_norm, **TOL[F64])
    torch.testing.assert_close(flows[1].dc_norm, flows[0].dc_norm, **TOL[F64])
    torch.testing.assert_close(flows[1].forget_mean, flows[0].forget_mean, **TOL[F64])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["layer_norm", "recurrent_dropout", "zoneout", "residual"])
def test_gradcheck_and_gradgradcheck(backend, variant, training):
    """float64 gradcheck and gradgradcheck of the module's outputs w.r.t. the input, h0, c0
    and every parameter; in training the masks are fixed by a seed inside the function."""
    # small: gradgradcheck differentiates every output twice by finite differences
    m = _module(backend, I=2, H=3, num_layers=2 if variant == "residual" else 1,
                bidirectional=variant in ("recurrent_dropout", "zoneout"),
                proj_size=2 if variant == "zoneout" else 0, **VARIANTS[variant])
    m.train(training)
    x, (h0, c0) = _inputs(m, T=3, B=2)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    leaves = [x.requires_grad_(), h0.requires_grad_(), c0.requires_grad_(), *params]

    def fn(x, h0, c0, *weights):
        torch.manual_seed(5)
        out, (hy, cy) = torch.func.functional_call(m, dict(zip(names, weights)), (x, (h0, c0)))
        return out, hy, cy

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("backend", NON_REFERENCE)
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) with every variant gives what eager gives, the masks
    drawn inside the graph from the same seed."""
    torch._dynamo.reset()
    _, ours = _pair(backend, "all", "plain", dtype=torch.float32)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    inp, hx, leaves = make_input(ours, "seq", T=3, B=2, dtype=torch.float32)
    results = [_run(m, inp, hx, leaves, seed=4) for m in (ours, compiled)]
    for a, b in zip(results[0][1] + list(results[0][2]), results[1][1] + list(results[1][2])):
        torch.testing.assert_close(b, a, **TOL[torch.float32])
    ours.eval()
    torch.testing.assert_close(compiled(inp, hx)[0], ours(inp, hx)[0], **TOL[torch.float32])


@pytest.mark.parametrize("backend", NON_REFERENCE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_matches_reference(backend, dtype):
    """16-bit inputs compute in float32 with every variant (masks drawn in the input's dtype,
    the same for both): the fused outputs and gradients are the reference's, to 16-bit
    rounding."""
    oracle, ours = _pair(backend, "all", "bi-proj", dtype=dtype, I=8, H=16)
    inp, hx, leaves = make_input(oracle, "packed_unsorted", lengths=[3, 8, 5, 8], dtype=dtype)
    _compare(oracle, ours, inp, hx, leaves, dict(rtol=2e-2, atol=2e-2))


@pytest.mark.parametrize("backend", NON_REFERENCE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_gradients_are_the_float32_ones_rounded(backend, dtype):
    """As for the plain cell (test_ops.py): 16-bit runs in float32, so each gradient is the
    float32 computation on the upcast values (and masks), rounded once; in particular dW_hh
    from the h the recurrence used, recomputed in float32 through layer norm and zoneout's
    recurrence, not from the rounded output."""
    from lstm_fused.options import LayerOptions

    gen = torch.Generator().manual_seed(0)
    T, B, I, H, P = 9, 6, 16, 32, 8
    D = 2

    def rand(*shape, scale=0.3, offset=0.0):
        return (offset + scale * torch.randn(*shape, generator=gen, dtype=F64)).to(dtype)

    params = []
    for _ in range(D):
        params += [rand(4 * H, I), rand(4 * H, P), rand(4 * H), rand(4 * H), rand(P, H),
                   rand(4 * H, offset=1.0), rand(4 * H, offset=1.0), rand(H, offset=1.0),
                   rand(H)]
    options = LayerOptions(has_proj=True, bidirectional=True, layer_norm=True,
                           recurrent_dropout=True, zoneout_cell=0.3, zoneout_hidden=0.4,
                           training=True)
    masks = [((torch.rand(D, B, P, generator=gen) < 0.75).double() / 0.75).to(dtype),
             (torch.rand(D, T * B, H, generator=gen) < 0.3).to(dtype),
             (torch.rand(D, T * B, P, generator=gen) < 0.4).to(dtype)]
    inputs16 = [rand(T, B, I, scale=1.0), rand(D, B, P, scale=1.0), rand(D, B, H, scale=1.0),
                *params]
    inputs16 = [t.requires_grad_() for t in inputs16]
    inputs32 = [t.detach().float().requires_grad_() for t in inputs16]
    layer = functional.BACKENDS[backend]
    outs16 = layer(*inputs16[:3], inputs16[3:], None, None, options, masks)
    outs32 = layer(*inputs32[:3], inputs32[3:], None, None, options, [m.float() for m in masks])
    weights = [torch.randn(o.shape, generator=gen, dtype=F64).to(dtype) for o in outs16]
    grads16 = torch.autograd.grad(outs16, inputs16, weights)
    grads32 = torch.autograd.grad(outs32, inputs32, [w.float() for w in weights])
    for k, (g16, g32) in enumerate(zip(grads16, grads32)):
        assert g16.dtype == dtype
        rounded = g32.to(dtype)
        # float32 rounding differences may tip a few values over a 16-bit rounding
        # boundary: rarely, and by one unit in the last place
        mismatched = int((g16 != rounded).sum())
        assert mismatched <= max(1, g16.numel() // 50), (k, mismatched)
        ulp = torch.finfo(dtype).eps * rounded.float().abs().clamp_min(1e-3)
        assert ((g16.float() - rounded.float()).abs() <= ulp).all(), k


# --- torch.func with the variants -------------------------------------------------------------

@pytest.mark.parametrize("backend", NON_REFERENCE)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_func_vmap_grad_jvp_with_every_variant(backend, training):
    """vmap over the data folds the masks with the batch (vmap's randomness="same": one
    draw for all elements, as a loop under the same seed sees it); grad and jvp give what
    autograd and the reference give."""
    from torch.func import functional_call, grad, jvp, vmap

    _, m = _pair(backend, "all", "bi-proj")
    m.train(training)
    oracle = copy.deepcopy(m)
    oracle.backend = "reference"
    names = [n for n, _ in m.named_parameters()]
    weights = {n: p.detach() for n, p in m.named_parameters()}
    xs = torch.randn(3, 5, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)

    def output(module, x, w=weights):
        torch.manual_seed(11)
        return functional_call(module, w, (x,))[0]

    batched = vmap(lambda x: output(m, x), randomness="same")(xs)
    for v in range(3):
        # with randomness="same" the draws are those of one element-sized call
        torch.testing.assert_close(batched[v], output(oracle, xs[v]), **TOL[F64])

    def loss(w, module):
        return output(module, xs[0], w).pow(2).sum()

    got, want = grad(loss)(weights, m), grad(loss)(weights, oracle)
    for n in names:
        torch.testing.assert_close(got[n], want[n], **TOL[F64], msg=n)
    tangent = {n: torch.randn_like(p) for n, p in weights.items()}
    _, jvp_got = jvp(lambda w: output(m, xs[0], w), (weights,), (tangent,))
    _, jvp_want = jvp(lambda w: output(oracle, xs[0], w), (weights,), (tangent,))
    torch.testing.assert_close(jvp_got, jvp_want, **TOL[F64])
