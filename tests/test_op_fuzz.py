"""Fuzzing the raw ops (hypothesis): `torch.ops.lstm_fused.layer_forward` / `layer_backward`
called directly, the way torch.library users, opcheck and compiled graphs call them, with
well-formed and malformed arguments.

Every example draws a well-formed layer (zero sizes, packed layouts, both directions,
projection, bias or not, clipping, telemetry, the cell variants: layer norm, recurrent
dropout, zoneout with masks or in eval), then at most one change to one argument:
- changes that keep the call valid (a non-contiguous copy of a tensor): the results must
  equal the reference backend's, forward and every gradient (float64, 1e-9);
- changes that make it invalid (a dimension one too large or too small, one too many, the
  wrong dtype, another device in the CUDA twin, bad batch sizes, bad options): the op must
  raise a RuntimeError that names the argument, never crash or return garbage.
Derandomized, so CI sees the same examples on every run. The CUDA twin (marked cuda) runs
the same examples on the GPU, where a tensor moved to the CPU is one more malformation;
bench/gpu_check.sh also runs it under compute-sanitizer memcheck.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lstm_fused import functional
from lstm_fused.options import LayerOptions
from conftest import requires_cuda

pytestmark = pytest.mark.skipif(functional.backend_unavailable_reason("fused") is not None,
                                reason=str(functional.backend_unavailable_reason("fused")))

OPS = torch.ops.lstm_fused
TOL = dict(rtol=1e-9, atol=1e-9)


@st.composite
def layers(draw):
    hidden = draw(st.integers(1, 6))
    layer = dict(
        I=draw(st.integers(0, 5)), H=hidden,
        P=draw(st.sampled_from([0, 0, *range(1, hidden)])),
        bias=draw(st.booleans()), bidirectional=draw(st.booleans()),
        clip=draw(st.sampled_from([(0.0, 0), (0.3, 1), (0.5, 2)])),
        record_flow=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
        # cell variants: layer norm, recurrent dropout, zoneout (c, h) with masks (training)
        # or their expectation (eval)
        layer_norm=draw(st.booleans()), recurrent_dropout=draw(st.booleans()),
        zoneout=draw(st.sampled_from([(0.0, 0.0), (0.0, 0.0), (0.3, 0.0), (0.0, 0.4),
                                      (0.25, 0.5)])),
        training=draw(st.booleans()),
    )
    if draw(st.booleans()):
        lengths = sorted(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)), reverse=True)
        layer["batch_sizes"] = [sum(1 for n in lengths if n > t)
                                for t in range(max(lengths, default=0))]
    else:
        layer["T"], layer["B"] = draw(st.integers(0, 5)), draw(st.integers(0, 4))
    return layer


def build(layer, device):
    """The forward's arguments of a well-formed layer (float64), as a dict by name."""
    gen = torch.Generator().manual_seed(layer["seed"])
    H, I = layer["H"], layer["I"]
    P = layer["P"] or H
    D = 2 if layer["bidirectional"] else 1

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    params = []
    for _ in range(D):
        params += [rand(4 * H, I) * 0.5, rand(4 * H, P) * 0.5]
        if layer["bias"]:
            params += [rand(4 * H), rand(4 * H)]
        if layer["P"]:
            params.append(rand(P, H) * 0.5)
        if layer["layer_norm"]:
            params += [1 + 0.3 * rand(4 * H), 1 + 0.3 * rand(4 * H), 1 + 0.3 * rand(H),
                       0.3 * rand(H)]
    if "batch_sizes" in layer:
        sizes = layer["batch_sizes"]
        batch_sizes = torch.tensor(sizes, dtype=torch.int64)
        x, B, T = rand(sum(sizes), I), (sizes[0] if sizes else 0), len(sizes)
    else:
        T, B = layer["T"], layer["B"]
        batch_sizes, x = None, rand(T, B, I)
    options = LayerOptions(has_biases=layer["bias"], has_proj=bool(layer["P"]),
                           bidirectional=layer["bidirectional"], bptt_clip=layer["clip"][0],
                           bptt_clip_mode=layer["clip"][1], layer_norm=layer["layer_norm"],
                           recurrent_dropout=layer["recurrent_dropout"],
                           zoneout_cell=layer["zoneout"][0], zoneout_hidden=layer["zoneout"][1],
                           training=layer["training"])
    probe = torch.zeros(D, T, 3, dtype=torch.float64, device=device) if layer["record_flow"] \
        else None
    hx, cx = rand(D, B, P), rand(D, B, H)
    masks = []
    for name, shape in zip(options.mask_names(), options.mask_shapes(B, x.shape[0] if
                                                                     "batch_sizes" in layer
                                                                     else T * B, H, P)):
        keep = 0.6 if name == "recurrent_dropout_mask" else 0.5
        draws = (torch.rand(shape, generator=gen, dtype=torch.float64) < keep).double()
        masks.append((draws / keep if name == "recurrent_dropout_mask" else draws).to(device))
    return dict(input=x, hx=hx, cx=cx, params=params, batch_sizes=batch_sizes,
                flow_probe=probe, options=options, masks=masks)


