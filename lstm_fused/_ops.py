"""The compiled ops: loading, fake (meta) kernels and autograd.

`torch.ops.lstm_fused.layer_forward` / `layer_backward` are defined in csrc/ops.cpp (schemas in
docs/ARCHITECTURE.md). Here they get fake kernels (shape/dtype propagation for torch.compile
and FakeTensor) and Autograd kernels: layer_forward's backward is the fused `layer_backward`
op, so a compiled graph keeps the fused BPTT loop as one node; forward-mode AD runs the
reference layer; layer_backward refuses to be differentiated. Both work under torch.func;
their batching rules (vmap) are in _vmap.py.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch._functorch.utils import enable_single_level_autograd_function

from . import reference
from ._loader import load_library
from .options import LayerOptions
from .reference import FLOW_CHANNELS_PER_SEQUENCE, acc_dtype  # acc: float32 for 16-bit inputs

load_library()

layer_forward = torch.ops.lstm_fused.layer_forward.default
layer_backward = torch.ops.lstm_fused.layer_backward.default
# the same, for the autograd kernels themselves (the names above may be wrapped by tests)
_LAYER_FORWARD, _LAYER_BACKWARD = layer_forward, layer_backward


# -- checks at the op boundary ---------------------------------------------------------------
# The fake kernels repeat the C++ checks of csrc/ops.cpp (check_layer, check_flow_probe,
# check_backward) with torch._check, so that eager and compiled calls refuse the same
# arguments. What a fake tensor cannot show (the values of batch_sizes) is checked in C++ only.

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _expect(t, name, shape, dtype, device):
    torch._check(t.device == device,
                 lambda: f"lstm_fused: {name} must be on {device} (the input's device), got "
                 f"{t.device}")
    torch._check(t.dtype == dtype,
                 lambda: f"lstm_fused: {name} must have dtype {dtype}, got {t.dtype}")
    torch._check(t.dim() == len(shape),
                 lambda: f"lstm_fused: {name} must have shape {list(shape)}, got {list(t.shape)}")
    for got, want in zip(t.shape, shape):
        torch._check(got == want, lambda: f"lstm_fused: {name} must have shape {list(shape)}, "
                     f"got {list(t.shape)}")


def _param_names(opts):
    return opts.param_names()


def _check_layer(input, hx, cx, params, opts, batch_sizes):
    """Sizes (D, H, P, steps, rows) after the checks of csrc/ops.cpp check_layer."""
    torch._check(input.dtype in _DTYPES, lambda: "lstm_fused: input must be float16, bfloat16, "
                 f"float32 or float64, got {input.dtype}")
    directions = opts.directions
    names = _param_names(opts)
    per_direction = len(names)
    torch._check(
        len(params) == per_direction * directions,
        lambda: f"lstm_fused: expected {per_direction * directions} parameter tensors "
        f"({directions} direction(s) x {per_direction}: {', '.join(names)}), got {len(params)}",
    )
    w_ih = params[0]
    torch._check(w_ih.dim() == 2 and w_ih.shape[0] % 4 == 0 and w_ih.shape[0] > 0,
                 lambda: "lstm_fused: params[0] (weight_ih) must be a 2-D (4*hidden_size, "
                 f"input_size) tensor with hidden_size > 0, got shape {list(w_ih.shape)}")
    hidden, input_size = w_ih.shape[0] // 4, w_ih.shape[1]
    out_size = hidden
    if opts.has_proj:
        proj_index = names.index("weight_hr")
        w_hr = params[proj_index]
        torch._check(w_hr.dim() == 2 and w_hr.shape[0] > 0,
                     lambda: f"lstm_fused: params[{proj_index}] (weight_hr) must be a 2-D "
                     f"(proj_size, hidden_size) tensor with proj_size > 0, got shape "
                     f"{list(w_hr.shape)}")
        out_size = w_hr.shape[0]
    if batch_sizes is None:
        torch._check(input.dim() == 3, lambda: "lstm_fused: input must be 3-D (T, B, input_size), "
                     f"got {input.dim()}-D")
        steps, batch, rows = input.shape[0], input.shape[1], input.shape[0] * input.shape[1]
    else:
        torch._check(batch_sizes.dim() == 1 and batch_sizes.dtype == torch.int64
                     and batch_sizes.device.type == "cpu",
                     lambda: "lstm_fused: batch_sizes must be a 1-D int64 CPU tensor")
        torch._check(input.dim() == 2, lambda: "lstm_fused: packed input must be 2-D "
                     f"(N, input_size), got {input.dim()}-D")
        steps, batch, rows = batch_sizes.shape[0], hx.shape[1], input.shape[0]
    torch._check(input.shape[-1] == input_size,
                 lambda: "lstm_fused: input.size(-1) must be equal to input_size. Expected "
                 f"{input_size}, got {input.shape[-1]}")
    for name, t, size in (("hidden[0]", hx, out_size), ("hidden[1]", cx, hidden)):
        torch._check(t.dim() == 3 and t.shape[0] == directions and t.shape[1] == batch
                     and t.shape[2] == size,
                     lambda: f"lstm_fused: Expected {name} size ({directions}, {batch}, {size}), "
                     f"got {list(t.shape)}")
        torch._check(t.device == input.device,
                     lambda: "Input and hidden tensors are not at the same device, found input "
                     f"tensor at {input.device} and hidden tensor at {t.device}")
        torch._check(t.dtype == input.dtype, lambda: f"lstm_fused: hidden state dtype {t.dtype} "
                     f"does not match input dtype {input.dtype}")
    shapes = {"weight_ih": (4 * hidden, input_size), "weight_hh": (4 * hidden, out_size),
              "bias_ih": (4 * hidden,), "bias_hh": (4 * hidden,), "weight_hr": (out_size, hidden),
              "layer_norm_ih": (4 * hidden,), "layer_norm_hh": (4 * hidden,),
              "layer_norm_cell_weight": (hidden,), "layer_norm_cell_bias": (hidden,)}
    for index, param in enumerate(params):
        torch._check(param.device == input.device,
                     lambda: "Input and parameter tensors are not at the same device, found "
                     f"input tensor at {input.device} and parameter tensor at {param.device}")
        torch._check(param.dtype == input.dtype, lambda: f"lstm_fused: parameter dtype "
                     f"{param.dtype} does not match input dtype {input.dtype}")
        name = names[index % per_direction]
        _expect(param, f"params[{index}] ({name} of direction {index // per_direction})",
                shapes[name], input.dtype, input.device)
    return directions, hidden, out_size, steps, rows


def _check_masks(masks, opts, input, batch, rows, hidden, out_size):
    """The checks of csrc/ops.cpp check_masks."""
    names = opts.mask_names()
    torch._check(len(masks) == len(names),
                 lambda: f"lstm_fused: expected {len(names)} mask tensor(s) "
                 f"({' '.join(names)} as the options say), got {len(masks)}")
    for k, (name, shape) in enumerate(zip(names, opts.mask_shapes(batch, rows, hidden,
                                                                   out_size))):
        _expect(masks[k], f"masks[{k}] ({name})", shape, input.dtype, input.device)


def _products_shape(opts, directions, rows, hidden):
    """layer_forward's `products`: x W_ih^T and the recurrent products, saved for layer
    norm's backward; empty without layer norm."""
    return (directions, 2, rows, 4 * hidden) if opts.layer_norm else (0,)


