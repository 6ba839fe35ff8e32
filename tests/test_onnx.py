"""ONNX export of lstm_fused.LSTM with both exporters (torch.onnx.export with dynamo=False and
dynamo=True), run by onnxruntime and compared with lstm_fused's own float32 outputs.

Under an ONNX export the module runs the aten op nn.LSTM runs (module.py _onnx_lstm), which
both exporters translate to ONNX LSTM nodes; these tests check the outputs (output, h_n, c_n
within 1e-5), that the graph holds one LSTM node per layer and nothing from our op, and the
cases ONNX's LSTM cannot express (proj_size) or one exporter cannot capture (PackedSequence
under torch.export) raise errors that say so. Skipped without onnx and onnxruntime; the
dynamo exporter also needs onnxscript.
"""

from __future__ import annotations

import importlib.util
import io
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_fused
from lstm_fused import functional, module

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.skipif(functional.backend_unavailable_reason("fused") is not None,
                                reason=str(functional.backend_unavailable_reason("fused")))

TOL = dict(atol=1e-5, rtol=1e-5)
I, H, T, B = 5, 8, 6, 3


# the dynamo exporter needs onnxscript too
requires_onnxscript = pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None,
                                         reason="the dynamo exporter needs onnxscript")


@pytest.fixture(params=[pytest.param(False, id="legacy"),
                        pytest.param(True, id="dynamo", marks=requires_onnxscript)])
def dynamo(request):
    """torch.onnx.export's `dynamo` argument: False (TorchScript exporter), True."""
    return request.param


def export(model, args, dynamo, **kwargs) -> onnx.ModelProto:
    """torch.onnx.export with no arguments of ours, as a user calls it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and trace warnings
        if dynamo:
            return torch.onnx.export(model, args, dynamo=True, verbose=False,
                                     **kwargs).model_proto
        f = io.BytesIO()
        torch.onnx.export(model, args, f, dynamo=False, **kwargs)
    return onnx.load_from_string(f.getvalue())


def run_onnxruntime(proto: onnx.ModelProto, inputs):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs), names
    return [torch.from_numpy(a) for a in
            session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})]


def assert_lstm_graph(proto: onnx.ModelProto, lstm_nodes: int):
    """One ONNX LSTM node per layer, every node from the standard domain (nothing left of the
    fused op), no loop (the recurrence is inside the LSTM nodes, not unrolled or looped)."""
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("LSTM") == lstm_nodes, ops
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, ops
    assert not {"Loop", "Scan"} & set(ops), ops


def make_model(seed=0, **cfg):
    torch.manual_seed(seed)
    return lstm_fused.LSTM(I, H, **cfg).eval()


def state(m, batch=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    D = 2 if m.bidirectional else 1
    shape = (m.num_layers * D, batch, H)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def sequence(m, steps=T, batch=B, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, steps, I) if m.batch_first else (steps, batch, I), generator=g)


def flat(result):
    output, (h_n, c_n) = result
    return [output, h_n, c_n]


def compare(got, expected):
    assert len(got) == len(expected)
    for name, a, b in zip(("output", "h_n", "c_n"), got, expected):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("cfg, given_state", [
    (dict(), False),
    (dict(num_layers=2, bidirectional=True, batch_first=True), True),
    (dict(bidirectional=True), True),
    (dict(num_layers=2, batch_first=True, bias=False), False),
], ids=["1layer", "2layers-bidir-batch_first-h0c0", "bidir-h0c0", "2layers-batch_first-nobias"])
def test_export_matches(dynamo, cfg, given_state):
    m = make_model(**cfg)
    args = (sequence(m), state(m)) if given_state else (sequence(m),)
    with torch.no_grad():
        expected = flat(m(*args))
    proto = export(m, args, dynamo)
    assert_lstm_graph(proto, lstm_nodes=m.num_layers)
    inputs = [args[0], *args[1]] if given_state else [args[0]]
    compare(run_onnxruntime(proto, inputs), expected)


def test_export_unbatched(dynamo):
    m = make_model(bidirectional=True)
    x = sequence(m)[:, 0]
    with torch.no_grad():
        expected = flat(m(x))
    proto = export(m, (x,), dynamo)
    assert_lstm_graph(proto, lstm_nodes=1)
    compare(run_onnxruntime(proto, [x]), expected)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_export_with_options_nn_lstm_lacks(dynamo, backend):
    # forget_bias is in the weights (so it changes the forward and must reach the export),
    # bptt_clip acts on gradients only, backend picks the kernels: all export as the same LSTM
    m = make_model(num_layers=2, forget_bias=3.0, bptt_clip=0.5, backend=backend)
    assert torch.all(m.bias_ih_l1[H:2 * H] == 3.0)
    x = sequence(m)
    with torch.no_grad():
        expected = flat(m(x))
    proto = export(m, (x,), dynamo)
    assert_lstm_graph(proto, lstm_nodes=2)
    compare(run_onnxruntime(proto, [x]), expected)


def test_export_inside_record_gradient_flow(dynamo):
    # the recorder's probes exist for the backward; an export records nothing and is unchanged
    model = nn.Sequential(make_model())
    x = sequence(model[0])
    with torch.no_grad():
        expected = flat(model(x))
    with lstm_fused.record_gradient_flow(model) as flow:
        proto = export(model, (x,), dynamo)
    assert len(flow) == 0
    compare(run_onnxruntime(proto, [x]), expected)


def test_nothing_changes_outside_an_export(dynamo):
    m = make_model()
    x = sequence(m)
    export(m, (x,), dynamo)
    assert not module._in_onnx_export()
    # torch.export outside torch.onnx.export keeps the fused op (README: torch.export)
    program = torch.export.export(m, (x,))
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert torch.ops.lstm_fused.layer_forward.default in targets
    assert torch.ops.aten.lstm.input not in targets


def test_legacy_dynamic_axes():
    m = make_model(num_layers=2, bidirectional=True, batch_first=True)
    x, (h0, c0) = sequence(m), state(m)
    proto = export(m, (x, (h0, c0)), dynamo=False, input_names=["x", "h0", "c0"],
                   output_names=["output", "h_n", "c_n"],
                   dynamic_axes={"x": {0: "batch", 1: "time"}, "h0": {1: "batch"},
                                 "c0": {1: "batch"}, "output": {0: "batch", 1: "time"},
                                 "h_n": {1: "batch"}, "c_n": {1: "batch"}})
    x2, (h2, c2) = sequence(m, steps=T + 4, batch=B + 2, seed=5), state(m, batch=B + 2, seed=6)
    with torch.no_grad():
        expected = flat(m(x2, (h2, c2)))
    compare(run_onnxruntime(proto, [x2, h2, c2]), expected)


class _Packed(nn.Module):
    """pack_padded_sequence -> LSTM -> pad_packed_sequence, the pair the legacy exporter
    turns into ONNX LSTM's sequence_lens (as for nn.LSTM)."""

    def __init__(self, lstm, enforce_sorted):
        super().__init__()
        self.lstm, self.enforce_sorted = lstm, enforce_sorted

    def forward(self, x, lengths, *hx):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=self.enforce_sorted)
        output, (h_n, c_n) = self.lstm(packed, hx or None)
        output, _ = pad_packed_sequence(output, total_length=x.shape[0])
        return output, h_n, c_n


