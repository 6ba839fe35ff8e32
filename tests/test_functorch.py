"""torch.func on lstm_fused.LSTM: vmap over inputs (the batching rule folds the vmap dimension
into the batch) and over stacked parameters (ensembles), grad, jacrev, jacfwd, hessians, and
gradcheck / gradgradcheck with check_batched_grad=True.

Compared with nn.LSTM wherever nn.LSTM has the feature; where it has none (vmap of the module,
ensembles: aten::lstm has no batching rule) with a loop over the vmap dimension, of nn.LSTM
calls on the same weights.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.func import (functional_call, grad, hessian, jacfwd, jacrev, stack_module_state,
                        vmap)
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstm_fused
from lstm_fused import _ops
from lstm_fused.functional import backend_unavailable_reason

from conftest import TOL, make_pair

pytestmark = [
    pytest.mark.skipif(backend_unavailable_reason("fused") is not None,
                       reason=str(backend_unavailable_reason("fused"))),
    # nn.LSTM's "LSTM with projections is not supported with oneDNN" and the like
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

DT = torch.float64
CONFIGS = {
    "1layer": dict(input_size=3, hidden_size=4),
    "2layers-bi": dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True),
    "proj": dict(input_size=3, hidden_size=4, proj_size=2),
    "2layers-bi-proj-batch_first": dict(input_size=3, hidden_size=4, num_layers=2,
                                        bidirectional=True, proj_size=2, batch_first=True),
}
V = 3  # vmap size


def pair(name, **extra):
    return make_pair("fused", DT, **CONFIGS[name], **extra)


def rnd(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def state_shapes(m, batch):
    D = 2 if m.bidirectional else 1
    P = m.proj_size or m.hidden_size
    lead = (m.num_layers * D,) if batch is None else (m.num_layers * D, batch)
    return (*lead, P), (*lead, m.hidden_size)


def assert_close(got, want, what=""):
    for i, (a, b) in enumerate(zip(torch.utils._pytree.tree_leaves(got),
                                   torch.utils._pytree.tree_leaves(want), strict=True)):
        torch.testing.assert_close(a, b, **TOL[DT], msg=lambda m, i=i: f"{what} [{i}]: {m}")


def stacked(results):
    return torch.utils._pytree.tree_map(lambda *t: torch.stack(t), *results)


def outputs(m):
    """The module as a function of (input, h0, c0) returning all it computes."""
    def f(x, h0=None, c0=None):
        out, (h, c) = m(x, None if h0 is None else (h0, c0))
        return out, h, c
    return f


# -- vmap over the data ----------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("state", ["none", "batched", "shared"])
def test_vmap_over_inputs_matches_a_loop_of_nn_lstm(cfg, state):
    ref, ours = pair(cfg)
    T, B = 5, 2
    x = rnd(V, *((B, T) if ours.batch_first else (T, B)), ours.input_size)
    hshape, cshape = state_shapes(ours, B)
    if state == "none":
        got = vmap(outputs(ours))(x)
        want = stacked([outputs(ref)(x[v]) for v in range(V)])
    elif state == "batched":
        h0, c0 = rnd(V, *hshape, seed=2), rnd(V, *cshape, seed=3)
        got = vmap(outputs(ours))(x, h0, c0)
        want = stacked([outputs(ref)(x[v], h0[v], c0[v]) for v in range(V)])
    else:  # one initial state for every vmap element; in_dims None
        h0, c0 = rnd(*hshape, seed=2), rnd(*cshape, seed=3)
        got = vmap(outputs(ours), in_dims=(0, None, None))(x, h0, c0)
        want = stacked([outputs(ref)(x[v], h0, c0) for v in range(V)])
    assert_close(got, want, "vmap")


def test_vmap_over_other_dims_and_over_the_state_alone():
    ref, ours = pair("2layers-bi")
    x = rnd(5, V, 2, 3)  # vmap dim 1
    got = vmap(outputs(ours), in_dims=1, out_dims=1)(x)
    want = torch.utils._pytree.tree_map(lambda t: t.movedim(0, 1),
                                        stacked([outputs(ref)(x[:, v]) for v in range(V)]))
    assert_close(got, want, "in_dims=1")
    # only h0/c0 vmapped (the input is shared): the input is expanded
    hshape, cshape = state_shapes(ours, 2)
    x, h0, c0 = rnd(5, 2, 3), rnd(*hshape, V, seed=2), rnd(*cshape, V, seed=3)
    got = vmap(outputs(ours), in_dims=(None, 3, 3))(x, h0, c0)
    want = stacked([outputs(ref)(x, h0[..., v], c0[..., v]) for v in range(V)])
    assert_close(got, want, "state only")


def test_vmap_over_unbatched_inputs():
    ref, ours = pair("2layers-bi-proj-batch_first")
    x = rnd(V, 5, 3)  # each element a 2-D (T, I) sequence
    got = vmap(outputs(ours))(x)
    want = stacked([outputs(ref)(x[v]) for v in range(V)])
    assert_close(got, want, "unbatched")


@pytest.mark.parametrize("with_state", [False, True])
def test_vmap_over_packed_data(with_state):
    """One packing (batch_sizes, indices) for every vmap element, vmapped data: the rule
    folds it into one packing with batch_sizes * V."""
    ref, ours = pair("2layers-bi-proj-batch_first")
    lengths = torch.tensor([2, 5, 3])
    x = rnd(V, 3, 5, 3)
    packs = [pack_padded_sequence(x[v], lengths, batch_first=True, enforce_sorted=False)
             for v in range(V)]
    data = torch.stack([p.data for p in packs])
    meta = (packs[0].batch_sizes, packs[0].sorted_indices, packs[0].unsorted_indices)
    hshape, cshape = state_shapes(ours, 3)
    h0, c0 = rnd(V, *hshape, seed=2), rnd(V, *cshape, seed=3)

    def f(m):
        def run(d, h, c):
            out, (hy, cy) = m(PackedSequence(d, *meta), (h, c) if with_state else None)
            return out.data, hy, cy
        return run

    got = vmap(f(ours))(data, h0, c0)
    want = stacked([f(ref)(data[v], h0[v], c0[v]) for v in range(V)])
    assert_close(got, want, "packed")


def test_autograd_through_a_vmapped_forward():
    """Ordinary autograd outside vmap: the folded call is differentiated as a whole."""
    ref, ours = pair("2layers-bi")
    x = rnd(V, 5, 2, 3)
    loss_ours = vmap(lambda t: ours(t)[0])(x).pow(2).sum()
    loss_ref = torch.stack([ref(x[v])[0] for v in range(V)]).pow(2).sum()
    assert_close(torch.autograd.grad(loss_ours, list(ours.parameters())),
                 torch.autograd.grad(loss_ref, list(ref.parameters())), "param grads")


def test_vmap_refuses_flow_recording_and_a_vmapped_batch_sizes():
    _, ours = pair("1layer")
    x = rnd(V, 5, 2, 3)
    with lstm_fused.record_gradient_flow(ours):
        with pytest.raises(NotImplementedError, match="gradient-flow recording"):
            vmap(lambda t: ours(t)[0])(x)
    w = list(ours.parameters())
    hx = torch.zeros(1, 2, 4, dtype=DT)
    bs = torch.tensor([[2, 2], [2, 1], [2, 2]])  # one packing per element

    def op(d, b):
        return torch.ops.lstm_fused.layer_forward(d, hx, hx, w, b, None,
                                                  lstm_fused.options.LayerOptions().to_list(),
                                                  [])[0]

    with pytest.raises(NotImplementedError, match="vmapped batch_sizes"):
        vmap(op)(rnd(V, 4, 3), bs)


# -- vmap over stacked parameters (ensembles) ------------------------------------------------

def ensemble(cfg="2layers-bi-proj-batch_first", n=3):
    models = [make_pair("fused", DT, seed=s, **CONFIGS[cfg]) for s in range(n)]
    params, buffers = stack_module_state([ours for _, ours in models])
    base = lstm_fused.LSTM(**CONFIGS[cfg], dtype=DT, device="meta")

    def call(p, b, x):
        out, (h, c) = functional_call(base, (p, b), (x,))
        return out, h, c

    return models, params, buffers, call


@pytest.mark.parametrize("shared_input", [True, False])
def test_vmap_over_stacked_parameters_matches_a_loop(shared_input):
    models, params, buffers, call = ensemble()
    x = rnd(3, 2, 5, 3) if not shared_input else rnd(2, 5, 3)
    in_dims = (0, 0, None if shared_input else 0)
    got = vmap(call, in_dims=in_dims)(params, buffers, x)
    want = stacked([outputs(ref)(x if shared_input else x[i])
                    for i, (ref, _) in enumerate(models)])
    assert_close(got, want, "ensemble")


@pytest.mark.parametrize("detach", [True, False], ids=["detached", "requires_grad"])
def test_per_member_gradients_of_an_ensemble(detach):
    """vmap(grad(loss)) over the stacked parameters, the way ensembles are trained: the fused
    backward runs per member (the layer_backward batching rule), against nn.LSTM's
    autograd member by member."""
    models, params, buffers, call = ensemble()
    if detach:
        params = {k: v.detach() for k, v in params.items()}
    x = rnd(3, 2, 5, 3)

    def loss(p, b, t):
        out, h, c = call(p, b, t)
        return out.pow(2).sum() + h.sum() + c.pow(2).sum()

    got = vmap(grad(loss))(params, buffers, x)
    want = []
    for i, (ref, _) in enumerate(models):
        out, (h, c) = ref(x[i])
        names = [n for n, _ in ref.named_parameters()]
        gs = torch.autograd.grad(out.pow(2).sum() + h.sum() + c.pow(2).sum(),
                                 list(ref.parameters()))
        want.append(dict(zip(names, gs)))
    assert_close(got, stacked(want), "per-member grads")


# -- grad, jacrev, jacfwd, hessians against nn.LSTM ------------------------------------------

@pytest.fixture
def count_fused_backward(monkeypatch):
    """Counts the fused backward calls made by the autograd formula."""
    calls = []
    original = _ops.layer_backward

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(_ops, "layer_backward", counting)
    return calls


def module_loss(m):
    def loss(x, h0, c0):
        out, (h, c) = m(x, (h0, c0))
        return out.pow(2).sum() + h.pow(2).sum() * c.sum()
    return loss


def loss_inputs(m, T=4, B=2):
    hshape, cshape = state_shapes(m, B)
    shape = (B, T) if m.batch_first else (T, B)
    return rnd(*shape, m.input_size), rnd(*hshape, seed=2), rnd(*cshape, seed=3)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_grad_matches_nn_lstm(cfg, count_fused_backward):
    ref, ours = pair(cfg)
    args = loss_inputs(ours)
    got = grad(module_loss(ours), argnums=(0, 1, 2))(*args)
    # one torch.func level: the fused backward serves (not the reference recomputation)
    assert count_fused_backward
    assert_close(got, grad(module_loss(ref), argnums=(0, 1, 2))(*args), "grad")

    # with respect to the parameters, through functional_call
    def by_params(m):
        def f(p, *a):
            return module_loss(lambda *x: functional_call(m, p, x))(*a)
        return f

    p_ours = {k: v.detach() for k, v in ours.named_parameters()}
    p_ref = {k: v.detach() for k, v in ref.named_parameters()}
    assert_close(grad(by_params(ours))(p_ours, *args), grad(by_params(ref))(p_ref, *args),
                 "grad params")


def reference_jacobian(transform, f, args):
    """nn.LSTM's jacobian: torch.func where it works, else torch.autograd.functional. (nn.LSTM
    fails under every torch.func transform with packed input on the CPU: "Cannot access data
    pointer of Tensor that doesn't have storage".)"""
    try:
        return transform(f, argnums=tuple(range(len(args))))(*args)
    except RuntimeError as e:
        if "data pointer" not in str(e):
            raise
    return torch.autograd.functional.jacobian(f, args)