@torch.library.register_fake("lstm_fused::layer_forward")
def _layer_forward_fake(input, hx, cx, params, batch_sizes, flow_probe, options, masks):
    opts = LayerOptions.from_list(options)
    directions, hidden, out_size, steps, rows = _check_layer(
        input, hx, cx, params, opts, batch_sizes)
    _check_masks(masks, opts, input, hx.shape[1], rows, hidden, out_size)
    acc = acc_dtype(input.dtype)
    if flow_probe is not None:
        channels = (FLOW_CHANNELS_PER_SEQUENCE if flow_probe.dim() == 3
                    and flow_probe.shape[2] == FLOW_CHANNELS_PER_SEQUENCE else 3)
        _expect(flow_probe, "flow_probe", (directions, steps, channels), acc, input.device)
    if batch_sizes is None:
        output = input.new_empty((input.shape[0], input.shape[1], directions * out_size))
    else:
        output = input.new_empty((rows, directions * out_size))
    if opts.inference:  # nothing kept for a backward
        gates, cells, products = (input.new_empty((0,), dtype=acc) for _ in range(3))
    else:
        gates = input.new_empty((directions, rows, 4 * hidden), dtype=acc)
        cells = input.new_empty((directions, rows, hidden), dtype=acc)
        products = input.new_empty(_products_shape(opts, directions, rows, hidden), dtype=acc)
    return output, hx.new_empty(hx.shape), cx.new_empty(cx.shape), gates, cells, products