FORWARD_TARGETS = ["input", "hx", "cx", "params", "batch_sizes", "flow_probe", "options",
                   "masks"]
BACKWARD_TARGETS = ["grad_output", "grad_hy", "grad_cy", "output", "gates", "cells", "products"]
# what a clear error about each argument says (its name, or nn.LSTM's words for it)
NAMES = {
    "input": r"input|hidden state dtype|batch_sizes|hidden\[",
    "hx": r"hidden\[0\]|hidden state dtype|hidden tensors",
    "cx": r"hidden\[1\]|hidden state dtype|hidden tensors",
    "params": r"params\[|parameter|hidden\[|input.size\(-1\)",
    "batch_sizes": r"batch_sizes|hidden\[|packed input",
    "flow_probe": r"flow_probe",
    "options": r"options|bptt_clip|mask",
    "masks": r"mask",
    "grad_output": r"grad_output", "grad_hy": r"grad_hy", "grad_cy": r"grad_cy",
    "output": r"output", "gates": r"gates", "cells": r"cells", "products": r"products",
}


@st.composite
def changes(draw, backward):
    """None (well-formed), or (target, kind, detail) for one argument."""
    if draw(st.integers(0, 4)) == 0:
        return None
    target = draw(st.sampled_from(FORWARD_TARGETS + (BACKWARD_TARGETS if backward else [])))
    if target == "options":
        return target, draw(st.sampled_from(["length", "mode", "negative clip", "flag",
                                             "zoneout"])), None
    if target == "masks":
        kind = draw(st.sampled_from(["grow", "shrink", "extra dim", "dtype", "strided", "device",
                                     "one more", "one less"]))
        return target, kind, (draw(st.integers(0, 7)), draw(st.integers(0, 3)))
    if target == "batch_sizes":
        return target, draw(st.sampled_from(["increasing", "negative", "sum", "dtype", "2-D",
                                             "device"])), None
    kind = draw(st.sampled_from(["grow", "shrink", "extra dim", "dtype", "strided", "device"]))
    return target, kind, (draw(st.integers(0, 7)), draw(st.integers(0, 3)))


def _strided(t):
    """A non-contiguous copy of t with the same values."""
    wide = torch.empty(*t.shape, 2, dtype=t.dtype, device=t.device)
    out = wide.select(-1, 0)
    out.copy_(t)
    return out


def _reshaped(t, kind, dim, other_device):
    """t changed by `kind`; None when the change does not apply to t."""
    if kind == "strided":
        return _strided(t) if t.dim() > 0 and t.numel() > 1 else None
    if kind == "dtype":
        return t.to(torch.float32 if t.dtype == torch.float64 else torch.float64)
    if kind == "device":
        return t.to(other_device) if other_device is not None else None
    if kind == "extra dim":
        return t.unsqueeze(0)
    if t.dim() == 0:
        return None
    dim %= t.dim()
    size = list(t.shape)
    if kind == "shrink":
        if size[dim] == 0:
            return None
        size[dim] -= 1
    else:
        size[dim] += 1
    return torch.zeros(size, dtype=t.dtype, device=t.device)


