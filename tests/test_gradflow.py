"""Gradient-flow telemetry, BPTT clipping and forget_bias, checked against an LSTM unrolled
step by step in this file (retain_grad on every c[t] and h[t]), independent of reference.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_fused
from lstm_fused.gradflow import (EXPLODING_ABOVE, VANISHING_BELOW, ModuleFlow, heatmap_image,
                                 log_gradients, record_gradient_flow)

I, H = 3, 5


class Model(nn.Module):
    def __init__(self, backend="fused", **lstm_kwargs):
        super().__init__()
        self.rnn = lstm_fused.LSTM(I, H, backend=backend, dtype=torch.float64, **lstm_kwargs)


def make_data(B, lengths, seed=0):
    """Padded time-major input (T, B, I) and the validity mask (T, B) of `lengths` (unequal
    lengths only for packed input: unpacked, every sequence runs all T steps)."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    x = torch.randn(T, B, I, generator=gen, dtype=torch.float64)
    mask = torch.arange(T)[:, None] < torch.tensor(lengths)[None, :]
    return x, mask


def loss_weights(rnn, mask, seed=1, output_loss=True):
    """Weights of the random linear loss on (output, hy, cy); output_loss=False zeroes the
    output's (the hy and cy weights stay the same)."""
    gen = torch.Generator().manual_seed(seed)
    T, B = mask.shape
    D = 2 if rnn.bidirectional else 1

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return (rand(T, B, D * H) * mask[..., None] * output_loss, rand(rnn.num_layers * D, B, H),
            rand(rnn.num_layers * D, B, H))