@torch.library.register_fake("lstm_fused::layer_backward")
def _layer_backward_fake(grad_output, grad_hy, grad_cy, input, hx, cx, params, output, gates,
                         cells, products, batch_sizes, record_flow, options, masks):
    opts = LayerOptions.from_list(options)
    directions, hidden, out_size, steps, rows = _check_layer(
        input, hx, cx, params, opts, batch_sizes)
    acc = acc_dtype(input.dtype)
    output_shape = ((input.shape[0], input.shape[1], directions * out_size) if batch_sizes is None
                    else (rows, directions * out_size))
    _expect(output, "output", output_shape, input.dtype, input.device)
    _expect(gates, "gates", (directions, rows, 4 * hidden), acc, input.device)
    _expect(cells, "cells", (directions, rows, hidden), acc, input.device)
    _expect(products, "products", _products_shape(opts, directions, rows, hidden), acc,
            input.device)
    for name, grad, shape in (("grad_output", grad_output, output_shape),
                              ("grad_hy", grad_hy, hx.shape), ("grad_cy", grad_cy, cx.shape)):
        if grad is not None:
            _expect(grad, name, shape, input.dtype, input.device)
    _check_masks(masks, opts, input, hx.shape[1], rows, hidden, out_size)
    flow_shape = (directions, steps, 3) if record_flow else (0,)
    return (
        input.new_empty(input.shape),
        hx.new_empty(hx.shape),
        cx.new_empty(cx.shape),
        [p.new_empty(p.shape) for p in params],
        input.new_empty(flow_shape, dtype=acc),
    )


class _LayerForwardFunction(torch.autograd.function._SingleLevelFunction):
    """layer_forward's reverse-mode autograd: what the op's Autograd kernel
    (_layer_forward_autograd, below) applies; its backward runs layer_backward.

    The kernel runs inside the dispatcher, where torch.func has already picked the level the
    call belongs to (the top of its interpreter stack), as for any C++ autograd kernel. So
    this is a single-level Function, applied at that level, not a torch.autograd.Function,
    which torch.func would route through its own machinery once more. (The Function that
    torch.library.register_autograd generates is a torch.autograd.Function without
    setup_context, which torch.func.grad/vjp/jacrev refuse: pytorch#168393, #179652.)
    Autograd tracks tensors only as direct arguments: the parameters come last, flattened.
    """

    @staticmethod
    def forward(input, hx, cx, batch_sizes, flow_probe, options, masks, *params):
        with _grad_modes_of_the_caller(), torch._C._AutoDispatchBelowAutograd():
            return _LAYER_FORWARD(input, hx, cx, list(params), batch_sizes, flow_probe, options,
                                  list(masks))

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, hx, cx, batch_sizes, flow_probe, options, masks, *params = inputs
        out, _, _, gates, cells, products = output
        ctx.num_params = len(params)
        ctx.num_masks = len(masks)
        ctx.options = list(options)
        ctx.has_batch_sizes = batch_sizes is not None
        ctx.record_flow = flow_probe is not None and flow_probe.requires_grad
        # (D, T, 5) probes also ask for the flow counted from each sequence's own last step
        ctx.flow_from_last_step = (ctx.record_flow
                                   and flow_probe.shape[-1] == FLOW_CHANNELS_PER_SEQUENCE)
        ctx.only_differentiating_level = _only_differentiating_level()
        saved = [input, hx, cx, out, gates, cells, products, *params, *masks]
        if batch_sizes is not None:
            saved.append(batch_sizes)
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(gates, cells, products)
        # Outputs without a gradient (always gates and cells, often hy/cy) reach the backward
        # as None, not as zeros autograd would allocate ((D, N, 4H) + (D, N, H) every
        # backward); layer_backward takes a missing gradient as zeros.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, grad_hy, grad_cy, _grad_gates, _grad_cells, _grad_products):
        grad_input, grad_hx, grad_cx, grad_params, grad_probe = _backward(
            ctx, grad_output, grad_hy, grad_cy)
        # the masks are constants (functional.lstm detaches them): no gradient
        return grad_input, grad_hx, grad_cx, None, grad_probe, None, None, *grad_params