@pytest.mark.parametrize("cfg", ["1layer", "2layers-bi-proj-batch_first"])
@pytest.mark.parametrize("transform", [jacrev, jacfwd])
def test_jacobians_match_nn_lstm(cfg, transform):
    ref, ours = pair(cfg)
    args = loss_inputs(ours, T=3)
    got = transform(outputs(ours), argnums=(0, 1, 2))(*args)
    assert_close(got, reference_jacobian(transform, outputs(ref), args), transform.__name__)


@pytest.mark.parametrize("transform", [jacrev, jacfwd])
def test_jacobians_of_packed_input_match_nn_lstm(transform):
    """With respect to the packed data (pack_padded_sequence itself has no forward-mode
    derivative, for nn.LSTM too)."""
    ref, ours = pair("2layers-bi")
    pack = pack_padded_sequence(rnd(2, 3, 3), torch.tensor([3, 1]), batch_first=True,
                                enforce_sorted=False)
    meta = (pack.batch_sizes, pack.sorted_indices, pack.unsorted_indices)

    def f(m):
        def run(data):
            out, (h, c) = m(PackedSequence(data, *meta))
            return out.data, h, c
        return run

    got = transform(f(ours), argnums=(0,))(pack.data)
    assert_close(got, reference_jacobian(transform, f(ref), (pack.data,)), transform.__name__)