def run_module(rnn, x, mask, packed, flow_on=True):
    """Forward + backward of a random linear loss of (output, hy, cy) through `rnn`
    (time-major or batch_first, packed or not); returns the GradientFlow (or None)."""
    lengths = mask.sum(0)
    w_out, w_hy, w_cy = loss_weights(rnn, mask)
    inp = x.transpose(0, 1) if rnn.batch_first else x
    if packed:
        inp = pack_padded_sequence(inp, lengths, batch_first=rnn.batch_first,
                                   enforce_sorted=False)
    holder = nn.ModuleDict({"rnn": rnn})
    recording = record_gradient_flow(holder) if flow_on else _nothing()
    with recording as flow:
        out, (hy, cy) = rnn(inp)
        if packed:
            out = pad_packed_sequence(out, batch_first=rnn.batch_first)[0]
        if rnn.batch_first:
            out = out.transpose(0, 1)
        loss = (out * w_out).sum() + (hy * w_hy).sum() + (cy * w_cy).sum()
        loss.backward()
    return flow


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def run_unrolled(rnn, x, mask, clip=0.0, mode=None, from_last_step=False, output_loss=True):
    """The same loss through an LSTM unrolled one step at a time from rnn's parameters,
    optionally clipping the gradient of every c[t] and h[t] (by value or by norm over the
    batch). Returns dh, dc, mean f as (layers, directions, T) and the parameter gradients.
    from_last_step=True: dh and dc at index k are the norms over the sequences of their
    gradients k steps before each sequence's own last step (instead of at step t=k).
    output_loss: as in loss_weights."""
    T, B = mask.shape
    L, D = rnn.num_layers, 2 if rnn.bidirectional else 1
    params = {name: p.detach().clone().requires_grad_() for name, p in rnn.named_parameters()}
    states = {}  # (layer, direction, t) -> (c[t], h[t])
    forget_mean = torch.zeros(L, D, T, dtype=torch.float64)

    def tap(v):
        if mode == "value":
            v.register_hook(lambda g: g.clamp(-clip, clip))
        elif mode == "norm":
            v.register_hook(lambda g: g * (clip / g.norm().clamp_min(clip)))
        v.retain_grad()  # retain_grad hooks run after the clipping hooks
        return v

    layer_input, hy, cy = x, [], []
    for layer in range(L):
        outputs = []
        for d in range(D):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh, b_ih, b_hh = (params[f"{n}{suffix}"]
                                      for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            h = x.new_zeros(B, H)
            c = x.new_zeros(B, H)
            out = [None] * T
            for t in (range(T - 1, -1, -1) if d else range(T)):
                i, f, g, o = (layer_input[t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, 1)
                c_t = tap(torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g))
                h_t = tap(torch.sigmoid(o) * torch.tanh(c_t))
                active = mask[t][:, None]
                # finished (or not yet started) sequences keep their state; their h_t/c_t
                # get no gradient, so norms over the batch are norms over the active rows
                h, c = torch.where(active, h_t, h), torch.where(active, c_t, c)
                out[t] = h_t
                states[layer, d, t] = (c_t, h_t)
                forget_mean[layer, d, t] = torch.sigmoid(f)[mask[t]].mean().detach()
            outputs.append(torch.stack(out))
            hy.append(h)
            cy.append(c)
        layer_input = torch.cat(outputs, -1)
    w_out, w_hy, w_cy = loss_weights(rnn, mask, output_loss=output_loss)
    loss = (layer_input * w_out).sum() + (torch.stack(hy) * w_hy).sum() \
        + (torch.stack(cy) * w_cy).sum()
    loss.backward()
    lengths = mask.sum(0).tolist()

    def norm(layer, d, step, slot):
        if not from_last_step:
            return states[layer, d, step][slot].grad.norm()
        return torch.stack([states[layer, d, length - 1 - step][slot].grad[b]
                            for b, length in enumerate(lengths) if length > step]).norm()

    dc, dh = (torch.tensor([[[norm(layer, d, step, slot) for step in range(T)]
                             for d in range(D)] for layer in range(L)]) for slot in (0, 1))
    return dh, dc, forget_mean, {n: p.grad for n, p in params.items()}


CONFIGS = [
    pytest.param(dict(num_layers=1), [6, 6, 6], False, id="1layer"),
    pytest.param(dict(num_layers=2, bidirectional=True), [5, 5], False, id="2layer-bidir"),
    pytest.param(dict(num_layers=2, bidirectional=True, batch_first=True), [4, 4, 4], False,
                 id="2layer-bidir-batch_first"),
    pytest.param(dict(num_layers=1), [6, 2, 4, 1], True, id="packed"),
    pytest.param(dict(num_layers=2, bidirectional=True), [5, 3, 5, 1], True,
                 id="2layer-bidir-packed"),
]


@pytest.mark.parametrize("cfg,lengths,packed", CONFIGS)
def test_norms_match_unrolled_lstm(backend, cfg, lengths, packed):
    torch.manual_seed(0)
    rnn = Model(backend, **cfg).rnn
    x, mask = make_data(len(lengths), lengths)
    flow = run_module(rnn, x, mask, packed)["rnn"]
    dh, dc, forget_mean, _ = run_unrolled(rnn, x, mask)
    assert flow.dh_norm.shape == dh.shape
    torch.testing.assert_close(flow.dh_norm, dh, rtol=1e-6, atol=0)
    torch.testing.assert_close(flow.dc_norm, dc, rtol=1e-6, atol=0)
    torch.testing.assert_close(flow.forget_mean, forget_mean, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode,clip", [("value", 0.05), ("norm", 0.2)])
@pytest.mark.parametrize("packed", [False, True], ids=["seq", "packed"])
def test_clipped_gradients_match_unrolled_clipping(backend, mode, clip, packed):
    torch.manual_seed(0)
    rnn = Model(backend, num_layers=2, bidirectional=True, bptt_clip=clip,
                bptt_clip_mode=mode).rnn
    lengths = [5, 3, 5, 2] if packed else [5] * 4
    x, mask = make_data(len(lengths), lengths)
    flow = run_module(rnn, x, mask, packed)["rnn"]
    dh, dc, _, ref_grads = run_unrolled(rnn, x, mask, clip, mode)
    _, _, _, unclipped_grads = run_unrolled(rnn, x, mask)
    assert any(not torch.allclose(ref_grads[n], unclipped_grads[n]) for n in ref_grads)
    for name, p in rnn.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flow.dh_norm, dh, rtol=1e-6, atol=0)
    torch.testing.assert_close(flow.dc_norm, dc, rtol=1e-6, atol=0)


@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["noclip", "valueclip"])
@pytest.mark.parametrize("cfg,lengths", [(dict(num_layers=1), [6, 2, 4, 1]),
                                         (dict(num_layers=2, bidirectional=True), [5, 3, 5, 1])],
                         ids=["1layer", "2layer-bidir"])
def test_norms_from_each_sequence_last_step_match_unrolled_lstm(backend, cfg, lengths, clip):
    """Packed sequences of unequal lengths: the norms over the sequences k steps before each
    one's own last step, as the unrolled LSTM's retain_grad shows them (element-wise
    clipping included)."""
    torch.manual_seed(0)
    rnn = Model(backend, bptt_clip=clip or None, **cfg).rnn
    x, mask = make_data(len(lengths), lengths)
    flow = run_module(rnn, x, mask, packed=True)["rnn"]
    dh, dc, _, _ = run_unrolled(rnn, x, mask, clip, "value" if clip else None,
                                from_last_step=True)
    assert flow.per_sequence and flow.dh_norm_from_last_step.shape == dh.shape
    torch.testing.assert_close(flow.dh_norm_from_last_step, dh, rtol=1e-6, atol=0)
    torch.testing.assert_close(flow.dc_norm_from_last_step, dc, rtol=1e-6, atol=0)