@contextlib.contextmanager
def _grad_modes_of_the_caller():
    """Inside a Function's forward: grad modes on again (apply switched both off; the
    kernels apply only where grad mode is on), as torch.func's own single-level Functions
    do. Below autograd they matter only to the torch.func levels under the one dispatching
    the call, which must record the op too (the outer grad of grad(grad(f)))."""
    with torch.enable_grad(), torch.autograd.forward_ad._set_fwd_grad_enabled(True):
        yield


def _only_differentiating_level():
    """True when this call is being dispatched at a torch.func grad/vjp level (the top of
    the interpreter stack) with no other grad or jvp level below it (vmaps aside). torch.func
    runs every backward with create_graph=True, but then only that level could differentiate
    the backward, and it never does: the fused backward serves. With two levels (grad of
    grad, jacrev of jacrev, jacfwd of jacrev) the outer one differentiates the inner
    backward, which must be the differentiable one."""
    if not torch._C._are_functorch_transforms_active():
        return False
    grad_type, jvp_type = (torch._C._functorch.TransformType.Grad,
                           torch._C._functorch.TransformType.Jvp)
    stack = torch._C._functorch.get_interpreter_stack() or []
    return (bool(stack) and stack[-1].key() == grad_type
            and sum(i.key() in (grad_type, jvp_type) for i in stack) == 1)


def _is_legacy_batched(tensors):
    return any(t is not None and torch._C._functorch.is_legacy_batchedtensor(t)
               for t in tensors)


def _backward(ctx, grad_output, grad_hy, grad_cy):
    saved = ctx.saved_tensors
    input, hx, cx, out, gates, cells, products = saved[:7]
    params = list(saved[7:7 + ctx.num_params])
    masks = list(saved[7 + ctx.num_params:7 + ctx.num_params + ctx.num_masks])
    batch_sizes = saved[7 + ctx.num_params + ctx.num_masks] if ctx.has_batch_sizes else None
    grads = (grad_output, grad_hy, grad_cy)
    differentiable = torch.is_grad_enabled() and not ctx.only_differentiating_level
    # autograd.grad(is_grads_batched=True), which gradcheck's check_batched_grad uses, runs
    # the backward under torch's legacy vmap, where custom ops get no batching rules: the
    # reference backward is aten ops, which it batches
    differentiable = differentiable or _is_legacy_batched(grads)
    if differentiable:
        # create_graph=True: the fused backward is not itself differentiable, so recompute the
        # layer with the reference implementation and differentiate that (double backward).
        grads = _differentiable_backward(grad_output, grad_hy, grad_cy, input, hx, cx, params,
                                         batch_sizes, LayerOptions.from_list(ctx.options),
                                         masks)
        flow = None
    else:
        grad_input, grad_hx, grad_cx, grad_params, flow = layer_backward(
            grad_output, grad_hy, grad_cy, input, hx, cx, params, out, gates, cells, products,
            batch_sizes, ctx.record_flow, ctx.options, masks)
        grads = (grad_input, grad_hx, grad_cx, grad_params)
    grad_input, grad_hx, grad_cx, grad_params = grads
    grad_probe = flow if ctx.record_flow and flow is not None else None
    if grad_probe is not None and ctx.flow_from_last_step:
        from_last_step = _flow_from_last_step(
            grad_output, grad_hy, grad_cy, input, hx, cx, params, out, gates, cells, products,
            batch_sizes, LayerOptions.from_list(ctx.options), flow, masks)
        grad_probe = torch.cat([flow, from_last_step], -1)
    return grad_input, grad_hx, grad_cx, grad_params, grad_probe