@pytest.mark.parametrize("cfg", ["2layers-bi", "proj"])
@pytest.mark.parametrize("second_order", ["hessian", "jacrev(jacrev)", "grad(grad)"])
def test_second_order_matches_nn_lstm(cfg, second_order):
    """Two differentiating levels: the inner backward is recomputed through the reference;
    the outer one differentiates both it and the fused forward."""
    ref, ours = pair(cfg)
    x = rnd(3, 2, 3)

    def loss(m):
        def f(t):
            out, (h, c) = m(t)
            return out.pow(2).sum() + h.pow(2).sum() * c.sum()
        return f

    def run(m):
        if second_order == "hessian":
            return hessian(loss(m))(x)
        if second_order == "jacrev(jacrev)":
            return jacrev(jacrev(loss(m)))(x)
        return grad(lambda t: grad(loss(m))(t).pow(2).sum())(x)

    assert_close(run(ours), run(ref), second_order)


def test_forward_ad_matches_nn_lstm():
    """Ordinary forward-mode AD (dual tensors), outside torch.func."""
    import torch.autograd.forward_ad as fwAD

    ref, ours = pair("2layers-bi-proj-batch_first")
    x, h0, c0 = loss_inputs(ours)
    tangent = rnd(*x.shape, seed=4)
    results = []
    for m in (ours, ref):
        with fwAD.dual_level():
            out, (h, c) = m(fwAD.make_dual(x, tangent), (h0, c0))
            results.append([fwAD.unpack_dual(t).tangent for t in (out, h, c)])
    assert_close(results[0], results[1], "tangents")