def apply_change(args, change, other_device):
    """args with the change applied, and whether the call must still succeed; None when the
    change does not apply to this example."""
    if change is None:
        return args, True
    target, kind, detail = change
    args = dict(args)
    if target == "options":
        values = args["options"].to_list()
        if kind == "length":
            values = values[:-1]
        elif kind == "mode":
            values[4] = 7.0
        elif kind == "negative clip":
            values[3] = -1.0
        elif kind == "zoneout":
            values[7] = 1.0
        else:
            values[1] = 0.5
        args["options"] = values
        return args, False
    if target == "batch_sizes":
        sizes = args["batch_sizes"]
        if sizes is None or len(sizes) < 1:
            return None
        if kind == "increasing":
            if len(sizes) < 2 or sizes[0] == sizes[-1] + 1:
                return None
            sizes = sizes.flip(0) + torch.arange(len(sizes))
        elif kind == "negative":
            sizes = sizes.clone()
            sizes[-1] = -1
        elif kind == "sum":
            sizes = sizes.clone()
            sizes[-1] += 1
        elif kind == "dtype":
            sizes = sizes.to(torch.int32)
        elif kind == "2-D":
            sizes = sizes.unsqueeze(0)
        elif other_device is not None:
            sizes = sizes.to(other_device)
        else:
            return None
        args["batch_sizes"] = sizes
        return args, False
    dim, which = detail
    if target == "masks":
        masks = args["masks"]
        if kind == "one more":
            args["masks"] = masks + [args["hx"].clone()]
            return args, False
        if not masks:
            return None
        if kind == "one less":
            args["masks"] = masks[:-1]
            return args, False
        index = which % len(masks)
        changed = _reshaped(masks[index], kind, dim, other_device)
        if changed is None:
            return None
        args["masks"] = [changed if k == index else m for k, m in enumerate(masks)]
        return args, kind == "strided"
    if target == "params":
        index = which % len(args["params"])
        changed = _reshaped(args["params"][index], kind, dim, other_device)
        if changed is None:
            return None
        args["params"] = [changed if k == index else p for k, p in enumerate(args["params"])]
    else:
        if args.get(target) is None:
            return None
        changed = _reshaped(args[target], kind, dim, other_device)
        if changed is None:
            return None
        args[target] = changed
    return args, kind == "strided"


def _forward(args):
    options = args["options"]
    return OPS.layer_forward(args["input"], args["hx"], args["cx"], args["params"],
                             args["batch_sizes"], args["flow_probe"],
                             options.to_list() if isinstance(options, LayerOptions) else options,
                             args["masks"])


def _backward(args, record_flow):
    options = args["options"]
    return OPS.layer_backward(
        args["grad_output"], args["grad_hy"], args["grad_cy"], args["input"], args["hx"],
        args["cx"], args["params"], args["output"], args["gates"], args["cells"],
        args["products"], args["batch_sizes"], record_flow,
        options.to_list() if isinstance(options, LayerOptions) else options, args["masks"])


def _reference(args, grads, record_flow):
    """Outputs of the reference layer and, given output gradients, every input gradient and
    the telemetry."""
    leaves = [t.detach().requires_grad_() for t in (args["input"], args["hx"], args["cx"],
                                                    *args["params"])]
    probe = args["flow_probe"].detach().clone().requires_grad_() if record_flow else None
    outs = functional.BACKENDS["reference"](leaves[0], leaves[1], leaves[2], leaves[3:],
                                            args["batch_sizes"], probe, args["options"],
                                            args["masks"])
    if grads is None:
        return [o.detach() for o in outs]
    # (outputs that depend on no input, e.g. of an empty sequence, have no graph)
    given_ = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    inputs = leaves + ([probe] if record_flow else [])
    result = (torch.autograd.grad([o for o, _ in given_], inputs, [g for _, g in given_],
                                  allow_unused=True) if given_ else [None] * len(inputs))
    return [torch.zeros_like(t) if g is None else g for g, t in zip(result, inputs)]


def _expect_clear_error(call, target):
    with pytest.raises(RuntimeError) as error:
        call()
    message = str(error.value).splitlines()[0]
    assert re.search(NAMES[target], message), (target, message)


def fuzz_one(layer, change, device, other_device):
    args = build(layer, device)
    record_flow = layer["record_flow"]
    backward = change is not None and change[0] in BACKWARD_TARGETS
    if not backward:
        applied = apply_change(args, change, other_device)
        if applied is None:
            return
        args, valid = applied
        if not valid:
            _expect_clear_error(lambda: _forward(args), change[0])
            return
    output, hy, cy, gates, cells, products = _forward(args)
    want = _reference(args, None, False)
    for got, ref in zip((output, hy, cy), want):
        torch.testing.assert_close(got, ref, **TOL)
    gen = torch.Generator().manual_seed(layer["seed"] + 1)
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device)
             for t in (output, hy, cy)]
    bargs = dict(args, grad_output=grads[0], grad_hy=grads[1], grad_cy=grads[2], output=output,
                 gates=gates, cells=cells, products=products)
    if backward:
        applied = apply_change(bargs, change, other_device)
        if applied is None:
            return
        bargs, valid = applied
        if not valid:
            _expect_clear_error(lambda: _backward(bargs, record_flow), change[0])
            return
    grad_input, grad_hx, grad_cx, grad_params, flow = _backward(bargs, record_flow)
    ref = _reference(args, grads, record_flow)
    got = [grad_input, grad_hx, grad_cx, *grad_params] + ([flow] if record_flow else [])
    assert len(got) == len(ref)
    for k, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, k=k: f"gradient {k}: {m}")


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(layers(), changes(backward=True))
def test_raw_ops_match_the_reference_or_refuse(layer, change):
    fuzz_one(layer, change, "cpu", None)