def _flow_from_last_step(grad_output, grad_hy, grad_cy, input, hx, cx, params, out, gates,
                         cells, products, batch_sizes, opts, flow, masks):
    """Sums of squares of [dL/dc, dL/dh] (D, T, 2) over the sequences, at k = 0, 1, ... steps
    before each sequence's own last step (the flow indexes t, where only the longest sequence
    reaches t=T-1).

    One more layer_backward, on the time-reversed layout: every packed sequence reversed
    within its own length (a packing with the same batch_sizes) and the directions swapped
    (the reverse direction over a reversed sequence is the forward direction over the
    sequence). Its flow at step k is taken over the rows k steps before their own last step.
    Exact with element-wise clipping; norm clipping couples the rows of a step, and the
    gradient-flow recorder does not ask for it then.
    """
    if batch_sizes is None:  # every sequence ends at t=T-1
        return flow[..., :2].flip(1).square()
    directions = opts.directions
    rows_total = input.shape[0]
    step_of_row, row_in_step, step_offsets = reference.packed_row_positions(batch_sizes,
                                                                             rows_total)
    lengths = reference.sequence_lengths(batch_sizes, hx.shape[1])
    # realigned packed row (k, b) holds the original row (lengths[b] - 1 - k, b)
    source = (step_offsets[lengths[row_in_step] - 1 - step_of_row] + row_in_step).to(input.device)
    # realigned direction j runs original direction order[j]; one direction is run twice
    # (as both directions of a bidirectional call): only the reverse one is read
    order = [1, 0] if opts.bidirectional else [0, 0]
    per_direction = len(params) // directions

    def columns(t):  # (N, D*P) per-direction columns, reordered
        if t is None:
            return None
        t = t[source].view(rows_total, directions, -1)[:, order]
        return t.reshape(rows_total, -1)

    def by_direction(t):
        return None if t is None else t[order]

    realigned_params = [p for d in order
                        for p in params[d * per_direction:(d + 1) * per_direction]]
    # masks by direction; the (D, N, .) zoneout masks also by row (the recurrent-dropout
    # mask is per batch row, which the realignment keeps)
    realigned_masks = [m[order] if name == "recurrent_dropout_mask" else m[order][:, source]
                       for name, m in zip(opts.mask_names(), masks)]
    *_, realigned_flow = layer_backward(
        columns(grad_output), by_direction(grad_hy), by_direction(grad_cy), input[source],
        hx[order], cx[order], realigned_params, columns(out), gates[order][:, source],
        cells[order][:, source], products[order][:, :, source] if opts.layer_norm else products,
        batch_sizes, True,
        dataclasses.replace(opts, bidirectional=True).to_list(), realigned_masks)
    # original direction 0 ran as realigned direction 1, direction 1 as 0
    return realigned_flow[[1, 0][:directions], :, :2].square()


def _reference_layer(batch_sizes, opts, masks=()):
    def layer(input, hx, cx, *params):
        return reference.lstm_layer(input, hx, cx, params, batch_sizes=batch_sizes, options=opts,
                                    masks=masks)
    return layer


def _check_no_taps_under_functorch(opts):
    # the reference's clipping and flow taps are autograd.Functions of the old style, which
    # torch.func refuses; the fused path (one torch.func level) clips in the kernel
    if torch._C._are_functorch_transforms_active() and opts.clip_mode != 0:
        raise NotImplementedError(
            "lstm_fused: bptt_clip under nested torch.func transforms (grad of grad, hessian) "
            "is not supported: the differentiable backward is the reference's, whose clipping "
            "does not run under torch.func")


