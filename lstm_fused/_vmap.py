"""Batching rules (torch.func.vmap) for the two ops, `torch.library.register_vmap`.

A vmap over the data (input, hx, cx; jacrev's and per-sample-gradient cotangents) and one
over the parameters (an ensemble: `stack_module_state` + `functional_call`) are different
problems:

- layer_forward with unbatched parameters folds the vmap dimension V into the LSTM batch:
  sequence b of vmap element v becomes sequence b*V + v of one call with V*B sequences. In
  that order every (T, V*B, .) or packed (N*V, .) row of the folded call is row r*V + v, r the
  element's own row, so for packed input the packing stays valid with batch_sizes * V (each
  step's active sequences are still a prefix of the batch) and every output, gates and cells
  included, unfolds as a view with the vmap dimension right after the row (or batch) one.
- Batched parameters cannot fold into the batch: every element has its own weights. The rule
  loops over the vmap dimension, one op call per element. So does layer_backward always:
  folding its rows would sum the weight gradients over the vmap elements, and the op has no
  way to keep them apart.

Both rules refuse a vmapped batch_sizes (one packing per vmap element has no single folded
layout) and flow probes (gradient-flow norms are over a whole batch, not per vmap element).
"""

from __future__ import annotations

import torch

__all__: list[str] = []


def _refuse(batch_sizes_dim, what):
    if batch_sizes_dim is not None:
        raise NotImplementedError(
            f"lstm_fused: {what} under torch.func.vmap with a vmapped batch_sizes (one packing "
            "per vmap element) is not supported; vmap over the packed data with one "
            "batch_sizes for all elements")


def _select(t, dim, v):
    return t if dim is None or t is None else t.select(dim, v)


def _stack(results):
    """Stack per-element op results (tuples whose entries are tensors or lists of tensors)
    along a new dimension 0; out_dims of the same structure."""
    stacked, dims = [], []
    for entry in zip(*results):
        if isinstance(entry[0], (list, tuple)):
            stacked.append([torch.stack(parts) for parts in zip(*entry)])
            dims.append([0] * len(entry[0]))
        else:
            stacked.append(torch.stack(entry))
            dims.append(0)
    return tuple(stacked), tuple(dims)


def _fold(t, dim, batch_axis, size):
    """Per-element tensor t (vmap dim `dim`, or None: shared by all elements) folded into
    its axis `batch_axis`: (..., B, ...) per element -> (..., B*V, ...), element v of
    sequence b at b*V + v."""
    if dim is None:
        t = t.unsqueeze(batch_axis + 1).expand(
            *t.shape[:batch_axis + 1], size, *t.shape[batch_axis + 1:])
    else:
        t = t.movedim(dim, batch_axis + 1)
    return t.reshape(*t.shape[:batch_axis], -1, *t.shape[batch_axis + 2:])


def _unfold(t, batch_axis, size):
    """The inverse of _fold as a view: (..., B*V, ...) -> (..., B, V, ...), vmap dim
    batch_axis + 1."""
    return t.unflatten(batch_axis, (-1, size)), batch_axis + 1


@torch.library.register_vmap("lstm_fused::layer_forward")
def _layer_forward_vmap(info, in_dims, input, hx, cx, params, batch_sizes, flow_probe,
                        options, masks):
    x_dim, hx_dim, cx_dim, param_dims, bs_dim, _, _, mask_dims = in_dims
    _refuse(bs_dim, "layer_forward")
    if flow_probe is not None:
        raise NotImplementedError(
            "lstm_fused: gradient-flow recording (record_gradient_flow) under torch.func.vmap "
            "is not supported")
    size = info.batch_size
    op = torch.ops.lstm_fused.layer_forward.default
    if any(d is not None for d in param_dims):
        # an ensemble: one call per element
        results = [op(_select(input, x_dim, v), _select(hx, hx_dim, v),
                      _select(cx, cx_dim, v),
                      [_select(p, d, v) for p, d in zip(params, param_dims)], batch_sizes,
                      None, options, [_select(m, d, v) for m, d in zip(masks, mask_dims)])
                   for v in range(size)]
        return _stack(results)
    packed = batch_sizes is not None
    # input (T, B, I): fold axis 1; packed data (N, I): rows, axis 0
    folded_input = _fold(input, x_dim, 0 if packed else 1, size)
    folded_bs = batch_sizes * size if packed else None
    # the cell variants' masks fold as the rows they belong to: the recurrent-dropout mask
    # (D, B, P) as hx (axis 1, the batch), the zoneout masks (D, N, .) as gates (axis 1, rows)
    folded_masks = [_fold(m, d, 1, size) for m, d in zip(masks, mask_dims)]
    out, hy, cy, gates, cells, products = op(folded_input, _fold(hx, hx_dim, 1, size),
                                             _fold(cx, cx_dim, 1, size), list(params),
                                             folded_bs, None, options, folded_masks)
    out, out_dim = _unfold(out, 0 if packed else 1, size)
    # (D, B*V, .) states and (D, N*V, .) gates/cells: element v of row r at r*V + v
    (hy, hy_dim), (cy, cy_dim) = _unfold(hy, 1, size), _unfold(cy, 1, size)
    # (inference: empty (0,), the same for every element)
    (gates, gates_dim), (cells, cells_dim) = (
        (_unfold(gates, 1, size), _unfold(cells, 1, size)) if gates.dim() == 3
        else ((gates, None), (cells, None)))
    # layer norm's (D, 2, N*V, 4H) products likewise; without layer norm an empty (0,), the
    # same for every element
    products, products_dim = (_unfold(products, 2, size) if products.dim() == 4
                              else (products, None))
    return ((out, hy, cy, gates, cells, products),
            (out_dim, hy_dim, cy_dim, gates_dim, cells_dim, products_dim))


@torch.library.register_vmap("lstm_fused::layer_backward")
def _layer_backward_vmap(info, in_dims, grad_output, grad_hy, grad_cy, input, hx, cx, params,
                         output, gates, cells, products, batch_sizes, record_flow, options,
                         masks):
    (go_dim, ghy_dim, gcy_dim, x_dim, hx_dim, cx_dim, param_dims, out_dim, gates_dim,
     cells_dim, products_dim, bs_dim, _, _, mask_dims) = in_dims
    _refuse(bs_dim, "layer_backward")
    op = torch.ops.lstm_fused.layer_backward.default
    results = [op(_select(grad_output, go_dim, v), _select(grad_hy, ghy_dim, v),
                  _select(grad_cy, gcy_dim, v), _select(input, x_dim, v),
                  _select(hx, hx_dim, v), _select(cx, cx_dim, v),
                  [_select(p, d, v) for p, d in zip(params, param_dims)],
                  _select(output, out_dim, v), _select(gates, gates_dim, v),
                  _select(cells, cells_dim, v), _select(products, products_dim, v),
                  batch_sizes, record_flow, options,
                  [_select(m, d, v) for m, d in zip(masks, mask_dims)])
               for v in range(info.batch_size)]
    return _stack(results)