# fewer under compute-sanitizer (bench/gpu_check.sh sets it), where every launch is slow
CUDA_EXAMPLES = int(os.environ.get("LSTM_FUSED_FUZZ_CUDA_EXAMPLES", "150"))


@requires_cuda
@settings(max_examples=CUDA_EXAMPLES, deadline=None, derandomize=True, database=None)
@given(layers(), changes(backward=True))
def test_raw_ops_cuda_match_the_reference_or_refuse(layer, change):
    """The CUDA twin: the same checks run on the GPU (the driver is shared), plus tensors left
    on the CPU; the reference runs on the GPU too."""
    fuzz_one(layer, change, "cuda", "cpu")


def test_the_reported_overflows_are_refused():
    """The calls that read past their buffers before the boundary checks (AddressSanitizer,
    csrc/cpu/lstm_rows_cpu.h): gates or cells with fewer rows than the sequence, a grad_hy of
    shape (1, 1, 1); and the checks that named no argument."""
    layer = dict(I=3, H=4, P=0, bias=True, bidirectional=False, clip=(0.0, 0),
                 record_flow=False, seed=0, T=5, B=3, layer_norm=False,
                 recurrent_dropout=False, zoneout=(0.0, 0.0), training=False)
    args = build(layer, "cpu")
    output, hy, cy, gates, cells, products = _forward(args)
    base = dict(args, grad_output=torch.ones_like(output), grad_hy=None, grad_cy=None,
                output=output, gates=gates, cells=cells, products=products)
    for name, value, words in (
            ("gates", gates[:, :-3], "gates must have shape"),
            ("cells", cells[:, :-3], "cells must have shape"),
            ("grad_hy", torch.ones(1, 1, 1, dtype=torch.float64), "grad_hy must have shape"),
            ("grad_output", torch.ones(5, 3, 5, dtype=torch.float64), "grad_output must have shape"),
            ("gates", gates.float(), "gates must have dtype")):
        with pytest.raises(RuntimeError, match=words):
            _backward(dict(base, **{name: value}), False)
    bad_bias = [p if k != 2 else p[:3] for k, p in enumerate(args["params"])]
    with pytest.raises(RuntimeError, match=r"params\[2\] \(bias_ih of direction 0\) must have "
                                           r"shape \[16\], got \[3\]"):
        _forward(dict(args, params=bad_bias))
    with pytest.raises(RuntimeError, match="flow_probe must have shape"):
        _forward(dict(args, flow_probe=torch.zeros(1, 4, 3, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="bptt_clip_mode must be"):
        bad_mode = args["options"].to_list()
        bad_mode[4] = 7.0  # bptt_clip_mode
        _forward(dict(args, options=bad_mode))


def test_fake_kernels_refuse_what_the_kernels_refuse():
    """The fake kernels (torch.compile, FakeTensor) check the same arguments."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = dict(I=3, H=4, P=2, bias=True, bidirectional=True, clip=(0.0, 0),
                 record_flow=True, seed=0, T=4, B=2, layer_norm=True, recurrent_dropout=True,
                 zoneout=(0.3, 0.4), training=True)
    args = build(layer, "cpu")
    output, hy, cy, gates, cells, products = _forward(args)
    bad = [
        ("forward", dict(args, params=[p if k != 3 else p[:5] for k, p in enumerate(args["params"])])),
        ("forward", dict(args, flow_probe=torch.zeros(2, 3, 3, dtype=torch.float64))),
        ("forward", dict(args, hx=args["hx"][:, :1])),
        ("backward", dict(args, grad_output=None, grad_hy=torch.ones(1, 1, 1, dtype=torch.float64),
                          grad_cy=None, output=output, gates=gates, cells=cells,
                          products=products)),
        ("backward", dict(args, grad_output=None, grad_hy=None, grad_cy=None, output=output,
                          gates=gates[:, :-1], cells=cells, products=products)),
        ("backward", dict(args, grad_output=None, grad_hy=None, grad_cy=None, output=output,
                          gates=gates, cells=cells, products=products[:, :1])),
        ("forward", dict(args, masks=args["masks"][:2])),
        ("forward", dict(args, masks=[m[:, :1] if k == 2 else m
                                      for k, m in enumerate(args["masks"])])),
        ("forward", dict(args, params=args["params"][:-1] + [args["params"][-1][:2]])),
    ]
    for which, call_args in bad:
        call = (lambda a=call_args: _forward(a)) if which == "forward" else \
            (lambda a=call_args: _backward(a, True))
        with pytest.raises(RuntimeError):
            call()  # the C++ kernel
        with FakeTensorMode(allow_non_fake_inputs=True):
            with pytest.raises(RuntimeError):
                call()  # the fake kernel