def _differentiable_backward(grad_output, grad_hy, grad_cy, input, hx, cx, params,
                             batch_sizes, opts, masks):
    """The layer's vjp through the reference implementation, itself differentiable."""
    inputs = [input, hx, cx, *params]
    layer = _reference_layer(batch_sizes, opts, masks)
    # a backward inside an autocast region runs with autocast on: recompute in the saved
    # tensors' dtypes, as layer_backward does (csrc/ops.cpp excludes autocast there)
    with torch.enable_grad(), torch.autocast(input.device.type, enabled=False):
        if torch._C._are_functorch_transforms_active():
            # inside a torch.func transform: its own vjp (requires_grad_ is refused there)
            _check_no_taps_under_functorch(opts)
            outs, vjp_fn = torch.func.vjp(layer, *inputs)
            grads = vjp_fn(tuple(torch.zeros_like(o) if g is None else g
                                 for o, g in zip(outs, (grad_output, grad_hy, grad_cy))))
        else:
            # Tensors that do not require grad still need a graph to differentiate through.
            leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in inputs]
            out, hy, cy = layer(*leaves)
            given = [(o, g) for o, g in zip((out, hy, cy), (grad_output, grad_hy, grad_cy))
                     if g is not None]
            grads = torch.autograd.grad([o for o, _ in given], leaves, [g for _, g in given],
                                        create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    return grads[0], grads[1], grads[2], grads[3:]


class _LayerBackwardFunction(torch.autograd.function._SingleLevelFunction):
    """layer_backward under autograd (its Autograd kernel, below). The fused BPTT pass has
    no derivative of its own; its results are differentiated through the reference: the vjp
    of the reference layer's vjp, with respect to the incoming gradients, input, hx, cx and
    the parameters (output, gates and cells are functions of those, so they get none).

    Under a single torch.func grad level the layer's backward is this op (_backward), and
    ordinary autograd may differentiate its results once more (torch.compile of
    torch.func.grad does, parameters that require grad make it possible in eager)."""

    @staticmethod
    def forward(grad_output, grad_hy, grad_cy, input, hx, cx, output, gates, cells, products,
                batch_sizes, record_flow, options, masks, *params):
        with _grad_modes_of_the_caller(), torch._C._AutoDispatchBelowAutograd():
            grad_input, grad_hx, grad_cx, grad_params, flow = _LAYER_BACKWARD(
                grad_output, grad_hy, grad_cy, input, hx, cx, list(params), output, gates,
                cells, products, batch_sizes, record_flow, options, list(masks))
        return grad_input, grad_hx, grad_cx, flow, *grad_params

    @staticmethod
    def setup_context(ctx, inputs, output):
        (grad_output, grad_hy, grad_cy, input, hx, cx, _output, _gates, _cells, _products,
         batch_sizes, _record_flow, options, masks, *params) = inputs
        ctx.given = [g is not None for g in (grad_output, grad_hy, grad_cy)]
        ctx.num_params = len(params)
        ctx.options = list(options)
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(grad_output, grad_hy, grad_cy, *masks, input, hx, cx, *params)
        ctx.num_masks = len(masks)
        ctx.mark_non_differentiable(output[3])  # the flow norms
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gg_input, gg_hx, gg_cx, _gg_flow, *gg_params):
        grad_output, grad_hy, grad_cy, *rest = ctx.saved_tensors
        masks, inputs = rest[:ctx.num_masks], rest[ctx.num_masks:]
        layer = _reference_layer(ctx.batch_sizes, LayerOptions.from_list(ctx.options), masks)
        grads = [torch.zeros_like(o) if g is None else g
                 for o, g in zip(_reference_output_likes(inputs, ctx.batch_sizes),
                                 (grad_output, grad_hy, grad_cy))]
        ggs = [torch.zeros_like(t) if g is None else g
               for t, g in zip(inputs, (gg_input, gg_hx, gg_cx, *gg_params))]
        with torch.autocast(inputs[0].device.type, enabled=False):
            if torch._C._are_functorch_transforms_active():
                _check_no_taps_under_functorch(LayerOptions.from_list(ctx.options))

                def first_order(grads, inputs):
                    outs, vjp_fn = torch.func.vjp(layer, *inputs)
                    return vjp_fn(tuple(grads))

                _, vjp_fn = torch.func.vjp(first_order, grads, inputs)
                d_grads, d_inputs = vjp_fn(tuple(ggs))
            else:
                create_graph = torch.is_grad_enabled()
                with torch.enable_grad():
                    grad_leaves = [g.detach().requires_grad_() for g in grads]
                    leaves = [t.detach().requires_grad_() for t in inputs]
                    first = torch.autograd.grad(layer(*leaves), leaves, grad_leaves,
                                                create_graph=True, allow_unused=True)
                    used = [(f, g) for f, g in zip(first, ggs) if f is not None]
                    second = torch.autograd.grad([f for f, _ in used], grad_leaves + leaves,
                                                 [g for _, g in used], allow_unused=True,
                                                 create_graph=create_graph)
                d_grads, d_inputs = second[:3], second[3:]
        d_grads = [d if given else None for d, given in zip(d_grads, ctx.given)]
        d_input, d_hx, d_cx, *d_params = d_inputs
        # output, gates, cells, products, batch_sizes, record_flow, options, masks: none
        return (*d_grads, d_input, d_hx, d_cx, *([None] * 8), *d_params)