# -- gradcheck / gradgradcheck with batched gradients ----------------------------------------

GRADCHECK_CASES = {
    "1layer": (dict(input_size=2, hidden_size=3), None),
    "2layers-bi-proj": (dict(input_size=2, hidden_size=3, num_layers=2, bidirectional=True,
                             proj_size=2), None),
    "packed-bi": (dict(input_size=2, hidden_size=3, bidirectional=True), [3, 1]),
}


def gradcheck_function(case):
    """(f, inputs): f of the input (for packed cases the packed data), h0, c0 and every
    parameter, returning output, h_n, c_n."""
    cfg, lengths = GRADCHECK_CASES[case]
    _, ours = make_pair("fused", DT, **cfg)
    names = [n for n, _ in ours.named_parameters()]
    B, T = 2, 3
    x = rnd(T, B, ours.input_size)
    meta = None
    if lengths is not None:  # f takes the packed data: packing has no forward-mode derivative
        pack = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        x, meta = pack.data, (pack.batch_sizes, pack.sorted_indices, pack.unsorted_indices)

    def f(x, h0, c0, *params):
        inp = x if meta is None else PackedSequence(x, *meta)
        out, (h, c) = functional_call(ours, dict(zip(names, params)), (inp, (h0, c0)))
        return (out if meta is None else out.data), h, c

    hshape, cshape = state_shapes(ours, B)
    inputs = [x, rnd(*hshape, seed=2), rnd(*cshape, seed=3),
              *[p.detach().clone() for p in ours.parameters()]]
    return f, [t.requires_grad_() for t in inputs]


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck_with_batched_grad_and_forward_ad(case):
    f, inputs = gradcheck_function(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy vmap's deprecation warnings
        assert torch.autograd.gradcheck(f, inputs, check_batched_grad=True,
                                        check_forward_ad=True, check_batched_forward_grad=True)


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradgradcheck_with_batched_grad(case):
    f, inputs = gradcheck_function(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.autograd.gradgradcheck(f, inputs, check_batched_grad=True)


@pytest.mark.parametrize("packed", [False, True])
def test_the_fused_backward_is_differentiable(packed):
    """layer_backward's own derivative (through the reference) against the double backward
    of the reference layer: ordinary autograd through the results of the fused backward."""
    _, ours = pair("2layers-bi-proj-batch_first")
    w = [p.detach().clone().requires_grad_() for p in ours.parameters()][:10]  # layer 0
    options = lstm_fused.options.LayerOptions(has_proj=True, bidirectional=True).to_list()
    if packed:
        bs = torch.tensor([2, 2, 1])
        x = rnd(5, 3).requires_grad_()
    else:
        bs = None
        x = rnd(3, 2, 3).requires_grad_()
    hx, cx = rnd(2, 2, 2, seed=2).requires_grad_(), rnd(2, 2, 4, seed=3).requires_grad_()
    with torch.no_grad():
        out, hy, cy, gates, cells, products = torch.ops.lstm_fused.layer_forward(
            x, hx, cx, w, bs, None, options, [])
    g_out = rnd(*out.shape, seed=4).requires_grad_()
    g_hy = rnd(*hy.shape, seed=5).requires_grad_()
    leaves = [g_out, g_hy, x, hx, cx, *w]

    def second_order(first):
        loss = sum((f * rnd(*f.shape, seed=10 + i)).sum() for i, f in enumerate(first))
        return torch.autograd.grad(loss, leaves)

    gi, ghx, gcx, gparams, _ = torch.ops.lstm_fused.layer_backward(
        g_out, g_hy, None, x, hx, cx, w, out, gates, cells, products, bs, False, options, [])
    got = second_order([gi, ghx, gcx, *gparams])
    ref_out, ref_hy, _ = lstm_fused.reference.lstm_layer(
        x, hx, cx, w, batch_sizes=bs, options=lstm_fused.options.LayerOptions.from_list(options))
    first = torch.autograd.grad((ref_out, ref_hy), [x, hx, cx, *w], (g_out, g_hy),
                                create_graph=True)
    assert_close(got, second_order(first), "second order")


def test_base_nn_lstm_has_no_vmap():
    """What the tests above stand in for: nn.LSTM has no batching rule."""
    ref, _ = pair("1layer")
    with pytest.raises(RuntimeError, match="Batching rule not implemented"):
        vmap(lambda t: ref(t)[0])(rnd(V, 5, 2, 3))
    assert isinstance(ref, nn.LSTM)


def test_ordinary_autograd_through_torch_func_grad():
    """torch.func.grad of a module whose parameters require grad, then ordinary autograd of
    that gradient with respect to the parameters: differentiates the fused backward (the one
    torch.func level ran it), against nn.LSTM's double backward."""
    ref, ours = pair("2layers-bi")
    x = rnd(4, 2, 3)

    def input_grad_then_param_grad(m):
        g = grad(lambda t: m(t)[0].pow(2).sum())(x)
        return torch.autograd.grad(g.pow(2).sum(), list(m.parameters()))

    assert_close(input_grad_then_param_grad(ours), input_grad_then_param_grad(ref), "grad")


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_compiled_transforms_match_eager(transform):
    _, ours = pair("2layers-bi")
    if transform == "vmap":
        f, x = vmap(lambda t: ours(t)[0]), rnd(V, 4, 2, 3)
    else:
        f, x = grad(lambda t: ours(t)[0].pow(2).sum()), rnd(4, 2, 3)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert_close(compiled(x), f(x), transform)