def test_packed_decay_is_measured_from_each_sequence_last_step(backend):
    """One long sequence and three short ones, the loss on hy and cy (each sequence's last
    step): t=T-1 holds the long sequence only, so a ratio to it ignored the others. The
    ratios start (forward direction) and end (reverse direction) at every sequence's own
    last step, as the unrolled LSTM's norms give them, and report() says so."""
    torch.manual_seed(0)
    rnn = Model(backend, bidirectional=True).rnn
    lengths = [9, 3, 3, 3]
    x, mask = make_data(len(lengths), lengths)
    holder = nn.ModuleDict({"rnn": rnn})
    w_hy, w_cy = loss_weights(rnn, mask)[1:]
    with record_gradient_flow(holder) as flow:
        _, (hy, cy) = rnn(pack_padded_sequence(x, torch.tensor(lengths)))
        ((hy * w_hy).sum() + (cy * w_cy).sum()).backward()
    fwd, rev = flow.summary()
    dh_t, _, _, _ = run_unrolled(rnn, x, mask, output_loss=False)
    dh_k, _, _, _ = run_unrolled(rnn, x, mask, output_loss=False, from_last_step=True)
    assert (fwd.last_step_of, rev.last_step_of) == ("sequence", "sequence")
    # forward: from each sequence's last step (k=0) back to t=0
    assert fwd.dh_ratio == pytest.approx(float(dh_t[0, 0, 0] / dh_k[0, 0, 0]), rel=1e-6)
    assert fwd.dh_ratio != pytest.approx(float(dh_t[0, 0, 0] / dh_t[0, 0, -1]), rel=0.1)
    # reverse: from t=0 to each sequence's last step (k=0)
    assert rev.dh_ratio == pytest.approx(float(dh_k[0, 1, 0] / dh_t[0, 1, 0]), rel=1e-6)
    assert rev.dh_ratio != pytest.approx(float(dh_t[0, 1, -1] / dh_t[0, 1, 0]), rel=0.1)
    assert "each seq's" in flow.report().splitlines()[1]


def test_equal_lengths_and_norm_clipping_keep_the_batch_last_step():
    """Unpacked input and packed input of equal lengths end every sequence at t=T-1 (the
    ratios are the batch's, as before); under norm clipping, which couples the sequences of
    a step, the per-sequence norms are not recorded and the ratios say so."""
    for packed, lengths, kw in ((False, [5] * 3, {}), (True, [5] * 3, {}),
                                (True, [5, 3, 4], dict(bptt_clip=0.2, bptt_clip_mode="norm"))):
        rnn = Model(**kw).rnn
        x, mask = make_data(3, lengths)
        flow = run_module(rnn, x, mask, packed)["rnn"]
        assert not flow.per_sequence and flow.dh_norm_from_last_step is None
        [v] = flow.summary()
        assert v.last_step_of == "batch"
        assert v.dh_ratio == pytest.approx(float(flow.dh_norm[0, 0, 0] / flow.dh_norm[0, 0, -1]))


