"""Pure-PyTorch LSTM layer: the oracle every fused kernel is tested against.

`lstm_layer` has the exact semantics of the `lstm_fused::layer_forward` op (see
docs/ARCHITECTURE.md) and is differentiable by autograd to any order when neither
gradient clipping nor flow recording is asked for. Gate order i, f, g, o as in nn.LSTM.

Unpacked input is handled as packed data with T equal batch sizes, so there is one code
path: a step works on the `bs = batch_sizes[t]` active rows; the forward direction drops
finished rows as the batch shrinks (their state is that sequence's hy/cy), the reverse
direction adds rows from hx/cx as the batch grows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .options import LAYER_NORM_EPS, LayerOptions

__all__ = ["lstm_layer", "acc_dtype", "FLOW_CHANNELS_PER_SEQUENCE", "sequence_lengths",
           "packed_row_positions"]

# A flow probe (D, T, 3) gets [||dL/dc[t]||, ||dL/dh[t]||, mean f[t]] as its gradient; one of
# (D, T, 5) also gets the sums of squares of dL/dc and dL/dh at k = 0, 1, ... steps before
# each sequence's own last step (channels 3 and 4; docs/ARCHITECTURE.md).
FLOW_CHANNELS_PER_SEQUENCE = 5


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the layer computes in: float32 for 16-bit inputs, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# Both with output shapes that do not depend on batch_sizes' values (B, N given), so that
# they trace under torch.compile.
def sequence_lengths(batch_sizes: Tensor, batch: int) -> Tensor:
    """Length of each of the `batch` sequences of a packing (B,), in its (sorted) row order."""
    return (batch_sizes[:, None] > torch.arange(batch)[None, :]).sum(0)


def packed_row_positions(batch_sizes: Tensor, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """(step t, batch row b) of each of the `rows` packed rows, (N,) each, and the first row
    of every step (T,)."""
    step_ends = batch_sizes.cumsum(0)
    row = torch.arange(rows)
    step_of_row = torch.searchsorted(step_ends, row, right=True)
    step_offsets = step_ends - batch_sizes
    return step_of_row, row - step_offsets[step_of_row], step_offsets


class _Tap(torch.autograd.Function):
    """Identity in the forward; in the backward, clips the gradient of one state tensor
    (h[t] or c[t] of one direction) and reports its norm as the gradient of `probe`.

    The tapped tensor's incoming gradient is the total dL/dh[t] (resp. dL/dc[t]):
    autograd sums every consumer (output, next step, hy/cy) before calling this backward.
    `steps_to_last` (rows,): how many steps each active row is before its sequence's last
    step, for a (D, T, 5) probe (None otherwise).
    """

    @staticmethod
    def forward(ctx, x, probe, d, t, slot, f_mean, clip, mode, steps_to_last):
        ctx.d, ctx.t, ctx.slot, ctx.clip, ctx.mode = d, t, slot, clip, mode
        ctx.f_mean = f_mean
        ctx.steps_to_last = steps_to_last
        ctx.has_probe = probe is not None
        if probe is not None:
            ctx.probe_meta = (probe.shape, probe.dtype, probe.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.clip > 0 and ctx.mode == 1:
            g = g.clamp(-ctx.clip, ctx.clip)
        elif ctx.clip > 0 and ctx.mode == 2:
            # scale = clip / max(norm, clip): exactly 1 when the norm is within the bound
            norm = torch.linalg.vector_norm(g)
            g = g * (ctx.clip / norm.clamp_min(ctx.clip))
        grad_probe = None
        if ctx.has_probe:
            shape, dtype, device = ctx.probe_meta
            grad_probe = torch.zeros(shape, dtype=dtype, device=device)
            # slot 0: ||dL/dc[t]|| (+ mean f[t]), slot 1: ||dL/dh[t]||
            grad_probe[ctx.d, ctx.t, ctx.slot] = torch.linalg.vector_norm(g.detach()).to(dtype)
            if ctx.f_mean is not None:
                grad_probe[ctx.d, ctx.t, 2] = ctx.f_mean.to(dtype)
            if ctx.steps_to_last is not None:
                # channels 3, 4: sums of squares per row, binned by steps to its last step
                row_squares = g.detach().square().sum(1).to(dtype)
                grad_probe[ctx.d, :, 3 + ctx.slot].index_add_(
                    0, ctx.steps_to_last.to(device), row_squares)
        return g, grad_probe, None, None, None, None, None, None, None


def _split_params(params, options: LayerOptions):
    """Per direction a dict of its params by name (LayerOptions.param_names; absent: None)."""
    names = options.param_names()
    n, num_directions = len(names), options.directions
    if len(params) != n * num_directions:
        raise ValueError(
            f"lstm_layer: expected {n * num_directions} parameters "
            f"({num_directions} direction(s) x {n}), got {len(params)}"
        )
    out = []
    for d in range(num_directions):
        named = dict.fromkeys(["bias_ih", "bias_hh", "weight_hr", "layer_norm_ih",
                               "layer_norm_hh", "layer_norm_cell_weight",
                               "layer_norm_cell_bias"])
        named.update(zip(names, params[d * n:(d + 1) * n]))
        out.append(named)
    return out


def _split_masks(masks, options: LayerOptions):
    """The `masks` list by name (LayerOptions.mask_names; absent: None)."""
    names = options.mask_names()
    if len(masks) != len(names):
        raise ValueError(f"lstm_layer: expected {len(names)} masks ({', '.join(names) or 'none'}"
                         f", as the options say), got {len(masks)}")
    named = dict.fromkeys(["recurrent_dropout_mask", "zoneout_cell_mask",
                           "zoneout_hidden_mask"])
    named.update(zip(names, masks))
    return named


def _layer_norm(v: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """LN(v) * weight (+ bias) over the last dimension: mean 0, biased variance, eps 1e-5."""
    return torch.nn.functional.layer_norm(v, v.shape[-1:], weight, bias, LAYER_NORM_EPS)


def _zoneout(keep, previous: Tensor, new: Tensor) -> Tensor:
    """keep * previous + (1 - keep) * new: keep a 0/1 mask (training) or the probability."""
    return keep * previous + (1 - keep) * new


def _direction(x, h0, c0, w, sizes, offsets, reverse, d, probe, clip, mode, lengths,
               options, masks):
    """One direction over packed rows x (N, I). Returns (out (N, P), hy (B, P), cy (B, H)).
    w: the direction's params by name; masks: this direction's masks by name (None when
    absent). lengths: (B,) sequence lengths for a (D, T, 5) probe, else None."""
    T = len(sizes)
    w_hh, w_hr = w["weight_hh"], w["weight_hr"]
    H = w_hh.shape[0] // 4
    gx = x @ w["weight_ih"].t()
    bias = w["bias_ih"] + w["bias_hh"] if w["bias_ih"] is not None else None
    if options.layer_norm:
        gx = _layer_norm(gx, w["layer_norm_ih"], bias)
    elif bias is not None:
        gx = gx + bias
    dropout_mask = masks["recurrent_dropout_mask"]
    # zoneout: per-row masks in training, the probabilities in eval; None: off
    zone_c = masks["zoneout_cell_mask"]
    zone_h = masks["zoneout_hidden_mask"]
    if zone_c is None and options.zoneout_cell > 0 and not options.training:
        zone_c = options.zoneout_cell
    if zone_h is None and options.zoneout_hidden > 0 and not options.training:
        zone_h = options.zoneout_hidden

    def rows_of(keep, t, bs):  # the step's rows of a (N, X) mask, or the probability
        return keep[offsets[t]:offsets[t] + bs] if isinstance(keep, Tensor) else keep

    tapping = probe is not None or (clip > 0 and mode != 0)
    outs: list[Tensor | None] = [None] * T
    if not reverse:
        h, c = h0, c0
        done_h: list[Tensor] = []
        done_c: list[Tensor] = []
        steps = range(T)
    else:
        h = h0[: sizes[-1]] if T else h0
        c = c0[: sizes[-1]] if T else c0
        steps = range(T - 1, -1, -1)
    for t in steps:
        bs = sizes[t]
        if not reverse and bs < h.shape[0]:
            # rows bs.. finished at the previous step: their state is final
            done_h.append(h[bs:])
            done_c.append(c[bs:])
            h, c = h[:bs], c[:bs]
        elif reverse and bs > h.shape[0]:
            h = torch.cat([h, h0[h.shape[0]:bs]], 0)
            c = torch.cat([c, c0[c.shape[0]:bs]], 0)
        h_in = h * dropout_mask[:bs] if dropout_mask is not None else h
        recurrent = h_in @ w_hh.t()
        if options.layer_norm:
            recurrent = _layer_norm(recurrent, w["layer_norm_hh"])
        g = gx[offsets[t]:offsets[t] + bs] + recurrent
        i = torch.sigmoid(g[:, 0 * H:1 * H])
        f = torch.sigmoid(g[:, 1 * H:2 * H])
        gg = torch.tanh(g[:, 2 * H:3 * H])
        o = torch.sigmoid(g[:, 3 * H:4 * H])
        # the new cell (the plain LSTM's, before zoneout): what the telemetry and the
        # clipping see as c[t]
        c_new = f * c + i * gg
        steps_to_last = lengths[:bs] - 1 - t if lengths is not None else None
        if tapping:
            f_mean = None
            if probe is not None:
                f_mean = f.detach().mean() if f.numel() else f.new_zeros(())
            c_new = _Tap.apply(c_new, probe, d, t, 0, f_mean, clip, mode, steps_to_last)
        if options.layer_norm:
            h_new = o * torch.tanh(_layer_norm(c_new, w["layer_norm_cell_weight"],
                                               w["layer_norm_cell_bias"]))
        else:
            h_new = o * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        c = _zoneout(rows_of(zone_c, t, bs), c, c_new) if zone_c is not None else c_new
        h = _zoneout(rows_of(zone_h, t, bs), h, h_new) if zone_h is not None else h_new
        if tapping:
            h = _Tap.apply(h, probe, d, t, 1, None, clip, mode, steps_to_last)
        outs[t] = h
    if not reverse:
        done_h.append(h)
        done_c.append(c)
        hy = torch.cat(done_h[::-1], 0) if len(done_h) > 1 else done_h[0]
        cy = torch.cat(done_c[::-1], 0) if len(done_c) > 1 else done_c[0]
    else:
        hy, cy = h, c
        if T and hy.shape[0] < h0.shape[0]:
            # batch_sizes[0] < B cannot happen for a valid PackedSequence; keep the rest
            hy = torch.cat([hy, h0[hy.shape[0]:]], 0)
            cy = torch.cat([cy, c0[cy.shape[0]:]], 0)
    if T:
        out = torch.cat(outs, 0) if T > 1 else outs[0]
    else:
        out = x.new_zeros((0, h0.shape[-1]))
    return out, hy, cy


def lstm_layer(input: Tensor, hx: Tensor, cx: Tensor, params,
               batch_sizes: Tensor | None = None, flow_probe: Tensor | None = None,
               options: LayerOptions = LayerOptions(), masks=()):
    """One LSTM layer, all its directions, in plain PyTorch.

    input: (T, B, I) when batch_sizes is None, else packed data (N, I) with batch_sizes an
    int64 CPU tensor (T,), non-increasing. hx (D, B, P), cx (D, B, H). params: per direction
    w_ih (4H, I), w_hh (4H, P), [b_ih (4H), b_hh (4H)], [w_hr (P, H)] as `options` says
    (has_biases, has_proj, bidirectional: lstm_fused.options.LayerOptions).
    Returns (output (T, B, D*P) or (N, D*P), hy (D, B, P), cy (D, B, H)) in the input dtype;
    16-bit inputs are computed in float32.

    options.bptt_clip > 0 with bptt_clip_mode 1 clamps dL/dh[t] and dL/dc[t] element-wise to
    [-clip, clip]; mode 2 rescales each so that its L2 norm over the step's active rows is at
    most clip. flow_probe: a (D, T, 3) tensor with requires_grad=True; its gradient becomes
    [||dL/dc[t]||, ||dL/dh[t]||, mean f[t]] per direction and step, measured after clipping;
    a (D, T, 5) one also gets FLOW_CHANNELS_PER_SEQUENCE's channels 3 and 4.

    Cell variants (options.layer_norm, recurrent_dropout, zoneout_*, training; the formulas
    are in docs/ARCHITECTURE.md): params then also hold each direction's layer-norm
    parameters, and `masks` the tensors LayerOptions.mask_names names. With zoneout the
    telemetry's and the clipping's dL/dc[t] is the gradient of the new cell c~[t] (before
    zoneout mixes in c[t-1]); dL/dh[t] is that of h[t] (after zoneout).
    """
    bidirectional = options.bidirectional
    bptt_clip_mode = options.clip_mode
    clip = float(options.bptt_clip) if bptt_clip_mode != 0 else 0.0
    D = 2 if bidirectional else 1
    dtype = input.dtype
    acc = acc_dtype(dtype)
    if batch_sizes is None:
        T, B = input.shape[0], input.shape[1]
        sizes = [B] * T
        x = input.reshape(T * B, input.shape[2])
    else:
        sizes = [int(s) for s in batch_sizes.tolist()]
        x = input
    lengths = None
    if flow_probe is not None and flow_probe.shape[-1] == FLOW_CHANNELS_PER_SEQUENCE:
        lengths = (torch.full((B,), T) if batch_sizes is None
                   else sequence_lengths(batch_sizes, hx.shape[1]))
    offsets = [0] * len(sizes)
    for t in range(1, len(sizes)):
        offsets[t] = offsets[t - 1] + sizes[t - 1]
    x = x.to(acc)
    h0, c0 = hx.to(acc), cx.to(acc)
    named_masks = _split_masks(list(masks), options)
    outs, hys, cys = [], [], []
    for d, named in enumerate(_split_params(params, options)):
        weights = {k: None if v is None else v.to(acc) for k, v in named.items()}
        direction_masks = {k: None if v is None else v[d].to(acc)
                           for k, v in named_masks.items()}
        out, hy, cy = _direction(
            x, h0[d], c0[d], weights, sizes, offsets, d == 1, d, flow_probe, clip,
            bptt_clip_mode, lengths, options, direction_masks)
        outs.append(out)
        hys.append(hy)
        cys.append(cy)
    output = torch.cat(outs, -1) if D > 1 else outs[0]
    if batch_sizes is None:
        output = output.reshape(input.shape[0], input.shape[1], output.shape[-1])
    return output.to(dtype), torch.stack(hys).to(dtype), torch.stack(cys).to(dtype)