def _reference_output_likes(inputs, batch_sizes):
    """Tensors shaped like the layer's (output, hy, cy) for `inputs` (input, hx, cx, ...)."""
    input, hx, cx, w_ih, *_ = inputs
    directions, out_size = hx.shape[0], hx.shape[2]
    if batch_sizes is None:
        output = input.new_empty((input.shape[0], input.shape[1], directions * out_size))
    else:
        output = input.new_empty((input.shape[0], directions * out_size))
    return output, hx, cx


def _layer_backward_autograd(keyset, grad_output, grad_hy, grad_cy, input, hx, cx, params,
                             output, gates, cells, products, batch_sizes, record_flow, options,
                             masks):
    args = (grad_output, grad_hy, grad_cy, input, hx, cx, output, gates, cells)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args, *params):
        with enable_single_level_autograd_function():
            grad_input, grad_hx, grad_cx, flow, *grad_params = _LayerBackwardFunction.apply(
                *args, products, batch_sizes, record_flow, options, masks, *params)
        return grad_input, grad_hx, grad_cx, grad_params, flow
    with torch._C._AutoDispatchBelowAutograd():
        return _LAYER_BACKWARD.redispatch(keyset & torch._C._after_autograd_keyset, *args[:6],
                                         params, *args[6:], products, batch_sizes, record_flow,
                                         options, masks)


def _has_tangents(tensors):
    """Whether forward-mode AD is differentiating this call: a torch.func jvp level the
    call is at, or ordinary forward AD with a dual tensor among `tensors`."""
    if torch._C._are_functorch_transforms_active():
        top = torch._C._functorch.peek_interpreter_stack()
        if top is not None and top.key() == torch._C._functorch.TransformType.Jvp:
            level = top.level()
            return any(t is not None and torch._C._functorch.maybe_get_level(t) == level
                       for t in tensors)
    if torch.autograd.forward_ad._current_level >= 0:  # inside a forward_ad.dual_level()
        return any(t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent
                   is not None for t in tensors)
    return False


def _forward_mode_layer(input, hx, cx, params, batch_sizes, flow_probe, options, masks):
    """layer_forward under forward-mode AD (jvp, jacfwd): the fused kernels have no
    forward-mode pass, so the layer is the reference one, in aten ops that carry the
    tangents at this level (and, in ordinary autograd, a reverse-mode graph with the flow
    probe and clipping). gates and cells, outputs for the backward only, come from the fused
    op."""
    opts = LayerOptions.from_list(options)
    if torch._C._are_functorch_transforms_active():
        # a jvp level: tangents are the forward's derivative, which BPTT clipping and flow
        # probes (reverse-mode only; their taps do not run under torch.func) leave alone
        opts, flow_probe = dataclasses.replace(opts, bptt_clip=0.0, bptt_clip_mode=0), None
    out, hy, cy = reference.lstm_layer(input, hx, cx, params, batch_sizes=batch_sizes,
                                       flow_probe=flow_probe, options=opts, masks=masks)
    with torch._C._AutoDispatchBelowAutograd(), torch.autograd.forward_ad._set_fwd_grad_enabled(
            False):
        *_, gates, cells, products = _LAYER_FORWARD(input, hx, cx, params, batch_sizes, None,
                                                    options, masks)
    return out, hy, cy, gates.detach(), cells.detach(), products.detach()