@pytest.mark.parametrize("packed", [False, True], ids=["seq", "packed"])
def test_fused_flow_at_sizes_that_split_the_hidden_units_over_threads(packed):
    # large enough for the CPU sequence kernel to give each thread its own slice of units
    size, lengths = 64, [8] * 48 if not packed else [8, 7, 7, 5] * 12
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, len(lengths), size, dtype=torch.float64, generator=gen)
    flows = {}
    for backend in ("fused", "reference"):
        torch.manual_seed(0)
        rnn = lstm_fused.LSTM(size, size, backend=backend, dtype=torch.float64)
        inp = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False) if packed else x
        with record_gradient_flow(rnn) as flow:
            out = rnn(inp)[0]
            (out.data if packed else out)[-40:].sum().backward()
        flows[backend] = flow[""].data
    torch.testing.assert_close(flows["fused"], flows["reference"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("packed", [False, True], ids=["seq", "packed"])
def test_gradients_identical_with_and_without_recording(packed):
    lengths = [6, 4, 6]
    x, mask = make_data(len(lengths), lengths)
    grads = []
    for flow_on in (False, True):
        torch.manual_seed(0)
        rnn = Model(num_layers=2, bidirectional=True).rnn
        run_module(rnn, x, mask, packed, flow_on=flow_on)
        grads.append([p.grad for p in rnn.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_probe_dtype_follows_the_ops_flow_dtype():
    model = nn.Sequential()
    model.add_module("rnn", lstm_fused.LSTM(I, H, dtype=torch.bfloat16))
    x = torch.randn(4, 2, I, dtype=torch.bfloat16)
    with record_gradient_flow(model) as flow:
        model(x)[0].float().sum().backward()
    assert flow["rnn"].dh_norm.dtype == torch.float32  # the acc dtype of bfloat16
    assert (flow["rnn"].dh_norm > 0).all()


def test_recorder_bookkeeping():
    model = Model()
    x = torch.randn(4, 2, I, dtype=torch.float64)
    with record_gradient_flow(model) as flow:
        with torch.no_grad():
            model.rnn(x)  # no backward possible: no probes
        assert "rnn" not in flow
        model.rnn(x)[0].sum().backward()
        model.rnn(x[:3])[0].sum().backward()
    assert model.rnn.flow_recorder is None  # restored
    assert list(flow) == ["rnn"]
    assert [f.dh_norm.shape[-1] for f in flow.forwards("rnn")] == [4, 3]
    assert flow["rnn"].dh_norm.shape == (1, 1, 3)  # the last forward
    with record_gradient_flow(model) as flow:
        model.rnn(x)
    with pytest.raises(RuntimeError, match="loss.backward"):
        flow["rnn"]
    with pytest.raises(KeyError):
        flow["other"]
    with pytest.raises(ValueError, match="no lstm_fused.LSTM"):
        with record_gradient_flow(nn.Linear(2, 2)):
            pass


def _module_flow(rows):
    """ModuleFlow with one layer, one row of dh (= dc) norms per direction."""
    norms = torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in rows])
    return ModuleFlow(torch.stack([norms, norms, torch.full_like(norms, 0.5)], -1)[None])


def test_summary_verdicts_on_constructed_flows():
    T = 20
    t = torch.arange(T, dtype=torch.float64)
    decaying = 0.5 ** (T - 1 - t)   # forward direction: shrinks back towards t=0
    growing = 2.0 ** (T - 1 - t)
    [v] = _module_flow([decaying]).summary("m")
    assert v.verdict == "vanishing" and v.dh_ratio == pytest.approx(0.5 ** (T - 1))
    assert _module_flow([growing]).summary()[0].verdict == "exploding"
    assert _module_flow([torch.ones(T)]).summary()[0].verdict == "healthy"
    assert _module_flow([torch.zeros(T)]).summary()[0].verdict == "no gradient"
    assert math.isnan(_module_flow([torch.zeros(T)]).summary()[0].dh_ratio)
    with_nan = torch.ones(T)
    with_nan[3] = float("nan")
    assert _module_flow([with_nan]).summary()[0].verdict == "exploding"
    # reverse direction: backprop starts at t=0, so decay towards t=T-1 is vanishing
    fwd, rev = _module_flow([torch.ones(T), decaying.flip(0)]).summary()
    assert (fwd.verdict, rev.verdict, rev.direction) == ("healthy", "vanishing", 1)
    # a direction fed only at its far end (the reverse direction under a last-step loss)
    only_last = torch.zeros(T)
    only_last[-1] = 1.0
    assert _module_flow([torch.ones(T), only_last]).summary()[1].verdict == "healthy"
    # the thresholds are the documented ones
    at_edge = torch.ones(T)
    at_edge[0] = VANISHING_BELOW * 2
    assert _module_flow([at_edge]).summary()[0].verdict == "healthy"
    at_edge[0] = EXPLODING_ABOVE * 2
    assert _module_flow([at_edge]).summary()[0].verdict == "exploding"


def _recorded_flow():
    torch.manual_seed(0)
    model = Model(num_layers=2, bidirectional=True)
    x = torch.randn(7, 2, I, dtype=torch.float64)
    with record_gradient_flow(model) as flow:
        model.rnn(x)[0][-1].sum().backward()
    return model, flow


def test_report_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    _, flow = _recorded_flow()
    assert len(flow.summary()) == 4 and "layer" in flow.report()
    path = flow.plot(tmp_path / "sub" / "flow.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    _, flow = _recorded_flow()
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        flow.plot(tmp_path / "flow.png")


class FakeWriter:
    def __init__(self):
        self.calls = []

    def __getattr__(self, method):
        return lambda *args, **kwargs: self.calls.append((method, args, kwargs))


def test_log_gradients_with_a_fake_writer():
    model, flow = _recorded_flow()
    writer = FakeWriter()
    log_gradients(writer, model, 7)
    assert [(m, a[0], a[2]) for m, a, _ in writer.calls] == [
        ("add_histogram", f"gradients/{n}", 7) for n, _ in model.named_parameters()]
    writer = FakeWriter()
    log_gradients(writer, model, 7, flow)
    by_tag = {(args[0] if args else kwargs["tag"]): (method, args, kwargs)
              for method, args, kwargs in writer.calls}
    method, args, kwargs = by_tag["gradient_flow/rnn/layer1_rev/dc_norm"]
    assert method == "add_histogram_raw" and kwargs["global_step"] == 7
    assert kwargs["bucket_counts"] == pytest.approx(flow["rnn"].dc_norm[1, 1].tolist())
    method, args, _ = by_tag["gradient_flow/rnn/dh_norm"]
    assert method == "add_image" and args[1].shape == (3, 4 * 8, 7)
    assert by_tag["gradient_flow/rnn/layer0_fwd/dh_ratio"][0] == "add_scalar"


def test_log_gradients_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    model, flow = _recorded_flow()
    writer = lstm_fused.gradflow.summary_writer(tmp_path)
    log_gradients(writer, model, 0, flow)
    writer.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_heatmap_image_range():
    image = heatmap_image(torch.tensor([[1.0, 10.0, 0.0], [100.0, 1e-3, 1.0]]), pixels_per_row=2)
    assert image.shape == (3, 4, 3) and image.min() >= 0 and image.max() <= 1
    assert (image[:, 0, 2] == 0).all()  # a zero norm is black


# -- constructor options ----------------------------------------------------------------------

def test_defaults_keep_nn_lstm_init_and_repr():
    torch.manual_seed(3)
    ours = lstm_fused.LSTM(I, H, num_layers=2, bidirectional=True)
    torch.manual_seed(3)
    ref = nn.LSTM(I, H, num_layers=2, bidirectional=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    assert repr(ours) == repr(ref)
    assert (ours.bptt_clip, ours.bptt_clip_mode, ours.forget_bias) == (0.0, 0, None)


def test_forget_bias_sets_the_forget_gate_slice():
    m = lstm_fused.LSTM(I, H, num_layers=2, bidirectional=True, forget_bias=1.0)
    for name, p in m.named_parameters():
        if name.startswith("bias"):
            expected = 1.0 if name.startswith("bias_ih") else 0.0
            assert torch.equal(p[H:2 * H], torch.full((H,), expected))
            assert not torch.equal(p[:H], torch.zeros(H))  # other gates keep nn.LSTM's init
    with torch.no_grad():
        m.bias_ih_l0.zero_()
    m.reset_parameters()
    assert torch.equal(m.bias_ih_l0[H:2 * H], torch.ones(H))
    assert "forget_bias=1.0" in repr(m)
    with pytest.raises(ValueError, match="bias=True"):
        lstm_fused.LSTM(I, H, bias=False, forget_bias=1.0)


def test_bptt_clip_options():
    m = lstm_fused.LSTM(I, H, bptt_clip=0.5, bptt_clip_mode="norm")
    assert (m.bptt_clip, m.bptt_clip_mode) == (0.5, 2)
    assert "bptt_clip=0.5, bptt_clip_mode='norm'" in repr(m)
    m.set_bptt_clip(None)
    assert (m.bptt_clip, m.bptt_clip_mode) == (0.0, 0)
    with pytest.raises(ValueError, match="bptt_clip_mode"):
        lstm_fused.LSTM(I, H, bptt_clip=1.0, bptt_clip_mode="elementwise")
    with pytest.raises(ValueError, match="> 0"):
        lstm_fused.LSTM(I, H, bptt_clip=0.0)


def test_demo_runs_end_to_end_on_a_tiny_budget(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from lstm_fused import demo

    tiny = demo.Budget(timing_length=6, timing_steps=3, adding_steps={8: 3, 12: 2},
                       variant_steps={8: 2, 12: 1}, batch=4, hidden=4)
    monkeypatch.setattr(demo, "QUICK", tiny)
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gradient_flow_T12.png", "gradient_flow_T8.png", "losses.png",
        "variants_gradient_flow_T12.png", "variants_gradient_flow_T8.png",
        "variants_losses.png"]
    printed = capsys.readouterr().out
    assert "torch.nn.LSTM" in printed and "nn.RNN tanh" in printed
    for model in ("LSTM layer_norm", "LSTM zoneout (0.5, 0.05)", "LSTM 2 layers residual"):
        assert model in printed
    assert torch.tensor([1e-40]).item() != 0  # flush-denormal mode restored