@pytest.mark.parametrize("enforce_sorted, given_state", [(True, False), (False, True)],
                         ids=["sorted", "unsorted-h0c0"])
def test_legacy_export_packed(enforce_sorted, given_state):
    m = make_model(bidirectional=True)
    lengths = torch.tensor([T, T - 2, 2] if enforce_sorted else [T - 2, T, 2])
    x = sequence(m)
    hx = state(m) if given_state else ()
    model = _Packed(m, enforce_sorted).eval()
    with torch.no_grad():
        expected = list(model(x, lengths, *hx))
    proto = export(model, (x, lengths, *hx), dynamo=False)
    assert_lstm_graph(proto, lstm_nodes=1)
    compare(run_onnxruntime(proto, [x, lengths, *hx]), expected)


@requires_onnxscript
def test_dynamo_export_packed_raises():
    # torch.export cannot capture PackedSequence input (nn.LSTM fails there too); the error
    # says so and names the exporter that can
    model = _Packed(make_model(), enforce_sorted=True).eval()
    with pytest.raises(RuntimeError, match=r"PackedSequence input.*dynamo=False\) exports it"):
        export(model, (sequence(model.lstm), torch.tensor([T, T - 2, 2])), dynamo=True)


def test_proj_size_raises(dynamo):
    # ONNX's LSTM has no projection; nn.LSTM's legacy export raises, its dynamo export
    # writes a model onnxruntime rejects. Ours raises with either exporter (the dynamo
    # exporter retries with strict torch.export, which must raise the same error).
    m = lstm_fused.LSTM(I, H, proj_size=4).eval()
    with pytest.raises(RuntimeError, match="ONNX export of proj_size > 0 is not supported"):
        export(m, (sequence(m),), dynamo)


@pytest.mark.parametrize("kw", [dict(layer_norm=True), dict(zoneout=0.1),
                                dict(recurrent_dropout=0.2), dict(residual=True, num_layers=2)],
                         ids=["layer_norm", "zoneout", "recurrent_dropout", "residual"])
def test_cell_variants_raise(kw, dynamo):
    # ONNX's LSTM has none of them: a clear error, not an export of another model
    m = lstm_fused.LSTM(I, H, **kw).eval()
    with pytest.raises(RuntimeError, match="ONNX export of layer_norm, recurrent_dropout, "
                                           "zoneout or residual is not supported"):
        export(m, (sequence(m),), dynamo)