# the slot of LayerOptions.inference in the ops' options list
INFERENCE_SLOT = [f.name for f in dataclasses.fields(LayerOptions)].index("inference")


def saving_options(options):
    """`options` with inference off: the call keeps what its backward reads."""
    if not options[INFERENCE_SLOT]:
        return options
    options = list(options)
    options[INFERENCE_SLOT] = 0.0
    return options


def _layer_forward_autograd(keyset, input, hx, cx, params, batch_sizes, flow_probe, options,
                            masks):
    """The op's Autograd kernel: under forward-mode AD the reference layer, when a gradient
    is needed _LayerForwardFunction (at the torch.func level being dispatched, if any), else
    the op below autograd. Where it records the call for a backward, the call keeps what the
    backward reads whatever LayerOptions.inference says (the caller cannot always tell)."""
    if _has_tangents((input, hx, cx, *params)):
        options = saving_options(options)
        return _forward_mode_layer(input, hx, cx, params, batch_sizes, flow_probe, options,
                                   masks)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(input, hx, cx, flow_probe,
                                                               *params):
        with enable_single_level_autograd_function():
            return _LayerForwardFunction.apply(input, hx, cx, batch_sizes, flow_probe,
                                               saving_options(options), masks, *params)
    with torch._C._AutoDispatchBelowAutograd():
        return _LAYER_FORWARD.redispatch(keyset & torch._C._after_autograd_keyset, input, hx, cx,
                                        params, batch_sizes, flow_probe, options, masks)


_autograd_lib = torch.library.Library("lstm_fused", "IMPL")
_autograd_lib.impl("layer_forward", _layer_forward_autograd, "Autograd", with_keyset=True)
_autograd_lib.impl("layer_backward", _layer_backward_autograd, "Autograd", with_keyset=True)

from . import _vmap  # noqa: E402,F401 - the batching rules (torch.func.vmap) of both ops


# Autocast: like aten's RNN kernels under autocast (mkldnn_rnn_layer on the CPU, _cudnn_rnn on
# CUDA), the forward runs in the lower-precision dtype: input, hx, cx and the weights are cast
# to the autocast dtype of the device, except float64 and non-floating tensors (autocast's own
# eligibility rule). Unlike torch.library.register_autocast, which bakes in one dtype, the dtype
# is read at call time (torch.autocast(..., dtype=...)). flow_probe keeps its dtype. The module
# (module.py) casts before it calls functional.lstm with autocast off, so this kernel serves
# callers of functional.lstm / the op itself. The backward op needs none: its inputs already
# have matching dtypes.
_autocast_lib = torch.library.Library("lstm_fused", "IMPL")


def _register_autocast(device_type: str, dispatch_key: str) -> None:
    def cast(t):
        eligible = (t.is_floating_point() and t.device.type == device_type
                    and t.dtype != torch.float64)
        return t.to(torch.get_autocast_dtype(device_type)) if eligible else t

    def layer_forward_autocast(input, hx, cx, params, batch_sizes, flow_probe, options, masks):
        with torch.autocast(device_type, enabled=False):
            return layer_forward(cast(input), cast(hx), cast(cx), [cast(p) for p in params],
                                 batch_sizes, flow_probe, options, [cast(m) for m in masks])

    _autocast_lib.impl("layer_forward", layer_forward_autocast, dispatch_key)


_register_autocast("cpu", "AutocastCPU")
_register_autocast("cuda", "AutocastCUDA")

